"""DIT: exact time-windowed influence by an adjoint sweep (math reference §2-3).

For a query ``f`` and a window ``[t1, t2]`` of steps::

    DIT_j[t1, t2] = F_j(t2) − F_j(t1),    F_j(t) = ⟨q_t, δ_j[t]⟩ ≈ f(θ^{-j}_t) − f(θ_t)

where ``δ_j`` is the linearised deviation of the trajectory when sample ``j`` is removed
(denominator ``|B_t|`` kept). Positive = removing the sample raises ``f`` (for a loss query:
helpful). ``F_j(t)`` for every sample at once is one backward sweep of the adjoint of the
linearised training dynamics, with one Hessian-vector product and one per-sample
directional-derivative pass per step (both from a single forward-over-reverse pass, or from
two first-order gradient evaluations with finite differences).

Optimisers (the linear system is over the whole optimizer state):

- SGD: any learning-rate schedule, coupled weight decay (``H_t + λ``), momentum with
  dampening and Nesterov, PyTorch's convention ``v ← μ v + (1−τ) g; θ ← θ − η v`` (the
  first step copies ``g``): exact in the linearisation, system over ``(δ, δv)``.
- Adam/AdamW: the frozen-preconditioner approximation ``θ_{t+1} = θ_t − η_t D_t m̂_t`` with
  ``D_t = diag(1/(√v̂_t + ε))`` taken from the run; decoupled weight decay enters
  ``(1 − η_t λ)``, coupled (Adam) enters ``H_t + λ``. System over ``(δ, δm)``. Labelled approx.

Parameters ``θ_t`` come from the log: replayed (:mod:`lightning_influence.replay`) from the
nearest checkpoint and verified at every checkpoint passed. Memory: ``O(p·C)`` for the
``C`` adjoint columns (queries × grid points still to come), plus the ``θ_t`` of one replay
segment (the steps between two checkpoints, or about ``√T`` steps with in-memory anchors
when checkpoints are sparse: bounded by ``max_memory_bytes``), plus one step's batch.

No Lightning imports.
"""

from __future__ import annotations

import bisect
import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from lightning_influence.capture.hvp import fd_directional_derivative, flatten, unflatten
from lightning_influence.estimators.scores import InfluenceScores
from lightning_influence.log.reader import InfluenceLog
from lightning_influence.queries import LossFn, Query, default_loss_fn, query_gradients, query_names
from lightning_influence.replay import (
    Progress,
    TrainData,
    UnsupportedOptimizerError,
    _optimizer_spec,
    batch_from_ids,
    checkpoint_params,
    functional_loss,
    grid_steps,
    optimizer_class,
    replay,
    replay_from,
    resolve_progress,
)

__all__ = ["Timeline", "dit", "dit_gauss_newton", "dit_local", "timeline", "HVP_MODES"]

HVP_MODES = ("exact", "fd")


