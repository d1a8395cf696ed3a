"""Diff-In (math reference §4): influence as a cumulative sum of per-step differences.

Two forms, both reading the tracker's log (ids, learning rates, per-sample gradients, the
finite-difference products ``H_{z,t} Ĝ_t``) and taking the Hessian-vector products they need
by central differences of first-order gradients (``hvp="fd"``) or exactly by
forward-over-reverse (``hvp="exact"``, to measure what the finite differences cost).
The derivation, its assumptions and the measurements are in ``docs/diffin.md``.

``form="published"``: the authors' checkpoint form, as written (math §4)::

    I(z, V) = Σ_{t ∈ T_m} a_t · ⟨q_t, H_{B_t} g_{z,t} + H_{z,t} Ĝ_t⟩,     a_t = −t · η_t² / (N · m)

evaluated with ``⟨q, H_B g_z⟩ = ⟨H_B q, g_z⟩`` (one HVP per query per selected step).
``samples="all"`` recomputes ``g_{z,t}`` and ``H_{z,t} Ĝ_t`` for every training sample at each
of the ``m`` selected steps (the paper's setting; three per-sample-gradient passes over the
training set per step); ``samples="batch"`` uses the logged rows of the samples of ``B_t``
at every step of the window, each weighted ``N / |B_t|`` so that it is an unbiased estimate
of the all-sample sum under uniform batch sampling (equal to it for full-batch training).

*Sign.* Expanding the removal deviation under the assumptions that give ``a_t`` (docs), the
expression above is the second-order part of ``f(θ^{-z}) − f(θ)``, with no first-order part.
Its dominant term ``⟨H_B q, g_z⟩`` weighs the same directions as the first-order ``⟨q, g_z⟩``
with a negative coefficient, so as written it is anti-correlated with the removal effect
(measured: docs/diffin.md); the paper reads it the other way round, as the effect of training
*on* ``z``. We return ``−I`` so that, as everywhere in this project, positive means removing
``z`` raises ``f`` (for a loss query: helpful). ``info["raw_sign"] = -1`` records the flip.

``form="step"``: the per-step cumulative form derived in ``docs/diffin.md`` (a named variant,
not the published method). With ``G_z(t) = ⟨q_τ, δ_z[t]⟩`` the deviation seen by the query
gradient at the window end ``τ``, the per-step difference is exact in the linearisation::

    G_z(t+1) − G_z(t) = (η_t/|B_t|) 1[z∈B_t] ⟨q_τ, g_{z,t}⟩ − η_t ⟨(H_t + λ) q_τ, δ_z[t]⟩

and the second-order (propagation) term is closed by the Rayleigh quotient of the batch
Hessian along the query, ``κ_t = ⟨q_τ, E_t (H_t + λ) q_τ⟩ / ‖q_τ‖²`` (one HVP per query per
step, ``E_t`` the per-group learning rates), i.e. ``⟨(H_t+λ) q_τ, δ⟩ ≈ κ_t ⟨q_τ, δ⟩/η_t``. The
recursion ``G(t+1) = (1 − κ_t) G(t) + ...`` is then solved exactly::

    G_z(τ) = Σ_{s<τ, z∈B_s} (η_s/|B_s|) ⟨q_τ, g_{z,s}⟩ · Π_{r=s+1}^{τ−1} (1 − κ_r)

Window scores are ``G_z(t2) − G_z(t1)`` (each end with its own query gradient), as DIT's
``F_j(t2) − F_j(t1)``: the deviation a sample caused before the window still counts.
Self-influence (query ``ℓ(z; θ_τ)``) closes along each sample's own gradient, with the
curvature measured at the sample's own steps (``|B_t|`` HVPs per step) and held between them.

Optimizers: both forms are derived for plain SGD (any schedule; coupled weight decay ``λ``
enters the step form), which they model exactly to their stated closure. SGD with momentum
or Nesterov, Adam, AdamW, RMSprop and Adagrad run unchanged (the update taken as ``η_t g``,
no momentum or preconditioner) and ``method`` says ``approx.``; for those, DIT
(:mod:`lightning_influence.estimators.dit`) is exact in the linearisation.
Parameters ``θ_t`` come from the log's checkpoints, or are replayed between them
(:func:`lightning_influence.replay.replay`, verified at every checkpoint passed).
No Lightning imports.
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vmap
from torch.utils import _pytree as pytree

from lightning_influence.capture.hvp import (KINK_GUARD, KINK_SHARE_LIMIT, default_eps0, fd_directional_derivative, guarded_difference,
                                            parameter_epsilon)
from lightning_influence.capture.per_sample import per_sample_grads_vmap
from lightning_influence.capture.projection import KroneckerProjector
from lightning_influence.estimators.scores import InfluenceScores
from lightning_influence.estimators.signature import estimator_api
from lightning_influence.log.reader import InfluenceLog
from lightning_influence.queries import LossFn, Query, default_loss_fn, query_gradients, query_names
from lightning_influence.replay_drift import DriftReport
from lightning_influence.step.micro import Step, per_sample_grads_masked
from lightning_influence.replay import (
    Progress,
    TrainData,
    batch_from_ids,
    checkpoint_params,
    functional_loss,
    load_step,
    replay,
    resolve_progress,
)
from lightning_influence.step.clipping import logged_clip_spec, step_clip_adjoint

__all__ = ["FORMS", "HVP_MODES", "SAMPLES", "diffin", "diffin_self_influence", "published_coefficients", "batch_hvp"]

FORMS = ("step", "published")
HVP_MODES = ("fd", "exact")
SAMPLES = ("all", "batch")

Vectors = dict[str, Tensor]  # name -> (C, *shape): C vectors over the tracked parameters


# ================================================================================= context
class _Context:
    """Log, model, data and the bookkeeping every Diff-In pass needs."""

    def __init__(self, log: InfluenceLog, module: nn.Module, train_data: TrainData, loss_fn: LossFn, hvp: str,
                 eps0: float | None, verify: bool, chunk_size: int) -> None:
        if module is None:
            raise ValueError("Diff-In needs `module` (the architecture; weights come from the log)")
        if train_data is None:
            raise ValueError("Diff-In needs `train_data` (the training samples by id) for the Hessian-vector products")
        if hvp not in HVP_MODES:
            raise ValueError(f"hvp must be one of {HVP_MODES}, got {hvp!r}")
        if not log.recorded.get("gradients"):
            raise ValueError(f"{log.path}: Diff-In reads the logged per-sample gradients; the run did not record them "
                             "(InfluenceTracker(record_gradients=True))")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.log, self.module, self.train_data, self.loss_fn = log, module, train_data, loss_fn
        self.drift = DriftReport()  # measured at every checkpoint the replays pass (info["replay_drift"])
        self.hvp, self.verify, self.chunk_size = hvp, verify, chunk_size
        ref = checkpoint_params(log, module, log.checkpoint_steps[0])
        self.dtype = next(iter(ref.values())).dtype
        self.eps0 = default_eps0(self.dtype) if eps0 is None else float(eps0)
        self.fd_checked = self.fd_blowups = 0  # finite-difference curvatures checked / beyond the stability edge
        self.fd_kinks = self.fd_products = 0  # batch products whose one-sided differences disagreed (guarded) / all
        if self.eps0 <= 0:
            raise ValueError(f"eps0 must be > 0, got {eps0}")
        self.names = log.param_names  # tracked: the logged columns
        self.shapes = {n: tuple(ref[n].shape) for n in self.names}
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

    # ------------------------------------------------------------------------- trajectory
    def params_at(self, steps: Sequence[int]) -> Iterator[tuple[int, dict[str, Tensor]]]:
        """``(t, θ_t)`` for the given steps in increasing order: checkpoints, else one verified replay."""
        steps = sorted({int(t) for t in steps})
        if not steps:
            return
        ckpts = set(self.log.checkpoint_steps)
        if all(t in ckpts for t in steps):
            for t in steps:
                yield t, checkpoint_params(self.log, self.module, t)
            return
        want = set(steps)
        for rs in replay(self.log, self.module, self.train_data, steps[0], steps[-1], loss_fn=self.loss_fn,
                         verify=self.verify, report=self.drift):
            if rs.step in want:
                yield rs.step, rs.params

    def batch(self, ids: np.ndarray) -> Any:
        return batch_from_ids(self.train_data, ids)

    def step_batch(self, t: int) -> Step:
        """The batch of step ``t`` as trained: its micro-batches with their dropout masks and autocast."""
        return load_step(self.log, self.train_data, t)

    def losses(self, params: Mapping[str, Tensor], batch: Any, exact: bool = False) -> Tensor:
        """Per-sample losses of a step's batch (each micro-batch under its random state) or of any other batch."""
        if isinstance(batch, Step):
            return batch.losses(self.module, self.loss_fn, params, exact=exact)
        return functional_loss(self.module, self.loss_fn, params, batch)

    # -------------------------------------------------------------------------- gradients
    def batch_grad(self, params: Mapping[str, Tensor], batch: Any, names: Sequence[str] | None = None,
                   w: Tensor | None = None) -> dict[str, Tensor]:
        """Gradient of the step's loss ``Σ w_i ℓ_i`` (default: the batch mean) w.r.t. ``names`` (default: the
        tracked parameters) at ``params``."""
        names = list(self.names if names is None else names)
        leaves = {n: params[n].detach().requires_grad_(True) for n in names}
        with torch.enable_grad():
            loss = _weighted(self.losses({**params, **leaves}, batch), w)
            g = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
        return {n: torch.zeros_like(leaves[n]) if gi is None else gi.detach() for n, gi in zip(names, g)}

    def project(self, vectors: Vectors) -> np.ndarray:
        """``(C, K)`` float64: the vectors projected like the logged gradient rows."""
        return self.projector.project(vectors).double().cpu().numpy()

    def query(self, query: Query, params: Mapping[str, Tensor]) -> tuple[Vectors, list[str]]:
        grads, values = query_gradients(self.module, query, self.names, params)
        return {n: g.detach().to(self.dtype) for n, g in grads.items()}, query_names(query, len(values))

    def per_sample_grads(self, params: Mapping[str, Tensor], batch: Any, projector: KroneckerProjector | None = None) -> Tensor:
        """Projected per-sample gradients; a step's batch keeps its training dropout masks (one batched forward
        per micro-batch), any other batch is evaluated sample by sample (``vmap``)."""
        if isinstance(batch, Step):
            return torch.cat([per_sample_grads_masked(self.module, self.loss_fn, m, batch.precision, self.names, params,
                                                      projector or self.projector) for m in batch.micro])
        return per_sample_grads_vmap(self.module, self.loss_fn, batch, self.names, projector or self.projector,
                                     params=params).detach()

    def per_sample_hvp(self, params: Mapping[str, Tensor], batch: Any, direction: Mapping[str, Tensor]) -> Tensor:
        """Projected ``H_z v`` ``(B, K)`` for every sample of ``batch`` (``direction`` over all parameters):
        central differences of the per-sample gradients along ``v`` with the tracker's kink guard (one
        more pass for ``g_z(θ)``), as the tracker logs them, or exact."""
        if self.hvp == "exact" and isinstance(batch, Step):  # reverse-over-reverse with the step's dropout masks
            hv = batch.per_sample_curvature(self.module, self.loss_fn, params, direction, self.names)
            return self.projector.project(hv).detach()
        if self.hvp == "exact":
            return _per_sample_hvp_exact(self, params, batch, direction)
        out, _ = fd_directional_derivative(lambda p: self.per_sample_grads(p, batch), params, direction, self.eps0,
                                           kink_guard=KINK_GUARD)
        return out

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


