"""What every Diff-In pass needs (:mod:`lightning_influence.estimators.diffin`): the log, model and data of a run
(:class:`_Context`), the batch and per-sample Hessian-vector products (finite differences, taken in float64 by
:class:`~lightning_influence.estimators.fd.FiniteDifferenceProducts` as DIT's, or exact), and the curvature along a
direction with its finite-difference check (docs/diffin.md). No Lightning imports.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vmap
from torch.utils import _pytree as pytree

from lightning_influence.capture.hvp import unflatten
from lightning_influence.capture.per_sample import per_sample_grads_vmap
from lightning_influence.capture.projection import KroneckerProjector
from lightning_influence.estimators.fd import CastInputs, FiniteDifferenceProducts
from lightning_influence.log.reader import InfluenceLog
from lightning_influence.queries import LossFn, Query, evaluation_mode, query_gradients, query_names
from lightning_influence.replay import (TrainData, batch_from_ids, checkpoint_params, functional_loss, load_step, replay,
                                        require_train_data)
from lightning_influence.replay_drift import DriftReport
from lightning_influence.step.clipping import logged_clip_spec, step_clip_adjoint
from lightning_influence.step.micro import Step, exact_kernels, per_sample_grads_masked
from lightning_influence.step.precision import Precision

__all__ = ["FD_EDGE", "HVP_MODES", "Vectors", "batch_hvp"]

HVP_MODES = ("fd", "exact")
Vectors = dict[str, Tensor]  # name -> (C, *shape): C vectors over the tracked parameters


# ================================================================================= context
class _Context:
    """Log, model, data and the bookkeeping every Diff-In pass needs."""

    def __init__(self, log: InfluenceLog, module: nn.Module, train_data: TrainData, loss_fn: LossFn, hvp: str,
                 eps0: float | None, verify: bool, chunk_size: int, tolerance: float | None = None) -> None:
        if module is None:
            raise ValueError("Diff-In needs `module` (the architecture; weights come from the log)")
        require_train_data(log, train_data, "Diff-In", "for the Hessian-vector products")
        if hvp not in HVP_MODES:
            raise ValueError(f"hvp must be one of {HVP_MODES}, got {hvp!r}")
        if not log.recorded.get("gradients"):
            raise ValueError(f"{log.path}: Diff-In reads the logged per-sample gradients; the run did not record them "
                             "(InfluenceTracker(record_gradients=True))")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.log, self.module, self.train_data, self.loss_fn = log, module, train_data, loss_fn
        self.drift = DriftReport()  # measured at every checkpoint the replays pass (info["replay_drift"])
        self.hvp, self.verify, self.chunk_size, self.tolerance = hvp, verify, chunk_size, tolerance
        ref = checkpoint_params(log, module, log.checkpoint_steps[0])
        self.dtype = next(iter(ref.values())).dtype
        self.fd_checked = self.fd_blowups = 0  # finite-difference curvatures checked / beyond the stability edge
        if eps0 is not None and not float(eps0) > 0:
            raise ValueError(f"eps0 must be > 0, got {eps0}")
        self.names = log.param_names  # tracked: the logged columns
        self.shapes = {n: tuple(ref[n].shape) for n in self.names}
        # hvp="fd": every product (batch and per-sample) through DIT's float64 finite differences, with their check,
        # fallback, kink and noise counts (docs/diffin.md)
        self.fd = (FiniteDifferenceProducts(module, loss_fn, self.names, self.shapes, self.dtype,
                                            Precision.from_meta(log.meta.get("precision")), eps0, estimator="Diff-In")
                   if hvp == "fd" else None)
        self.projector: KroneckerProjector = log.projector()
        self.N = log.dataset_size
        self.first = log.first_step  # > 0 for a log started by a resumed fit
        self.every = int(log.meta.get("every_n_steps", 1))
        groups = log.param_groups()
        group_of = {n: gi for gi, names in enumerate(groups) for n in names}
        self.group_of_name = {n: group_of[n] for n in self.names}
        self.n_groups = len(groups)
        self.col_group = log.column_groups()
        spec = log.meta.get("optimizer", {})
        spec = spec[0] if isinstance(spec, list) else spec
        self.opt_class = str(spec.get("class", "")).rpartition(".")[2]
        pgroups = spec.get("param_groups", [{}] * self.n_groups)
        self.weight_decay = np.array([float(g.get("weight_decay", 0.0) or 0.0) for g in pgroups])
        self.momentum = any(float(g.get("momentum", 0.0) or 0.0) != 0.0 for g in pgroups)
        self.exact_sgd = self.opt_class == "SGD" and not self.momentum

    def weight_decay_at(self, t: int) -> np.ndarray:
        """``λ`` per param group at step ``t``: the value a schedule set where the log recorded one (``log.hyper``)."""
        values = self.log.hyper(t)
        return self.weight_decay if values is None or "weight_decay" not in values else values["weight_decay"]

    @property
    def eps0(self) -> float | None:
        """``ε_0`` of the finite-difference products (``None`` with exact ones)."""
        return None if self.fd is None else self.fd.eps0

    # ------------------------------------------------------------------------- trajectory
    def params_at(self, steps: Sequence[int], through: int | None = None) -> Iterator[tuple[int, dict[str, Tensor]]]:
        """``(t, θ_t)`` for the given steps in increasing order: checkpoints, else one verified replay (continued to
        step ``through`` when given: a process of a split computation checks the checkpoints up to the next one's
        steps, as one process would)."""
        steps = sorted({int(t) for t in steps})
        if not steps:
            return
        ckpts = set(self.log.checkpoint_steps)
        if all(t in ckpts for t in steps):
            for t in steps:
                yield t, checkpoint_params(self.log, self.module, t)
            return
        want = set(steps)
        for rs in replay(self.log, self.module, self.train_data, steps[0], max(steps[-1], through or 0),
                         loss_fn=self.loss_fn, verify=self.verify, tolerance=self.tolerance, report=self.drift):
            if rs.step in want:
                yield rs.step, rs.params

    def batch(self, ids: np.ndarray) -> Any:
        """Samples by id, cast as the run's precision plugin cast its batches (``"64-true"``; ``replay.load_step``)."""
        return Precision.from_meta(self.log.meta.get("precision")).convert_input(batch_from_ids(self.train_data, ids))

    def step_batch(self, t: int) -> Step:
        """The batch of step ``t`` as trained: its micro-batches with their dropout masks and autocast."""
        return load_step(self.log, self.train_data, t)

    def losses(self, params: Mapping[str, Tensor], batch: Any, exact: bool = False, module: nn.Module | None = None
               ) -> Tensor:
        """Per-sample losses of a step's batch (each micro-batch under its random state) or of any other batch (on
        ``module``, default the run's: the finite differences pass their float64 copy)."""
        module = self.module if module is None else module
        if isinstance(batch, Step):
            return batch.losses(module, self.loss_fn, params, exact=exact)
        with evaluation_mode(module):  # not a step's batch: a function of θ, dropout off (as a query)
            return functional_loss(module, self.loss_fn, params, batch)

    # -------------------------------------------------------------------------- gradients
    def batch_grad(self, params: Mapping[str, Tensor], batch: Any, names: Sequence[str] | None = None,
                   w: Tensor | None = None, module: nn.Module | None = None) -> dict[str, Tensor]:
        """Gradient of the step's loss ``Σ w_i ℓ_i`` (default: the batch mean) w.r.t. ``names`` (default: the
        tracked parameters) at ``params``."""
        names = list(self.names if names is None else names)
        leaves = {n: params[n].detach().requires_grad_(True) for n in names}
        with torch.enable_grad():
            loss = _weighted(self.losses({**params, **leaves}, batch, module=module), w)
            g = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
        return {n: torch.zeros_like(leaves[n]) if gi is None else gi.detach() for n, gi in zip(names, g)}

    def project(self, vectors: Vectors) -> np.ndarray:
        """``(C, K)`` float64: the vectors projected like the logged gradient rows."""
        return self.projector.project(vectors).double().cpu().numpy()

    def query(self, query: Query, params: Mapping[str, Tensor]) -> tuple[Vectors, list[str]]:
        grads, values = query_gradients(self.module, query, self.names, params)
        return {n: g.detach().to(self.dtype) for n, g in grads.items()}, query_names(query, len(values))

    def per_sample_grads(self, params: Mapping[str, Tensor], batch: Any, projector: KroneckerProjector | None = None,
                         module: nn.Module | None = None) -> Tensor:
        """Projected per-sample gradients; a step's batch keeps its training dropout masks (one batched forward
        per micro-batch), any other batch is evaluated sample by sample (``vmap``) with dropout off (a function of θ)."""
        module = self.module if module is None else module
        if isinstance(batch, Step):
            return torch.cat([per_sample_grads_masked(module, self.loss_fn, m, batch.precision, self.names, params,
                                                      projector or self.projector) for m in batch.micro])
        with evaluation_mode(module):  # not a step's batch: a function of θ, dropout off (as a query)
            return per_sample_grads_vmap(module, self.loss_fn, batch, self.names, projector or self.projector,
                                         params=params).detach()

    def per_sample_hvp(self, params: Mapping[str, Tensor], batch: Any, direction: Mapping[str, Tensor]) -> Tensor:
        """Projected ``H_z v`` ``(B, K)`` for every sample of ``batch`` (``direction`` over all parameters):
        central differences of the per-sample gradients along ``v`` in float64, kink-guarded per sample (one
        more pass for ``g_z(θ)``; :meth:`FiniteDifferenceProducts.directional`), or exact."""
        if self.hvp == "exact" and isinstance(batch, Step):  # reverse-over-reverse with the step's dropout masks
            hv = batch.per_sample_curvature(self.module, self.loss_fn, params, direction, self.names)
            return self.projector.project(hv).detach()
        if self.hvp == "exact":
            return _per_sample_hvp_exact(self, params, batch, direction)
        assert self.fd is not None
        inputs = CastInputs(batch)
        return self.fd.directional(lambda module, q, dt: self.per_sample_grads(q, inputs(dt)[0], module=module),
                                   params, [direction], _step_of(batch))[0]

    # ------------------------------------------------------- the step as Lightning ran it
    def step_weights(self, t: int) -> Tensor:
        """``w_{i,t}`` of step ``t`` (:mod:`lightning_influence.step.weights`)."""
        return torch.as_tensor(self.log.weights(t), dtype=self.dtype)

    def clip_factor(self, t: int) -> float:
        """The norm-clip coefficient of step ``t`` (1 when not norm-clipped): the factor the clipped step put on
        the gradient, so on its curvature term (step form) and on its learning rate (published form)."""
        spec = logged_clip_spec(self.log, t)
        coef = float(self.log.step_column(t, "clip_coef"))
        return coef if spec is not None and spec.algorithm == "norm" and np.isfinite(coef) else 1.0

    def clipped(self, rec: Any, G: np.ndarray, R: np.ndarray) -> np.ndarray:
        """``J_Cᵀ R`` for columns ``R`` ``(K, C)`` in the logged row space of step ``rec`` (identity without clipping)."""
        return step_clip_adjoint(self.log, rec.step, rec.weights, G)(torch.from_numpy(np.ascontiguousarray(R))).numpy()

    def method(self, base: str, extra: Sequence[str] = ()) -> str:
        tags = [self.hvp, *extra]
        if not self.exact_sgd:
            tags.append("approx.")
        return f"{base} ({', '.join(tags)})"