# ============================================================================ linearisation
class _Linearisation:
    """Per-coordinate optimizer hyperparameters and the adjoint of one linearised step.

    The adjoint state is ``(U, W)``: ``U`` pairs with ``δθ``, ``W`` with the optimizer's
    linear state (``δv`` for momentum SGD, ``δm`` for Adam). One step ``t`` is::

        R      = pre(U, W)              # adjoint of the step's gradient perturbation
        F_j   += −⟨R, g_{j,t}⟩ / |B_t|  # j ∈ B_t (removal removes g_j/|B_t| from the gradient)
        U, W   = post(U, W, R, H_t R)
    """

    def __init__(self, kind: str, group_of: np.ndarray, groups: list[dict[str, Any]], decoupled: list[bool],
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        self.kind = kind
        self.idx = torch.as_tensor(np.asarray(group_of, dtype=np.int64), device=device)
        self.dtype = dtype

        def vec(values: Sequence[float]) -> Tensor:
            return torch.tensor([float(v) for v in values], dtype=dtype, device=device)[self.idx].unsqueeze(1)

        self.wd = vec([g.get("weight_decay", 0.0) for g in groups])
        if kind == "sgd":
            self.mu = vec([g.get("momentum", 0.0) for g in groups])
            self.damp = vec([g.get("dampening", 0.0) for g in groups])
            self.nesterov = vec([bool(g.get("nesterov", False)) for g in groups]) > 0
            self.has_momentum = bool((self.mu != 0).any())
            self.mom = self.mu != 0
            self.wd_coupled, self.wd_decoupled = self.wd, torch.zeros_like(self.wd)
        else:
            self.beta1 = vec([g["betas"][0] for g in groups])
            dec = vec([float(d) for d in decoupled]) > 0
            self.wd_coupled = torch.where(dec, torch.zeros_like(self.wd), self.wd)
            self.wd_decoupled = torch.where(dec, self.wd, torch.zeros_like(self.wd))

    def eta(self, lrs: np.ndarray) -> Tensor:
        return torch.as_tensor(np.asarray(lrs, dtype=np.float64), dtype=self.dtype)[self.idx].unsqueeze(1)

    def pre(self, U: Tensor, W: Tensor, eta: Tensor, info: dict[str, Tensor]) -> Tensor:
        if self.kind == "sgd":
            if not self.has_momentum:
                return -eta * U
            c = torch.where(info["first"], torch.ones_like(self.damp), 1.0 - self.damp)
            a = torch.where(self.nesterov, eta * self.mu, eta)
            w_tot = W - a * U
            r_mom = torch.where(self.nesterov, -eta * U, torch.zeros_like(U)) + c * w_tot
            info["_w_tot"] = w_tot
            return torch.where(self.mom, r_mom, -eta * U)
        w_tot = W - (eta / info["bc1"]) * info["D"] * U
        info["_w_tot"] = w_tot
        return (1.0 - self.beta1) * w_tot

    def post(self, U: Tensor, W: Tensor, R: Tensor, HR: Tensor, eta: Tensor, info: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        if self.kind == "sgd":
            U_new = U + HR + self.wd_coupled * R
            if not self.has_momentum:
                return U_new, W
            keep = self.mom & ~info["first"]
            return U_new, torch.where(keep, self.mu * info.pop("_w_tot"), torch.zeros_like(W))
        U_new = (1.0 - eta * self.wd_decoupled) * U + HR + self.wd_coupled * R
        return U_new, self.beta1 * info.pop("_w_tot")


def _optimizer_kind(log: InfluenceLog) -> tuple[str, list[dict[str, Any]], list[bool]]:
    cls = optimizer_class(log)
    groups = [dict(g) for g in _optimizer_spec(log)["param_groups"]]
    for g in groups:
        if g.get("maximize"):
            raise UnsupportedOptimizerError(f"{log.path}: maximize=True is not supported by DIT")
    if cls is torch.optim.SGD:
        return "sgd", groups, [False] * len(groups)
    decoupled = [cls is torch.optim.AdamW or bool(g.get("decoupled_weight_decay", False)) for g in groups]
    return "adam", groups, decoupled


# ============================================================================== trajectory
@dataclass
class _Record:
    step: int
    params: dict[str, Tensor]
    ids: np.ndarray | None  # None: the end point θ_{t_hi}
    lrs: np.ndarray | None = None
    info: dict[str, Tensor] = field(default_factory=dict)


class _Context:
    """Everything a model-based sweep needs: log, module, data, names, linearisation."""

    def __init__(self, log: InfluenceLog, module: nn.Module, train_data: TrainData, loss_fn: LossFn, verify: bool,
                 atol: float | None, rtol: float | None, max_memory_bytes: int) -> None:
        self.log, self.module, self.train_data, self.loss_fn = log, module, train_data, loss_fn
        self.verify, self.atol, self.rtol, self.max_memory_bytes = verify, atol, rtol, max_memory_bytes
        ref = checkpoint_params(log, module, log.checkpoint_steps[0] if log.checkpoint_steps else 0)
        self.names = list(ref)
        self.shapes = {n: tuple(t.shape) for n, t in ref.items()}
        self.dtype = next(iter(ref.values())).dtype
        self.p = sum(t.numel() for t in ref.values())
        self.kind, groups, decoupled = _optimizer_kind(log)
        group_names = [g["params"] for g in groups]
        group_of_name = {n: gi for gi, names in enumerate(group_names) for n in names}
        self.opt_names = [n for names in group_names for n in names]
        coords = np.concatenate([np.full(int(np.prod(self.shapes[n], dtype=np.int64)), group_of_name[n]) for n in self.names])
        self.lin = _Linearisation(self.kind, coords, groups, decoupled, self.dtype)
        self.groups = groups
        self.slices: dict[str, slice] = {}
        start = 0
        for n in self.names:
            k = int(np.prod(self.shapes[n], dtype=np.int64))
            self.slices[n] = slice(start, start + k)
            start += k

    # --- optimizer state -> per-step linearisation data
    def _state_by_name(self, opt: torch.optim.Optimizer) -> dict[str, dict[str, Any]]:
        params = [p for g in opt.param_groups for p in g["params"]]
        return {n: opt.state.get(p, {}) for n, p in zip(self.opt_names, params)}

    def info_before(self, opt: torch.optim.Optimizer) -> dict[str, Tensor]:
        if self.kind != "sgd" or not self.lin.has_momentum:
            return {}
        state = self._state_by_name(opt)
        first = torch.zeros(self.p, 1, dtype=torch.bool)
        for n, sl in self.slices.items():
            if state[n].get("momentum_buffer") is None:
                first[sl] = True
        return {"first": first}

    def info_after(self, opt: torch.optim.Optimizer, info: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.kind != "adam":
            return info
        state = self._state_by_name(opt)
        D = torch.empty(self.p, 1, dtype=self.dtype)
        bc1 = torch.empty(self.p, 1, dtype=self.dtype)
        group_of = {n: gi for gi, g in enumerate(self.groups) for n in g["params"]}
        for n, sl in self.slices.items():
            g = self.groups[group_of[n]]
            st = state[n]
            if "exp_avg_sq" not in st:
                raise RuntimeError(f"Adam state of {n!r} is missing after a replayed step")
            s = float(st["step"])
            beta1, beta2 = float(g["betas"][0]), float(g["betas"][1])
            v = st["max_exp_avg_sq"] if g.get("amsgrad") else st["exp_avg_sq"]
            denom = v.detach().reshape(-1).to(self.dtype).sqrt() / math.sqrt(1.0 - beta2 ** s) + float(g["eps"])
            D[sl, 0] = 1.0 / denom
            bc1[sl, 0] = 1.0 - beta1 ** s
        return {**info, "D": D, "bc1": bc1}

    def bytes_per_step(self) -> int:
        return self.p * torch.tensor([], dtype=self.dtype).element_size() * (3 if self.kind == "adam" else 1)

    # --- trajectory, in reverse
    def reverse_trajectory(self, t_lo: int, t_hi: int, progress: Callable[[int, int], None] | None) -> Iterator[_Record]:
        """Yield the end point ``θ_{t_hi}``, then the steps ``t_hi−1 .. t_lo`` (with ``θ_t``, ``B_t``, ``η_t``)."""
        log = self.log
        ckpts = log.checkpoint_steps
        earlier = [c for c in ckpts if c <= t_lo]
        if not earlier:
            raise ValueError(f"no checkpoint at or before step {t_lo} to replay from (checkpoints: {ckpts})")
        s0 = earlier[-1]
        n_steps = t_hi - s0
        per = max(self.bytes_per_step(), 1)
        if n_steps * per <= self.max_memory_bytes:
            seg_len = max(n_steps, 1)
        else:
            seg_len = max(1, min(int(math.ceil(math.sqrt(n_steps))), self.max_memory_bytes // per))
        ckpt_set = set(ckpts)
        bounds = sorted({c for c in ckpts if s0 <= c < t_hi} | set(range(s0, t_hi, seg_len)) | {s0})
        memory_anchors: dict[int, tuple[dict[str, Tensor], dict[str, Any]]] = {}
        need = [a for a in bounds if a not in ckpt_set]
        total = (t_hi - s0) + (max(need) - s0 if need else 0)
        done = 0
        if need:  # forward pass keeping θ and the optimizer state at the in-memory anchors
            want = set(need)
            for rs in replay(log, self.module, self.train_data, s0, max(need), start=s0, loss_fn=self.loss_fn,
                             verify=self.verify, atol=self.atol, rtol=self.rtol):
                if rs.step in want:
                    memory_anchors[rs.step] = (rs.params, copy.deepcopy(rs.optimizer.state_dict()))
                if rs.step < max(need):
                    done += 1
                    if progress is not None:
                        progress(done, total)
        segments = list(zip(bounds, bounds[1:] + [t_hi]))
        first_segment = True
        for a, b in reversed(segments):
            if b <= t_lo and not first_segment:
                break
            if a in ckpt_set:
                gen = replay(log, self.module, self.train_data, a, b, start=a, loss_fn=self.loss_fn, verify=self.verify,
                             atol=self.atol, rtol=self.rtol)
            else:
                params, state = memory_anchors.pop(a)
                gen = replay_from(log, self.module, self.train_data, params, state, a, b, loss_fn=self.loss_fn,
                                  verify=self.verify, atol=self.atol, rtol=self.rtol)
            records: list[_Record] = []
            pending: _Record | None = None
            end: _Record | None = None
            for rs in gen:
                if pending is not None:
                    pending.info = self.info_after(rs.optimizer, pending.info)
                    records.append(pending)
                    pending = None
                if rs.step < b:
                    pending = _Record(rs.step, rs.params, rs.ids, rs.lrs, self.info_before(rs.optimizer))
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


# ================================================================================ products
def _products_exact(ctx: _Context, params: dict[str, Tensor], batch: Any, R: Tensor) -> tuple[Tensor, Tensor]:
    """``(H_t R, J_t R)``: Hessian of the batch-mean loss times ``R`` ``(p, C)`` and the
    per-sample directional derivatives ``⟨g_j, R_c⟩`` ``(C, B)``, by forward-over-reverse."""
    module, loss_fn, names, shapes = ctx.module, ctx.loss_fn, ctx.names, ctx.shapes

    def f(p: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        losses = functional_loss(module, loss_fn, p, batch)
        return losses.mean(), losses

    gf = torch.func.grad(f, has_aux=True)

    def one(r: Tensor) -> tuple[Tensor, Tensor]:
        _, (hv, jv) = torch.func.jvp(gf, (params,), (unflatten(r, shapes),))
        return flatten(hv, names), jv

    if R.shape[1] == 1:
        hr, jr = one(R[:, 0])
        return hr.unsqueeze(1), jr.unsqueeze(0)
    HR, JR = torch.func.vmap(one, in_dims=1, out_dims=(1, 0))(R)
    return HR, JR


def _products_fd(ctx: _Context, params: dict[str, Tensor], batch: Any, R: Tensor, eps0: float) -> tuple[Tensor, Tensor]:
    """Finite-difference ``(H_t R, J_t R)`` from first-order gradients at ``θ ± ε r̂`` (math §3)."""
    module, loss_fn, names, shapes = ctx.module, ctx.loss_fn, ctx.names, ctx.shapes

    def grads_and_losses(p: dict[str, Tensor]) -> Tensor:
        leaves = {n: v.detach().requires_grad_(True) for n, v in p.items()}
        with torch.enable_grad():
            losses = functional_loss(module, loss_fn, leaves, batch)
            g = torch.autograd.grad(losses.mean(), [leaves[n] for n in names], allow_unused=True)
        flat = torch.cat([(torch.zeros_like(leaves[n]) if gi is None else gi).reshape(-1) for n, gi in zip(names, g)])
        return torch.cat([flat, losses.detach().reshape(-1)])

    p = ctx.p
    HR = torch.empty_like(R)
    JR = []
    for c in range(R.shape[1]):
        out, _ = fd_directional_derivative(grads_and_losses, params, unflatten(R[:, c], shapes), eps0)
        HR[:, c] = out[:p]
        JR.append(out[p:])
    return HR, torch.stack(JR)


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


def _model_sweep(ctx: _Context, query: Query, t_lo: int, t_hi: int, activations: Sequence[int], hvp: str,
                 eps0: float | None, progress: Callable[[int, int], None] | None) -> _SweepResult:
    """Backward sweep over steps ``t_hi−1 .. t_lo``; a column block ``q_s`` joins at each activation step ``s``."""
    if hvp not in HVP_MODES:
        raise ValueError(f"hvp must be one of {HVP_MODES}, got {hvp!r}")
    if eps0 is None:
        eps0 = 1e-5 if ctx.dtype == torch.float64 else 1e-3
    acts = sorted({int(s) for s in activations if t_lo < s <= t_hi})
    N = ctx.log.dataset_size
    U = W = None
    blocks: list[tuple[int, int]] = []  # (activation step, first column)
    scores: np.ndarray | None = None
    names: list[str] = []
    n_hvp = 0
    t0 = time.perf_counter()

    def activate(step: int, params: dict[str, Tensor]) -> None:
        nonlocal U, W, scores, names
        q, names = _query_matrix(ctx, query, params)
        Q = q.shape[1]
        if scores is None:
            scores = np.zeros((N, Q * len(acts)))
            U = torch.zeros(ctx.p, 0, dtype=ctx.dtype)
            W = torch.zeros(ctx.p, 0, dtype=ctx.dtype)
        blocks.append((step, U.shape[1]))
        U = torch.cat([U, q], dim=1)
        W = torch.cat([W, torch.zeros_like(q)], dim=1)

    for rec in ctx.reverse_trajectory(t_lo, t_hi, progress):
        if rec.ids is None:
            if t_hi in acts:
                activate(t_hi, rec.params)
            continue
        if U is not None and U.shape[1] > 0:
            if len(rec.ids):
                ids = rec.ids
                eta = ctx.lin.eta(rec.lrs)
                info = dict(rec.info)
                R = ctx.lin.pre(U, W, eta, info)
                batch = batch_from_ids(ctx.train_data, ids)
                if hvp == "exact":
                    HR, JR = _products_exact(ctx, rec.params, batch, R)
                else:
                    HR, JR = _products_fd(ctx, rec.params, batch, R, eps0)
                n_hvp += R.shape[1]
                C = U.shape[1]
                np.add.at(scores[:, :C], ids, (-JR.T / len(ids)).detach().double().numpy())
                U, W = ctx.lin.post(U, W, R, HR.detach(), eta, info)
        if rec.step in acts:
            activate(rec.step, rec.params)
    values: dict[int, np.ndarray] = {}
    Q = len(names)
    for step, c0 in blocks:
        values[step] = scores[:, c0 : c0 + Q].copy()
    info = {"hvp": hvp, "hvp_products": n_hvp, "steps_swept": t_hi - t_lo, "optimizer": ctx.kind,
            "seconds": time.perf_counter() - t0}
    if hvp == "fd":
        info["eps0"] = eps0
    return _SweepResult(values, names, info)


# ================================================================================ public API
def _context(log: InfluenceLog, module: nn.Module, train_data: TrainData, loss_fn: LossFn, verify: bool,
             atol: float | None, rtol: float | None, max_memory_bytes: int) -> _Context:
    if module is None:
        raise ValueError("DIT needs `module` (the architecture; weights come from the log)")
    if train_data is None:
        raise ValueError("DIT needs `train_data` (the training samples by id) to replay the run and take gradients")
    return _Context(log, module, train_data, loss_fn, verify, atol, rtol, max_memory_bytes)


def _method(ctx: _Context, base: str, hvp: str, approx: bool = False) -> str:
    """Estimator name; every approximation says so (``approx.``)."""
    tags = []
    if hvp == "fd":
        tags.append("fd-hvp")
    if ctx.kind == "adam":
        tags.append("frozen Adam preconditioner")
    if approx or ctx.kind == "adam":
        tags.append("approx.")
    return f"{base} ({', '.join(tags)})" if tags else base


_DEFAULT_MEMORY = 512 * 2**20


def dit(log: InfluenceLog, module: nn.Module, train_data: TrainData, query: Query, window: Any = None, *,
        loss_fn: LossFn = default_loss_fn, hvp: str = "exact", eps0: float | None = None, verify: bool = True,
        atol: float | None = None, rtol: float | None = None, max_memory_bytes: int = _DEFAULT_MEMORY,
        progress: Progress = None) -> InfluenceScores:
    """DIT scores ``F_j(t2) − F_j(t1)`` of every training sample id for ``window`` (math §3).

    Exact in the linearisation for SGD (momentum, weight decay, schedules); Adam/AdamW use the
    frozen-preconditioner approximation and say so in ``method``.

    Args:
        log: the influence log (ids, learning rates, checkpoints).
        module: the architecture; weights come from the log's checkpoints (replayed between them).
        train_data: training samples by id (dataset or callable ``ids -> batch``).
        query: ``f(module) -> scalar or (Q,)`` (see :mod:`lightning_influence.queries`); the
            ``Q`` outputs are swept together.
        window: steps ``(t1, t2)``, fractions ``(0.5, 1.0)``, ``("epoch", a, b)`` or a string
            (see :meth:`InfluenceLog.window`); ``None`` is the whole run.
        loss_fn: per-sample training loss ``loss_fn(module, batch) -> Tensor[B]``.
        hvp: ``"exact"`` (forward-over-reverse) or ``"fd"`` (central differences of gradients).
        eps0: finite-difference ``ε_0`` (default 1e-5 in float64, 1e-3 otherwise).
        verify, atol, rtol: check the replayed ``θ_t`` against every checkpoint passed.
        max_memory_bytes: budget for the ``θ_t`` held per replay segment.
        progress: ``progress(done, total)`` callback or ``True`` for a bar on stderr.

    Returns:
        :class:`InfluenceScores` with ``N = log.dataset_size`` rows and one column per query
        output. Sign: positive = removing the sample raises ``f``.
    """
    t1, t2 = log.window(window)
    ctx = _context(log, module, train_data, loss_fn, verify, atol, rtol, max_memory_bytes)
    res = _model_sweep(ctx, query, 0, t2, [t1, t2], hvp, eps0, resolve_progress(progress, "dit"))
    out = res.values[t2] - (res.values[t1] if t1 > 0 else 0.0)
    return InfluenceScores(out, _method(ctx, "dit", hvp), (t1, t2), res.names, info=res.info)


def dit_local(log: InfluenceLog, module: nn.Module, train_data: TrainData, query: Query, window: Any = None, *,
              loss_fn: LossFn = default_loss_fn, hvp: str = "exact", eps0: float | None = None, verify: bool = True,
              atol: float | None = None, rtol: float | None = None, max_memory_bytes: int = _DEFAULT_MEMORY,
              progress: Progress = None) -> InfluenceScores:
    """Local DIT (approximation): the adjoint sweep only inside ``[t1, t2)``, from ``q_{t2}``.

    It drops the deviation a sample caused before the window (as if the sample were removed
    only inside the window), so samples absent from the window score 0. Cheaper than
    :func:`dit` for late windows (``t2 − t1`` steps instead of ``t2``). Arguments as :func:`dit`.
    """
    t1, t2 = log.window(window)
    ctx = _context(log, module, train_data, loss_fn, verify, atol, rtol, max_memory_bytes)
    res = _model_sweep(ctx, query, t1, t2, [t2], hvp, eps0, resolve_progress(progress, "dit-local"))
    return InfluenceScores(res.values[t2], _method(ctx, "dit-local", hvp, approx=True),
                           (t1, t2), res.names, info=res.info)


@dataclass
class Timeline:
    """``F_j(t)`` of every sample on a grid of steps (math §3).

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

    def _col(self, t: int) -> int:
        hits = np.nonzero(self.grid == t)[0]
        if not len(hits):
            raise ValueError(f"step {t} is not on the timeline grid {self.grid.tolist()}")
        return int(hits[0])

    def at(self, t: int) -> np.ndarray:
        """``F_j(t)`` ``(N, Q)`` at grid step ``t``."""
        return self.values[:, self._col(t), :]

    def window(self, t1: int, t2: int) -> InfluenceScores:
        """``DIT[t1, t2] = F(t2) − F(t1)`` for two grid steps (additive by construction)."""
        if not t1 < t2:
            raise ValueError(f"need t1 < t2, got [{t1}, {t2}]")
        return InfluenceScores(self.at(t2) - self.at(t1), self.method, (int(t1), int(t2)), list(self.query_names),
                               info={"from": "timeline", **self.info})

    def increments(self, query: int | str = 0) -> np.ndarray:
        """``(N, G−1)`` DIT of each window between consecutive grid points."""
        return np.diff(self.values[:, :, self._q(query)], axis=1)

    def _q(self, query: int | str) -> int:
        return self.query_names.index(query) if isinstance(query, str) else int(query)

    def patterns(self, query: int | str = 0, thresholds: Any = None) -> Any:
        """Temporal pattern of each sample (stable / early / late / fluctuating), from
        :func:`lightning_influence.evaluation.patterns.classify_timeline`."""
        from lightning_influence.evaluation.patterns import classify_timeline

        return classify_timeline(self.values[:, :, self._q(query)], thresholds)


def timeline(log: InfluenceLog, module: nn.Module, train_data: TrainData, query: Query, grid: Any = None, *,
             loss_fn: LossFn = default_loss_fn, hvp: str = "exact", eps0: float | None = None, verify: bool = True,
             atol: float | None = None, rtol: float | None = None, max_memory_bytes: int = _DEFAULT_MEMORY,
             progress: Progress = None) -> Timeline:
    """``F_j(t)`` for every sample on a grid of steps, in **one** backward sweep.

    Every grid point adds its query-gradient columns to the adjoint when the sweep reaches
    it, so the cost is one sweep over ``[0, max(grid))`` with up to ``G·Q`` HVP columns per
    step (vectorised). Any window between grid points is a difference of columns:
    ``timeline.window(t1, t2)``.

    Args:
        grid: ``None``/``"epoch"`` (the first step of every epoch and ``T``), an int ``k``
            (every ``k`` steps), a list of steps, or a list of fractions of training.
        others: as :func:`dit`.
    """
    steps = grid_steps(log, grid)
    ctx = _context(log, module, train_data, loss_fn, verify, atol, rtol, max_memory_bytes)
    t_hi = int(steps[-1])
    if t_hi == 0:
        raise ValueError("the grid must contain a step > 0")
    res = _model_sweep(ctx, query, 0, t_hi, steps.tolist(), hvp, eps0, resolve_progress(progress, "dit timeline"))
    Q = len(res.names)
    values = np.zeros((log.dataset_size, len(steps), Q))
    for g, s in enumerate(steps):
        if s > 0:
            values[:, g, :] = res.values[int(s)]
    return Timeline(values, steps, res.names, _method(ctx, "dit", hvp), info=res.info)


# ========================================================================= Gauss-Newton
def dit_gauss_newton(log: InfluenceLog, query: Query | Mapping[int, np.ndarray], module: nn.Module | None = None,
                     window: Any = None, *, local: bool = False, query_names_: list[str] | None = None,
                     chunk_steps: int = 64, progress: Progress = None) -> InfluenceScores:
    """DIT with the Gauss-Newton Hessian, from the log alone (approximation, math §3).

    ``H_t`` is replaced by ``(1/|B_t|) Σ_{i∈B_t} g_{i,t} g_{i,t}ᵀ`` built from the logged
    (possibly projected) per-sample gradients, plus the optimizer's L2 term; the sweep runs
    in the logged gradient space, without the model or the data. SGD only (momentum and
    weight decay included); Adam's per-coordinate preconditioner does not survive the
    projection and is refused. With gradients recorded every ``n`` steps, each recorded
    step stands for ``n`` steps.

    Args:
        log: the influence log (must hold gradients).
        query: a query callable (needs ``module``; its gradients are taken at the checkpoints
            and projected like the logged rows) or precomputed ``{checkpoint_step: (Q, K)}``.
        module: the architecture, only to take query gradients.
        window: as :func:`dit`.
        local: sweep only inside the window (like :func:`dit_local`).
        query_names_: names for precomputed query gradients.
        chunk_steps: steps read from the log at a time (memory: ``chunk_steps·|B|·K``).
        progress: ``progress(done, total)`` or ``True``.
    """
    from lightning_influence.estimators.tracin import checkpoint_query_gradients

    t1, t2 = log.window(window)
    kind, groups, _ = _optimizer_kind(log)
    if kind != "sgd":
        raise UnsupportedOptimizerError(
            f"{log.path}: dit_gauss_newton supports SGD only; Adam's per-coordinate preconditioner cannot be applied "
            "to projected gradients. Use dit(...) with the model (frozen-preconditioner approximation).")
    if not log.recorded.get("gradients"):
        raise ValueError(f"{log.path}: dit_gauss_newton needs per-sample gradients in the log (record_gradients=True)")
    ckpts = log.checkpoint_steps
    if callable(query):
        if module is None:
            raise ValueError("dit_gauss_newton needs `module` to take query gradients, or precomputed query gradients")
        needed = sorted({[c for c in ckpts if c <= t][-1] for t in (t1, t2) if any(c <= t for c in ckpts)})
        qgrads, names = checkpoint_query_gradients(log, module, query, needed)
    else:
        qgrads, names = {int(k): np.asarray(v) for k, v in query.items()}, list(query_names_ or [])
    qsteps = sorted(qgrads)

    def q_at(t: int) -> np.ndarray:
        i = bisect.bisect_right(qsteps, t) - 1
        if i < 0:
            raise ValueError(f"no query gradient at or before step {t} (have {qsteps})")
        return qgrads[qsteps[i]].astype(np.float64)

    every = int(log.meta.get("every_n_steps", 1))
    col_groups = log.column_groups()
    K = len(col_groups)
    lin = _Linearisation("sgd", col_groups, groups, [False] * len(groups), torch.float64)
    t_lo = t1 if local else 0
    acts = [t2] if local else sorted({t for t in (t1, t2) if t > 0})
    q2 = q_at(t2)
    Q = q2.shape[0]
    names = names or [f"q{i}" for i in range(Q)]
    if q2.shape[1] != K:
        raise ValueError(f"query gradients have {q2.shape[1]} columns, the log's gradients {K}")
    N = log.dataset_size
    scores = np.zeros((N, Q * len(acts)))
    U = torch.from_numpy(q2.T.copy())
    W = torch.zeros_like(U)
    blocks = {t2: 0}
    show = resolve_progress(progress, "dit-gauss-newton")
    done = 0
    for hi in range(t2, t_lo, -chunk_steps):
        lo = max(t_lo, hi - chunk_steps)
        recs = list(log.iter_steps(lo, hi, fields=("grad",)))
        by_step = {r.step: r for r in recs}
        for t in range(hi - 1, lo - 1, -1):
            rec = by_step.get(t)
            if rec is not None and len(rec.ids):
                G = torch.from_numpy(rec.grads.astype(np.float64))  # (B, K)
                eta = lin.eta(rec.lrs) * every
                info = {"first": torch.full((K, 1), t == 0)} if lin.has_momentum else {}
                R = lin.pre(U, W, eta, info)
                GR = G @ R  # (B, C)
                HR = G.T @ GR / len(rec.ids)
                C = U.shape[1]
                np.add.at(scores[:, :C], rec.ids, (-GR / len(rec.ids)).numpy())
                U, W = lin.post(U, W, R, HR, eta, info)
            if t in acts and t not in blocks:
                blocks[t] = U.shape[1]
                qt = torch.from_numpy(q_at(t).T.copy())
                U = torch.cat([U, qt], dim=1)
                W = torch.cat([W, torch.zeros_like(qt)], dim=1)
            done += 1
            if show is not None:
                show(done, t2 - t_lo)
    F2 = scores[:, blocks[t2] : blocks[t2] + Q]
    out = F2 - scores[:, blocks[t1] : blocks[t1] + Q] if (not local and t1 > 0) else F2
    tag = "dit-local-gauss-newton (approx.)" if local else "dit-gauss-newton (approx.)"
    if every > 1:
        tag = tag[:-1] + f", every {every} steps)"
    return InfluenceScores(out, tag, (t1, t2), names,
                           info={"query_checkpoints": qsteps, "columns": K, "every_n_steps": every})
