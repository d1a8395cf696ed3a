"""The PBRF solved per sample from ``θ_T``: Gauss-Newton-preconditioned L-BFGS on stacked copies, or one
sample at a time by L-BFGS, Adam or SGD (:func:`pbrf`, docs/influence-math.md §6).

Pure torch: no Lightning imports.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from lightning_influence.estimators.signature import positional_limit
from lightning_influence.evaluation.pbrf.problem import InputsFn, OutputLoss, Problem
from lightning_influence.evaluation.pbrf.result import PBRFResult
from lightning_influence.log.reader import InfluenceLog
from lightning_influence.queries import LossFn, Query, default_loss_fn
from lightning_influence.replay import Progress, TrainData, resolve_progress

__all__ = ["SOLVERS", "pbrf", "resolve_solver", "solve_samples"]


SOLVERS = ("auto", "gauss-newton", "lbfgs", "adam", "sgd")
NEGATIVE_COS = 0.1  # cos(s, y) below -0.1 on an accepted step: negative curvature along it, not rounding
RESPONSE_RTOL = 1e-4  # a response whose predicted remaining change is below this fraction of it has converged


def _solve_one(prob: Problem, m: int, *, epsilon: float, steps: int, solver: str, lr: float | None, tol: float,
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


def _solve_batched_gn(prob: Problem, samples: np.ndarray, *, epsilon: float, steps: int, tol: float,
                      marks: Sequence[int]) -> tuple[np.ndarray, dict[int, np.ndarray], np.ndarray, np.ndarray,
                                                     np.ndarray, np.ndarray]:
    """The Gauss-Newton-preconditioned solve of every sample's PBRF at once (stacked copies, ``vmap``).

    Each copy ``c`` minimises its own objective by L-BFGS whose initial inverse Hessian is
    ``P_c⁻¹``, ``P_c = G + μ + ε J_cᵀ H_c J_c`` (the objective's Gauss-Newton matrix at θ_T,
    Woodbury on one Cholesky factor: Newton's step at the start, exact for a quadratic), with
    Armijo backtracking per copy. Converged copies stop moving; a copy whose direction gives
    no descent after 16 halvings stops too (it stays unconverged in the report).

    Also returns, per copy, the response's remaining error as one Gauss-Newton step predicts it,
    ``max_q |∇f_qᵀ P_c⁻¹ ∇J_c|`` (what the answer would still move; at the dtype's rounding floor, the error that
    floor leaves), and whether an accepted step met negative curvature (``cos(s, y) < −0.1``: the objective is not convex
    along it, as when the removal term's curvature ``−∇²ℓ_m/N`` exceeds the damping).
    """
    S, p = len(samples), prob.p
    tree_map = torch.utils._pytree.tree_map
    batch = prob.batch(samples)
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
    negative = torch.zeros(S, dtype=torch.bool)
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
        # the curvature along the step is negative, beyond what rounding in y can fake (y of noise is near-orthogonal)
        cos = sy / (s_new.norm(dim=1) * y_new.norm(dim=1)).clamp_min(torch.finfo(prob.dtype).tiny)
        negative[idx[cos < -NEGATIVE_COS]] = True
        Sm[head, idx], Ym[head, idx] = s_new, y_new
        Rho[head, idx] = torch.where(sy > 1e-300, 1.0 / sy.clamp_min(1e-300), torch.zeros_like(sy))
        head = (head + 1) % hist
        if t in marks:
            recorded[t] = responses(X)
    final = responses(X)
    for mark in marks:
        recorded.setdefault(mark, final)
    rel = torch.where(g0 > 0, Gr.abs().amax(1) / g0.clamp_min(1e-300), torch.zeros_like(g0))
    qgrad = torch.func.jacrev(lambda z: prob.f(z))(prob.theta).reshape(-1, p)  # (Q, p) ∇f at θ_T
    error = (precondition(Gr) @ qgrad.T).abs().amax(1) if qgrad.shape[0] else torch.zeros(S, dtype=prob.dtype)
    return final, recorded, iters.numpy(), rel.double().numpy(), error.double().numpy(), negative.numpy()


def resolve_solver(prob: Problem, solver: str) -> str:
    """``solver`` checked against the model size; ``"auto"``: Gauss-Newton up to ``max_dense_params``, else L-BFGS."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if solver == "auto":
        return "gauss-newton" if prob.p <= prob.max_dense_params else "lbfgs"
    if solver == "gauss-newton" and prob.p > prob.max_dense_params:
        raise ValueError(f"solver='gauss-newton' forms the dense {prob.p}x{prob.p} Gauss-Newton matrix; the module has "
                         f"more than max_dense_params={prob.max_dense_params} parameters: use solver='lbfgs' or raise "
                         "max_dense_params")
    return solver


@positional_limit(4, "the log, the model, the training data and the query",
                  "pbrf(log, module, train_data, query, *, samples=..., damping=..., ...)")
def pbrf(log: InfluenceLog, module: nn.Module, train_data: TrainData, query: Query, *, samples: Sequence[int],
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
        tol: convergence when ``‖∇J‖_∞ <= tol · ‖∇J(θ_T)‖_∞`` (``∇J(θ_T) = ε ∇ℓ_m``), or (Gauss-Newton solver)
            when one more Gauss-Newton step would move the response by at most ``RESPONSE_RTOL`` (1e-4) of it: the
            gradient's rounding floor (about 1e-5 of its start in float32) stops the first, not the second.
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
    prob = Problem(log, module, train_data, query, output_loss=output_loss, damping=damping, weight_decay=weight_decay,
                    step=step, loss_fn=loss_fn, inputs_fn=inputs_fn, chunk_size=chunk_size, epsilon=epsilon,
                    max_dense_params=max_dense_params)
    return solve_samples(prob, prob.check_samples(samples), steps=steps, solver=resolve_solver(prob, solver), lr=lr,
                         tol=tol, record_at=record_at, progress=resolve_progress(progress, "pbrf"), copies=copies)


def solve_samples(prob: Problem, samples: np.ndarray, *, steps: int, solver: str, lr: float | None, tol: float,
                  record_at: Sequence[int], progress: Callable[[int, int], None] | None, copies: int = 128) -> PBRFResult:
    """The PBRF of ``samples`` for a built :class:`Problem` and a resolved ``solver`` (:func:`pbrf`,
    :func:`gap_decomposition`): stacked Gauss-Newton copies when the batches allow, else one sample at a time."""
    t0 = time.perf_counter()
    S, Q = len(samples), prob.f0.numel()
    scores = np.zeros((S, Q))
    marks = sorted({int(s) for s in record_at if 0 < int(s) < steps} | ({steps // 2} if steps >= 4 else set()))
    inter = {s: np.zeros((S, Q)) for s in marks}
    iters, rel, change = np.zeros(S, np.int64), np.zeros(S), np.zeros(S)
    error, negative = np.full(S, np.nan), np.zeros(S, bool)  # measured by the stacked Gauss-Newton solver
    if solver == "gauss-newton" and S and _tensor_tree(prob.sample_batch(int(samples[0]))):
        for a in range(0, S, copies):
            sl = slice(a, a + copies)
            sc, rec, it, r, err, neg = _solve_batched_gn(prob, samples[sl], epsilon=prob.epsilon, steps=steps,
                                                         tol=tol, marks=marks)
            scores[sl], iters[sl], rel[sl], error[sl], negative[sl] = sc, it, r, err, neg
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
    # the objective's Hessian at θ_T, exactly (dense): the solver's witness sees few of the directions it curves down
    checked = prob.p <= prob.max_dense_params
    if checked:
        negative |= np.array([prob.indefinite(int(m), prob.epsilon) for m in samples], dtype=bool)
    keep = {s: v for s, v in inter.items() if s in {int(r) for r in record_at}}
    size = np.abs(scores).max(axis=1) if Q else np.zeros(S)
    # converged: the gradient reached tol, or the response's predicted remaining change is below RESPONSE_RTOL of it
    # (in float32 the gradient's rounding floor is ~1e-5 of its start: tol=1e-8 is out of reach, the answer is not)
    converged = (rel <= tol) | (error <= RESPONSE_RTOL * size)
    return PBRFResult(samples=samples, scores=scores, query_names=prob.query_names, method="pbrf",
                      damping=prob.damping, epsilon=prob.epsilon, converged=converged, iterations=iters,
                      rel_grad_norm=rel, response_change=change, intermediate=keep, response_error=error,
                      negative_curvature=negative,
                      info={"solver": solver, "steps": steps, "tol": tol, "output_loss": prob.output_loss, "N": prob.N,
                            "p": prob.p, "max_dense_params": prob.max_dense_params, "step": prob.step, "response_rtol": RESPONSE_RTOL, "dtype": str(prob.dtype), "weight_decay_note": prob.weight_decay_note,
                            "weight_decay_max": float(prob.kappa.max()), "seconds": time.perf_counter() - t0,
                            "response_change_from_step": marks[-1] if marks else steps,
                            "curvature_checked_at_theta": checked})
