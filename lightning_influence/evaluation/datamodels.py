"""Datamodel quality without fitting a datamodel: how additive is *your* run? (docs/influence-math.md §6)

A linear datamodel predicts a query from which training samples were kept,
``f(S) ≈ β_0 + Σ_{i∈S} β_i``. Every additive attribution (influence scores summed over a
subset, LDS) is such a model, so the best one bounds them all. Following Saunshi et al.
(2022), with subsets drawn by keeping each sample with probability ``p``:

- ``W_1`` (degree-1 Fourier mass) is what the best linear datamodel captures,
- the residual ``E[f²] − W_0 − W_1`` (degree ≥ 2 mass) is its mean squared error,
- ``sqrt(W_1 / Var f)`` is the highest correlation any additive attribution can reach,

and all three come from noise stability ``Stab_ρ(f) = E[f(x) f(y)]`` at a few correlation
levels ``ρ`` (:mod:`lightning_influence.evaluation.stability`), i.e. from retraining runs on
random subsets, without fitting ``N`` weights. Here each run is the logged training replayed
from ``θ_0`` on the recorded batches with the removed samples' losses weighted 0 and the
batch denominator kept (docs/influence-math.md §2), by :func:`~lightning_influence.evaluation.ground_truth.replay_loo`
(many subsets trained at once as stacked parameter copies; optionally split over processes).

:func:`datamodel_quality` reports the Fourier split, its bootstrap standard errors, the
correlation ceiling next to the LDS each given estimator reaches on the same subsets, and,
for small ``N``, a directly fitted linear datamodel as a cross-check.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from lightning_influence.evaluation.metrics import linear_datamodeling_score, pearson, spearman
from lightning_influence.evaluation.stability import (
    FourierMass,
    SubsetFn,
    datamodel_residual,
    fit_linear_datamodel,
    fourier_mass_from_stability,
    noise_stability,
    stability_estimates,
)
from lightning_influence.log.reader import InfluenceLog
from lightning_influence.queries import LossFn, Query, default_loss_fn
from lightning_influence.replay import TrainData

__all__ = ["DatamodelQuality", "ReplaySubsets", "datamodel_quality", "datamodel_quality_of"]


# ================================================================================ retraining
class ReplaySubsets:
    """``f(mask) = f(θ_T(S)) − f(θ_T)``: the logged run replayed on the kept samples ``S``.

    Removed samples (``mask[id] = False``) get loss weight 0 in every batch that held them, the
    denominator ``|B_t|`` is kept, everything else is as logged (docs/influence-math.md §2). The constant
    ``f(θ_T)`` is subtracted for numerical comfort; it only moves ``W_0``.

    Calling it on one mask replays one run; :meth:`map` evaluates many masks at once as
    stacked parameter copies (``copies`` per pass) and, with ``workers > 1``, splits them over
    forked processes (each reopens the log). Use ``map`` as the ``map_fn`` of
    :func:`~lightning_influence.evaluation.stability.noise_stability`.
    """

    def __init__(self, log: InfluenceLog, module: nn.Module, train_data: TrainData, query: Query, *,
                 query_index: int = 0, loss_fn: LossFn = default_loss_fn, copies: int = 256, workers: int = 1,
                 verify: bool = True) -> None:
        if not (isinstance(workers, int) and workers >= 1):
            raise ValueError(f"workers must be an int >= 1, got {workers!r}")
        self.log_path = str(log.path)
        self._log: InfluenceLog | None = log
        self._pid = os.getpid()
        self.module, self.train_data, self.query, self.loss_fn = module, train_data, query, loss_fn
        self.query_index, self.copies, self.workers, self.verify = int(query_index), int(copies), workers, verify
        self.n = log.dataset_size
        self.T = log.num_steps
        self.runs = 0
        self.seconds = 0.0

    @property
    def log(self) -> InfluenceLog:
        if self._log is None or self._pid != os.getpid():  # a forked worker opens its own file handles
            self._log = InfluenceLog(self.log_path)
            self._pid = os.getpid()
        return self._log

    def _check(self, mask: np.ndarray) -> np.ndarray:
        m = np.asarray(mask)
        if m.dtype != np.bool_ or m.shape != (self.n,):
            raise ValueError(f"a mask must be a boolean array of shape ({self.n},) (one entry per sample id), "
                             f"got {m.dtype} {m.shape}")
        return m

    def evaluate(self, masks: Sequence[np.ndarray]) -> np.ndarray:
        """``f`` of every mask, in this process."""
        from lightning_influence.evaluation.ground_truth import replay_loo

        groups = [np.flatnonzero(~self._check(m)) for m in masks]
        if not groups:
            return np.zeros(0)
        t0 = time.perf_counter()
        res = replay_loo(self.log, self.module, self.train_data, self.query, groups=groups, grid=[self.T],
                         loss_fn=self.loss_fn, copies=self.copies, verify=self.verify)
        self.verify = False  # the reference run was checked against the log once
        self.runs += len(groups)
        self.seconds += time.perf_counter() - t0
        values = res.at(self.T)
        if not 0 <= self.query_index < values.shape[1]:
            raise ValueError(f"query_index {self.query_index} but the query has {values.shape[1]} outputs")
        return values[:, self.query_index]

    def __call__(self, mask: np.ndarray) -> float:
        return float(self.evaluate([mask])[0])

    def map(self, fn: SubsetFn | None, masks: Iterable[np.ndarray]) -> list[float]:
        """``map``-like batched evaluation (``fn`` is ignored: it is this object)."""
        masks = [np.array(m, dtype=bool) for m in masks]
        if self.workers == 1 or len(masks) < 2 * self.workers:
            return self.evaluate(masks).tolist()
        return _parallel(self, masks, self.workers)


_WORKER: ReplaySubsets | None = None


def _init_worker() -> None:
    torch.set_num_threads(1)


def _run_chunk(masks: list[np.ndarray]) -> list[float]:
    assert _WORKER is not None
    return _WORKER.evaluate(masks).tolist()


def _parallel(evaluator: ReplaySubsets, masks: list[np.ndarray], workers: int) -> list[float]:
    """Split ``masks`` into ``workers`` chunks evaluated in forked processes (the evaluator is inherited, not pickled)."""
    import multiprocessing as mp

    global _WORKER
    _WORKER = evaluator
    chunks = [list(c) for c in np.array_split(np.arange(len(masks)), workers)]
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("fork"), initializer=_init_worker) as ex:
            parts = list(ex.map(_run_chunk, [[masks[i] for i in c] for c in chunks]))
    finally:
        _WORKER = None
    evaluator.runs += len(masks)
    return [v for part in parts for v in part]


# =================================================================================== result
@dataclass
class DatamodelQuality:
    """How well any additive attribution can explain a query over random training subsets.

    Attributes:
        p: keep probability of the subsets.
        rhos: correlation levels of the noise-stability estimate.
        pairs: correlated pairs per ``ρ``.
        mass: :class:`~lightning_influence.evaluation.stability.FourierMass` (``W0``, ``W1``,
            residual, variance, correlation ceiling).
        stderr: bootstrap standard errors of ``W1/Var``, ``residual/Var`` and the ceiling.
        lds: ``{estimator: {"spearman": LDS, "pearson": ...}}`` on the same subsets (the
            ``x`` draws of the stability estimate), scores used as removal scores (``τ = −F``).
        fitted: the direct cross-check (small ``N``): a least-squares linear datamodel on
            ``fit_masks`` fresh subsets, its held-out residual and correlation; or ``None``.
        info: retraining runs, seconds, the query.
    """

    p: float
    rhos: list[float]
    pairs: int
    mass: FourierMass
    stderr: dict[str, float]
    lds: dict[str, dict[str, float]] = field(default_factory=dict)
    fitted: dict[str, float] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def residual_fraction(self) -> float:
        """Degree ≥ 2 share of the variance: ``residual / Var f`` (0 = perfectly additive)."""
        v = self.mass.variance
        return self.mass.residual / v if v > 0 else float("nan")

    @property
    def ceiling(self) -> float:
        """``sqrt(W1 / Var f)``: the best correlation an additive attribution can reach."""
        return self.mass.correlation_ceiling

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON-ready values."""
        m = self.mass
        return {"p": self.p, "rhos": list(self.rhos), "pairs": self.pairs,
                "W0": m.W0, "W1": m.W1, "residual": m.residual, "variance": m.variance,
                "residual_fraction": self.residual_fraction, "ceiling": self.ceiling, "stderr": dict(self.stderr),
                "lds": {k: dict(v) for k, v in self.lds.items()}, "fitted": dict(self.fitted) if self.fitted else None,
                "info": {k: v for k, v in self.info.items() if isinstance(v, (int, float, str, bool, list))}}

    def table(self) -> str:
        """The result as printable lines."""
        se = self.stderr
        lines = [f"datamodel quality, keep-probability p={self.p:g}, ρ={self.rhos}, {self.pairs} pairs "
                 f"({self.info.get('evaluations', '?')} retrainings)",
                 f"  Var f = {self.mass.variance:.3e}; linear (degree-1) share W1/Var = "
                 f"{1 - self.residual_fraction:.3f} ± {se.get('linear_fraction', float('nan')):.3f}; "
                 f"non-additive residual share = {self.residual_fraction:.3f} ± {se.get('residual_fraction', float('nan')):.3f}",
                 f"  ceiling on any additive attribution's correlation: {self.ceiling:.3f} ± {se.get('ceiling', float('nan')):.3f}"]
        if self.lds:
            lines.append(f"  {'estimator':<14} {'LDS (Spearman)':>14} {'Pearson':>8} {'/ ceiling':>9}")
            for k, v in self.lds.items():
                ratio = v["pearson"] / self.ceiling if self.ceiling and self.ceiling > 0 else float("nan")
                lines.append(f"  {k:<14} {v['spearman']:>14.3f} {v['pearson']:>8.3f} {ratio:>9.2f}")
        if self.fitted:
            f = self.fitted
            lines.append(f"  fitted linear datamodel ({f['fit_masks']:.0f} subsets): held-out residual share "
                         f"{f['residual_fraction']:.3f}, held-out correlation {f['correlation']:.3f}")
        return "\n".join(lines)


