"""The DIT adjoint sweep (docs/influence-math.md §2-3, docs/optimizer-adjoint.md): the mechanics behind
:func:`~lightning_influence.estimators.dit.dit`, ``dit_local`` and ``timeline``.

:class:`_Context` holds the log, the module, the data and the logged optimizer's functional twin,
and replays the trajectory in reverse (:meth:`_Context.reverse_trajectory`: segments between
checkpoints, or, where an interval's steps exceed ``max_memory_bytes``, about ``√L`` steps of an interval of ``L`` with
in-memory anchors: about ``2√L`` states held at once, :func:`segment_length`).
:func:`_model_sweep` pulls the adjoint ``(λ_θ, λ_s)`` back through every step::

    (θ̄, s̄, R) = VJP_u(λ) at (θ_t, s_t, G_t);   F_j += −w_{j,t} ⟨R, g_{j,t}⟩;   λ = (θ̄ + H_t R, s̄)

with the Hessian-vector products ``H_t R`` and per-sample terms ``J_t R`` from one reverse-over-reverse
pass (or finite differences of gradients). With a :class:`~lightning_influence.step.shard.BatchShard`
each process evaluates its rows of every step (docs/scaling.md, *batch split*): ``G_t`` and ``H_t R``
are sums over rows, so they are summed over the processes (one all-reduce each); ``J_t R`` stays with
the rows' process and the score matrix is summed once at the end. No Lightning imports.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from lightning_influence.capture.hvp import flatten, unflatten
from lightning_influence.estimators.fd import FiniteDifferenceProducts
from lightning_influence.estimators.growth import AdjointGrowth
from lightning_influence.log.reader import InfluenceLog
from lightning_influence.queries import LossFn, Query, query_gradients, query_names
from lightning_influence.replay import (TrainData, _optimizer_spec, checkpoint_params, load_step, optimizer_class, replay,
                                        replay_from)
from lightning_influence.replay_drift import DriftReport
from lightning_influence.step.clipping import clip_gradient, logged_clip_spec
from lightning_influence.step.micro import Step, per_sample_grad_blocks_masked
from lightning_influence.step.optimizers import RULES, OptimizerStep, coordinate_groups
from lightning_influence.step.precision import Precision
from lightning_influence.step.shard import BatchShard, check_row_split

HVP_MODES = ("exact", "fd")
REMOVALS = ("step", "linear")


# ================================================================================ optimizer
PRECONDITIONERS = ("exact", "frozen")


def _optimizer_step(log: InfluenceLog, names: Sequence[str], sizes: Sequence[int], dtype: torch.dtype,
                    preconditioner: str = "exact", device: torch.device | str = "cpu") -> OptimizerStep:
    """The logged optimizer's functional twin over the flat layout ``names``/``sizes``."""
    if preconditioner not in PRECONDITIONERS:
        raise ValueError(f"preconditioner must be one of {PRECONDITIONERS}, got {preconditioner!r}")
    rule = RULES[optimizer_class(log).__name__]
    groups = [dict(g) for g in _optimizer_spec(log)["param_groups"]]
    return OptimizerStep(rule, groups, coordinate_groups(groups, names, sizes), dtype, device,
                         frozen_preconditioner=preconditioner == "frozen")


# ============================================================================== trajectory
@dataclass
class _Record:
    step: int
    params: dict[str, Tensor]
    ids: np.ndarray | None  # None: the end point θ_{t_hi}
    lrs: np.ndarray | None = None
    state: dict[str, Tensor] = field(default_factory=dict)  # flat optimizer state before the step