def batch_hvp(ctx: _Context, params: Mapping[str, Tensor], batch: Any, V: Vectors, w: Tensor | None = None) -> Vectors:
    """``H_B v`` for the ``C`` vectors ``V`` (tracked parameters) at ``params``: the Hessian of the
    step's loss ``Σ w_i ℓ_i`` (default: the batch mean), its tracked block. ``fd``: central differences of the batch gradient at
    ``θ ± ε v̂`` with ``ε = eps0 (1 + ‖θ‖)/√p`` (:func:`~lightning_influence.capture.parameter_epsilon`),
    all ``C`` directions in one vectorised call; ``exact``: reverse-over-reverse for a step's batch
    (:meth:`~lightning_influence.step.micro.Step.curvature_products`), else forward-over-reverse."""
    names = ctx.names
    C = next(iter(V.values())).shape[0]
    fixed = {n: t.detach() for n, t in params.items()}

    if ctx.hvp == "exact" and isinstance(batch, Step):  # reverse-over-reverse from one forward with the step's masks
        wt = torch.full((len(batch.ids),), 1.0 / len(batch.ids), dtype=ctx.dtype) if w is None else w
        hr, _ = batch.curvature_products(ctx.module, ctx.loss_fn, fixed, wt, [{n: V[n][c] for n in names} for c in range(C)])
        return {n: torch.stack([h[n] for h in hr]) for n in names}
    if ctx.hvp == "exact":
        def loss_all(p: dict[str, Tensor]) -> Tensor:
            return _weighted(ctx.losses(p, batch, exact=True), w)

        def one(v: dict[str, Tensor]) -> dict[str, Tensor]:
            tangents = {n: v[n] if n in v else torch.zeros_like(t) for n, t in fixed.items()}
            _, hv = jvp(grad(loss_all), (fixed,), (tangents,))
            return {n: hv[n] for n in names}

        return vmap(one, randomness="same")({n: V[n] for n in names}) if C > 1 else {n: t.unsqueeze(0) for n, t in one({n: V[n][0] for n in names}).items()}

    eps = parameter_epsilon(fixed, ctx.eps0)
    norms = torch.sqrt(sum((V[n].double() ** 2).reshape(C, -1).sum(1) for n in names)).to(ctx.dtype)  # (C,)
    unit = eps / torch.where(norms > 0, norms, torch.ones_like(norms))  # zero directions stay at θ
    factor = torch.where(norms > 0, norms / (2.0 * eps), torch.zeros_like(norms))

    def loss_tracked(p: dict[str, Tensor]) -> Tensor:
        return _weighted(ctx.losses({**fixed, **p}, batch), w)

    def per_dir(x: Tensor, t: Tensor) -> Tensor:  # (C,) -> broadcastable against (C, *shape)
        return x.reshape(C, *([1] * (t.dim() - 1)))

    def plain(p: dict[str, Tensor]) -> dict[str, Tensor]:  # direction by direction, outside vmap
        rows: dict[str, list[Tensor]] = {n: [] for n in names}
        for c in range(C):
            leaves = {n: p[n][c].detach().requires_grad_(True) for n in names}
            with torch.enable_grad():
                gs = torch.autograd.grad(loss_tracked(leaves), [leaves[n] for n in names], allow_unused=True)
            for n, gi in zip(names, gs):
                rows[n].append(torch.zeros_like(leaves[n]) if gi is None else gi)
        return {n: torch.stack(v) for n, v in rows.items()}

    # a step that drew random numbers: plain passes keep its dropout masks (a forward inside vmap may not)
    g = plain if isinstance(batch, Step) and batch.drew else vmap(grad(loss_tracked))
    shift = {n: V[n] * per_dir(unit, V[n]) for n in names}
    plus = g({n: fixed[n].unsqueeze(0) + shift[n] for n in names})
    minus = g({n: fixed[n].unsqueeze(0) - shift[n] for n in names})
    at = grad(loss_tracked)({n: fixed[n] for n in names})  # one more pass: the kink guard's g(θ)
    fwd = torch.cat([(plus[n] - at[n].unsqueeze(0)).reshape(C, -1) for n in names], dim=1)
    bwd = torch.cat([(at[n].unsqueeze(0) - minus[n]).reshape(C, -1) for n in names], dim=1)
    diff, kink = guarded_difference(fwd, bwd, KINK_GUARD)  # (f + b)/2, or the smaller side across a kink
    ctx.fd_kinks += int(kink.sum())
    ctx.fd_products += C
    out, start = {}, 0
    for n in names:
        size = V[n][0].numel()
        out[n] = diff[:, start:start + size].reshape(V[n].shape) * per_dir(2.0 * factor, V[n])
        start += size
    return out


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

    _, hv = jvp(per_sample, (primals,), (tangents,))
    return ctx.projector.project(hv).detach()