def _weighted(losses: Tensor, w: Tensor | None) -> Tensor:
    """The step's loss from its per-sample losses: ``Σ w_i ℓ_i`` (step.weights), or the mean without weights."""
    return losses.mean() if w is None else (w.to(losses) * losses).sum()


def batch_hvp(ctx: _Context, params: Mapping[str, Tensor], batch: Step, V: Vectors, w: Tensor | None = None) -> Vectors:
    """``H_B v`` for the ``C`` vectors ``V`` (tracked parameters) at ``params``: the Hessian of the step's loss
    ``Σ w_i ℓ_i`` (default: the batch mean) over ``batch``, a step's batch as trained (``load_step``), its tracked
    block. ``exact``: reverse-over-reverse from one forward with the step's masks
    (:meth:`~lightning_influence.step.micro.Step.curvature_products`); ``fd``: DIT's own central differences
    (:class:`~lightning_influence.estimators.fd.FiniteDifferenceProducts`: float64, kink-guarded per direction)."""
    if not isinstance(batch, Step):
        raise TypeError(f"batch_hvp takes a step's batch as trained (Step, from load_step), not {type(batch).__name__}")
    names = ctx.names
    C = next(iter(V.values())).shape[0]
    fixed = {n: t.detach() for n, t in params.items()}
    if w is None:  # the batch mean
        w = torch.full((len(batch.ids),), 1.0 / len(batch.ids), dtype=ctx.dtype)
    if ctx.hvp == "exact":
        hr, _ = batch.curvature_products(ctx.module, ctx.loss_fn, fixed, w, [{n: V[n][c] for n in names} for c in range(C)])
        return {n: torch.stack([h[n] for h in hr]) for n in names}
    assert ctx.fd is not None
    R = torch.stack([torch.cat([V[n][c].reshape(-1) for n in names]) for c in range(C)], dim=1)
    HR, _ = ctx.fd(fixed, batch, R, w)  # H_B R of the step with its masks (and J R, not needed here)
    return _stacked(ctx, HR.T)


