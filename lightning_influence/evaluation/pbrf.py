"""PBRF: what influence estimates answer for a trained network (math §6; Bae et al. 2022).

The *proximal Bregman response function* of removing training sample ``z_m`` from the
final parameters ``θ^s = θ_T`` is the solution of

    θ^s(ε) = argmin_θ  (1/N) Σ_i D_ℓ(h(θ, x_i), h(θ^s, x_i))  +  ε ℓ(z_m; θ)
                       + (λ/2) ‖θ − θ^s‖²  +  (κ/2) ‖θ − θ^s‖²,         ε = −1/N,

where ``h(θ, x) = module(x)`` are the network outputs, ``D_ℓ`` is the Bregman divergence of
the loss in output space (softmax cross-entropy: ``KL(p(h^s) ‖ p(h))``; squared error:
``½‖h − h^s‖²``), ``λ`` the damping (proximity) and ``κ`` the training run's own L2 weight
decay (the Bregman divergence of the regulariser ``(κ/2)‖θ‖²``; 0 without one). The PBRF
response of a query is ``f(θ^s(ε)) − f(θ^s)``, with the project's sign: positive = removing
the sample raises ``f``.

For a model whose outputs are linear in ``θ`` and a squared loss, the objective is quadratic
and the PBRF is exactly the leave-one-out retraining of the regularised objective from its
minimiser when ``λ = 0`` (tests check this in closed form). For a network it answers a
different, local question than replay LOO; :func:`gap_decomposition` measures the gap stage
by stage:

    loo        cold-start retraining from θ_0 without z_m on the recorded batches (replay LOO)
    warm       warm start: the logged optimizer, schedule and batches from θ_T without z_m
    warm_prox  ... plus the proximity term (λ/2)‖θ − θ_T‖²
    bregman    ... with each loss ℓ_i replaced by its Bregman divergence around θ_T (θ_T
               treated as a minimiser: the training non-convergence term); this is the PBRF
               objective run by the logged optimizer
    pbrf       the PBRF solved to convergence (solver non-convergence term)
    linear     the linearised PBRF −ε qᵀ(G + (λ+κ)I)⁻¹∇ℓ_m, G the Gauss-Newton matrix at θ_T
               (influence-function form; linearisation term)

Every stage is a response of the same chosen samples; adjacent stages differ in one thing,
so the differences telescope from LOO to the influence function.

Pure torch: no Lightning imports.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from lightning_influence.capture import call_with_params
from lightning_influence.capture.hvp import flatten, unflatten
from lightning_influence.log.reader import InfluenceLog
from lightning_influence.queries import LossFn, Query, default_loss_fn, evaluate_query, query_names
from lightning_influence.replay import (
    Progress,
    TrainData,
    _optimizer_spec,
    batch_from_ids,
    build_optimizer,
    functional_loss,
    load_optimizer_state,
    optimizer_class,
    parameters_at,
    resolve_progress,
)

__all__ = [
    "BREGMAN_LOSSES",
    "GapDecomposition",
    "PBRFResult",
    "bregman_divergence",
    "gap_decomposition",
    "linear_pbrf",
    "pbrf",
]

Bregman = Callable[[Tensor, Tensor], Tensor]
"""``D(h, h_ref) -> Tensor[B]``: per-sample Bregman divergence of the loss in output space."""

OutputLoss = Union[str, Bregman]
InputsFn = Callable[[Any], Tensor]


def _kl_logits(h: Tensor, h_ref: Tensor) -> Tensor:
    logp_ref = torch.log_softmax(h_ref, dim=1)
    return (logp_ref.exp() * (logp_ref - torch.log_softmax(h, dim=1))).flatten(1).sum(1)


def _mse(h: Tensor, h_ref: Tensor) -> Tensor:
    return (h - h_ref).pow(2).flatten(1).mean(1)


def _half_sse(h: Tensor, h_ref: Tensor) -> Tensor:
    return 0.5 * (h - h_ref).pow(2).flatten(1).sum(1)


BREGMAN_LOSSES: dict[str, tuple[Bregman, str]] = {
    "cross_entropy": (_kl_logits, "softmax cross-entropy on logits (dim 1): D = KL(softmax(h_ref) ‖ softmax(h))"),
    "mse": (_mse, "F.mse_loss per sample, mean over output entries of (h − y)²: D = mean((h − h_ref)²)"),
    "squared_error": (_half_sse, "½ Σ (h − y)² per sample: D = ½ ‖h − h_ref‖²"),
}


def bregman_divergence(output_loss: OutputLoss) -> Bregman:
    """The output-space Bregman divergence ``D(h, h_ref)`` of a per-sample loss.

    Args:
        output_loss: ``"cross_entropy"`` (logits, classes on dim 1), ``"mse"`` (per-sample
            mean of squared errors, like ``F.mse_loss(..., reduction="none").mean(dims)``),
            ``"squared_error"`` (``½ Σ (h − y)²``), or a callable ``D(h, h_ref) -> Tensor[B]``
            (it must be ``≥ 0``, zero with zero gradient at ``h = h_ref``).

    Raises:
        ValueError: an unknown name.
    """
    if callable(output_loss):
        return output_loss
    if output_loss in BREGMAN_LOSSES:
        return BREGMAN_LOSSES[output_loss][0]
    known = "; ".join(f"{k!r}: {v[1]}" for k, v in BREGMAN_LOSSES.items())
    raise ValueError(f"output_loss={output_loss!r} is not supported. The PBRF needs the training loss written in "
                     f"output space to form its Bregman divergence. Supported: {known}. For another loss that is "
                     "convex in the outputs, pass a callable D(h, h_ref) -> Tensor[B].")


def _default_inputs(batch: Any) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise TypeError(f"cannot find the model inputs in a batch of type {type(batch).__name__}: pass "
                    "inputs_fn=lambda batch: <the tensor module(x) takes>")


# ============================================================================== problem
class _Problem:
    """Everything the response objectives need, computed once: θ_T, data chunks, h(θ_T, x_i), κ."""

    def __init__(self, log: InfluenceLog, module: nn.Module, train_data: TrainData, query: Query, *,
                 output_loss: OutputLoss, damping: float, weight_decay: float | Mapping[str, float] | None,
                 step: int | None, loss_fn: LossFn, inputs_fn: InputsFn | None, chunk_size: int | None,
                 epsilon: float | None, max_dense_params: int = 6000) -> None:
        if not (isinstance(damping, (int, float)) and damping >= 0 and math.isfinite(damping)):
            raise ValueError(f"damping must be a finite float >= 0, got {damping!r}")
        self.log, self.module, self.train_data, self.query = log, module, train_data, query
        self.loss_fn, self.inputs_fn = loss_fn, inputs_fn or _default_inputs
        self.divergence = bregman_divergence(output_loss)
        self.output_loss = output_loss if isinstance(output_loss, str) else getattr(output_loss, "__name__", "custom")
        self.damping = float(damping)
        self.max_dense_params = int(max_dense_params)
        self._gn: Tensor | None = None
        self._chol: Tensor | None = None
        self.step = log.num_steps if step is None else int(step)
        params = parameters_at(log, module, train_data, self.step)
        self.names = list(params)
        self.shapes = {n: tuple(t.shape) for n, t in params.items()}
        self.theta = flatten({n: t.detach() for n, t in params.items()}, self.names)
        self.dtype = self.theta.dtype
        self.p = self.theta.numel()
        self.ids = log.all_ids()
        self.N = len(self.ids)
        if self.N == 0:
            raise ValueError(f"{log.path}: the log holds no training step")
        self.epsilon = -1.0 / self.N if epsilon is None else float(epsilon)
        self.kappa, self.weight_decay_note = self._weight_decay(weight_decay)
        self.mu = self.damping + self.kappa  # (p,) proximity weight of the PBRF
        cs = self.N if chunk_size is None else int(chunk_size)
        if cs < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size!r}")
        self.chunks: list[tuple[Any, Tensor, Tensor]] = []  # (batch, inputs, h(θ_T))
        with torch.no_grad():
            for a in range(0, self.N, cs):
                batch = batch_from_ids(train_data, self.ids[a:a + cs])
                x = self.inputs_fn(batch)
                self.chunks.append((batch, x, self.outputs(self.theta, x).detach()))
        with torch.no_grad():
            f0 = self.f(self.theta)
        self.f0 = f0
        self.query_names = query_names(query, f0.numel())

    # --- weight decay = the training run's L2 regulariser (its Bregman divergence joins the proximity)
    def _weight_decay(self, weight_decay: Any) -> tuple[Tensor, str]:
        vec = torch.zeros(self.p, dtype=self.dtype)
        offsets, start = {}, 0
        for n in self.names:
            k = math.prod(self.shapes[n])
            offsets[n] = slice(start, start + k)
            start += k
        if isinstance(weight_decay, Mapping):
            for n, v in weight_decay.items():
                if n not in offsets:
                    raise ValueError(f"weight_decay names {n!r}, not a trainable parameter of the module")
                vec[offsets[n]] = float(v)
            return vec, "given per parameter"
        if weight_decay is not None:
            vec[:] = float(weight_decay)
            return vec, "given"
        try:
            cls = optimizer_class(self.log)
            groups = _optimizer_spec(self.log)["param_groups"]
        except Exception as err:  # noqa: BLE001 - no optimizer metadata: no regulariser known
            return vec, f"not known ({err}); 0 used"
        if cls is torch.optim.AdamW or any(g.get("decoupled_weight_decay") for g in groups):
            return vec, ("AdamW's decoupled weight decay is not the gradient of an L2 loss term; not included "
                         "(pass weight_decay= to include an L2 term)")
        for g in groups:
            for n in g["params"]:
                if n in offsets:
                    vec[offsets[n]] = float(g.get("weight_decay", 0.0))
        return vec, f"coupled L2 weight decay of the logged {cls.__name__} param groups"

    # --- evaluation at a flat parameter vector
    def as_dict(self, x: Tensor) -> dict[str, Tensor]:
        return unflatten(x, self.shapes)

    def outputs(self, x: Tensor, inputs: Tensor) -> Tensor:
        return call_with_params(self.module, lambda m, a: m(a), self.as_dict(x), inputs)

    def losses(self, x: Tensor, batch: Any) -> Tensor:
        return functional_loss(self.module, self.loss_fn, self.as_dict(x), batch)

    def f(self, x: Tensor) -> Tensor:
        return evaluate_query(self.module, self.query, self.as_dict(x)).reshape(-1)

    def sample_batch(self, m: int) -> Any:
        return batch_from_ids(self.train_data, np.asarray([m], dtype=np.int64))

    def check_samples(self, samples: Sequence[int] | np.ndarray) -> np.ndarray:
        s = np.asarray(samples, dtype=np.int64).reshape(-1)
        missing = np.setdiff1d(s, self.ids)
        if len(missing):
            raise ValueError(f"samples {missing[:10].tolist()} never appear in the log's batches (training ids "
                             f"{self.ids.min()}..{self.ids.max()}, {self.N} distinct)")
        return s

    # --- the dense Gauss-Newton matrix G = (1/N) Σ_i J_iᵀ ∇²_h D_i J_i at θ_T (small models)
    def gauss_newton_matrix(self) -> Tensor:
        if self._gn is not None:
            return self._gn
        if self.p > self.max_dense_params:
            raise ValueError(f"the dense Gauss-Newton matrix needs p <= max_dense_params={self.max_dense_params}, "
                             f"the module has p={self.p}")
        G = torch.zeros(self.p, self.p, dtype=self.dtype)
        for _, inputs, h_ref in self.chunks:
            K = h_ref[0].numel()
            step = max(1, (1 << 24) // max(1, K * self.p))  # Jacobian rows per pass: <= 128 MiB in float64
            for a in range(0, h_ref.shape[0], step):
                x_in, hr = inputs[a:a + step], h_ref[a:a + step]
                jac = torch.func.jacrev(lambda z: self.outputs(z, x_in))(self.theta).reshape(hr.shape[0], K, self.p)

                hess = self.output_hessians(hr, hr)
                G += jac.reshape(-1, self.p).T @ torch.einsum("nkl,nlp->nkp", hess, jac).reshape(-1, self.p)
        self._gn = (G + G.T) / (2 * self.N)
        return self._gn

    def gauss_newton_cholesky(self) -> Tensor:
        """Cholesky factor of ``G + diag(λ + κ)``."""
        if self._chol is None:
            A = self.gauss_newton_matrix() + torch.diag(self.mu)
            L, info = torch.linalg.cholesky_ex(A)
            if int(info) != 0:  # singular without damping: add the smallest jitter that factors
                jitter = 1e-12 * float(A.diagonal().abs().max())
                while int(info) != 0:
                    L, info = torch.linalg.cholesky_ex(A + jitter * torch.eye(self.p, dtype=self.dtype))
                    jitter *= 10
            self._chol = L
        return self._chol

    def output_hessians(self, h: Tensor, h_ref: Tensor) -> Tensor:
        """``(B, K, K)`` Hessians of ``D(·, h_ref)`` in output space at ``h`` (= the loss's output Hessian)."""
        def one(a: Tensor, r: Tensor) -> Tensor:
            return self.divergence(a.unsqueeze(0), r.unsqueeze(0)).sum()

        K = h[0].numel()
        return torch.func.vmap(torch.func.hessian(one))(h, h_ref).reshape(h.shape[0], K, K)

    def sample_preconditioner(self, m: int, epsilon: float) -> Callable[[Tensor], Tensor]:
        """``g ↦ (G + μ + ε J_mᵀ H_m J_m)⁻¹ g``: the Gauss-Newton matrix of the whole PBRF objective of
        sample ``m`` at θ_T, by a Woodbury update of the Cholesky factor of ``G + μ`` (rank ``K``)."""
        chol = self.gauss_newton_cholesky()
        x_m = self.inputs_fn(self.sample_batch(m))
        with torch.no_grad():
            h_m = self.outputs(self.theta, x_m).detach()
        K = h_m[0].numel()
        Jm = torch.func.jacrev(lambda z: self.outputs(z, x_m))(self.theta).reshape(K, self.p)
        Hm = self.output_hessians(h_m, h_m)[0]
        AU = torch.cholesky_solve(Jm.T.contiguous(), chol)  # (p, K)
        core = torch.eye(K, dtype=self.dtype) + epsilon * Hm @ (Jm @ AU)
        try:
            core_inv = torch.linalg.inv(core)
        except RuntimeError:  # singular update: precondition with G + μ alone
            core_inv = None

        def apply(g: Tensor) -> Tensor:
            y = torch.cholesky_solve(g.unsqueeze(1), chol).squeeze(1)
            if core_inv is None:
                return y
            return y - AU @ (core_inv @ (epsilon * (Hm @ (Jm @ y))))

        return apply

    # --- the PBRF objective J(x) = (1/N) Σ D + ε ℓ_m + ½ Σ μ (x − θ_T)², gradient accumulated chunk by chunk
    def pbrf_closure(self, x: Tensor, sample_batch: Any, epsilon: float) -> Callable[[], Tensor]:
        def closure() -> Tensor:
            if x.grad is not None:
                x.grad = None
            total = 0.0
            for _, inputs, h_ref in self.chunks:
                part = self.divergence(self.outputs(x, inputs), h_ref).sum() / self.N
                part.backward()
                total += float(part.detach())
            rest = epsilon * self.losses(x, sample_batch).sum() + 0.5 * (self.mu * (x - self.theta).pow(2)).sum()
            rest.backward()
            return torch.as_tensor(total + float(rest.detach()), dtype=self.dtype)

        return closure


# =============================================================================== results
@dataclass
class PBRFResult:
    """PBRF responses of chosen samples, with the solver's convergence report.

    Attributes:
        samples: ``(S,)`` sample ids.
        scores: ``(S, Q)`` responses ``f(θ^s(ε)) − f(θ^s)`` (positive = removing raises ``f``).
        query_names: names of the ``Q`` query outputs.
        method: ``"pbrf"`` or ``"linear-pbrf"``.
        damping: ``λ``.
        epsilon: ``ε`` (``−1/N``).
        converged: ``(S,)`` the solver reached its tolerance.
        iterations: ``(S,)`` solver iterations (LBFGS/Adam/SGD steps; CG iterations for the linear form).
        rel_grad_norm: ``(S,)`` ``‖∇J‖_∞ / ‖∇J(θ_T)‖_∞`` at the end (CG: relative residual).
        response_change: ``(S,)`` ``max_q |response − response at the previous record point|``
            (the last-segment movement of the answer: a practical non-convergence signal).
        intermediate: ``{steps: (S, Q)}`` responses after that many solver steps (``record_at``).
        info: settings (solver, output loss, weight decay, N, time).
    """

    samples: np.ndarray
    scores: np.ndarray
    query_names: list[str]
    method: str
    damping: float
    epsilon: float
    converged: np.ndarray
    iterations: np.ndarray
    rel_grad_norm: np.ndarray
    response_change: np.ndarray
    intermediate: dict[int, np.ndarray] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def column(self, query: int | str = 0) -> np.ndarray:
        q = self.query_names.index(query) if isinstance(query, str) else query
        return self.scores[:, q]

    def full(self, n: int) -> np.ndarray:
        """``(n, Q)`` scores by sample id, ``nan`` for samples not solved."""
        out = np.full((n, self.scores.shape[1]), np.nan)
        out[self.samples] = self.scores
        return out

    def summary(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "samples": int(len(self.samples)),
            "damping": self.damping,
            "epsilon": self.epsilon,
            "converged_fraction": float(np.mean(self.converged)) if len(self.converged) else float("nan"),
            "median_iterations": float(np.median(self.iterations)) if len(self.iterations) else float("nan"),
            "max_rel_grad_norm": float(np.max(self.rel_grad_norm)) if len(self.rel_grad_norm) else float("nan"),
            "max_response_change": float(np.nanmax(self.response_change)) if len(self.response_change) else float("nan"),
            "rms_response": float(np.sqrt(np.mean(self.scores ** 2))) if self.scores.size else float("nan"),
            **{k: v for k, v in self.info.items() if isinstance(v, (int, float, str, bool))},
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "summary": self.summary(),
            "query_names": list(self.query_names),
            "samples": self.samples.tolist(),
            "scores": self.scores.tolist(),
            "converged": self.converged.tolist(),
            "iterations": self.iterations.tolist(),
            "rel_grad_norm": self.rel_grad_norm.tolist(),
            "response_change": self.response_change.tolist(),
            "intermediate": {str(k): v.tolist() for k, v in self.intermediate.items()},
            "info": {k: v for k, v in self.info.items() if isinstance(v, (int, float, str, bool, list))},
        }

    def table(self) -> str:
        s = self.summary()
        lines = [f"{self.method}: {s['samples']} samples, damping λ={self.damping:g}, ε={self.epsilon:.3g}, "
                 f"output loss {self.info.get('output_loss')}",
                 f"  converged: {s['converged_fraction']:.0%} (tolerance {self.info.get('tol')}), median iterations "
                 f"{s['median_iterations']:g}, worst relative gradient/residual {s['max_rel_grad_norm']:.2e}",
                 f"  RMS response {s['rms_response']:.3e}; largest last-segment change {s['max_response_change']:.2e}"]
        if self.info.get("weight_decay_note"):
            lines.append(f"  weight decay in the proximity: {self.info['weight_decay_note']}")
        return "\n".join(lines)


# =================================================================================== pbrf
SOLVERS = ("auto", "gauss-newton", "lbfgs", "adam", "sgd")


def _solve_one(prob: _Problem, m: int, *, epsilon: float, steps: int, solver: str, lr: float | None, tol: float,
               record_at: Sequence[int]) -> tuple[Tensor, dict[int, Tensor], int, float]:
    """Minimise the PBRF objective of sample ``m`` from θ_T; returns (x, {steps: f(x) − f0}, iterations, rel grad)."""
    x = prob.theta.clone().requires_grad_(True)
    closure = prob.pbrf_closure(x, prob.sample_batch(m), epsilon)
    J = closure()
    g0 = float(x.grad.abs().max())
    marks = sorted({int(s) for s in record_at if 0 < int(s) < steps} | {steps})
    if g0 == 0.0:  # ∇ℓ_m(θ_T) = 0: θ_T solves the objective
        zero = torch.zeros_like(prob.f0)
        return x.detach(), {s: zero for s in marks}, 0, 0.0
    recorded: dict[int, Tensor] = {}
    done = 0
    if solver == "lbfgs":
        opt = torch.optim.LBFGS([x], lr=1.0 if lr is None else lr, max_iter=1, history_size=50,
                                tolerance_grad=tol * g0, tolerance_change=1e-300, line_search_fn="strong_wolfe")
        for mark in marks:
            todo = mark - done
            if todo > 0:
                opt.param_groups[0]["max_iter"] = todo
                opt.param_groups[0]["max_eval"] = todo * 5 // 4 + 5
                opt.step(closure)
                done = int(opt.state[x].get("n_iter", done))
            with torch.no_grad():
                recorded[mark] = prob.f(x) - prob.f0
    elif solver == "gauss-newton":
        # preconditioned descent with the Gauss-Newton matrix at θ_T, G + μ (the exact Hessian of the
        # Bregman and proximity terms at θ_T), Armijo backtracking; Newton-fast near θ_T
        precondition = prob.sample_preconditioner(m, epsilon)
        g = x.grad.detach().clone()
        for t in range(1, steps + 1):
            if float(g.abs().max()) <= tol * g0:
                break
            d = -precondition(g)
            slope = float(g @ d)
            alpha, x_old = 1.0, x.detach().clone()
            for _ in range(40):
                with torch.no_grad():
                    x.copy_(x_old + alpha * d)
                J_new = closure()
                g_new = x.grad.detach().clone()
                if float(J_new) <= float(J) + 1e-4 * alpha * slope or float(g_new.abs().max()) < float(g.abs().max()):
                    break
                alpha *= 0.5
            J, g, done = J_new, g_new, t
            if t in marks:
                with torch.no_grad():
                    recorded[t] = prob.f(x) - prob.f0
    else:
        if lr is None:
            raise ValueError(f"solver={solver!r} needs lr=")
        opt = torch.optim.Adam([x], lr=lr) if solver == "adam" else torch.optim.SGD([x], lr=lr)
        for t in range(1, steps + 1):
            closure()
            if float(x.grad.abs().max()) <= tol * g0:
                break
            opt.step()
            done = t
            if t in marks:
                with torch.no_grad():
                    recorded[t] = prob.f(x) - prob.f0
    with torch.no_grad():
        final = prob.f(x) - prob.f0
    for mark in marks:  # stopped early (converged): later marks hold the final answer
        recorded.setdefault(mark, final)
    recorded[steps] = final
    closure()
    rel = float(x.grad.abs().max()) / g0
    return x.detach(), recorded, done, rel


def _tensor_tree(batch: Any) -> bool:
    leaves = torch.utils._pytree.tree_leaves(batch)
    return bool(leaves) and all(isinstance(t, Tensor) for t in leaves)


def _solve_batched_gn(prob: _Problem, samples: np.ndarray, *, epsilon: float, steps: int, tol: float,
                      marks: Sequence[int]) -> tuple[np.ndarray, dict[int, np.ndarray], np.ndarray, np.ndarray]:
    """The Gauss-Newton-preconditioned solve of every sample's PBRF at once (stacked copies, ``vmap``).

    Each copy ``c`` minimises its own objective by L-BFGS whose initial inverse Hessian is
    ``P_c⁻¹``, ``P_c = G + μ + ε J_cᵀ H_c J_c`` (the objective's Gauss-Newton matrix at θ_T,
    Woodbury on one Cholesky factor: Newton's step at the start, exact for a quadratic), with
    Armijo backtracking per copy. Converged copies stop moving; a copy whose direction gives
    no descent after 16 halvings stops too (it stays unconverged in the report).
    """
    S, p = len(samples), prob.p
    tree_map = torch.utils._pytree.tree_map
    batch = batch_from_ids(prob.train_data, samples)
    chol = prob.gauss_newton_cholesky()
    x_s = prob.inputs_fn(batch)
    with torch.no_grad():
        h_s = prob.outputs(prob.theta, x_s).detach()
    K = h_s[0].numel()
    # per-sample output Jacobians (S, K, p), output Hessians (S, K, K), Woodbury pieces
    J = torch.func.jacrev(lambda z: prob.outputs(z, x_s))(prob.theta).reshape(S, K, p)
    H = prob.output_hessians(h_s, h_s)
    AU = torch.cholesky_solve(J.reshape(S * K, p).T.contiguous(), chol).T.reshape(S, K, p)  # rows of A⁻¹ J_cᵀ
    core = torch.eye(K, dtype=prob.dtype).expand(S, K, K) + epsilon * H @ (J @ AU.transpose(1, 2))
    core_inv, info = torch.linalg.inv_ex(core)
    ok = (info == 0).to(prob.dtype).reshape(S, 1)

    def precondition(G: Tensor) -> Tensor:  # (S, p) -> (S, p)
        Y = torch.cholesky_solve(G.T.contiguous(), chol).T
        inner = epsilon * torch.einsum("skl,sl->sk", H, torch.einsum("skp,sp->sk", J, Y))
        corr = torch.einsum("skp,sk->sp", AU, torch.einsum("skl,sl->sk", core_inv, inner))
        return Y - ok * corr

    def data_term(x: Tensor, inputs: Tensor, h_ref: Tensor) -> Tensor:
        return prob.divergence(prob.outputs(x, inputs), h_ref).sum() / prob.N

    def sample_term(x: Tensor, b: Any) -> Tensor:
        return epsilon * prob.losses(x, tree_map(lambda t: t.unsqueeze(0), b)).sum()

    data_grad = torch.func.vmap(torch.func.grad_and_value(data_term), in_dims=(0, None, None))
    sample_grad = torch.func.vmap(torch.func.grad_and_value(sample_term))

    def evaluate(X: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Objective values and gradients of copies ``idx`` at ``X`` (rows matching ``idx``)."""
        d = X - prob.theta
        Gr = prob.mu * d
        Jv = 0.5 * (prob.mu * d * d).sum(1)
        for _, inputs, h_ref in prob.chunks:
            g, v = data_grad(X, inputs, h_ref)
            Gr, Jv = Gr + g, Jv + v
        g, v = sample_grad(X, tree_map(lambda t: t[idx], batch))
        return (Jv + v).detach(), (Gr + g).detach()

    every = torch.arange(S)
    X = prob.theta.expand(S, p).clone()
    Jv, Gr = evaluate(X, every)
    g0 = Gr.abs().amax(1)
    active = g0 > 0
    iters = torch.zeros(S, dtype=torch.int64)
    recorded: dict[int, np.ndarray] = {}

    def responses(X: Tensor) -> np.ndarray:
        with torch.no_grad():
            return np.stack([(prob.f(X[c]) - prob.f0).double().numpy() for c in range(S)])

    # L-BFGS memory per copy, with the Gauss-Newton preconditioner as the initial inverse Hessian
    hist = 10
    Sm = torch.zeros(hist, S, p, dtype=prob.dtype)
    Ym = torch.zeros(hist, S, p, dtype=prob.dtype)
    Rho = torch.zeros(hist, S, dtype=prob.dtype)  # 0 = empty slot or a pair without positive curvature
    head = 0
    for t in range(1, steps + 1):
        active &= Gr.abs().amax(1) > tol * g0
        if not bool(active.any()):
            break
        idx = torch.nonzero(active).squeeze(1)
        q = Gr[idx].clone()
        a = torch.zeros(hist, len(idx), dtype=prob.dtype)
        order = [(head - 1 - i) % hist for i in range(hist)]
        for k in order:
            a[k] = Rho[k, idx] * (Sm[k, idx] * q).sum(1)
            q = q - a[k].unsqueeze(1) * Ym[k, idx]
        full = torch.zeros(S, p, dtype=prob.dtype)
        full[idx] = q
        r = precondition(full)[idx]
        for k in reversed(order):
            b = Rho[k, idx] * (Ym[k, idx] * r).sum(1)
            r = r + (a[k] - b).unsqueeze(1) * Sm[k, idx]
        Dm = -r
        slope = (Gr[idx] * Dm).sum(1)
        bad = slope >= 0  # not a descent direction (curvature pairs gone wrong): fall back to P⁻¹
        if bool(bad.any()):
            Dm[bad] = -precondition(Gr)[idx[bad]]
            slope = (Gr[idx] * Dm).sum(1)
        X_old, G_old = X[idx].clone(), Gr[idx].clone()
        alpha = torch.ones(len(idx), dtype=prob.dtype)
        pending = torch.ones(len(idx), dtype=torch.bool)
        for _ in range(16):
            sub = torch.nonzero(pending).squeeze(1)
            trial = X[idx[sub]] + alpha[sub].unsqueeze(1) * Dm[sub]
            Jt, Gt = evaluate(trial, idx[sub])
            accept = (Jt <= Jv[idx[sub]] + 1e-4 * alpha[sub] * slope[sub]) | \
                (Gt.abs().amax(1) < Gr[idx[sub]].abs().amax(1))
            take = sub[accept]
            X[idx[take]], Jv[idx[take]], Gr[idx[take]] = trial[accept], Jt[accept], Gt[accept]
            pending[take] = False
            if not bool(pending.any()):
                break
            alpha = torch.where(pending, 0.5 * alpha, alpha)
        iters[idx] += 1
        active[idx[pending]] = False  # no descent along the direction: stalled, reported unconverged
        s_new, y_new = X[idx] - X_old, Gr[idx] - G_old
        sy = (s_new * y_new).sum(1)
        Sm[head, idx], Ym[head, idx] = s_new, y_new
        Rho[head, idx] = torch.where(sy > 1e-300, 1.0 / sy.clamp_min(1e-300), torch.zeros_like(sy))
        head = (head + 1) % hist
        if t in marks:
            recorded[t] = responses(X)
    final = responses(X)
    for mark in marks:
        recorded.setdefault(mark, final)
    rel = torch.where(g0 > 0, Gr.abs().amax(1) / g0.clamp_min(1e-300), torch.zeros_like(g0))
    return final, recorded, iters.numpy(), rel.double().numpy()


def _resolve_solver(prob: _Problem, solver: str) -> str:
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if solver == "auto":
        return "gauss-newton" if prob.p <= prob.max_dense_params else "lbfgs"
    if solver == "gauss-newton" and prob.p > prob.max_dense_params:
        raise ValueError(f"solver='gauss-newton' forms the dense {prob.p}x{prob.p} Gauss-Newton matrix; the module has "
                         f"more than max_dense_params={prob.max_dense_params} parameters: use solver='lbfgs' or raise "
                         "max_dense_params")
    return solver


def pbrf(log: InfluenceLog, module: nn.Module, train_data: TrainData, query: Query, samples: Sequence[int], *,
         damping: float = 1e-3, steps: int = 100, output_loss: OutputLoss = "cross_entropy", epsilon: float | None = None,
         solver: str = "auto", lr: float | None = None, tol: float = 1e-8, record_at: Sequence[int] = (),
         weight_decay: float | Mapping[str, float] | None = None, step: int | None = None,
         loss_fn: LossFn = default_loss_fn, inputs_fn: InputsFn | None = None, chunk_size: int | None = None,
         max_dense_params: int = 6000, copies: int = 128, progress: Progress = None) -> PBRFResult:
    """Proximal Bregman response of removing each of ``samples`` from the final parameters.

    Minimises ``(1/N) Σ_i D(h(θ, x_i), h(θ_T, x_i)) + ε ℓ(z_m; θ) + ½ (λ + κ) ‖θ − θ_T‖²`` from
    ``θ_T`` for each sample ``m`` (``N`` = distinct training ids in the log, full batch, chunked
    by ``chunk_size``), and returns ``f(θ_m) − f(θ_T)``.

    Args:
        log: the influence log (``θ_T`` from its final checkpoint, or replayed to ``step``).
        module: the architecture; ``module(x)`` gives the outputs ``h`` that ``output_loss`` is
            written in.
        train_data: the training samples by id.
        query: ``f(module) -> scalar or (Q,)``.
        samples: ids to remove (one at a time).
        damping: ``λ >= 0``, the proximity weight.
        steps: maximum solver iterations per sample.
        output_loss: the loss in output space: ``"cross_entropy"``, ``"mse"``, ``"squared_error"``
            or a callable Bregman divergence ``D(h, h_ref)`` (see :func:`bregman_divergence`).
            ``loss_fn`` must be this loss of ``module(x)`` and the sample's target.
        epsilon: ``ε`` (default ``−1/N``: removal).
        solver: ``"gauss-newton"``: L-BFGS whose initial inverse Hessian is the dense
            Gauss-Newton matrix of the sample's objective at ``θ_T`` (``G + λ + κ`` with the
            sample's own rank-``K`` term; Newton's step at the start, exact in one step for a
            quadratic), Armijo backtracking, all samples solved together as stacked copies;
            ``"lbfgs"``: plain full-batch L-BFGS with a strong-Wolfe line search, one sample at a
            time (any model size; stops at ~1e-8 relative accuracy, where float64 objective
            values stop resolving progress); ``"adam"``/``"sgd"`` (need ``lr``); ``"auto"``:
            Gauss-Newton up to ``max_dense_params`` parameters, else L-BFGS.
        lr: solver learning rate (L-BFGS default 1).
        tol: convergence when ``‖∇J‖_∞ <= tol · ‖∇J(θ_T)‖_∞`` (``∇J(θ_T) = ε ∇ℓ_m``).
        record_at: also report the responses after these step counts (non-convergence study).
        weight_decay: ``κ``: ``None`` takes the logged optimizer's coupled L2 weight decay
            (SGD, Adam; per param group), a float or ``{param name: value}`` sets it.
        step: the trained parameters ``θ^s`` (default: the end of the run).
        loss_fn: per-sample training loss ``loss_fn(module, batch) -> Tensor[B]``.
        inputs_fn: ``batch -> inputs`` of ``module`` (default: ``batch[0]``).
        chunk_size: training samples per forward pass (default: all at once).
        max_dense_params: largest model for the dense Gauss-Newton matrix.
        copies: samples solved together (stacked parameter copies, Gauss-Newton solver).
        progress: ``progress(done, total)`` or ``True`` for a bar.

    Returns:
        :class:`PBRFResult` with a convergence report per sample.
    """
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    prob = _Problem(log, module, train_data, query, output_loss=output_loss, damping=damping, weight_decay=weight_decay,
                    step=step, loss_fn=loss_fn, inputs_fn=inputs_fn, chunk_size=chunk_size, epsilon=epsilon,
                    max_dense_params=max_dense_params)
    return _pbrf(prob, prob.check_samples(samples), steps=steps, solver=_resolve_solver(prob, solver), lr=lr, tol=tol,
                 record_at=record_at, progress=resolve_progress(progress, "pbrf"), copies=copies)


def _pbrf(prob: _Problem, samples: np.ndarray, *, steps: int, solver: str, lr: float | None, tol: float,
          record_at: Sequence[int], progress: Callable[[int, int], None] | None, copies: int = 128) -> PBRFResult:
    t0 = time.perf_counter()
    S, Q = len(samples), prob.f0.numel()
    scores = np.zeros((S, Q))
    marks = sorted({int(s) for s in record_at if 0 < int(s) < steps} | ({steps // 2} if steps >= 4 else set()))
    inter = {s: np.zeros((S, Q)) for s in marks}
    iters, rel, change = np.zeros(S, np.int64), np.zeros(S), np.zeros(S)
    if solver == "gauss-newton" and S and _tensor_tree(prob.sample_batch(int(samples[0]))):
        for a in range(0, S, copies):
            sl = slice(a, a + copies)
            sc, rec, it, r = _solve_batched_gn(prob, samples[sl], epsilon=prob.epsilon, steps=steps, tol=tol,
                                               marks=marks)
            scores[sl], iters[sl], rel[sl] = sc, it, r
            for s in marks:
                inter[s][sl] = rec[s]
            if progress is not None:
                progress(min(a + copies, S), S)
        prev = inter[marks[-1]] if marks else scores
        change = np.max(np.abs(scores - prev), axis=1) if Q else change
        samples_loop: Sequence[int] = []
    else:
        samples_loop = samples
    for k, m in enumerate(samples_loop):
        _, rec, it, r = _solve_one(prob, int(m), epsilon=prob.epsilon, steps=steps, solver=solver, lr=lr, tol=tol,
                                   record_at=marks)
        scores[k] = rec[steps].double().numpy()
        for s in marks:
            inter[s][k] = rec[s].double().numpy()
        iters[k], rel[k] = it, r
        prev = inter[marks[-1]][k] if marks else scores[k]
        change[k] = float(np.max(np.abs(scores[k] - prev))) if Q else 0.0
        if progress is not None:
            progress(k + 1, S)
    keep = {s: v for s, v in inter.items() if s in {int(r) for r in record_at}}
    return PBRFResult(samples=samples, scores=scores, query_names=prob.query_names, method="pbrf",
                      damping=prob.damping, epsilon=prob.epsilon, converged=rel <= tol, iterations=iters,
                      rel_grad_norm=rel, response_change=change, intermediate=keep,
                      info={"solver": solver, "steps": steps, "tol": tol, "output_loss": prob.output_loss, "N": prob.N,
                            "p": prob.p, "step": prob.step, "weight_decay_note": prob.weight_decay_note,
                            "weight_decay_max": float(prob.kappa.max()), "seconds": time.perf_counter() - t0,
                            "response_change_from_step": marks[-1] if marks else steps})


# ============================================================================ linear PBRF
class _GaussNewton:
    """``v ↦ (G + μ) v`` at θ_T, ``G = (1/N) Σ_i J_iᵀ ∇²_h D_i J_i`` (Gauss-Newton of the loss in output space)."""

    def __init__(self, prob: _Problem) -> None:
        self.prob = prob
        self.parts = []
        for _, inputs, h_ref in prob.chunks:
            def out_fn(x: Tensor, inputs: Tensor = inputs) -> Tensor:
                return prob.outputs(x, inputs)

            def jvp_fn(v: Tensor, out_fn: Callable[[Tensor], Tensor] = out_fn) -> Tensor:
                return torch.func.jvp(out_fn, (prob.theta,), (v,))[1]

            _, vjp_fn = torch.func.vjp(out_fn, prob.theta)

            def grad_h(h: Tensor, h_ref: Tensor = h_ref) -> Tensor:
                return torch.func.grad(lambda a: prob.divergence(a, h_ref).sum())(h)

            self.parts.append((jvp_fn, vjp_fn, grad_h, h_ref))

    def __call__(self, v: Tensor) -> Tensor:
        out = self.prob.mu * v
        for jvp_fn, vjp_fn, grad_h, h_ref in self.parts:
            jv = jvp_fn(v)
            _, hjv = torch.func.jvp(grad_h, (h_ref,), (jv,))
            out = out + vjp_fn(hjv)[0] / self.prob.N
        return out


def _cg(matvec: Callable[[Tensor], Tensor], b: Tensor, tol: float, maxiter: int) -> tuple[Tensor, int, float]:
    """Conjugate gradients for an SPD operator; returns (x, iterations, ‖r‖/‖b‖)."""
    x = torch.zeros_like(b)
    r = b.clone()
    bn = float(torch.linalg.vector_norm(b))
    if bn == 0.0:
        return x, 0, 0.0
    d = r.clone()
    rs = torch.dot(r, r)
    it = 0
    for it in range(1, maxiter + 1):
        Ad = matvec(d)
        alpha = rs / torch.dot(d, Ad)
        x = x + alpha * d
        r = r - alpha * Ad
        rs_new = torch.dot(r, r)
        if math.sqrt(float(rs_new)) <= tol * bn:
            rs = rs_new
            break
        d = r + (rs_new / rs) * d
        rs = rs_new
    return x, it, math.sqrt(float(rs)) / bn


def linear_pbrf(log: InfluenceLog, module: nn.Module, train_data: TrainData, query: Query,
                samples: Sequence[int] | None = None, *, damping: float = 1e-3, output_loss: OutputLoss = "cross_entropy",
                epsilon: float | None = None, linear_solver: str = "auto", cg_tol: float = 1e-10, cg_maxiter: int = 2000,
                weight_decay: float | Mapping[str, float] | None = None, step: int | None = None,
                loss_fn: LossFn = default_loss_fn, inputs_fn: InputsFn | None = None, chunk_size: int | None = None,
                max_dense_params: int = 6000) -> PBRFResult:
    """Linearised PBRF (influence-function form) ``−ε ⟨(G + (λ+κ) I)⁻¹ ∇f(θ_T), ∇ℓ_m(θ_T)⟩``.

    ``G`` is the Gauss-Newton matrix of the output-space loss at ``θ_T``. One linear solve per
    query output, then one directional derivative per training sample, so every sample
    (``samples=None``) costs about as much as a few. ``linear_solver``: ``"cholesky"`` (dense
    ``G``, up to ``max_dense_params``), ``"cg"`` (conjugate gradients with Gauss-Newton-vector
    products by forward- and reverse-mode differentiation, any size) or ``"auto"``.
    ``rel_grad_norm`` reports the relative residual of the solve. Other arguments as in :func:`pbrf`.
    """
    prob = _Problem(log, module, train_data, query, output_loss=output_loss, damping=damping, weight_decay=weight_decay,
                    step=step, loss_fn=loss_fn, inputs_fn=inputs_fn, chunk_size=chunk_size, epsilon=epsilon,
                    max_dense_params=max_dense_params)
    s = prob.ids if samples is None else prob.check_samples(samples)
    return _linear(prob, s, linear_solver=linear_solver, cg_tol=cg_tol, cg_maxiter=cg_maxiter)


def _linear(prob: _Problem, samples: np.ndarray, *, linear_solver: str = "auto", cg_tol: float = 1e-10,
            cg_maxiter: int = 2000) -> PBRFResult:
    t0 = time.perf_counter()
    if linear_solver not in ("auto", "cholesky", "cg"):
        raise ValueError(f"linear_solver must be 'auto', 'cholesky' or 'cg', got {linear_solver!r}")
    if linear_solver == "auto":
        linear_solver = "cholesky" if prob.p <= prob.max_dense_params else "cg"
    x = prob.theta.clone().requires_grad_(True)
    fvals = prob.f(x)
    qgrads = torch.stack([torch.autograd.grad(fvals[i], x, retain_graph=i + 1 < fvals.numel())[0]
                          for i in range(fvals.numel())])  # (Q, p)
    its: list[int] = []
    res: list[float] = []
    if linear_solver == "cholesky":
        A_op = None
        U = torch.cholesky_solve(qgrads.T, prob.gauss_newton_cholesky()).T
        A = prob.gauss_newton_matrix() + torch.diag(prob.mu)
        for qi in range(U.shape[0]):
            qn = float(torch.linalg.vector_norm(qgrads[qi]))
            res.append(float(torch.linalg.vector_norm(A @ U[qi] - qgrads[qi])) / qn if qn > 0 else 0.0)
            its.append(1)
    else:
        A_op = _GaussNewton(prob)
        solves = []
        for q in qgrads:
            u, it, r = _cg(A_op, q.detach(), cg_tol, cg_maxiter)
            solves.append(u)
            its.append(it)
            res.append(r)
        U = torch.stack(solves)
    # ⟨u, ∇ℓ_m⟩ for all samples of a batch: a jvp of the per-sample losses along u
    scores = np.zeros((len(samples), U.shape[0]))
    for a in range(0, len(samples), 512):
        batch = batch_from_ids(prob.train_data, samples[a:a + 512])
        for qi in range(U.shape[0]):
            _, dd = torch.func.jvp(lambda z: prob.losses(z, batch), (prob.theta,), (U[qi],))
            scores[a:a + 512, qi] = (-prob.epsilon * dd).detach().double().numpy()
    S = len(samples)
    worst = max(res) if res else 0.0
    tol = cg_tol if linear_solver == "cg" else 1e-8
    return PBRFResult(samples=samples, scores=scores, query_names=prob.query_names, method="linear-pbrf",
                      damping=prob.damping, epsilon=prob.epsilon, converged=np.full(S, worst <= tol),
                      iterations=np.full(S, max(its) if its else 0), rel_grad_norm=np.full(S, worst),
                      response_change=np.zeros(S),
                      info={"solver": linear_solver, "tol": tol, "solver_iterations": its, "rel_residual": res,
                            "output_loss": prob.output_loss, "N": prob.N, "p": prob.p, "step": prob.step,
                            "weight_decay_note": prob.weight_decay_note, "seconds": time.perf_counter() - t0})


# ======================================================================== gap decomposition
STAGES = ("loo", "warm", "warm_prox", "bregman", "pbrf", "linear")
_STAGE_TEXT = {
    "loo": "cold-start retraining from θ_0 without z_m (replay LOO, the ground truth)",
    "warm": "warm start: the same optimizer, schedule and batches ({K}) from θ_T without z_m",
    "warm_prox": "+ proximity (λ/2)‖θ − θ_T‖²",
    "bregman": "+ Bregman divergences instead of the losses (θ_T treated as a minimiser)",
    "pbrf": "PBRF solved to convergence (full batch)",
    "linear": "linearised PBRF (influence function: Gauss-Newton + damping)",
}
_TERMS = (
    ("warm-start (θ_0 -> θ_T)", "loo", "warm"),
    ("proximity", "warm", "warm_prox"),
    ("training non-convergence (loss -> Bregman)", "warm_prox", "bregman"),
    ("solver non-convergence (logged optimizer -> converged)", "bregman", "pbrf"),
    ("linearisation", "pbrf", "linear"),
)


@dataclass
class GapDecomposition:
    """The LOO → PBRF → influence-function gap of chosen samples, stage by stage.

    Attributes:
        samples: ``(S,)`` ids.
        stages: ``{stage: (S, Q)}`` responses (keys in :data:`STAGES` order).
        query_names: the ``Q`` query names.
        descriptions: ``{stage: text}``.
        info: settings, timings and the PBRF convergence summary.
    """

    samples: np.ndarray
    stages: dict[str, np.ndarray]
    query_names: list[str]
    descriptions: dict[str, str]
    info: dict[str, Any] = field(default_factory=dict)

    def _q(self, query: int | str) -> int:
        return self.query_names.index(query) if isinstance(query, str) else int(query)

    def terms(self, query: int | str = 0) -> list[dict[str, Any]]:
        """Each gap term ``stage_b − stage_a``: RMS, RMS relative to RMS(LOO) and to RMS of the total gap."""
        q = self._q(query)
        loo = self.stages["loo"][:, q]
        rms_loo = float(np.sqrt(np.mean(loo ** 2)))
        total = self.stages["linear"][:, q] - loo
        rms_total = float(np.sqrt(np.mean(total ** 2)))
        rows = []
        for name, a, b in _TERMS:
            d = self.stages[b][:, q] - self.stages[a][:, q]
            rms = float(np.sqrt(np.mean(d ** 2)))
            rows.append({"term": name, "from": a, "to": b, "rms": rms,
                         "rms_over_loo": rms / rms_loo if rms_loo > 0 else float("nan"),
                         "rms_over_total_gap": rms / rms_total if rms_total > 0 else float("nan")})
        rows.append({"term": "total (linear − loo)", "from": "loo", "to": "linear", "rms": rms_total,
                     "rms_over_loo": rms_total / rms_loo if rms_loo > 0 else float("nan"), "rms_over_total_gap": 1.0})
        return rows

    def correlations(self, query: int | str = 0) -> list[dict[str, Any]]:
        """Pearson/Spearman of every stage with LOO and with the converged PBRF."""
        from lightning_influence.evaluation.metrics import pearson, spearman

        q = self._q(query)
        loo, pb = self.stages["loo"][:, q], self.stages["pbrf"][:, q]
        return [{"stage": s, "rms": float(np.sqrt(np.mean(v[:, q] ** 2))),
                 "pearson_loo": pearson(v[:, q], loo), "spearman_loo": spearman(v[:, q], loo),
                 "pearson_pbrf": pearson(v[:, q], pb), "spearman_pbrf": spearman(v[:, q], pb)}
                for s, v in self.stages.items()]

    def to_dict(self) -> dict[str, Any]:
        return {"samples": self.samples.tolist(), "query_names": list(self.query_names),
                "stages": {k: v.tolist() for k, v in self.stages.items()}, "descriptions": dict(self.descriptions),
                "terms": {n: self.terms(n) for n in self.query_names},
                "correlations": {n: self.correlations(n) for n in self.query_names},
                "info": {k: v for k, v in self.info.items() if isinstance(v, (int, float, str, bool, list, dict))}}

    def table(self, query: int | str = 0) -> str:
        q = self._q(query)
        lines = [f"LOO -> PBRF -> influence-function gap, query {self.query_names[q]!r}, {len(self.samples)} samples, "
                 f"damping λ={self.info.get('damping')}"]
        lines.append(f"{'stage':<10} {'RMS':>10} {'r(LOO)':>7} {'ρ(LOO)':>7} {'r(PBRF)':>7} {'ρ(PBRF)':>7}  what")
        for row in self.correlations(q):
            lines.append(f"{row['stage']:<10} {row['rms']:>10.3e} {row['pearson_loo']:>7.3f} {row['spearman_loo']:>7.3f} "
                         f"{row['pearson_pbrf']:>7.3f} {row['spearman_pbrf']:>7.3f}  {self.descriptions[row['stage']]}")
        lines.append(f"{'term':<55} {'RMS':>10} {'/RMS(LOO)':>9} {'/RMS(gap)':>9}")
        for row in self.terms(q):
            lines.append(f"{row['term']:<55} {row['rms']:>10.3e} {row['rms_over_loo']:>9.3f} {row['rms_over_total_gap']:>9.3f}")
        return "\n".join(lines)


class _WarmRunner:
    """The logged optimizer, learning rates and batches of ``steps``, started at θ_T with its optimizer state,
    with a modified objective; every removal is a stacked copy of the parameters (copy 0 removes nothing).

    The coupled weight decay of SGD/Adam is taken out of the optimizer and put in the objective as
    ``½ Σ κ θ²`` (the same update), so the Bregman stage can use its divergence ``½ Σ κ (θ − θ_T)²``;
    AdamW keeps its decoupled weight decay in every stage.
    """

    def __init__(self, prob: _Problem, steps: Sequence[int]) -> None:
        self.prob = prob
        log = prob.log
        self.steps = list(steps)
        self.batches = []
        with torch.no_grad():
            for t in self.steps:
                ids = log.batch_ids(t)
                batch = batch_from_ids(prob.train_data, ids)
                inputs = prob.inputs_fn(batch)
                self.batches.append((ids, log.lr(t), batch, inputs, prob.outputs(prob.theta, inputs).detach()))
        try:
            self.decoupled = optimizer_class(log) is torch.optim.AdamW
        except Exception:  # noqa: BLE001 - build_optimizer raises the real error below
            self.decoupled = False
        self.opt_names = [n for g in _optimizer_spec(log)["param_groups"] for n in g["params"]]
        try:
            self.state = log.optimizer_state(prob.step) if prob.step in log.checkpoint_steps else None
        except Exception:  # noqa: BLE001 - no stored state: a fresh optimizer
            self.state = None

    def run(self, removed: Sequence[int | None], kind: str, prox: bool) -> np.ndarray:
        """``f`` of every copy ``(C, Q)`` after the steps; copy ``c`` removes sample ``removed[c]`` (None: nothing)."""
        prob = self.prob
        C = len(removed)
        theta = prob.as_dict(prob.theta)
        stacked = {n: theta[n].detach().unsqueeze(0).expand(C, *theta[n].shape).clone().requires_grad_(True)
                   for n in prob.names}
        opt = build_optimizer(prob.log, stacked)
        if self.state is not None:
            load_optimizer_state(opt, self.opt_names, self.state)
        if not self.decoupled:
            for g in opt.param_groups:
                g["weight_decay"] = 0.0
        rem = np.array([-1 if r is None else int(r) for r in removed])
        kappa = prob.kappa if not self.decoupled else torch.zeros_like(prob.kappa)
        for ids, lrs, batch, inputs, h_ref in self.batches:
            for g, lr in zip(opt.param_groups, lrs):
                g["lr"] = float(lr)
            opt.zero_grad(set_to_none=True)
            n = len(ids)
            gone = torch.as_tensor(ids[None, :] == rem[:, None], dtype=prob.dtype)  # (C, B)

            def per_copy(p: dict[str, Tensor], w: Tensor) -> Tensor:
                x = flatten(p, prob.names)
                losses = functional_loss(prob.module, prob.loss_fn, p, batch)
                if kind == "loss":
                    obj = ((1.0 - w) * losses).sum() / n + 0.5 * (kappa * x.pow(2)).sum()
                else:
                    h = call_with_params(prob.module, lambda m, a: m(a), p, inputs)
                    obj = (prob.divergence(h, h_ref).sum() - (w * losses).sum()) / n \
                        + 0.5 * (kappa * (x - prob.theta).pow(2)).sum()
                if prox:
                    obj = obj + 0.5 * prob.damping * (x - prob.theta).pow(2).sum()
                return obj

            torch.func.vmap(per_copy)(dict(stacked), gone).sum().backward()
            opt.step()
        with torch.no_grad():
            return np.stack([prob.f(flatten({n: v[c] for n, v in stacked.items()}, prob.names)).double().numpy()
                             for c in range(C)])


def gap_decomposition(log: InfluenceLog, module: nn.Module, train_data: TrainData, query: Query, samples: Sequence[int], *,
                      damping: float = 1e-3, output_loss: OutputLoss = "cross_entropy", warm_epochs: int | None = None,
                      steps: int = 100, tol: float = 1e-8, solver: str = "auto", loo: np.ndarray | None = None,
                      pbrf_result: PBRFResult | None = None,
                      weight_decay: float | Mapping[str, float] | None = None, loss_fn: LossFn = default_loss_fn,
                      inputs_fn: InputsFn | None = None, chunk_size: int | None = None, copies: int = 256,
                      max_dense_params: int = 6000, progress: Progress = None) -> GapDecomposition:
    """Split the gap between replay LOO and the PBRF / influence function into its terms.

    Computes, for every sample of ``samples``, the response of each intermediate objective
    (:data:`STAGES`); adjacent stages differ in one thing, so the terms telescope:

    - ``loo``: :func:`~lightning_influence.evaluation.ground_truth.replay_loo` (or ``loo``,
      ``(S, Q)`` precomputed in the order of ``samples``);
    - ``warm``: the logged optimizer, learning rates and batches of the last ``warm_epochs``
      epochs (default: the whole run, so only the starting point differs from LOO), started
      at ``θ_T`` with its optimizer state, minus the same run without the removal;
    - ``warm_prox``: the same plus ``(λ/2)‖θ − θ_T‖²``;
    - ``bregman``: the same with every loss replaced by its Bregman divergence around
      ``θ_T`` (and the removed sample's loss subtracted where it was in the batch): the
      PBRF objective run by the logged optimizer;
    - ``pbrf``: :func:`pbrf` solved to convergence (``solver``, ``steps``, ``tol``), or
      ``pbrf_result`` computed before for the same samples and damping;
    - ``linear``: :func:`linear_pbrf`.

    The warm-start stages train all samples together as stacked copies (``copies`` per pass).

    Returns:
        :class:`GapDecomposition` (``.table()``, ``.terms()``, ``.correlations()``).
    """
    from lightning_influence.evaluation.ground_truth import replay_loo

    show = resolve_progress(progress, "gap")
    t0 = time.perf_counter()
    prob = _Problem(log, module, train_data, query, output_loss=output_loss, damping=damping, weight_decay=weight_decay,
                    step=None, loss_fn=loss_fn, inputs_fn=inputs_fn, chunk_size=chunk_size, epsilon=None,
                    max_dense_params=max_dense_params)
    s = prob.check_samples(samples)
    S, Q = len(s), prob.f0.numel()
    stages: dict[str, np.ndarray] = {}
    times: dict[str, float] = {}
    tic = time.perf_counter()
    if loo is None:
        res = replay_loo(log, module, train_data, query, s, grid=[log.num_steps], loss_fn=loss_fn, copies=copies)
        stages["loo"] = res.at(log.num_steps)
    else:
        stages["loo"] = np.asarray(loo, dtype=np.float64).reshape(S, Q)
    times["loo"] = time.perf_counter() - tic
    epochs_all = sorted(set(int(e) for e in log.epochs_of_step))
    chosen = epochs_all if warm_epochs is None else epochs_all[-int(warm_epochs):]
    warm_steps = [int(t) for t, e in zip(log.steps, log.epochs_of_step) if int(e) in chosen]
    runner = _WarmRunner(prob, warm_steps)
    drift: dict[str, float] = {}
    per = max(1, copies - 1)
    done = 0
    for name, kind, prox in (("warm", "loss", False), ("warm_prox", "loss", True), ("bregman", "bregman", True)):
        tic = time.perf_counter()
        out = np.zeros((S, Q))
        for a in range(0, S, per):
            chunk = [int(m) for m in s[a:a + per]]
            vals = runner.run([None] + chunk, kind, prox)
            out[a:a + len(chunk)] = vals[1:] - vals[0]
            drift[name] = float(np.max(np.abs(vals[0] - prob.f0.double().numpy())))
            done += len(chunk)
            if show is not None:
                show(done, 3 * S + S)
        stages[name] = out
        times[name] = time.perf_counter() - tic
    tic = time.perf_counter()
    if pbrf_result is not None:
        if not np.array_equal(pbrf_result.samples, s) or pbrf_result.damping != prob.damping:
            raise ValueError("pbrf_result must hold the same samples (same order) and damping as this call")
        res_p = pbrf_result
    else:
        res_p = _pbrf(prob, s, steps=steps, solver=_resolve_solver(prob, solver), lr=None, tol=tol, record_at=(),
                      progress=(lambda k, _n: show(3 * S + k, 4 * S)) if show is not None else None)
    stages["pbrf"] = res_p.scores
    times["pbrf"] = time.perf_counter() - tic
    tic = time.perf_counter()
    res_l = _linear(prob, s)
    stages["linear"] = res_l.scores
    times["linear"] = time.perf_counter() - tic
    span = (f"all {len(chosen)} epochs, {len(warm_steps)} steps" if warm_epochs is None
            else f"last {len(chosen)} epoch(s), {len(warm_steps)} steps")
    desc = {k: v.format(K=span) for k, v in _STAGE_TEXT.items()}
    info = {"damping": prob.damping, "epsilon": prob.epsilon, "warm_epochs": len(chosen), "warm_steps": len(warm_steps),
            "steps": steps, "tol": tol, "N": prob.N, "p": prob.p, "output_loss": prob.output_loss,
            "weight_decay_note": prob.weight_decay_note, "baseline_drift": drift, "pbrf": res_p.summary(),
            "linear": res_l.summary(), "seconds": times, "total_seconds": time.perf_counter() - t0}
    return GapDecomposition(samples=s, stages={k: stages[k] for k in STAGES}, query_names=prob.query_names,
                            descriptions=desc, info=info)
