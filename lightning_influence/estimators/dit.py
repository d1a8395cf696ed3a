"""DIT: exact time-windowed influence by an adjoint sweep (docs/influence-math.md §2-3).

For a query ``f`` and a window ``[t1, t2]`` of steps::

    DIT_j[t1, t2] = F_j(t2) − F_j(t1),    F_j(t) = ⟨q_t, δ_j[t]⟩ ≈ f(θ^{-j}_t) − f(θ_t)

where ``δ_j`` is the linearised deviation of the trajectory when sample ``j`` is removed
(denominator ``|B_t|`` kept). Positive = removing the sample raises ``f`` (for a loss query:
helpful). ``F_j(t)`` for every sample at once is one backward sweep of the adjoint of the
linearised training dynamics, with one Hessian-vector product and one per-sample
directional-derivative pass per step (both from a single forward-over-reverse pass, or from
two first-order gradient evaluations with finite differences).

Optimisers: one mechanism for all (docs/optimizer-adjoint.md). Each step is ``x_{t+1} =
u(x_t, G_t(θ_t))`` over the full optimizer state ``x = (θ, s)`` (momentum buffer; Adam's
``m``, ``v``, ``v_max``; RMSprop's and Adagrad's accumulators) with the functional twin
``u`` of :mod:`lightning_influence.step.optimizers`. The adjoint ``λ = (λ_θ, λ_s)`` of the
linearised dynamics is pulled back through each step by ``torch.func.vjp`` of ``u``::

    (θ̄, s̄, ḡ) = VJP_u(λ) at (θ_t, s_t, G_t)   # ḡ = R: adjoint of the step's gradient
    F_j      += ⟨λ, u(x_t, G_t − w_j g_{j,t}) − u(x_t, G_t)⟩   # j ∈ B_t  (removal="step", the default)
    F_j      += −w_j ⟨R, g_{j,t}⟩                              # j ∈ B_t  (removal="linear": its derivative)
    λ_θ, λ_s  = θ̄ + H_t R, s̄

The default scores each removal with the step's exact response (the whole update, clipping
included), propagated to ``t2`` by the adjoint of the linearised later steps: for an affine
step (SGD without clipping) the two are the same number; for Adam, where an early step is
close to ``sign(g)``, the derivative misses most of a removal (docs/optimizer-adjoint.md §2, §8).
Exact in the linearisation of the later steps for SGD (momentum, dampening, Nesterov, weight
decay), Adam and AdamW (coupled/decoupled weight decay, bias correction, ``eps``, ``amsgrad``),
RMSprop and Adagrad, with any learning-rate schedule. ``preconditioner="frozen"`` holds the adaptive
optimizers' denominators at their values in the run (the earlier approximation, labelled
``approx.``): ``λ_v`` stays 0 and the adjoint state is ``(λ_θ, λ_m)``.

Parameters ``θ_t`` come from the log: replayed (:mod:`lightning_influence.replay`) from the
nearest checkpoint and verified at every checkpoint passed. Memory: ``O(p·C)`` for the
``C`` adjoint columns (queries × grid points still to come), plus the ``θ_t`` of one replay
segment (the steps between two checkpoints, or about ``√L`` steps of an interval of ``L`` and its in-memory anchors
when checkpoints are sparse: bounded by ``max_memory_bytes``), plus one step's batch. The sweep
itself is :mod:`lightning_influence.estimators.sweep`; with ``shard`` (set by
:mod:`lightning_influence.distributed`) it runs on one process's rows of every step.

No Lightning imports.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_influence.estimators.scores import InfluenceScores, grid_column
from lightning_influence.datacheck import check_estimator_data
from lightning_influence.estimators.signature import estimator_api
from lightning_influence.estimators.sweep import HVP_MODES, _Context, _model_sweep
from lightning_influence.log.reader import InfluenceLog
from lightning_influence.queries import LossFn, Query, default_loss_fn, query_column
from lightning_influence.estimators.gauss_newton import dit_gauss_newton  # noqa: F401 - public here too
from lightning_influence.replay import Progress, TrainData, grid_steps, require_train_data, resolve_progress
from lightning_influence.replay_drift import report_outside_changes
from lightning_influence.step.buffers import run_buffers
from lightning_influence.step.shard import BatchShard

__all__ = ["Timeline", "dit", "dit_gauss_newton", "dit_local", "timeline", "HVP_MODES"]


# ================================================================================ public API
def _context(log: InfluenceLog, module: nn.Module, train_data: TrainData, loss_fn: LossFn, verify: bool,
             tolerance: float | None, max_memory_bytes: int, preconditioner: str = "exact", query: Query = None) -> _Context:
    if module is None:
        raise ValueError("DIT needs `module` (the architecture; weights come from the log)")
    require_train_data(log, train_data, "DIT", "to replay the run and take gradients")
    floating = {n for n, b in module.named_buffers() if b.is_floating_point()}  # not counters (num_batches_tracked)
    moved = [n for n in run_buffers(log, module, statistics=True) if n in floating]
    moved += log.meta.get("forward_changes_params") or []  # changed in place by the forward, under no_grad
    if moved:  # the adjoint runs over θ and the optimizer state, not over buffers (docs/replay.md, Buffers)
        warnings.warn(f"DIT takes the buffers {moved[:3]}{' ...' if len(moved) > 3 else ''}, which this run's forwards "
                      "changed (BatchNorm running statistics, spectral_norm's power iteration, Embedding(max_norm)'s "
                      "renormalisation), as they were at each step: it leaves out how removing a sample moves them, "
                      "which queries in eval mode read (docs/replay.md: 0.4 of the score on a short train-mode BatchNorm "
                      "run). Replay leave-one-out (evaluate) includes it", RuntimeWarning, stacklevel=3)
    ctx = _Context(log, module, train_data, loss_fn, verify, tolerance, max_memory_bytes, preconditioner)
    check_estimator_data(log, module, query, train_data, loss_fn)  # data the model cannot take: now, not in the sweep
    return ctx


def _reported(ctx: _Context, res: Any, method: str) -> str:
    """``method`` with what the sweep measured about its own validity put in ``res.info``, warned about and tagged:
    the adjoint's growth (:mod:`~lightning_influence.estimators.growth`) and changes the run made outside its logged
    optimizer steps (:func:`~lightning_influence.replay_drift.outside_changes`), which DIT holds constant."""
    method = res.growth.report(method, res.info, stacklevel=4)
    return report_outside_changes(res.info, method, ctx.dtype, "DIT", stacklevel=4,
                                  fit_threads=ctx.log.meta.get("cpu_threads"))


def _method(ctx: _Context, base: str, hvp: str, approx: bool = False, removal: str = "step") -> str:
    """Estimator name; every approximation says so (``approx.``)."""
    tags = []
    if hvp == "fd":
        tags.append("fd-hvp")
    if ctx.step.frozen:
        tags.append(f"frozen {ctx.rule.name} preconditioner")
    elif removal == "linear" and not ctx.rule.linear:
        tags.append("linear removal")
    if approx or ctx.step.frozen:
        tags.append("approx.")
    return f"{base} ({', '.join(tags)})" if tags else base


_DEFAULT_MEMORY = 512 * 2**20


@estimator_api
def dit(log: InfluenceLog, query: Query, *, module: nn.Module | None = None, train_data: TrainData | None = None,
        window: Any = None, loss_fn: LossFn = default_loss_fn, hvp: str = "exact", eps0: float | None = None, verify: bool = True,
        tolerance: float | None = None, max_memory_bytes: int = _DEFAULT_MEMORY,
        preconditioner: str = "exact", removal: str = "step", progress: Progress = None,
        shard: BatchShard | None = None
        ) -> InfluenceScores:
    """DIT scores ``F_j(t2) − F_j(t1)`` of every training sample id for ``window`` (docs/influence-math.md §3).

    Exact in the linearisation for every supported optimizer (SGD with momentum/Nesterov/weight
    decay, Adam, AdamW, RMSprop, Adagrad; any schedule): the adjoint runs over the whole
    optimizer state (docs/optimizer-adjoint.md).

    Args:
        log: the influence log (ids, learning rates, checkpoints).
        module: the architecture; weights come from the log's checkpoints (replayed between them).
        train_data: training samples by id (dataset or callable ``ids -> batch``); ``None`` for a log with stored inputs.
        query: ``f(module) -> scalar or (Q,)`` (see :mod:`lightning_influence.queries`); the
            ``Q`` outputs are swept together.
        window: steps ``(t1, t2)``, fractions ``(0.5, 1.0)``, ``("epoch", a, b)`` or a string
            (see :meth:`InfluenceLog.window`); ``None`` is the whole run.
        loss_fn: per-sample training loss ``loss_fn(module, batch) -> Tensor[B]``.
        hvp: ``"exact"`` (forward-over-reverse) or ``"fd"`` (central differences of gradients).
        eps0: finite-difference ``ε_0`` of the float64 evaluation (default 1e-6; :mod:`.fd`, which also says when the
            products fall back to the parameters' dtype and its step).
        verify, tolerance: check the replayed ``θ_t`` against every checkpoint passed and re-anchor there;
            stop if a drift exceeds ``tolerance`` (:mod:`lightning_influence.replay_drift`; default 1%).
            The drifts are in ``info["replay_drift"]``.
        max_memory_bytes: budget for the ``θ_t`` (and optimizer state) held at once: a checkpoint interval of ``L``
            steps is replayed whole where it fits, else in segments of ``⌈√L⌉`` steps from in-memory anchors
            (``≈ 2√L`` states, the least without more replay; ``info["peak_trajectory_bytes"]``). It also bounds the
            step removal's per-sample gradient rows ``(B, p)``: a step's rows are taken in blocks of as many as fit
            (``info["removal_rows_per_block"]``; then ``G_t`` from its own backward pass).
        preconditioner: ``"exact"`` (the VJP of the full update) or ``"frozen"``: adaptive
            optimizers' denominators held at their values in the run (approximation, cheaper:
            no ``λ_v`` columns; ``method`` says ``approx.``; its removal is linear).
        removal: ``"step"`` (each removal enters with its step's exact change of the update and optimizer state) or
            ``"linear"`` (its derivative: ``∂f/∂w_j``, what the recursion of docs/influence-math.md §2 computes). The
            same numbers for SGD without clipping; ``"step"`` costs one per-sample gradient pass per step otherwise.
        progress: ``progress(done, total)`` callback or ``True`` for a bar on stderr.
        shard: evaluate only this process's rows of every step, summing the step's gradient, its Hessian-vector
            products and the scores over the processes (:mod:`lightning_influence.step.shard`; set by
            :func:`lightning_influence.distributed.sweep`, which every process calls alike).

    Returns:
        :class:`InfluenceScores` with ``N = log.dataset_size`` rows and one column per query
        output. Sign: positive = removing the sample raises ``f``.
    """
    t1, t2 = log.window(window)
    ctx = _context(log, module, train_data, loss_fn, verify, tolerance, max_memory_bytes, preconditioner, query)
    t0 = log.first_step  # > 0 for a log started by a resumed fit
    res = _model_sweep(ctx, query, t0, t2, [t1, t2], hvp, eps0, resolve_progress(progress, "dit"), shard, removal)
    out = res.values[t2] - (res.values[t1] if t1 > t0 else 0.0)
    method = _reported(ctx, res, _method(ctx, "dit", hvp, removal=removal))
    return InfluenceScores(out, method, (t1, t2), res.names, info=res.info)


@estimator_api
def dit_local(log: InfluenceLog, query: Query, *, module: nn.Module | None = None, train_data: TrainData | None = None,
              window: Any = None, loss_fn: LossFn = default_loss_fn, hvp: str = "exact", eps0: float | None = None, verify: bool = True,
              tolerance: float | None = None, max_memory_bytes: int = _DEFAULT_MEMORY,
              preconditioner: str = "exact", removal: str = "step", progress: Progress = None,
        shard: BatchShard | None = None
              ) -> InfluenceScores:
    """Local DIT (approximation): the adjoint sweep only inside ``[t1, t2)``, from ``q_{t2}``.

    It drops the deviation a sample caused before the window (as if the sample were removed
    only inside the window), so samples absent from the window score 0. Cheaper than
    :func:`dit` for late windows (``t2 − t1`` steps instead of ``t2``). Arguments as :func:`dit`.
    """
    t1, t2 = log.window(window)
    ctx = _context(log, module, train_data, loss_fn, verify, tolerance, max_memory_bytes, preconditioner, query)
    res = _model_sweep(ctx, query, t1, t2, [t2], hvp, eps0, resolve_progress(progress, "dit-local"), shard, removal)
    method = _reported(ctx, res, _method(ctx, "dit-local", hvp, approx=True, removal=removal))
    return InfluenceScores(res.values[t2], method, (t1, t2), res.names, info=res.info)


@dataclass
class Timeline:
    """``F_j(t)`` of every sample on a grid of steps (docs/influence-math.md §3).

    Attributes:
        values: ``(N, G, Q)`` float64, ``values[j, g, q] = F_j(grid[g])`` for query ``q``.
        grid: ``(G,)`` steps, increasing (``F(0) = 0``).
        query_names: the ``Q`` query names.
        method: the estimator name.
        info: sweep details.
    """

    values: np.ndarray
    grid: np.ndarray
    query_names: list[str]
    method: str
    info: dict[str, Any] = field(default_factory=dict)

    def at(self, t: int) -> np.ndarray:
        """``F_j(t)`` ``(N, Q)`` at grid step ``t``."""
        return self.values[:, grid_column(self.grid, t, "timeline"), :]

    def window(self, t1: int, t2: int) -> InfluenceScores:
        """``DIT[t1, t2] = F(t2) − F(t1)`` for two grid steps (additive by construction)."""
        if not t1 < t2:
            raise ValueError(f"need t1 < t2, got [{t1}, {t2}]")
        return InfluenceScores(self.at(t2) - self.at(t1), self.method, (int(t1), int(t2)), list(self.query_names),
                               info={"from": "timeline", **self.info})

    def increments(self, query: int | str = 0) -> np.ndarray:
        """``(N, G−1)`` DIT of each window between consecutive grid points."""
        return np.diff(self.values[:, :, query_column(self.query_names, query)], axis=1)

    def patterns(self, query: int | str = 0, thresholds: Any = None) -> Any:
        """Temporal pattern of each sample (negligible / stable / early / late / fluctuating), from
        :func:`lightning_influence.evaluation.patterns.classify_timeline`."""
        from lightning_influence.evaluation.patterns import classify_timeline

        return classify_timeline(self.values[:, :, query_column(self.query_names, query)], thresholds)


@estimator_api
def timeline(log: InfluenceLog, query: Query, *, module: nn.Module | None = None, train_data: TrainData | None = None,
             grid: Any = None, loss_fn: LossFn = default_loss_fn, hvp: str = "exact", eps0: float | None = None, verify: bool = True,
             tolerance: float | None = None, max_memory_bytes: int = _DEFAULT_MEMORY,
             preconditioner: str = "exact", removal: str = "step", progress: Progress = None,
        shard: BatchShard | None = None) -> Timeline:
    """``F_j(t)`` for every sample on a grid of steps, in **one** backward sweep.

    Every grid point adds its query-gradient columns to the adjoint when the sweep reaches
    it, so the cost is one sweep over ``[0, max(grid))`` with up to ``G·Q`` HVP columns per
    step (vectorised). Any window between grid points is a difference of columns:
    ``timeline.window(t1, t2)``.

    Args:
        grid: ``None``/``"epoch"`` (the first step of every epoch and ``T``), an int ``n`` (``n`` equal windows
            of the run, as the CLI's ``--grid n``), a list of steps, or a list of fractions of training
            (:func:`~lightning_influence.replay.grid_bounds`).
        others: as :func:`dit`.
    """
    steps = grid_steps(log, grid)
    ctx = _context(log, module, train_data, loss_fn, verify, tolerance, max_memory_bytes, preconditioner, query)
    t_hi = int(steps[-1])
    if t_hi == 0:
        raise ValueError("the grid must contain a step > 0")
    t0 = log.first_step  # a log started by a resumed fit: nothing accumulates before its first step
    res = _model_sweep(ctx, query, t0, t_hi, steps.tolist(), hvp, eps0, resolve_progress(progress, "dit timeline"), shard,
                        removal)
    Q = len(res.names)
    values = np.zeros((log.dataset_size, len(steps), Q))
    for g, s in enumerate(steps):
        if s > t0:
            values[:, g, :] = res.values[int(s)]
    return Timeline(values, steps, res.names, _reported(ctx, res, _method(ctx, "dit", hvp, removal=removal)),
                    info=res.info)