class _Context:
    """Everything a model-based sweep needs: log, module, data, names, the optimizer step."""

    def __init__(self, log: InfluenceLog, module: nn.Module, train_data: TrainData, loss_fn: LossFn, verify: bool,
                 tolerance: float | None, max_memory_bytes: int, preconditioner: str = "exact") -> None:
        self.log, self.module, self.train_data, self.loss_fn = log, module, train_data, loss_fn
        self.verify, self.tolerance, self.max_memory_bytes = verify, tolerance, max_memory_bytes
        self.drift = DriftReport()  # measured at every checkpoint the replays pass (re-anchored there)
        ref = checkpoint_params(log, module, log.checkpoint_steps[0] if log.checkpoint_steps else 0)
        self.names = list(ref)
        self.shapes = {n: tuple(t.shape) for n, t in ref.items()}
        self.sizes = [int(np.prod(self.shapes[n], dtype=np.int64)) for n in self.names]
        self.dtype = next(iter(ref.values())).dtype
        self.device = next(iter(ref.values())).device  # the module's: the sweep runs there (e.g. a GPU)
        self.p = sum(self.sizes)
        self.step = _optimizer_step(log, self.names, self.sizes, self.dtype, preconditioner, device=self.device)
        self.rule = self.step.rule
        self.opt_names = [n for g in _optimizer_spec(log)["param_groups"] for n in g["params"]]
        self.peak_trajectory_bytes = 0  # the most θ_t + state bytes held at once (a segment's and the anchors)

    def state_before(self, opt: torch.optim.Optimizer) -> dict[str, Tensor]:
        """The live optimizer's state (before the step it is about to take), flat."""
        params = [p for g in opt.param_groups for p in g["params"]]
        by_name = {n: opt.state.get(p, {}) for n, p in zip(self.opt_names, params)}
        return self.step.state_from(by_name, self.names, self.sizes)

    def bytes_per_step(self) -> int:
        return self.p * torch.tensor([], dtype=self.dtype).element_size() + self.step.bytes_per_state()

    # --- trajectory, in reverse
    def reverse_trajectory(self, t_lo: int, t_hi: int, progress: Callable[[int, int], None] | None,
                           shard: BatchShard | None = None) -> Iterator[_Record]:
        """Yield the end point ``θ_{t_hi}``, then the steps ``t_hi−1 .. t_lo`` (with ``θ_t``, ``B_t``, ``η_t``); with
        ``shard`` every process replays its rows of each step (:func:`~lightning_influence.replay.replay_step`)."""
        log = self.log
        ckpts = log.checkpoint_steps
        earlier = [c for c in ckpts if c <= t_lo]
        if not earlier:
            raise ValueError(f"no checkpoint at or before step {t_lo} to replay from (checkpoints: {ckpts})")
        s0 = earlier[-1]
        per = max(self.bytes_per_step(), 1)
        # each checkpoint interval on its own, latest first: its in-memory anchors live only while it is swept
        starts = sorted({c for c in ckpts if s0 <= c < t_hi} | {s0})
        intervals = list(zip(starts, starts[1:] + [t_hi]))
        seg_len = segment_length(max(b - a for a, b in intervals), per, self.max_memory_bytes)
        plan = [(a, b, list(range(a + seg_len, b, seg_len))) for a, b in intervals]
        total = (t_hi - s0) + sum(anchors[-1] - a for a, _, anchors in plan if anchors)
        done = 0
        first_segment = True
        for a, b, anchors in reversed(plan):
            if b <= t_lo and not first_segment:
                break
            memory_anchors: dict[int, tuple[dict[str, Tensor], dict[str, Any]]] = {}
            if anchors:  # forward pass keeping θ and the optimizer state at the interval's in-memory anchors
                want = set(anchors)
                for rs in replay(log, self.module, self.train_data, a, anchors[-1], start=a, loss_fn=self.loss_fn,
                                 verify=self.verify, tolerance=self.tolerance, report=self.drift, shard=shard):
                    if rs.step in want:
                        memory_anchors[rs.step] = (rs.params, copy.deepcopy(rs.optimizer.state_dict()))
                    if rs.step < anchors[-1]:
                        done += 1
                        if progress is not None:
                            progress(done, total)
            for sa, sb in reversed(list(zip([a, *anchors], [*anchors, b]))):
                if sb <= t_lo and not first_segment:
                    break
                if sa == a:
                    gen = replay(log, self.module, self.train_data, sa, sb, start=sa, loss_fn=self.loss_fn,
                                 verify=self.verify, tolerance=self.tolerance, report=self.drift, shard=shard)
                else:
                    params, state = memory_anchors.pop(sa)
                    gen = replay_from(log, self.module, self.train_data, params, state, sa, sb, loss_fn=self.loss_fn,
                                      verify=self.verify, tolerance=self.tolerance, report=self.drift, shard=shard)
                records: list[_Record] = []
                end: _Record | None = None
                for rs in gen:
                    if rs.step < sb:
                        records.append(_Record(rs.step, rs.params, rs.ids, rs.lrs, self.state_before(rs.optimizer)))
                        self.peak_trajectory_bytes = max(self.peak_trajectory_bytes,
                                                         (len(records) + len(memory_anchors)) * per)
                    else:
                        end = _Record(rs.step, rs.params, None)
                if first_segment:
                    assert end is not None
                    yield end
                    first_segment = False
                for rec in reversed(records):
                    done += 1
                    if rec.step >= t_lo:
                        yield rec
                    if progress is not None:
                        progress(min(done, total), total)
                del records