def _step_of(batch: Any) -> int:
    return batch.step if isinstance(batch, Step) else -1


def _stacked(ctx: _Context, rows: Tensor) -> Vectors:
    """``(C, p)`` flat rows over the tracked parameters as ``{name: (C, *shape)}``."""
    cols = [unflatten(r, ctx.shapes) for r in rows]
    return {n: torch.stack([c[n] for c in cols]) for n in ctx.names}


def _per_sample_hvp_exact(ctx: _Context, params: Mapping[str, Tensor], batch: Any, direction: Mapping[str, Tensor]) -> Tensor:
    """Exact projected ``H_z v`` per sample: ``jvp`` along ``v`` of ``vmap(grad)`` over the samples."""
    leaves, spec = pytree.tree_flatten(batch)
    is_tensor = [isinstance(x, Tensor) for x in leaves]
    tensors = tuple(x for x, t in zip(leaves, is_tensor) if t)
    primals = {n: t.detach() for n, t in params.items()}
    tangents = {n: direction[n].detach().to(t.dtype) if n in direction else torch.zeros_like(t) for n, t in primals.items()}

    def sample_loss(p: dict[str, Tensor], sample: tuple[Tensor, ...]) -> Tensor:
        it = iter(sample)
        one = pytree.tree_unflatten([next(it).unsqueeze(0) if t else x for x, t in zip(leaves, is_tensor)], spec)
        return functional_loss(ctx.module, ctx.loss_fn, p, one)[0]

    def per_sample(p: dict[str, Tensor]) -> dict[str, Tensor]:
        g = vmap(grad(sample_loss), in_dims=(None, 0), randomness="different")(p, tensors)
        return {n: g[n] for n in ctx.names}

    with evaluation_mode(ctx.module), exact_kernels():  # not a step's batch: dropout off (as a query); attention
        _, hv = jvp(per_sample, (primals,), (tangents,))  # through its math kernel (the fused ones have no forward AD)
    return ctx.projector.project(hv).detach()