# =========================================================================== published form
def published_coefficients(t: int, lrs: np.ndarray, N: int, m: int) -> np.ndarray:
    """``a_t = −t · η_t² / (N · m)`` (elementwise over ``lrs``: per param group or per gradient column)."""
    return -float(t) * np.asarray(lrs, dtype=np.float64) ** 2 / (N * m)


def _select_steps(t1: int, t2: int, steps: Any) -> list[int]:
    if steps is None:
        steps = min(20, t2 - t1)
    if isinstance(steps, str):
        if steps != "all":
            raise ValueError(f"steps must be None, an int m, a list of steps or 'all', got {steps!r}")
        return list(range(t1, t2))
    if isinstance(steps, (int, np.integer)):
        m = int(steps)
        if not 1 <= m <= t2 - t1:
            raise ValueError(f"steps={m}: the window [{t1}, {t2}) has {t2 - t1} steps to sample m from")
        return sorted({int(v) for v in np.linspace(t1, t2 - 1, m).round().astype(int)})
    out = sorted({int(t) for t in steps})
    bad = [t for t in out if not t1 <= t < t2]
    if bad or not out:
        raise ValueError(f"selected steps {bad[:5] or out} are not inside the window [{t1}, {t2})")
    return out


def _published(ctx: _Context, query: Query | None, t1: int, t2: int, steps: Any, samples: str,
               progress: Callable[[int, int], None] | None) -> tuple[np.ndarray, list[str], dict[str, Any]]:
    """``I(z, V)`` (or ``I(z, z)`` with ``query=None``) of the published form, unnegated: ``(N, Q)``."""
    log, N = ctx.log, ctx.N
    if samples not in SAMPLES:
        raise ValueError(f"samples must be one of {SAMPLES}, got {samples!r}")
    if samples == "batch":
        if ctx.hvp == "fd" and not log.recorded.get("hvp"):
            raise ValueError(f"{log.path}: samples='batch' with hvp='fd' reads the logged H_z Ĝ rows; the run did not "
                             "record them (InfluenceTracker(record_hvp=True)). Use samples='all' or hvp='exact'")
        if steps is not None and steps != "all":
            raise ValueError("samples='batch' uses every logged step of the window (steps must be None or 'all')")
        selected = [t for t in range(t1, t2) if log.has_grads(t)]
    else:
        selected = _select_steps(t1, t2, steps)
    m = len(selected)
    scores: np.ndarray | None = None
    names: list[str] = []
    n_hvp = 0
    col_group = ctx.col_group
    fields = ("grad", "hvp") if ctx.hvp == "fd" else ("grad",)
    log_rows = log.iter_steps(t1, t2, fields=fields) if samples == "batch" else None
    full = KroneckerProjector(ctx.shapes, None)  # self-influence: unprojected g_z, the HVP directions
    for done, (t, params) in enumerate(ctx.params_at(selected), start=1):
        w_t = torch.as_tensor(log.weights(t), dtype=ctx.dtype)  # w_{i,t}: the step's loss is Σ w ℓ (step.weights)
        # (K,): a_t of each column's group, with the clipped step's learning rate η_t·κ_t
        a_col = published_coefficients(t, log.lr(t)[col_group] * ctx.clip_factor(t), N, m)
        batch_t = ctx.step_batch(t)
        g_hat = ctx.batch_grad(params, batch_t, names=list(params), w=w_t)  # Ĝ_t over every parameter (as logged)
        chunks = []  # (ids, projected g_z, projected H_z Ĝ, unprojected g_z or None)
        if log_rows is not None:  # the logged rows of B_t, each standing for N/|B_t| samples
            rec = next(log_rows)
            if rec.step != t:
                raise RuntimeError(f"logged rows of step {rec.step} where step {t} was expected")
            Hz = rec.hvps.astype(np.float64) if ctx.hvp == "fd" else ctx.per_sample_hvp(params, batch_t, g_hat).double().cpu().numpy()
            gz = ctx.per_sample_grads(params, batch_t, projector=full) if query is None else None
            chunks.append((rec.ids, rec.grads.astype(np.float64), Hz, gz))
            weight = N * rec.weights[:, None]  # each row stands for N w_{i,t} samples (N/|B_t| for a plain mean)
        else:
            for c0 in range(0, N, ctx.chunk_size):
                ids = np.arange(c0, min(N, c0 + ctx.chunk_size))
                b = ctx.batch(ids)
                if query is None:
                    gz = ctx.per_sample_grads(params, b, projector=full)
                    G = ctx.project({n: gz[:, sl].reshape(len(ids), *ctx.shapes[n]) for n, sl in full.slices.items()})
                else:
                    gz, G = None, ctx.per_sample_grads(params, b).double().cpu().numpy()
                chunks.append((ids, G, ctx.per_sample_hvp(params, b, g_hat).double().cpu().numpy(), gz))
            weight = 1.0
        if query is not None:
            q, names = ctx.query(query, params)
            HBq = batch_hvp(ctx, params, batch_t, q, w_t)
            n_hvp += next(iter(q.values())).shape[0]
            qp, Hqp = ctx.project(q), ctx.project(HBq)
            if scores is None:
                scores = np.zeros((N, qp.shape[0]))
            for ids, G, Hz, _ in chunks:
                np.add.at(scores, ids, weight * ((G * a_col) @ Hqp.T + Hz @ (qp * a_col).T))
        else:  # the query gradient of sample z is g_z itself: ⟨a ⊙ g_z, H_B g_z + H_z Ĝ⟩
            names = ["self"]
            if scores is None:
                scores = np.zeros((N, 1))
            for ids, G, Hz, gz in chunks:
                V = {n: gz[:, sl].reshape(len(ids), *ctx.shapes[n]) for n, sl in full.slices.items()}
                HBgv = batch_hvp(ctx, params, batch_t, V, w_t)
                _check_fd(ctx, _curvature(ctx, V, HBgv), log.lr(t))
                HBg = ctx.project(HBgv)
                n_hvp += len(ids)
                np.add.at(scores[:, 0], ids, np.ravel(weight) * ((G * a_col) * (HBg + Hz)).sum(1))
        if progress is not None:
            progress(done, m)
    if scores is None:
        raise ValueError(f"no step of the window [{t1}, {t2}) has logged gradients")
    info = {"form": "published", "samples": samples, "steps": selected, "m": m, "hvp_products": n_hvp, "raw_sign": -1}
    if ctx.hvp == "fd":
        info["eps0"] = ctx.eps0
        if samples == "batch":
            info["logged_hvp_eps0"] = log.meta.get("hvp", {}).get("eps0")
    return scores, names, info


