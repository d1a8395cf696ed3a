"""``InfluenceScores``: what every estimator returns (one score per training-sample id).

Besides the ``(N, Q)`` array it gives the answer as a table: one row per query and rank (method, query, window,
rank, id, score, label, flipped when known), as a pandas DataFrame (``to_pandas()``, when pandas is installed) or
CSV/JSON text (``to_csv()``, ``to_json()``), and the top ``k`` rows with their scores (``top(k)``). The table is
:func:`table_rows` and :func:`rows_csv`, which the CLI's ``query`` writes too: the same scores give the same CSV from
Python and from the CLI.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Sequence

import numpy as np

from lightning_influence.queries import query_column


@dataclass
class InfluenceScores:
    """Scores of every training sample id for one or several queries over one window.

    Sign (docs/influence-math.md §2): a positive score means removing the sample *raises* the query
    ``f``; for a loss query, positive = helpful, negative = harmful.

    Attributes:
        scores: ``(N, Q)`` float64; row ``i`` is sample id ``i``.
        method: estimator name, e.g. ``"tracin"``, ``"dit"``, ``"dit-local (approx.)"``.
        window: the half-open step range ``[t1, t2)``.
        query_names: names of the ``Q`` query columns.
        info: estimator details (steps swept, approximations, timings).
        labels: ``(N,)`` training labels by id (``-1`` where unknown), or ``None``; see
            :meth:`with_labels`.
        flipped: the ids known to carry a flipped (corrupted) label, or ``None`` where unknown; see
            :meth:`with_labels`.
    """

    scores: np.ndarray
    method: str
    window: tuple[int, int]
    query_names: list[str]
    info: dict[str, Any] = field(default_factory=dict)
    labels: np.ndarray | None = None
    flipped: frozenset[int] | None = None

    def __post_init__(self) -> None:
        self.scores = np.asarray(self.scores, dtype=np.float64)
        if self.scores.ndim == 1:
            self.scores = self.scores[:, None]
        if self.scores.shape[1] != len(self.query_names):
            raise ValueError(f"{self.scores.shape[1]} score columns but {len(self.query_names)} query names")

    def column(self, query: int | str = 0) -> np.ndarray:
        """The ``(N,)`` scores of one query (by index or name)."""
        return self.scores[:, query_column(self.query_names, query)]

    @property
    def ids(self) -> np.ndarray:
        """The training-sample ids, ``0..N-1`` (row ``i`` is id ``i``)."""
        return np.arange(self.scores.shape[0])

    def with_labels(self, labels: Any, flipped: Collection[int] | None = None) -> "InfluenceScores":
        """A copy carrying the training labels: an ``(N,)`` array, or the training dataset (``ds[i]`` is
        ``(x, y, ...)`` or a dict with ``y``/``label``/``labels``/``target``); and, where known, the ids whose label was
        flipped (a ``flipped`` column in the tables, as the CLI writes for a datamodule with ``flipped``)."""
        n = self.scores.shape[0]
        if hasattr(labels, "__getitem__") and hasattr(labels, "__len__") and not hasattr(labels, "shape") \
                and len(labels) and isinstance(labels[0], (tuple, list, dict)):
            labels = [item_label(labels[i]) for i in range(n)]
        arr = np.asarray(labels).reshape(-1)
        if len(arr) != n:
            raise ValueError(f"{len(arr)} labels for {n} samples")
        marked = None if flipped is None else frozenset(int(i) for i in np.asarray(flipped).reshape(-1))
        return replace(self, labels=arr.astype(np.int64), flipped=marked)

    def rank(self, query: int | str = 0, harmful: bool = True) -> np.ndarray:
        """Each sample's rank (1 = most harmful: most negative, or for self-influence most positive; ``harmful=False``:
        the other end first)."""
        order = self._order(query, harmful)
        ranks = np.empty(len(order), dtype=np.int64)
        ranks[order] = np.arange(1, len(order) + 1)
        return ranks

    def _order(self, query: int | str, harmful: bool) -> np.ndarray:
        """Most harmful first: the most negative score of a query; of self-influence (query ``"self"``) the largest,
        where mislabelled samples are (as :func:`lightning_influence.tasks.harmful_order`)."""
        name = self.query_names[query_column(self.query_names, query)]
        sort = sort_order(None, name)
        return ranked(self.column(query), sort if harmful else _OTHER_END[sort], None)

    def top(self, k: int, harmful: bool = True, query: int | str = 0) -> "Ranking":
        """The ``k`` most harmful (most negative; for self-influence most positive, the mislabelled candidates) or, with
        ``harmful=False``, the other end, with their scores."""
        ids = self._order(query, harmful)[:k]
        name = self.query_names[query] if isinstance(query, int) else query
        marked = None if self.flipped is None else np.array([int(i) in self.flipped for i in ids], dtype=bool)
        return Ranking(ids, self.column(query)[ids], None if self.labels is None else self.labels[ids], name, harmful,
                       marked, None if self.flipped is None else (len(self.flipped), self.scores.shape[0]))

    def rows(self, top: int | None = None, sort: str | None = None) -> list[dict[str, Any]]:
        """The table (:func:`table_rows`): per query, its samples in ``sort`` order (default: most harmful first, as
        :meth:`rank`), the first ``top`` (default all), each a dict of method, query, window, t1, t2, rank, id, score,
        label (``None`` where unknown) and, where known, flipped."""
        return table_rows(self, top=top, sort=sort, labels=None if self.labels is None else self.labels.__getitem__,
                          flipped=self.flipped)

    def to_pandas(self, top: int | None = None, sort: str | None = None) -> Any:
        """The :meth:`rows` as a ``pandas.DataFrame`` (needs pandas; else use :meth:`to_csv`)."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("to_pandas() needs pandas (pip install pandas); to_csv() and to_json() need nothing") from None
        return pd.DataFrame(self.rows(top, sort), columns=table_columns(self.flipped is not None))

    def to_csv(self, path: str | Path | None = None, top: int | None = None, sort: str | None = None) -> str:
        """The :meth:`rows` as CSV text (written to ``path`` when given): what ``lightning-influence query --format csv
        --top 0`` writes for the same scores and window."""
        return _written(rows_csv(self.rows(top, sort), self.flipped is not None), path)

    def to_json(self, path: str | Path | None = None, top: int | None = None, sort: str | None = None) -> str:
        """Method, window, query names and the :meth:`rows` as JSON text (written to ``path`` when given)."""
        text = strict_json({"method": self.method, "window": list(self.window), "query_names": self.query_names,
                            "rows": self.rows(top, sort)}, indent=1)
        return _written(text, path)