def segment_length(longest: int, per: int, budget: int) -> int:
    """Steps per replay segment for checkpoint intervals of at most ``longest`` steps, ``per`` bytes a step: the whole
    interval where it fits ``budget``, else ``⌈√longest⌉``, which holds the fewest states at once (the interval's
    in-memory anchors plus one segment's steps, ``≈ 2√longest``): a shorter segment only adds anchors."""
    if longest * per <= budget:
        return max(longest, 1)
    return max(1, int(math.ceil(math.sqrt(longest))))


# ================================================================================ products
def _batch_gradient(ctx: _Context, params: dict[str, Tensor], batch: Step, w: Tensor,
                    shard: BatchShard | None = None) -> Tensor:
    """``G_t = Σ_i w_{i,t} ∇ℓ_i``: the unclipped gradient the step applied at ``θ_t``, flat (the point the
    optimizer's and the clipping's VJPs are taken at). A plain backward pass: its forward draws the training
    dropout masks (one inside ``torch.func.grad`` may not, ``docs/replay.md``). With ``shard``: the sum over the
    processes of their rows' parts."""
    if not batch.micro:  # a process without rows of this step
        return shard.all_reduce(torch.zeros(ctx.p, dtype=ctx.dtype, device=ctx.device))
    leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    with torch.enable_grad():
        g = torch.autograd.grad((w * batch.losses(ctx.module, ctx.loss_fn, leaves)).sum(), list(leaves.values()),
                                allow_unused=True)
    g = flatten({n: torch.zeros_like(leaves[n]) if gi is None else gi for n, gi in zip(leaves, g)}, ctx.names).detach()
    return g if shard is None else shard.all_reduce(g)


def _products_exact(ctx: _Context, params: dict[str, Tensor], batch: Step, R: Tensor, w: Tensor,
                    shard: BatchShard | None = None) -> tuple[Tensor, Tensor]:
    """``(H_t R, J_t R)``: Hessian of the weighted batch loss ``Σ w_i ℓ_i`` times ``R`` ``(p, C)`` and the
    per-sample directional derivatives ``⟨g_j, R_c⟩`` ``(C, B)``, exactly, by reverse-over-reverse from one
    plain forward with every micro-batch's training dropout masks (:meth:`Step.curvature_products`). With
    ``shard``: ``H_t R`` summed over the processes, ``J_t R`` of this process's rows."""
    if not batch.micro:
        return shard.all_reduce(torch.zeros_like(R)), R.new_zeros(R.shape[1], 0)
    directions = [unflatten(R[:, c], ctx.shapes) for c in range(R.shape[1])]
    hr, jr = batch.curvature_products(ctx.module, ctx.loss_fn, params, w, directions)
    HR = torch.stack([flatten(h, ctx.names) for h in hr], dim=1)
    return (HR if shard is None else shard.all_reduce(HR)), jr