# ================================================================================= step form
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


def _curvature(ctx: _Context, V: Vectors, HV: Vectors, clip: float = 1.0) -> np.ndarray:
    """``⟨v, (c H + λ) v⟩_g / ‖v‖²`` per vector and param group ``g``: ``(C, G)`` (lr not applied; ``c`` the
    step's clip coefficient: clipping scales the gradient, not the weight decay)."""
    C = next(iter(V.values())).shape[0]
    vv = sum((V[n].double() ** 2).reshape(C, -1).sum(1) for n in ctx.names)
    vv = torch.where(vv > 0, vv, torch.ones_like(vv))
    out = torch.zeros(C, ctx.n_groups, dtype=torch.float64, device=vv.device)
    for n in ctx.names:
        g = ctx.group_of_name[n]
        curv = clip * HV[n].double() + ctx.weight_decay[g] * V[n].double()
        out[:, g] += (V[n].double() * curv).reshape(C, -1).sum(1)
    return (out / vv[:, None]).cpu().numpy()


def _rho(decays: np.ndarray) -> np.ndarray:
    """``rho[s] = Π_{r=s+1}^{τ−1} decays[r]`` for ``decays`` of steps ``0 .. τ−1``."""
    rho = np.ones_like(decays)
    for s in range(len(decays) - 2, -1, -1):
        rho[s] = rho[s + 1] * decays[s + 1]
    return rho