def strict_json(obj: Any, indent: int | None = None) -> str:
    """``obj`` as strict JSON text (what JavaScript's ``JSON.parse`` and jq read): a NaN or infinite float (an undefined
    correlation, a score not computed) becomes ``null``, numpy scalars and arrays their Python values, a tuple or set
    a list, anything else its ``str``. Python's own ``NaN``/``Infinity`` tokens are never written."""
    return json.dumps(_json_values(obj), indent=indent, allow_nan=False)


def _json_values(o: Any) -> Any:
    if isinstance(o, dict):
        return {k: _json_values(v) for k, v in o.items()}
    if isinstance(o, (list, tuple, set, frozenset)):
        return [_json_values(v) for v in o]
    if isinstance(o, np.ndarray):
        return _json_values(o.tolist())
    if isinstance(o, (bool, np.bool_)):  # a JSON true/false, never the string "True"
        return bool(o)
    if isinstance(o, (int, np.integer)):
        return int(o)
    if isinstance(o, (float, np.floating)):
        return float(o) if np.isfinite(o) else None
    if o is None or isinstance(o, str):
        return o
    return str(o)


def grid_column(grid: np.ndarray, t: int, what: str) -> int:
    """The column of step ``t`` in values on a grid of steps (``what``: the grid's name, for the message), for the
    results that hold one column per grid step (``Timeline``, replay leave-one-out)."""
    hits = np.nonzero(grid == t)[0]
    if not len(hits):
        raise ValueError(f"step {t} is not on the {what} grid {grid.tolist()}")
    return int(hits[0])


@dataclass
class Ranking:
    """The top rows of :meth:`InfluenceScores.top`: ``ids``, ``scores`` and ``labels`` (or ``None``), best first, and
    after ``with_labels(..., flipped=)`` whether each label was flipped (``flipped``; ``flipped_overall``: how many of
    how many samples are).

    Iterating yields ``(id, score)`` pairs; ``print()`` shows a table (as the CLI's ``query``).
    """

    ids: np.ndarray
    scores: np.ndarray
    labels: np.ndarray | None
    query: str
    harmful: bool = True
    flipped: np.ndarray | None = None
    flipped_overall: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[tuple[int, float]]:
        return iter(zip(self.ids.tolist(), self.scores.tolist()))

    def __str__(self) -> str:
        head = f"{'rank':>4} {'id':>6} {'score':>12}" + (f" {'label':>5}" if self.labels is not None else "") \
            + (" flipped" if self.flipped is not None else "")
        if self.query == "self":  # self-influence: high = fitted only because trained on (mislabelled candidates)
            title = "highest self-influence (look here for mislabelled samples):" if self.harmful else \
                "lowest self-influence:"
        else:
            title = f"most {'harmful' if self.harmful else 'helpful'} for {self.query}:"
        lines = [title, head]
        for r, (i, s) in enumerate(self, 1):
            label = f" {int(self.labels[r - 1]):>5}" if self.labels is not None else ""
            flip = f" {'yes' if self.flipped[r - 1] else '':>7}" if self.flipped is not None else ""
            lines.append(f"{r:>4} {i:>6} {s:>12.4e}{label}{flip}".rstrip())
        if self.flipped is not None and self.flipped_overall is not None and len(self):
            lines.append(flipped_summary(int(self.flipped.sum()), len(self), *self.flipped_overall))
        return "\n".join(lines)