# ================================================================================ estimator
def _as_vector(scores: Any, n: int, query_index: int) -> np.ndarray:
    arr = getattr(scores, "scores", scores)
    arr = np.asarray(arr, dtype=np.float64)
    if arr.ndim == 2:
        arr = arr[:, query_index if arr.shape[1] > 1 else 0]
    if arr.shape != (n,):
        raise ValueError(f"scores must have one entry per sample id ({n}), got shape {arr.shape}")
    return arr


def datamodel_quality_of(f: SubsetFn, n: int, *, p: float = 0.5, rhos: Sequence[float] = (0.0, 0.5, 0.75, 1.0),
                         pairs: int = 100, max_degree: int = 2, scores: Mapping[str, Any] | None = None,
                         query_index: int = 0, fit_masks: int = 0, test_masks: int = 0,
                         map_fn: Callable[[SubsetFn, Iterable[np.ndarray]], Iterable[float]] | None = None,
                         bootstrap: int = 200, seed: int = 0) -> DatamodelQuality:
    """:func:`datamodel_quality` for any subset function ``f(mask) -> float`` over ``n`` samples.

    Args:
        f: query value of the model trained on a keep-mask.
        n: number of samples (mask length).
        p: keep probability.
        rhos: correlation levels (``0`` and ``1`` cost no extra run; each other ``ρ`` costs ``pairs``).
        pairs: pairs per ``ρ``.
        max_degree: degree of the polynomial fitted to ``Stab_ρ`` (see
            :func:`~lightning_influence.evaluation.stability.fourier_mass_from_stability`).
        scores: ``{name: (n,) removal scores}`` (or :class:`InfluenceScores`) whose LDS to report.
        query_index: column of 2-D scores to use.
        fit_masks: ``> n``: also fit a least-squares linear datamodel on that many fresh subsets.
        test_masks: held-out subsets for the fitted datamodel (default ``max(100, fit_masks // 4)``).
        map_fn: ``map``-like evaluator (e.g. ``ReplaySubsets.map``).
        bootstrap: resamples of the pairs for the standard errors (0: none).
        seed: random seed of the subsets.
    """
    t0 = time.perf_counter()
    rho_list = [float(r) for r in rhos]
    if 1.0 not in rho_list:
        rho_list.append(1.0)
    evaluate = map_fn or map
    captured: dict[str, Any] = {}

    def recording(fn: SubsetFn, masks: Iterable[np.ndarray]) -> list[float]:
        ms = [np.array(m, dtype=bool) for m in masks]
        vals = list(evaluate(fn, ms))
        captured["masks"], captured["values"] = np.stack(ms), np.asarray(vals, dtype=np.float64)
        return vals

    stabs = noise_stability(f, n, p, rho_list, pairs, rng=seed, map_fn=recording)
    mass = fourier_mass_from_stability(stabs, stabs[1.0], max_degree=max_degree)
    masks, values = captured["masks"], captured["values"]
    x_masks, fx = masks[:pairs], values[:pairs]
    noisy = [r for r in rho_list if 0.0 < r < 1.0]
    fy = {r: values[pairs * (k + 1):pairs * (k + 2)] for k, r in enumerate(noisy)}
    stderr: dict[str, float] = {}
    if bootstrap:
        gen = np.random.default_rng(seed + 1)
        draws = {"linear_fraction": [], "residual_fraction": [], "ceiling": []}
        for _ in range(bootstrap):
            idx = gen.integers(0, pairs, pairs)
            s = stability_estimates(fx[idx], {r: v[idx] for r, v in fy.items()}, rho_list)
            mb = fourier_mass_from_stability(s, s[1.0], max_degree=max_degree)
            if mb.variance > 0:
                draws["linear_fraction"].append(mb.W1 / mb.variance)
                draws["residual_fraction"].append(mb.residual / mb.variance)
                draws["ceiling"].append(mb.correlation_ceiling)
        stderr = {k: float(np.std(v, ddof=1)) if len(v) > 1 else float("nan") for k, v in draws.items()}
    lds: dict[str, dict[str, float]] = {}
    for name, sc in (scores or {}).items():
        tau = -_as_vector(sc, n, query_index)  # removal scores -> inclusion attributions
        lds[name] = {"spearman": linear_datamodeling_score(tau, x_masks, fx),
                     "pearson": pearson(x_masks.astype(np.float64) @ tau, fx)}
    fitted = None
    if fit_masks:
        if fit_masks < n + 1:
            raise ValueError(f"fit_masks must be >= n + 1 = {n + 1} to fit a linear datamodel, got {fit_masks}")
        gen = np.random.default_rng(seed + 2)
        n_test = test_masks or max(100, fit_masks // 4)
        fm = gen.random((fit_masks + n_test, n)) < p
        out = np.asarray(list(evaluate(f, list(fm))), dtype=np.float64)
        model = fit_linear_datamodel(fm[:fit_masks], out[:fit_masks])
        held_res = datamodel_residual(fm[fit_masks:], out[fit_masks:], model)
        var_test = float(np.var(out[fit_masks:]))
        pred = model.predict(fm[fit_masks:])
        fitted = {"fit_masks": float(fit_masks), "test_masks": float(n_test), "residual": held_res,
                  "train_residual": datamodel_residual(fm[:fit_masks], out[:fit_masks], model),
                  "variance": var_test, "residual_fraction": held_res / var_test if var_test > 0 else float("nan"),
                  "correlation": pearson(pred, out[fit_masks:]),
                  "lds_fitted": spearman(pred, out[fit_masks:])}
        for name, sc in (scores or {}).items():
            tau = -_as_vector(sc, n, query_index)
            fitted[f"pearson_{name}"] = pearson(fm[fit_masks:].astype(np.float64) @ tau, out[fit_masks:])
    info = {"evaluations": int(len(values)) + (int(fit_masks + (test_masks or max(100, fit_masks // 4))) if fit_masks else 0),
            "seconds": time.perf_counter() - t0, "max_degree": max_degree, "stabilities": [stabs[r] for r in rho_list],
            "seed": seed}
    return DatamodelQuality(p=float(p), rhos=rho_list, pairs=int(pairs), mass=mass, stderr=stderr, lds=lds,
                            fitted=fitted, info=info)


def datamodel_quality(log: InfluenceLog, module: nn.Module, train_data: TrainData, query: Query, *, p: float = 0.5,
                      rhos: Sequence[float] = (0.0, 0.5, 0.75, 1.0), pairs: int = 100, max_degree: int = 2,
                      scores: Mapping[str, Any] | None = None, query_index: int = 0, fit_masks: int = 0,
                      test_masks: int = 0, workers: int = 1, copies: int = 256, bootstrap: int = 200, seed: int = 0,
                      loss_fn: LossFn = default_loss_fn) -> DatamodelQuality:
    """Noise-stability estimate of how additive a query is over random subsets of the training set.

    Retrains (replays) the logged run on ``pairs · (1 + #{ρ ∈ (0,1)})`` random subsets (each
    sample kept with probability ``p``), estimates ``W_0, W_1`` and the degree ≥ 2 residual,
    and reports the ceiling ``sqrt(W_1/Var f)`` on any additive attribution's correlation next
    to the LDS of each estimator in ``scores`` on the same subsets.

    Args:
        log, module, train_data, query: the run, as for :func:`replay_loo`.
        p: keep probability (``0.5``: the usual LDS setting; close to 1: small removals).
        rhos, pairs, max_degree, scores, query_index, fit_masks, test_masks, bootstrap, seed:
            see :func:`datamodel_quality_of`.
        workers: processes for the retraining (forked; 1 = in this process).
        copies: subsets trained together per replay pass.
        loss_fn: the per-sample training loss.

    Returns:
        :class:`DatamodelQuality` (``.table()``, ``.to_dict()``).
    """
    ev = ReplaySubsets(log, module, train_data, query, query_index=query_index, loss_fn=loss_fn, copies=copies,
                       workers=workers)
    res = datamodel_quality_of(ev, ev.n, p=p, rhos=rhos, pairs=pairs, max_degree=max_degree, scores=scores,
                               query_index=query_index, fit_masks=fit_masks, test_masks=test_masks, map_fn=ev.map,
                               bootstrap=bootstrap, seed=seed)
    res.info.update({"retraining_runs": ev.runs, "retraining_seconds": ev.seconds, "workers": workers,
                     "query_index": query_index})
    return res