def _step(ctx: _Context, query: Query, t1: int, t2: int, progress: Callable[[int, int], None] | None
          ) -> tuple[np.ndarray, list[str], dict[str, Any]]:
    """``G_z(t2) − G_z(t1)``: one pass over ``θ_r``, ``r < t2``, with the end queries stacked."""
    log, t0 = ctx.log, ctx.first  # G_z sums from the log's first step
    ends = [t2] + ([t1] if t1 > t0 else [])
    qs: dict[int, Vectors] = {}
    names: list[str] = []
    for tau, params in ctx.params_at(ends):
        qs[tau], names = ctx.query(query, params)
    Q = next(iter(qs[t2].values())).shape[0]
    decays = {tau: np.ones((tau, Q)) for tau in ends}
    for r, params in ctx.params_at(range(t0, t2)):
        active = [tau for tau in ends if r < tau]
        V = {n: torch.cat([qs[tau][n] for tau in active]) for n in ctx.names}
        kap = _curvature(ctx, V, batch_hvp(ctx, params, ctx.step_batch(r), V, ctx.step_weights(r)),
                         ctx.clip_factor(r))  # (len(active)·Q, G)
        _check_fd(ctx, kap, log.lr(r))
        dec = 1.0 - kap @ log.lr(r)[: ctx.n_groups]
        for i, tau in enumerate(active):
            decays[tau][r] = dec[i * Q : (i + 1) * Q]
        if progress is not None:
            progress(r + 1 - t0, t2 - t0)
    out = np.zeros((ctx.N, Q))
    for tau, sign in zip(ends, (1.0, -1.0)):
        qp, rho = ctx.project(qs[tau]), _rho(decays[tau])
        for rec in log.iter_steps(t0, tau, fields=("grad",)):
            G = rec.grads.astype(np.float64)
            eta_q = ctx.clipped(rec, G, (qp * (rec.lrs[ctx.col_group] * ctx.every)).T)  # (K, Q): J_Cᵀ η q
            np.add.at(out, rec.ids, sign * rec.weights[:, None] * (G @ eta_q) * rho[rec.step])
    info = {"form": "step", "hvp_products": Q * (t1 + t2 - 2 * t0), "ends": ends,
            "decay_min": float(min(d.min() for d in decays.values())) if t2 else 1.0}
    return out, names, info