# ======================================================================= curvature checks
FD_EDGE = 4.0  # |κ|·η beyond SGD's stability edge 2(1 + momentum) ≤ 4: a finite-difference artifact, not curvature


def _check_fd(ctx: _Context, kap: np.ndarray, lrs: np.ndarray) -> None:
    """Count finite-difference curvatures ``κ`` with ``|κ|·η > FD_EDGE``: a run that trained stably has no such
    direction (SGD diverges along it), so the product crossed a kink (ReLU) or lost its digits to rounding and its
    ``1 − κη`` factor would blow the scores up (docs/diffin.md). Adaptive optimizers are not checked."""
    if ctx.hvp != "fd" or not ctx.exact_sgd:
        return
    edge = np.abs(kap) @ np.asarray(lrs, dtype=np.float64)[: ctx.n_groups]
    ctx.fd_checked += int(edge.size)
    ctx.fd_blowups += int(np.count_nonzero(~(edge <= FD_EDGE)))


def _curvature(ctx: _Context, step: int, V: Vectors, HV: Vectors, clip: float = 1.0) -> np.ndarray:
    """``⟨v, (c H + λ_t) v⟩_g / ‖v‖²`` per vector and param group ``g`` at ``step``: ``(C, G)`` (lr not applied; ``c``
    the step's clip coefficient: clipping scales the gradient, not the weight decay)."""
    decay = ctx.weight_decay_at(step)
    C = next(iter(V.values())).shape[0]
    vv = sum((V[n].double() ** 2).reshape(C, -1).sum(1) for n in ctx.names)
    vv = torch.where(vv > 0, vv, torch.ones_like(vv))
    out = torch.zeros(C, ctx.n_groups, dtype=torch.float64, device=vv.device)
    for n in ctx.names:
        g = ctx.group_of_name[n]
        curv = clip * HV[n].double() + float(decay[g]) * V[n].double()
        out[:, g] += (V[n].double() * curv).reshape(C, -1).sum(1)
    return (out / vv[:, None]).cpu().numpy()