def flipped_summary(hits: int, k: int, total: int, n: int) -> str:
    """How many of ``k`` listed samples carry a flipped label, against ``total`` of the ``n`` training samples."""
    return f"flipped labels among these {k}: {hits} ({hits / k:.0%}); {total} of {n} ({total / n:.0%}) are flipped overall"


SORTS = ("negative", "positive", "abs")
_OTHER_END = {"negative": "positive", "positive": "negative"}  # the other end of a default order


def sort_order(sort: str | None, query: str) -> str:
    """``sort`` as given (one of :data:`SORTS`), or its default for ``query``: the most self-influential first for
    self-influence (query ``"self"``, where mislabelled samples are), the most negative (for a loss: the most harmful)
    first otherwise."""
    if sort is not None and sort not in SORTS:
        raise ValueError(f"sort must be one of {SORTS}, got {sort!r}")
    return sort or ("positive" if query == "self" else "negative")


def ranked(scores: np.ndarray, sort: str, top: int | None) -> np.ndarray:
    """Ids ordered by ``sort`` (``negative``: most negative first, ``positive``, ``abs``), the first ``top``."""
    key = {"negative": scores, "positive": -scores, "abs": -np.abs(scores)}[sort]
    order = np.argsort(key, kind="stable")
    return order if not top else order[:top]


_COLUMNS = ["method", "query", "window", "t1", "t2", "rank", "id", "score", "label"]


def table_columns(flipped: bool) -> list[str]:
    """The columns of the score table (:func:`table_rows`), with ``flipped`` where flipped labels are known."""
    return _COLUMNS + (["flipped"] if flipped else [])


def table_rows(scores: InfluenceScores, *, top: int | None = None, sort: str | None = None,
               labels: Callable[[np.ndarray], Any] | None = None, flipped: Collection[int] | None = None,
               query: int | None = None) -> list[dict[str, Any]]:
    """The score table of :meth:`InfluenceScores.rows` and the CLI's ``query``: for each query (or only column
    ``query``), its samples ordered by ``sort`` (:func:`sort_order`), the first ``top`` (``None``/0: all), one row each
    with its rank in that order, its label (``labels(ids)``, ``-1``/``None`` where unknown) and, with ``flipped``,
    whether its label was flipped. ``window`` is ``"t1:t2"``, steps (what ``--window`` takes)."""
    t1, t2 = (int(t) for t in scores.window)
    out = []
    for q in range(len(scores.query_names)) if query is None else [query]:
        name = scores.query_names[q]
        s = scores.scores[:, q]
        ids = ranked(s, sort_order(sort, name), top)
        known = np.full(len(ids), -1) if labels is None else np.asarray(labels(ids)).reshape(-1)
        for r, (i, lb) in enumerate(zip(ids.tolist(), known.tolist()), 1):
            row = {"method": scores.method, "query": name, "window": f"{t1}:{t2}", "t1": t1, "t2": t2, "rank": r,
                   "id": i, "score": float(s[i]), "label": int(lb) if lb >= 0 else None}
            if flipped is not None:
                row["flipped"] = i in flipped
            out.append(row)
    return out


def rows_csv(rows: Sequence[dict[str, Any]], flipped: bool) -> str:
    """:func:`table_rows` (of one or several windows) as CSV text."""
    header = table_columns(flipped)
    return csv_text(header, [[row.get(k) for k in header] for row in rows])


def csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """CSV text: an empty cell for ``None``, floats as ``repr`` (they read back exactly)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        w.writerow(["" if c is None else (repr(float(c)) if isinstance(c, (float, np.floating)) else c) for c in r])
    return buf.getvalue()


LABEL_KEYS = ("y", "label", "labels", "target", "targets")


def item_label(item: Any) -> int:
    """The integer label of a training item: ``item[1]`` of a tuple ``(x, y, ...)``, a dict's ``y``/``label``/...
    entry; ``-1`` when there is none or it is not an integer (a regression target, a sequence)."""
    try:
        if isinstance(item, dict):
            value = next((item[k] for k in LABEL_KEYS if k in item), None)
        else:
            value = item[1] if len(item) > 1 else None
        value = value.item() if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1 else value
        return int(value) if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else -1
    except Exception:
        return -1


def _written(text: str, path: str | Path | None) -> str:
    if path is not None:
        Path(path).write_text(text)
    return text