def _step_self(ctx: _Context, t1: int, t2: int, progress: Callable[[int, int], None] | None
               ) -> tuple[np.ndarray, dict[str, Any]]:
    """Self-influence in the step form: query ``ℓ(z; θ_τ)``; the closure runs along each sample's own
    gradient, its curvature measured at the sample's own steps and held in between."""
    log, N, G, t0 = ctx.log, ctx.N, ctx.n_groups, ctx.first
    full = KroneckerProjector(ctx.shapes, None)
    # forward: κ_{z,s} (per group) at every step s of z, with the κ of z's previous step
    kappa_at: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # s -> (ids, κ of the previous appearance (B, G))
    last = np.zeros((N, G))
    snapshots: dict[int, np.ndarray] = {}
    n_hvp = 0
    for s, params in ctx.params_at(range(t0, t2)):
        if s == t1:
            snapshots[t1] = last.copy()
        b = ctx.step_batch(s)
        ids = b.ids
        gz = ctx.per_sample_grads(params, b, projector=full)
        V = {n: gz[:, sl].reshape(len(ids), *ctx.shapes[n]) for n, sl in full.slices.items()}
        kap = _curvature(ctx, V, batch_hvp(ctx, params, b, V, ctx.step_weights(s)), ctx.clip_factor(s))
        _check_fd(ctx, kap, log.lr(s))
        n_hvp += len(ids)
        kappa_at[s] = (ids, last[ids].copy())
        last[ids] = kap
        if progress is not None:
            progress(s + 1 - t0, t2 - t0)
    snapshots[t2] = last
    out = np.zeros(N)
    for tau, sign in ((t2, 1.0), (t1, -1.0)):
        if tau == t0:
            continue
        (_, params), = list(ctx.params_at([tau]))
        qz = np.zeros((N, ctx.projector.out_dim))
        for c0 in range(0, N, ctx.chunk_size):
            ids = np.arange(c0, min(N, c0 + ctx.chunk_size))
            qz[ids] = ctx.per_sample_grads(params, ctx.batch(ids)).double().cpu().numpy()
        R = np.ones(N)  # Π of (1 − κ) over the steps after s
        kcur = snapshots[tau].copy()
        for s in range(tau - 1, t0 - 1, -1):
            for rec in log.iter_steps(s, s + 1, fields=("grad",)):
                rows = rec.grads.astype(np.float64)
                eta_q = ctx.clipped(rec, rows, (qz[rec.ids] * (rec.lrs[ctx.col_group] * ctx.every)).T)  # (K, B)
                out[rec.ids] += sign * R[rec.ids] * rec.weights * (rows * eta_q.T).sum(1)
            R *= 1.0 - kcur @ log.lr(s)[:G]
            ids, prev = kappa_at[s]
            kcur[ids] = prev
    return out[:, None], {"form": "step", "hvp_products": n_hvp,
                          "closure": "own gradient, curvature held between the sample's steps"}