def removal_block(p: int, dtype: torch.dtype, budget: int) -> int:
    """Samples whose per-sample gradient rows ``(block, p)`` the step removal holds at once: as many as ``budget``
    bytes (``max_memory_bytes``) take, at least one."""
    return max(1, int(budget) // max(1, p * torch.tensor([], dtype=dtype).element_size()))


def _removed_rows(ctx: _Context, params: dict[str, Tensor], batch: Step, w: Tensor,
                  block: int | None = None) -> Iterator[Tensor]:
    """``w_j ∇ℓ_j`` for this process's rows of the step in their order, at most ``block`` rows ``(≤ block, p)`` at a
    time (``None``: a micro-batch's at once), each micro-batch from one forward with its training masks."""
    at = 0
    for m in batch.micro:
        for rows in per_sample_grad_blocks_masked(ctx.module, ctx.loss_fn, m, batch.precision, ctx.names, params, block):
            yield rows.to(ctx.dtype) * w[at:at + rows.shape[0]].unsqueeze(1)
            at += rows.shape[0]


def _query_matrix(ctx: _Context, query: Query, params: Mapping[str, Tensor]) -> tuple[Tensor, list[str]]:
    grads, values = query_gradients(ctx.module, query, ctx.names, params)
    Q = len(values)
    q = torch.cat([grads[n].reshape(Q, -1) for n in ctx.names], dim=1).to(ctx.dtype)
    return q.T.contiguous(), query_names(query, Q)  # (p, Q)


# =================================================================================== sweep
@dataclass
class _SweepResult:
    values: dict[int, np.ndarray]  # activation step -> (N, Q) F_j(step) (or local sums)
    names: list[str]
    info: dict[str, Any]
    growth: AdjointGrowth  # how far λ_θ grew (reported by the public estimator: AdjointGrowth.report)


def _model_sweep(ctx: _Context, query: Query, t_lo: int, t_hi: int, activations: Sequence[int], hvp: str,
                 eps0: float | None, progress: Callable[[int, int], None] | None,
                 shard: BatchShard | None = None, removal: str = "step") -> _SweepResult:
    """Backward sweep over steps ``t_hi−1 .. t_lo``; a column block ``q_s`` joins at each activation step ``s``.

    With ``shard`` only this process's rows of every step are replayed and evaluated (the replay's gradient, ``G_t``,
    ``H_t R`` and the scores summed over the processes); every process holds the whole trajectory and adjoint."""
    if hvp not in HVP_MODES:
        raise ValueError(f"hvp must be one of {HVP_MODES}, got {hvp!r}")
    if removal not in REMOVALS:
        raise ValueError(f"removal must be one of {REMOVALS}, got {removal!r}")
    if ctx.step.frozen:  # the frozen-preconditioner approximation is a linearisation throughout
        removal = "linear"
    if shard is not None:
        check_row_split(ctx.module, ctx.log.meta)
    fd = (FiniteDifferenceProducts(ctx.module, ctx.loss_fn, ctx.names, ctx.shapes, ctx.dtype,
                                   Precision.from_meta(ctx.log.meta.get("precision")), eps0) if hvp == "fd" else None)
    acts = sorted({int(s) for s in activations if t_lo < s <= t_hi})
    N = ctx.log.dataset_size
    U: Tensor | None = None  # λ_θ (p, C)
    S: dict[str, Tensor] = {}  # λ_s per state key (p, C)
    blocks: list[tuple[int, int]] = []  # (activation step, first column)
    scores: np.ndarray | None = None
    names: list[str] = []
    n_hvp = 0
    t0 = time.perf_counter()
    keys = ctx.step.adjoint_keys
    peak_adjoint = 0  # bytes of the adjoint columns (λ_θ, λ_s, R) at their largest
    peak_rows = 0  # bytes of one step's per-sample gradients (the step removal) held at once
    block = removal_block(ctx.p, ctx.dtype, ctx.max_memory_bytes)  # of those rows, within the budget
    rows_evaluated = 0  # sample-steps this process evaluated
    growth = AdjointGrowth("dit", "Check the scores with replay leave-one-out (evaluate), or use a shorter window or "
                           "dit_local", t_hi, ctx.log.path)

    def activate(step: int, params: dict[str, Tensor]) -> None:
        nonlocal U, S, scores, names
        q, names = _query_matrix(ctx, query, params)
        Q = q.shape[1]
        if U is None:
            scores = np.zeros((N, Q * len(acts)))
            U = torch.zeros(ctx.p, 0, dtype=ctx.dtype, device=ctx.device)
            S = {k: torch.zeros(ctx.p, 0, dtype=ctx.dtype, device=ctx.device) for k in keys}
        blocks.append((step, U.shape[1]))
        U, S = OptimizerStep.add_columns(U, S, q)
        growth.added(q)

    for rec in ctx.reverse_trajectory(t_lo, t_hi, progress, shard):
        if rec.ids is None:
            if t_hi in acts:
                activate(t_hi, rec.params)
            continue
        batch = (load_step(ctx.log, ctx.train_data, rec.step, shard) if U is not None and U.shape[1] > 0 and len(rec.ids)
                 else None)
        if batch is not None and not batch.skipped:  # a step the GradScaler skipped is the identity
            mine = slice(None) if batch.rows is None else batch.rows  # this process's rows of the step
            ids = rec.ids[mine]
            rows_evaluated += len(ids)
            theta = flatten(rec.params, ctx.names)
            w = torch.as_tensor(ctx.log.weights(rec.step)[mine], dtype=ctx.dtype, device=ctx.device)  # w_{i,t} (step.weights)
            clip = logged_clip_spec(ctx.log, rec.step)  # the clipping Jacobian joins the update's VJP (step.clipping)
            transform = None if clip is None else (lambda x: clip_gradient(x, clip))
            # an affine step (SGD without clipping): a VJP independent of g (no gradient pass), removal = its derivative
            affine = ctx.rule.linear and clip is None
            stepped = removal == "step" and not affine
            # the step's per-sample rows in blocks within max_memory_bytes; all of them at once where they fit
            whole = stepped and len(ids) <= block
            rows = torch.cat([theta.new_zeros(0, ctx.p), *_removed_rows(ctx, rec.params, batch, w)]) if whole else None
            if affine:
                g = torch.zeros_like(theta)
            elif rows is None:
                g = _batch_gradient(ctx, rec.params, batch, w, shard)
            else:  # G_t = Σ_j w_j g_j from the rows the removal needs anyway (no second gradient pass)
                g = rows.sum(0) if shard is None else shard.all_reduce(rows.sum(0))
            terms = None
            values = ctx.log.hyper(rec.step)  # momentum, betas, ... of the step where a schedule changed them
            if stepped:
                parts = []
                for r in ([rows] if whole else _removed_rows(ctx, rec.params, batch, w, block)):
                    peak_rows = max(peak_rows, r.numel() * r.element_size())
                    parts.append(ctx.step.removal_terms(theta, rec.state, g, rec.lrs, r, U, S, transform, values=values))
                terms = torch.cat(parts, dim=1) if parts else U.new_zeros(U.shape[1], 0)
                rows = None
            th_bar, S, R = ctx.step.vjp(theta, rec.state, g, rec.lrs, U, S, transform=transform, values=values)
            # J R is used by the linear removal only, but comes with H R: one batched backward (the leaf u: no
            # measurable cost) or the same differences, whose kink guard compares whole columns, J R's included
            HR, JR = (_products_exact(ctx, rec.params, batch, R, w, shard) if fd is None
                      else fd(rec.params, batch, R, w, shard, len(rec.ids)))
            n_hvp += R.shape[1]
            C = U.shape[1]
            peak_adjoint = max(peak_adjoint, sum(x.numel() * x.element_size() for x in (U, R, *S.values())))
            if terms is None:
                terms = -JR * w.unsqueeze(0)
            np.add.at(scores[:, :C], ids, terms.T.detach().double().cpu().numpy())
            U = th_bar + HR.detach()
            growth.check(U, rec.step)
        if rec.step in acts:
            activate(rec.step, rec.params)
    if shard is not None and scores is not None:  # each process's rows' terms, summed
        scores = shard.sum(scores)
    values: dict[int, np.ndarray] = {}
    Q = len(names)
    for step, c0 in blocks:
        values[step] = scores[:, c0 : c0 + Q].copy()
    info = {"hvp": hvp, "hvp_products": n_hvp, "steps_swept": t_hi - t_lo, "optimizer": ctx.rule.name,
            "preconditioner": "frozen" if ctx.step.frozen else "exact", "removal": removal, "peak_adjoint_bytes": peak_adjoint,
            "peak_removal_rows_bytes": peak_rows, "removal_rows_per_block": block,
            "peak_trajectory_bytes": ctx.peak_trajectory_bytes,
            "seconds": time.perf_counter() - t0, "replay_drift": ctx.drift.summary()}
    if shard is not None:
        info.update(split="batch", rows_evaluated=rows_evaluated)
    if fd is not None:
        info.update(fd.info())
        reason = fd.unreliable()
        if reason is not None:
            info["fd_unreliable"] = True
            warnings.warn(f"DIT with hvp='fd': {reason}; the scores are not reliable. Use hvp='exact' (the default) or "
                          "a smaller eps0", RuntimeWarning, stacklevel=4)
    return _SweepResult(values, names, info, growth)
