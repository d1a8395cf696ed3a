"""Diff-In self-influence in the step form (:func:`lightning_influence.estimators.diffin.diffin_self_influence`).

The query of sample ``z`` is its own loss ``ℓ(z; θ_τ)``, so the closure of docs/diffin.md runs along each sample's
own gradient: its curvature ``κ_{z,s}`` is measured at the sample's own steps ``s`` (one HVP per sample of the
batch) and held between them, and::

    G_z(τ) = Σ_{s<τ, z∈B_s} w_{z,s} η_s ⟨g_z(θ_τ), g_{z,s}⟩ · Π_{r=s+1}^{τ−1} (1 − κ_{z,r} η_r)

Split over processes (:class:`~lightning_influence.estimators.sharding.StepShard`, docs/scaling.md): each process
measures ``κ`` at its own contiguous range of steps (replayed from the checkpoint before it) and the curvatures
(``|B|·G`` numbers per step) are gathered; the gradients ``g_z(θ_τ)`` of all samples are split by sample and summed;
each process then reads only its steps' logged rows, with the product over its own steps, and scales its partial
sum by the product over the later processes' steps (gathered: one ``N``-vector per process). No Lightning imports.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from lightning_influence.capture.projection import KroneckerProjector
from lightning_influence.estimators.diffin_context import _check_fd, _Context, _curvature, batch_hvp
from lightning_influence.estimators.sharding import ONE_PROCESS, StepShard

__all__ = ["step_self_influence"]


def step_self_influence(ctx: _Context, t1: int, t2: int, progress: Callable[[int, int], None] | None,
                        shard: StepShard = ONE_PROCESS) -> tuple[np.ndarray, dict[str, Any]]:
    """``G_z(t2) − G_z(t1)`` for every sample ``(N, 1)``: this process's part of the sum (``shard``)."""
    log, N, G, t0 = ctx.log, ctx.N, ctx.n_groups, ctx.first  # G_z sums from the log's first step
    a, b = shard.steps(log, t0, t2)
    mine, n_hvp = _curvatures(ctx, a, b, b if b < t2 else None, progress)
    taus = [(tau, sign) for tau, sign in ((t2, 1.0), (t1, -1.0)) if tau > t0]
    prev_of, held = _held(shard.gather(mine), N, G, a, b, {min(b, tau) for tau, _ in taus})
    out = np.zeros(N)
    for tau, sign in taus:
        qz = shard.sum(_own_gradients(ctx, tau, shard))  # g_z(θ_τ) of every sample, each computed by one process
        hi = min(b, tau)
        part, R = np.zeros(N), np.ones(N)  # R: Π of (1 − κη) over this process's steps after s
        kcur = held[hi].copy() if hi > a else None
        for s in range(hi - 1, a - 1, -1):
            for rec in log.iter_steps(s, s + 1, fields=("grad",)):
                rows = rec.grads.astype(np.float64)
                eta_q = ctx.clipped(rec, rows, (qz[rec.ids] * (rec.lrs[ctx.col_group] * ctx.every)).T)  # (K, B)
                part[rec.ids] += sign * R[rec.ids] * rec.weights * (rows * eta_q.T).sum(1)
            R *= 1.0 - kcur @ log.lr(s)[:G]
            ids, prev = prev_of[s]
            kcur[ids] = prev
        factors = shard.gather(R)  # the later processes' products carry the sum over the steps after this process's
        later = np.prod(factors[shard.rank + 1:], axis=0) if shard.rank + 1 < len(factors) else 1.0
        out += later * part
    return out[:, None], {"form": "step", "hvp_products": n_hvp, "shard_steps": [a, b],
                          "closure": "own gradient, curvature held between the sample's steps"}


def _curvatures(ctx: _Context, a: int, b: int, through: int | None, progress: Callable[[int, int], None] | None
                ) -> tuple[list[tuple[int, np.ndarray, np.ndarray]], int]:
    """``(s, ids, κ (B, G))`` at every step ``s`` of ``[a, b)`` along each sample's own full gradient, and the number
    of Hessian-vector products taken (the replay continued to ``through``, to check the checkpoints up to there)."""
    full = KroneckerProjector(ctx.shapes, None)
    out, n_hvp = [], 0
    for s, params in ctx.params_at(range(a, b), through):
        batch = ctx.step_batch(s)
        gz = ctx.per_sample_grads(params, batch, projector=full)
        V = {n: gz[:, sl].reshape(len(batch.ids), *ctx.shapes[n]) for n, sl in full.slices.items()}
        kap = _curvature(ctx, s, V, batch_hvp(ctx, params, batch, V, ctx.step_weights(s)), ctx.clip_factor(s))
        _check_fd(ctx, kap, ctx.log.lr(s))
        n_hvp += len(batch.ids)
        out.append((s, batch.ids, kap))
        if progress is not None:
            progress(s + 1 - a, b - a)
    return out, n_hvp


def _held(parts: list[list[tuple[int, np.ndarray, np.ndarray]]], N: int, G: int, a: int, b: int, at: set[int]
          ) -> tuple[dict[int, tuple[np.ndarray, np.ndarray]], dict[int, np.ndarray]]:
    """From every process's curvatures (in step order): for each step of ``[a, b)`` its ids and their ``κ`` of the
    previous appearance, and for each step of ``at`` every sample's ``κ`` of its last appearance before it."""
    last = np.zeros((N, G))
    prev_of: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    held: dict[int, np.ndarray] = {}
    for s, ids, kap in (x for part in parts for x in part):
        if s in at:
            held[s] = last.copy()
        if a <= s < b:
            prev_of[s] = (ids, last[ids].copy())
        last[ids] = kap
    held.update({s: last for s in at if s not in held})  # the end of the steps (τ = t2)
    return prev_of, held


def _own_gradients(ctx: _Context, tau: int, shard: StepShard) -> np.ndarray:
    """``(N, K)``: the projected ``g_z(θ_τ)`` of this process's chunks of samples (the same chunks as in one process),
    zero elsewhere."""
    qz = np.zeros((ctx.N, ctx.projector.out_dim))
    chunks = list(range(0, ctx.N, ctx.chunk_size))
    lo, hi = shard.part(len(chunks))
    if lo < hi:
        (_, params), = list(ctx.params_at([tau]))
        for c0 in chunks[lo:hi]:
            ids = np.arange(c0, min(ctx.N, c0 + ctx.chunk_size))
            qz[ids] = ctx.per_sample_grads(params, ctx.batch(ids)).double().cpu().numpy()
    return qz
