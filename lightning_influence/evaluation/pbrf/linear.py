"""The linearised PBRF (influence-function form) ``−ε qᵀ(G + (λ+κ)I)⁻¹∇ℓ_m``: a dense Cholesky solve or
conjugate gradients with Gauss-Newton-vector products (:func:`linear_pbrf`, docs/influence-math.md §6).

Pure torch: no Lightning imports.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from lightning_influence.estimators.signature import positional_limit
from lightning_influence.evaluation.pbrf.problem import InputsFn, OutputLoss, Problem
from lightning_influence.evaluation.pbrf.result import PBRFResult
from lightning_influence.log.reader import InfluenceLog
from lightning_influence.queries import LossFn, Query, default_loss_fn
from lightning_influence.replay import TrainData
from lightning_influence.step.micro import exact_kernels

__all__ = ["linear_pbrf", "linear_responses"]


class _GaussNewton:
    """``v ↦ (G + μ) v`` at θ_T, ``G = (1/N) Σ_i J_iᵀ ∇²_h D_i J_i`` (Gauss-Newton of the loss in output space).

    ``J v`` is forward-mode AD through the module: attention through its math kernel (``exact_kernels``, as every
    forward-mode pass; the fused kernels have none), and the ``vjp`` taken under the same kernel so ``Jᵀ`` is the
    transpose of that ``J``."""

    def __init__(self, prob: Problem) -> None:
        self.prob = prob
        self.parts = []
        for _, inputs, h_ref in prob.chunks:
            def out_fn(x: Tensor, inputs: Tensor = inputs) -> Tensor:
                return prob.outputs(x, inputs)

            def jvp_fn(v: Tensor, out_fn: Callable[[Tensor], Tensor] = out_fn) -> Tensor:
                return torch.func.jvp(out_fn, (prob.theta,), (v,))[1]

            with exact_kernels():
                _, vjp_fn = torch.func.vjp(out_fn, prob.theta)

            def grad_h(h: Tensor, h_ref: Tensor = h_ref) -> Tensor:
                return torch.func.grad(lambda a: prob.divergence(a, h_ref).sum())(h)

            self.parts.append((jvp_fn, vjp_fn, grad_h, h_ref))

    def __call__(self, v: Tensor) -> Tensor:
        out = self.prob.mu * v
        for jvp_fn, vjp_fn, grad_h, h_ref in self.parts:
            with exact_kernels():
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


@positional_limit(4, "the log, the model, the training data and the query",
                  "linear_pbrf(log, module, train_data, query, *, samples=..., damping=..., ...)")
def linear_pbrf(log: InfluenceLog, module: nn.Module, train_data: TrainData, query: Query,
                *, samples: Sequence[int] | None = None, damping: float = 1e-3,
                output_loss: OutputLoss = "cross_entropy",
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
    prob = Problem(log, module, train_data, query, output_loss=output_loss, damping=damping, weight_decay=weight_decay,
                    step=step, loss_fn=loss_fn, inputs_fn=inputs_fn, chunk_size=chunk_size, epsilon=epsilon,
                    max_dense_params=max_dense_params)
    s = prob.ids if samples is None else prob.check_samples(samples)
    return linear_responses(prob, s, linear_solver=linear_solver, cg_tol=cg_tol, cg_maxiter=cg_maxiter)


def linear_responses(prob: Problem, samples: np.ndarray, *, linear_solver: str = "auto", cg_tol: float = 1e-10,
                     cg_maxiter: int = 2000) -> PBRFResult:
    """The linearised PBRF of ``samples`` for a built :class:`Problem` (:func:`linear_pbrf`, :func:`gap_decomposition`)."""
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
    # ⟨u, ∇ℓ_m⟩ for all samples of a batch: a jvp of the per-sample losses along u (forward-mode AD: attention
    # through its math kernel, as every forward-mode pass)
    scores = np.zeros((len(samples), U.shape[0]))
    for a in range(0, len(samples), 512):
        batch = prob.batch(samples[a:a + 512])
        for qi in range(U.shape[0]):
            with exact_kernels():
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