# ================================================================================ public API
def _diffin(query: Query | None, log: InfluenceLog, module: nn.Module, train_data: TrainData, window: Any, form: str,
            hvp: str, eps0: float | None, steps: Any, samples: str, loss_fn: LossFn, verify: bool, chunk_size: int,
            progress: Progress) -> InfluenceScores:
    """Both public entry points: ``query=None`` is self-influence."""
    t0 = time.perf_counter()
    t1, t2 = log.window(window)
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if form == "step" and (steps is not None or samples != "all"):
        raise ValueError("steps/samples select the published form's checkpoints; the step form uses every step")
    ctx = _Context(log, module, train_data, loss_fn, hvp, eps0, verify, chunk_size)
    suffix = " self" if query is None else ""
    show = resolve_progress(progress, f"diffin-{form}{suffix.replace(' ', '-')}")
    if form == "published":
        raw, names, info = _published(ctx, query, t1, t2, steps, samples, show)
        scores = -raw
        method = ctx.method(f"diffin-published{suffix}", [f"m={info['m']}" if samples == "all" else "batch rows"])
    else:
        if query is None:
            scores, info = _step_self(ctx, t1, t2, show)
        else:
            scores, names, info = _step(ctx, query, t1, t2, show)
        method = ctx.method(f"diffin-step{suffix}")
    info.update(hvp=hvp, seconds=time.perf_counter() - t0, optimizer=ctx.opt_class, replay_drift=ctx.drift.summary())
    if hvp == "fd":
        info.update(eps0=ctx.eps0, fd_checked=ctx.fd_checked, fd_blowups=ctx.fd_blowups, fd_kinks=ctx.fd_kinks,
                    fd_products=ctx.fd_products)
        problems = []
        if ctx.fd_blowups:
            problems.append(f"{ctx.fd_blowups} of {ctx.fd_checked} curvatures lie beyond the SGD stability edge "
                            f"(|κ|·η > {FD_EDGE:g})")
        if ctx.fd_kinks > KINK_SHARE_LIMIT * ctx.fd_products:
            problems.append(f"{ctx.fd_kinks} of {ctx.fd_products} products crossed a kink (over "
                            f"{KINK_SHARE_LIMIT:.0%}: ε is too large for this model)")
        if problems:
            info["fd_unreliable"] = True
            method += " [FD unreliable]"
            warnings.warn(f"Diff-In with hvp='fd': {'; '.join(problems)}; the scores are not reliable. Use hvp='exact' "
                          "(the default) or a smaller eps0", RuntimeWarning, stacklevel=4)
    return InfluenceScores(scores, method, (t1, t2), ["self"] if query is None else names, info=info)


