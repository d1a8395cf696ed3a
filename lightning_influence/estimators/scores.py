"""``InfluenceScores``: what every estimator returns (one score per training-sample id).

Besides the ``(N, Q)`` array it gives the answer as a table: ids, scores, labels (when known)
and ranks, as a pandas DataFrame (``to_pandas()``, when pandas is installed) or CSV/JSON text
(``to_csv()``, ``to_json()``), and the top ``k`` rows with their scores (``top(k)``).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np


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
    """

    scores: np.ndarray
    method: str
    window: tuple[int, int]
    query_names: list[str]
    info: dict[str, Any] = field(default_factory=dict)
    labels: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.scores = np.asarray(self.scores, dtype=np.float64)
        if self.scores.ndim == 1:
            self.scores = self.scores[:, None]
        if self.scores.shape[1] != len(self.query_names):
            raise ValueError(f"{self.scores.shape[1]} score columns but {len(self.query_names)} query names")

    def column(self, query: int | str = 0) -> np.ndarray:
        """The ``(N,)`` scores of one query (by index or name)."""
        q = self.query_names.index(query) if isinstance(query, str) else query
        return self.scores[:, q]

    @property
    def ids(self) -> np.ndarray:
        """The training-sample ids, ``0..N-1`` (row ``i`` is id ``i``)."""
        return np.arange(self.scores.shape[0])

    def with_labels(self, labels: Any) -> "InfluenceScores":
        """A copy carrying the training labels: an ``(N,)`` array, or the training dataset (``ds[i]`` is
        ``(x, y, ...)`` or a dict with ``y``/``label``/``labels``/``target``)."""
        n = self.scores.shape[0]
        if hasattr(labels, "__getitem__") and hasattr(labels, "__len__") and not hasattr(labels, "shape") \
                and len(labels) and isinstance(labels[0], (tuple, list, dict)):
            labels = [item_label(labels[i]) for i in range(n)]
        arr = np.asarray(labels).reshape(-1)
        if len(arr) != n:
            raise ValueError(f"{len(arr)} labels for {n} samples")
        return replace(self, labels=arr.astype(np.int64))

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
        s = self.column(query)
        name = query if isinstance(query, str) else self.query_names[query]
        return np.argsort(s if harmful != (name == "self") else -s, kind="stable")

    def top(self, k: int, harmful: bool = True, query: int | str = 0) -> "Ranking":
        """The ``k`` most harmful (most negative; for self-influence most positive, the mislabelled candidates) or, with
        ``harmful=False``, the other end, with their scores."""
        ids = self._order(query, harmful)[:k]
        name = self.query_names[query] if isinstance(query, int) else query
        return Ranking(ids, self.column(query)[ids], None if self.labels is None else self.labels[ids], name, harmful)

    def rows(self) -> list[dict[str, Any]]:
        """One dict per sample: ``id``, ``label`` (when known), and per query its score and rank (1 = most harmful, :meth:`rank`)."""
        single = len(self.query_names) == 1
        cols: dict[str, np.ndarray] = {"id": self.ids}
        if self.labels is not None:
            cols["label"] = self.labels
        for q, name in enumerate(self.query_names):
            cols["score" if single else f"score[{name}]"] = self.scores[:, q]
            cols["rank" if single else f"rank[{name}]"] = self.rank(q)
        return [{k: v[i].item() for k, v in cols.items()} for i in range(self.scores.shape[0])]

    def to_pandas(self) -> Any:
        """The :meth:`rows` as a ``pandas.DataFrame`` indexed by id (needs pandas; else use :meth:`to_csv`)."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("to_pandas() needs pandas (pip install pandas); to_csv() and to_json() need nothing") from None
        return pd.DataFrame(self.rows()).set_index("id")

    def to_csv(self, path: str | Path | None = None) -> str:
        """The :meth:`rows` as CSV text (written to ``path`` when given)."""
        rows = self.rows()
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["id"], lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: repr(v) if isinstance(v, float) else v for k, v in r.items()} for r in rows)
        return _written(buf.getvalue(), path)

    def to_json(self, path: str | Path | None = None) -> str:
        """Method, window, query names and the :meth:`rows` as JSON text (written to ``path`` when given)."""
        text = json.dumps({"method": self.method, "window": list(self.window), "query_names": self.query_names,
                           "rows": self.rows()}, indent=1)
        return _written(text, path)


@dataclass
class Ranking:
    """The top rows of :meth:`InfluenceScores.top`: ``ids``, ``scores`` and ``labels`` (or ``None``), best first.

    Iterating yields ``(id, score)`` pairs; ``print()`` shows a table.
    """

    ids: np.ndarray
    scores: np.ndarray
    labels: np.ndarray | None
    query: str
    harmful: bool = True

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[tuple[int, float]]:
        return iter(zip(self.ids.tolist(), self.scores.tolist()))

    def __str__(self) -> str:
        head = f"{'rank':>4} {'id':>6} {'score':>12}" + (f" {'label':>5}" if self.labels is not None else "")
        if self.query == "self":  # self-influence: high = fitted only because trained on (mislabelled candidates)
            title = "highest self-influence (look here for mislabelled samples):" if self.harmful else \
                "lowest self-influence:"
        else:
            title = f"most {'harmful' if self.harmful else 'helpful'} for {self.query}:"
        lines = [title, head]
        for r, (i, s) in enumerate(self, 1):
            label = f" {int(self.labels[r - 1]):>5}" if self.labels is not None else ""
            lines.append(f"{r:>4} {i:>6} {s:>12.4e}{label}")
        return "\n".join(lines)


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
