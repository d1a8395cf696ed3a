"""Group influence: do single-sample scores add up to the effect of removing a group? (docs/influence-math.md §6)

For a group ``S`` the replayed truth is ``Δf(S) = f(θ_T^{−S}) − f(θ_T)``: the logged run
replayed from ``θ_0`` with every member's loss weighted 0 in the batches that held it
(denominator kept, docs/influence-math.md §2), by
:func:`~lightning_influence.evaluation.ground_truth.replay_loo` (groups trained together as
stacked copies). An additive attribution predicts ``Σ_{j∈S} F_j``. The two agree when the
query is close to linear in the subset (small degree ≥ 2 Fourier mass, see
:mod:`lightning_influence.evaluation.datamodels`); they part as groups grow, and sooner for
groups whose members act alike (same class, top-scored) than for random ones.

:func:`group_additivity` draws groups of several sizes and kinds, replays their removal and
reports, per estimator, the ratio ``Σ F / Δf`` and the relative error, and where additivity
breaks (the smallest size whose relative error passes a threshold).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike
from torch import nn

from lightning_influence.log.reader import InfluenceLog
from lightning_influence.queries import LossFn, Query, default_loss_fn
from lightning_influence.replay import TrainData

__all__ = ["GROUP_KINDS", "GroupAdditivity", "group_additivity", "make_groups", "replay_group_removal"]

GROUP_KINDS = ("random", "same_class", "top", "bottom")
"""``random``: uniform; ``same_class``: members share a label (filled class by class, a random
class first, when the group outgrows one class); ``top``/``bottom``: the largest/smallest
scores of an estimator (for a loss query with the project's sign: most helpful / most harmful)."""


def replay_group_removal(log: InfluenceLog, module: nn.Module, train_data: TrainData, query: Query,
                         groups: Sequence[Sequence[int]], *, loss_fn: LossFn = default_loss_fn, copies: int = 256,
                         verify: bool = True, processes: Any = None) -> np.ndarray:
    """``(G, Q)`` replayed group-removal effects ``f(θ_T^{−S}) − f(θ_T)`` (the groups spread over ``processes``,
    as :func:`~lightning_influence.evaluation.ground_truth.replay_loo`)."""
    from lightning_influence.evaluation.ground_truth import replay_loo

    if not len(groups):
        return np.zeros((0, 0))
    res = replay_loo(log, module, train_data, query, groups=[np.asarray(g, dtype=np.int64) for g in groups],
                     grid=[log.num_steps], loss_fn=loss_fn, copies=copies, verify=verify, processes=processes)
    return res.at(log.num_steps)


def _as_vector(scores: Any, n: int, query_index: int) -> np.ndarray:
    arr = np.asarray(getattr(scores, "scores", scores), dtype=np.float64)
    if arr.ndim == 2:
        arr = arr[:, query_index if arr.shape[1] > 1 else 0]
    if arr.shape != (n,):
        raise ValueError(f"scores must have one entry per sample id ({n}), got shape {arr.shape}")
    return arr


def make_groups(kind: str, size: int, ids: np.ndarray, *, rng: np.random.Generator, labels: ArrayLike | None = None,
                scores: np.ndarray | None = None) -> np.ndarray:
    """One group of ``size`` ids of ``kind`` (see :data:`GROUP_KINDS`) drawn from ``ids``."""
    ids = np.asarray(ids, dtype=np.int64)
    if not 1 <= size <= len(ids):
        raise ValueError(f"group size {size} must be in [1, {len(ids)}]")
    if kind == "random":
        return np.sort(rng.choice(ids, size=size, replace=False))
    if kind == "same_class":
        if labels is None:
            raise ValueError("same_class groups need labels= (the class of every sample id)")
        lab = np.asarray(labels)[ids]
        classes = np.unique(lab)
        order = rng.permutation(classes)
        out: list[int] = []
        for c in order:
            members = rng.permutation(ids[lab == c])
            out.extend(members[: size - len(out)].tolist())
            if len(out) >= size:
                break
        return np.sort(np.asarray(out, dtype=np.int64))
    if kind in ("top", "bottom"):
        if scores is None:
            raise ValueError(f"{kind} groups need scores")
        s = scores[ids]
        order = np.argsort(-s if kind == "top" else s, kind="stable")
        return np.sort(ids[order[:size]])
    raise ValueError(f"group kind must be one of {GROUP_KINDS}, got {kind!r}")


@dataclass
class GroupAdditivity:
    """Sum of single-sample scores against the replayed group removal.

    Attributes:
        rows: one dict per group: ``kind``, ``source`` (the estimator whose scores chose a
            top/bottom group, else ``""``), ``fraction``, ``size``, ``repeat``, ``actual``
            (replayed ``Δf``), and per estimator ``sum_<name>``, ``ratio_<name>`` (``Σ/Δf``),
            ``relerr_<name>`` (``|Σ − Δf| / |Δf|``).
        estimators: the estimator names.
        threshold: relative error at which additivity counts as broken.
        query_name: the query.
        residual: optional ``{p: residual}``: the degree ≥ 2 mass ``E[(f − best linear)²]`` of
            :func:`~lightning_influence.evaluation.datamodels.datamodel_quality` at keep-probability
            ``p`` (``DatamodelQuality.mass.residual``). A random removal of a fraction ``1 − p`` is
            one such subset, so ``√residual`` is the size of the non-additive part to expect there;
            the table prints it next to ``Δf − Σ loo`` when exact single LOO (``"loo"``) is given.
        info: settings and timings.
    """

    rows: list[dict[str, Any]]
    estimators: list[str]
    threshold: float
    query_name: str
    residual: dict[float, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> list[dict[str, Any]]:
        """Per ``(kind, source, fraction)``: median ratio and relative error per estimator (over repeats)."""
        keys: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
        for r in self.rows:
            keys.setdefault((r["kind"], r["source"], r["fraction"]), []).append(r)
        out = []
        for (kind, source, frac), rs in keys.items():
            row: dict[str, Any] = {"kind": kind, "source": source, "fraction": frac, "size": int(rs[0]["size"]),
                                   "groups": len(rs), "actual": float(np.median([r["actual"] for r in rs]))}
            for e in self.estimators:
                row[f"ratio_{e}"] = float(np.median([r[f"ratio_{e}"] for r in rs]))
                row[f"relerr_{e}"] = float(np.median([r[f"relerr_{e}"] for r in rs]))
            if "loo" in self.estimators:  # the non-additive part of the truth itself
                row["interaction_rms"] = float(np.sqrt(np.mean([(r["actual"] - r["sum_loo"]) ** 2 for r in rs])))
            match = [p for p in self.residual if abs((1.0 - p) - frac) < 1e-9]
            if kind == "random" and match:  # a Monte-Carlo residual can come out negative: read it as ≈ 0
                row["sqrt_residual"] = float(np.sqrt(max(self.residual[match[0]], 0.0)))
            out.append(row)
        return out

    def breaks(self) -> dict[str, dict[str, float | None]]:
        """``{kind[/source]: {estimator: smallest fraction with median relative error > threshold, or None}}``."""
        out: dict[str, dict[str, float | None]] = {}
        for row in self.summary():
            key = row["kind"] + (f"/{row['source']}" if row["source"] else "")
            d = out.setdefault(key, {e: None for e in self.estimators})
            for e in self.estimators:
                if row[f"relerr_{e}"] > self.threshold and (d[e] is None or row["fraction"] < d[e]):
                    d[e] = row["fraction"]
        return out

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON-ready values."""
        return {"query": self.query_name, "threshold": self.threshold, "estimators": list(self.estimators),
                "rows": self.rows, "summary": self.summary(), "breaks": self.breaks(),
                "residual": {str(k): v for k, v in self.residual.items()},
                "info": {k: v for k, v in self.info.items() if isinstance(v, (int, float, str, bool, list))}}

    def table(self) -> str:
        """The result as printable lines."""
        est = self.estimators
        inter = "loo" in est
        head = f"{'group':<18} {'size':>5} {'Δf replayed':>12} " + " ".join(f"{'Σ' + e + '/Δf':>12}" for e in est)
        if inter:
            head += f" {'RMS(Δf−Σloo)':>13} {'√residual':>10}"
        lines = [f"group additivity, query {self.query_name!r} (median over repeats; additivity broken where "
                 f"|Σ − Δf|/|Δf| > {self.threshold:g})", head]
        for r in self.summary():
            name = r["kind"] + (f"/{r['source']}" if r["source"] else "")
            cells = " ".join(f"{r[f'ratio_{e}']:>11.2f}{'*' if r[f'relerr_{e}'] > self.threshold else ' '}" for e in est)
            if inter:
                sr = (f"{'≈0':>10}" if r["sqrt_residual"] == 0.0 else f"{r['sqrt_residual']:>10.2e}") \
                    if "sqrt_residual" in r else f"{'':>10}"
                cells += f" {r['interaction_rms']:>13.2e} {sr}"
            lines.append(f"{name:<18} {r['size']:>5} {r['actual']:>12.3e} {cells}")
        lines.append("(* = broken)  breaks at fraction: " + "; ".join(
            f"{k}: " + ", ".join(f"{e}={v if v is not None else '-'}" for e, v in d.items()) for k, d in self.breaks().items()))
        if self.residual:
            lines.append("RMS of the non-additive part over random p-subsets (noise stability, √residual): "
                         + ", ".join(f"p={p:g}: {np.sqrt(v):.2e}" if v > 0 else f"p={p:g}: ≈0 (estimate {v:.1e})"
                                     for p, v in self.residual.items()))
        return "\n".join(lines)


def group_additivity(log: InfluenceLog, module: nn.Module, train_data: TrainData, query: Query,
                     scores: Mapping[str, Any], *, fractions: Sequence[float] = (0.01, 0.05, 0.1, 0.2),
                     kinds: Sequence[str] = ("random", "same_class", "top"), labels: ArrayLike | None = None,
                     repeats: int = 1, top_by: Sequence[str] | None = None, threshold: float = 0.2,
                     query_index: int = 0, residual: Mapping[float, float] | None = None, seed: int = 0,
                     loss_fn: LossFn = default_loss_fn, copies: int = 256, processes: Any = None) -> GroupAdditivity:
    """Compare the sum of single-sample scores with the replayed removal of groups.

    Args:
        log, module, train_data, query: the run, as for :func:`replay_loo`.
        scores: ``{estimator: (N,) or (N, Q) removal scores}`` (or :class:`InfluenceScores`);
            include exact single-sample LOO (e.g. ``"loo"``) to see the additivity of the truth
            itself.
        fractions: group sizes as fractions of the training ids in the log.
        kinds: group kinds (:data:`GROUP_KINDS`).
        labels: class of every sample id (for ``same_class``).
        repeats: groups per (random/same-class kind, size).
        top_by: estimators whose top/bottom groups to replay (default: all in ``scores``).
        threshold: relative error at which additivity counts as broken.
        query_index: which query output to compare.
        residual: ``{p: residual share}`` from :func:`datamodel_quality`, reported alongside.
        seed: random seed for the groups.
        loss_fn: the per-sample training loss.
        copies: groups replayed together per pass.
        processes: replay the groups on several processes (as :func:`replay_group_removal`).
    """
    from lightning_influence.queries import query_names

    t0 = time.perf_counter()
    ids = log.all_ids()
    n = log.dataset_size
    vecs = {k: _as_vector(v, n, query_index) for k, v in scores.items()}
    est = list(vecs)
    if not est:
        raise ValueError("group_additivity needs at least one estimator's scores")
    unknown = set(kinds) - set(GROUP_KINDS)
    if unknown:
        raise ValueError(f"unknown group kinds {sorted(unknown)}; known: {GROUP_KINDS}")
    sources = list(top_by) if top_by is not None else est
    rng = np.random.default_rng(seed)
    specs: list[dict[str, Any]] = []
    for kind in kinds:
        for frac in fractions:
            size = max(1, int(round(frac * len(ids))))
            if kind in ("top", "bottom"):
                for src in sources:
                    specs.append({"kind": kind, "source": src, "fraction": float(frac), "size": size, "repeat": 0,
                                  "group": make_groups(kind, size, ids, rng=rng, scores=vecs[src])})
            else:
                for r in range(repeats):
                    specs.append({"kind": kind, "source": "", "fraction": float(frac), "size": size, "repeat": r,
                                  "group": make_groups(kind, size, ids, rng=rng, labels=labels)})
    # replay each distinct group once
    uniq: dict[bytes, int] = {}
    groups: list[np.ndarray] = []
    for s in specs:
        key = s["group"].tobytes()
        if key not in uniq:
            uniq[key] = len(groups)
            groups.append(s["group"])
    tic = time.perf_counter()
    actual = replay_group_removal(log, module, train_data, query, groups, loss_fn=loss_fn, copies=copies,
                                  processes=processes)
    replay_s = time.perf_counter() - tic
    rows = []
    for s in specs:
        a = float(actual[uniq[s["group"].tobytes()], query_index])
        row = {k: v for k, v in s.items() if k != "group"}
        row["actual"] = a
        row["group"] = s["group"].tolist()
        for e in est:
            tot = float(vecs[e][s["group"]].sum())
            row[f"sum_{e}"] = tot
            row[f"ratio_{e}"] = tot / a if a != 0 else float("nan")
            row[f"relerr_{e}"] = abs(tot - a) / abs(a) if a != 0 else float("inf")
        rows.append(row)
    qn = query_names(query, actual.shape[1])[query_index]
    return GroupAdditivity(rows=rows, estimators=est, threshold=threshold, query_name=qn,
                           residual=dict(residual or {}),
                           info={"groups_replayed": len(groups), "replay_seconds": replay_s,
                                 "seconds": time.perf_counter() - t0, "N": int(len(ids)), "seed": seed})