@estimator_api
def diffin(log: InfluenceLog, query: Query, *, module: nn.Module | None = None, train_data: TrainData | None = None,
           window: Any = None, form: str = "published", hvp: str = "exact", eps0: float | None = None, steps: Any = None,
           samples: str | None = None, loss_fn: LossFn = default_loss_fn, verify: bool = True, chunk_size: int = 512,
           progress: Progress = None) -> InfluenceScores:
    """Diff-In scores of every training sample id for ``query`` over ``window``.

    Args:
        log: the influence log (per-sample gradients; ``H_z Ĝ`` rows for the published form with
            ``samples="batch"``; checkpoints, replayed between when sparse).
        module: the architecture (weights come from the log).
        train_data: training samples by id (a dataset or a callable ``ids -> batch``).
        query: ``f(module) -> scalar or (Q,)`` (see :mod:`lightning_influence.queries`).
        window: steps ``(t1, t2)``, fractions, ``("epoch", a, b)`` or a string (see
            :meth:`InfluenceLog.window`); ``None`` is the whole run.
        form: ``"published"`` (default: the paper's checkpoint form, the CLI's ``--method diffin``)
            or ``"step"`` (per-step cumulative form, docs/diffin.md; ``--method diffin-step``).
        hvp: ``"exact"`` (default: forward-over-reverse, also for ``H_z Ĝ`` instead of the logged rows)
            or ``"fd"`` (central differences of first-order gradients, checked: curvatures beyond the
            stability edge are counted in ``info["fd_blowups"]``, tagged in the method name and warned about).
        eps0: ``ε_0`` of the finite differences, ``ε = ε_0 (1 + ‖θ‖)/√p`` (default 1e-5 in
            float64, 1e-3 otherwise; the logged ``H_z Ĝ`` rows keep the tracker's ``hvp_eps``).
        steps: published form, ``samples="all"``: the ``m`` selected steps ``T_m``: an int ``m``
            (evenly spaced in the window; default ``min(20, t2 − t1)``), a list of steps, or ``"all"``.
        samples: published form: ``"batch"`` (the default there: the rows of ``B_t`` at every step,
            weighted ``N/|B_t|``) or ``"all"`` (every training sample at each selected step).
        loss_fn: per-sample training loss ``loss_fn(module, batch) -> Tensor[B]``.
        verify: check replayed ``θ_t`` against the checkpoints passed.
        chunk_size: samples per per-sample-gradient pass.
        progress: ``progress(done, total)`` or ``True`` for a bar on stderr.

    Returns:
        :class:`InfluenceScores` with ``N`` rows, one column per query output. Sign: positive
        = removing the sample raises ``f`` (the published expression is negated, see module doc).
    """
    samples = samples or ("batch" if form == "published" and steps is None else "all")
    return _diffin(query, log, module, train_data, window, form, hvp, eps0, steps, samples, loss_fn, verify,
                   chunk_size, progress)


@estimator_api
def diffin_self_influence(log: InfluenceLog, query: None = None, *, module: nn.Module | None = None,
                          train_data: TrainData | None = None, window: Any = None, form: str = "step", hvp: str = "exact",
                          eps0: float | None = None, steps: Any = None, samples: str = "all", loss_fn: LossFn = default_loss_fn, verify: bool = True,
                          chunk_size: int = 512, progress: Progress = None) -> InfluenceScores:
    """Self-influence ``I(z, z)`` of every training sample: the query is the sample's own loss.

    Step form: removal's effect on ``ℓ(z; θ_{t2})`` (minus that on ``ℓ(z; θ_{t1})``), closed
    along each sample's own gradient. Positive = removing ``z`` raises its own loss; the
    largest values flag samples the model fits only because they are in the training set
    (mislabelled ones): **most suspicious = largest**.

    Published form: ``Σ_t a_t ⟨g_{z,t}, H_{B_t} g_{z,t} + H_{z,t} Ĝ_t⟩`` (one HVP per sample per
    selected step), returned negated like :func:`diffin`, so that here too larger = more
    suspicious. It is the second-order part only: its ``⟨g_z, H_B g_z⟩`` term is ``≥ 0`` for
    Gauss-Newton-dominated curvature and grows with ``‖g_z‖²`` (flipped labels score high), but
    its ``⟨g_z, H_z Ĝ⟩`` term (the rate at which training changes ``‖g_z‖²/2``) is negative while
    training pushes against a sample and positive once the model memorises it, and ``a_t``
    weighs late steps most: which term wins depends on the run (docs/diffin.md, measured).
    Arguments as :func:`diffin` (``query`` must stay ``None``: each sample's own loss is the query).
    """
    if query is not None:
        raise TypeError("diffin_self_influence() answers each sample's own loss and takes no query; pass query=None")
    return _diffin(None, log, module, train_data, window, form, hvp, eps0, steps, samples, loss_fn, verify,
                   chunk_size, progress)
