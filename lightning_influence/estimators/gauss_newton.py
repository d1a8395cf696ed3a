"""Gauss-Newton DIT: the DIT adjoint sweep with ``H_t ≈ Σ_i w_{i,t} g_{i,t} g_{i,t}ᵀ``, from the log alone
(docs/influence-math.md §3).

The sweep runs backwards over the logged steps in the space of the logged (possibly projected) gradient rows ``G_t``
``(B, K)``, with the adjoint ``U`` ``(K, C)`` of the ``C`` query columns and the optimizer's adjoint state::

    (θ̄, S, R) = VJP_u(U, S)            # the optimizer step (SGD: momentum, dampening, Nesterov, weight decay)
    R         = J_{C,t}ᵀ R              # the step's clipping, if it bound
    F_j      += −w_{j,t} ⟨g_{j,t}, R⟩    # j ∈ B_t
    U         = θ̄ + G_tᵀ W_t G_t R

Split over processes (``shard``, :func:`lightning_influence.distributed.by_batch`): the step's rows are the only
part of the recursion that grows with the log, and they enter it as sums over the rows (``G_tᵀ W_t G_t R``; the
clipped step's ``Σ_i w_i g_i``) and as per-row terms (``F_j``). Each process reads only its part of every step's rows
(:class:`~lightning_influence.log.shares.RowShares`), adds its part of the sums to the others' with one all-reduce of
``K·C`` float64 per step (a second of ``K`` for a step whose clipping is recorded), and keeps its samples' terms;
the ``(N, C)`` scores are summed once at the end. Every process then holds the same ``U`` at every step: the result
is the single-process one up to the order of float64 additions. The step's CRC-32s are checked on the parts' XOR,
carried in the same all-reduce (:mod:`lightning_influence.log.shares`). docs/scaling.md has the costs.
"""

from __future__ import annotations

import bisect
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from torch import nn

from lightning_influence.datacheck import check_estimator_data
from lightning_influence.estimators.growth import AdjointGrowth
from lightning_influence.estimators.scores import InfluenceScores
from lightning_influence.estimators.signature import estimator_api
from lightning_influence.log.reader import InfluenceLog
from lightning_influence.log.shares import RowShares
from lightning_influence.queries import Query
from lightning_influence.replay import Progress, UnsupportedOptimizerError, _optimizer_spec, optimizer_class, resolve_progress
from lightning_influence.step.clipping import logged_clip_spec, step_clip_adjoint
from lightning_influence.step.optimizers import RULES, OptimizerStep
from lightning_influence.step.shard import BatchShard, Share

__all__ = ["dit_gauss_newton", "query_gradients_for"]

_GN_ADVICE = "Use dit (the exact Hessian), a shorter window or local=True"


def query_gradients_for(log: InfluenceLog, module: nn.Module, query: Query, window: Any = None
                        ) -> tuple[dict[int, np.ndarray], list[str]]:
    """The projected query gradients ``{checkpoint_step: (Q, K)}`` that :func:`dit_gauss_newton` uses for ``window``
    (the last checkpoint at or before each window end), and the query's output names."""
    from lightning_influence.estimators.tracin import checkpoint_query_gradients

    t1, t2 = log.window(window)
    ckpts = log.checkpoint_steps
    needed = sorted({[c for c in ckpts if c <= t][-1] for t in (t1, t2) if any(c <= t for c in ckpts)})
    return checkpoint_query_gradients(log, module, query, needed)


def _chunks(log: InfluenceLog, t_lo: int, t2: int, chunk_steps: int, shares: RowShares | None
            ) -> Iterator[tuple[int, int, dict[int, Any]]]:
    """``(lo, hi, rows by step)`` for the chunks of ``chunk_steps`` steps of ``[t_lo, t2)``, last chunk first: all the
    rows of the steps with gradient rows (``iter_steps``), or this process's part with its CRC-32 bits (``shares``;
    a thread reads the next chunk while the caller sweeps this one: ``preadv`` and the CRC-32 release the GIL)."""
    bounds = [(max(t_lo, hi - chunk_steps), hi) for hi in range(t2, t_lo, -chunk_steps)]
    if shares is None:
        for lo, hi in bounds:
            yield lo, hi, {r.step: r for r in log.iter_steps(lo, hi, fields=("grad",))}
        return

    def read(lo: int, hi: int) -> dict[int, Any]:
        return {t: shares.read(t) for t in range(lo, hi) if log.has_grads(t)}

    with ThreadPoolExecutor(1, thread_name_prefix="gn-rows") as pool:
        ahead = pool.submit(read, *bounds[0]) if bounds else None
        for i, (lo, hi) in enumerate(bounds):
            rows = ahead.result()  # type: ignore[union-attr]
            ahead = pool.submit(read, *bounds[i + 1]) if i + 1 < len(bounds) else None
            yield lo, hi, rows


@estimator_api
def dit_gauss_newton(log: InfluenceLog, query: Query | Mapping[int, np.ndarray], *, module: nn.Module | None = None,
                     window: Any = None, local: bool = False, query_names_: list[str] | None = None,
                     chunk_steps: int = 64, progress: Progress = None, shard: BatchShard | None = None
                     ) -> InfluenceScores:
    """DIT with the Gauss-Newton Hessian, from the log alone (approximation, docs/influence-math.md §3).

    ``H_t`` is replaced by ``Σ_{i∈B_t} w_{i,t} g_{i,t} g_{i,t}ᵀ`` (``w_{i,t}`` the step's sample weights,
    ``1/|B_t|`` for a plain mean) built from the logged
    (possibly projected) per-sample gradients, plus the optimizer's L2 term; the sweep runs
    in the logged gradient space, without the model or the data. Optimizers: SGD (momentum,
    dampening, Nesterov, coupled weight decay: the same functional step as :func:`dit`,
    applied per logged column, exact given the Gauss-Newton Hessian); adaptive optimizers
    (Adam, AdamW, RMSprop, Adagrad) are refused: their per-coordinate preconditioner does
    not survive the projection. With gradients recorded every ``n`` steps, each recorded
    step stands for ``n`` steps.

    Args:
        log: the influence log (must hold gradients).
        query: a query callable (needs ``module``; its gradients are taken at the checkpoints
            and projected like the logged rows) or precomputed ``{checkpoint_step: (Q, K)}``.
        module: the architecture, only to take query gradients.
        window: as :func:`dit`.
        local: sweep only inside the window (like :func:`dit_local`).
        query_names_: names for precomputed query gradients.
        chunk_steps: steps read from the log at a time (memory: ``chunk_steps·|B|·K`` values; split over processes,
            two chunks of this process's rows: the next one is read while the sweep runs over this one).
        progress: ``progress(done, total)`` or ``True``.
        shard: read and use only this process's part of every step's rows, summing the step's sums over the
            processes (module doc; set by :func:`lightning_influence.distributed.by_batch`, which every process
            calls alike).
    """
    t1, t2 = log.window(window)
    rule = RULES[optimizer_class(log).__name__]
    if rule.adaptive:
        raise UnsupportedOptimizerError(
            f"{log.path}: dit_gauss_newton supports SGD only; {rule.name}'s per-coordinate preconditioner cannot be applied "
            "to projected gradients. Use dit(...) with the model (frozen-preconditioner approximation).")
    if not log.recorded.get("gradients"):
        raise ValueError(f"{log.path}: dit_gauss_newton needs per-sample gradients in the log (record_gradients=True)")
    if callable(query):
        if module is None:
            raise ValueError("dit_gauss_newton needs `module` to take query gradients, or precomputed query gradients")
        check_estimator_data(log, module, query, training=False)  # data the model cannot take: now, not later
        qgrads, names = query_gradients_for(log, module, query, window)
    else:
        qgrads, names = {int(k): np.asarray(v) for k, v in query.items()}, list(query_names_ or [])
    qsteps = sorted(qgrads)

    def q_at(t: int) -> np.ndarray:
        i = bisect.bisect_right(qsteps, t) - 1
        if i < 0:
            raise ValueError(f"no query gradient at or before step {t} (have {qsteps})")
        return qgrads[qsteps[i]].astype(np.float64)

    share: Share = shard if shard is not None else Share()
    every = int(log.meta.get("every_n_steps", 1))
    col_groups = log.column_groups()
    K = len(col_groups)
    step = OptimizerStep(rule, _optimizer_spec(log)["param_groups"], col_groups, torch.float64)
    t_lo = t1 if local else log.first_step
    acts = [t2] if local else sorted({t for t in (t1, t2) if t > t_lo})
    q2 = q_at(t2)
    Q = q2.shape[0]
    names = names or [f"q{i}" for i in range(Q)]
    if q2.shape[1] != K:
        raise ValueError(f"query gradients have {q2.shape[1]} columns, the log's gradients {K}")
    N = log.dataset_size
    scores = np.zeros((N, Q * len(acts)))
    U = torch.from_numpy(q2.T.copy())
    S = {k: torch.zeros_like(U) for k in step.adjoint_keys}
    zeros = torch.zeros(K, dtype=torch.float64)  # SGD's VJP does not depend on g or the buffer's value
    blocks = {t2: 0}
    show = resolve_progress(progress, "dit-gauss-newton")
    done = rows = 0
    shares = RowShares(log, share.rank, share.world) if share.world > 1 else None
    chunks = _chunks(log, t_lo, t2, chunk_steps, shares)
    growth = AdjointGrowth("dit_gauss_newton", _GN_ADVICE, t2, log.path)
    growth.added(U)
    try:
        for lo, hi, by_step in chunks:
            for t in range(hi - 1, lo - 1, -1):
                rec = by_step.get(t)
                if rec is not None and (rec.count if shares is not None else len(rec.ids)):
                    U, S = _step_back(log, step, rec, U, S, zeros, every, share, shares, scores)
                    rows += len(rec.ids)
                    growth.check(U, t)
                if t in acts and t not in blocks:
                    blocks[t] = U.shape[1]
                    qt = torch.from_numpy(q_at(t).T.copy())
                    U, S = OptimizerStep.add_columns(U, S, qt)
                    growth.added(qt)
                done += 1
                if show is not None:
                    show(done, t2 - t_lo)
    finally:
        chunks.close()  # the read-ahead thread first
        if shares is not None:
            shares.close()
    scores = share.sum(scores)
    F2 = scores[:, blocks[t2] : blocks[t2] + Q]
    out = F2 - scores[:, blocks[t1] : blocks[t1] + Q] if t1 > t_lo else F2
    tag = "dit-local-gauss-newton (approx.)" if local else "dit-gauss-newton (approx.)"
    if every > 1:
        tag = tag[:-1] + f", every {every} steps)"
    info: dict[str, Any] = {"query_checkpoints": qsteps, "columns": K, "every_n_steps": every, "rows_evaluated": rows}
    tag = growth.report(tag, info)
    if shares is not None:
        info.update(split="batch", bytes_read=shares.bytes_read)
    return InfluenceScores(out, tag, (t1, t2), names, info=info)


def _step_back(log: InfluenceLog, step: OptimizerStep, rec: Any, U: torch.Tensor, S: dict[str, torch.Tensor],
               zeros: torch.Tensor, every: int, share: Share, shares: RowShares | None, scores: np.ndarray
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The adjoint ``(U, S)`` carried back over step ``rec.step`` (module doc), this process's rows' terms added to
    ``scores``; with ``shares``, the rows' sums (and the CRC-32 bits) are summed over the processes."""
    t, K = rec.step, len(zeros)
    G = torch.from_numpy(rec.grads.astype(np.float64, copy=False))  # (B, K): all rows, or this process's
    w = torch.from_numpy(rec.weights)  # w_{i,t} (step.weights)
    bits = torch.from_numpy(rec.bits) if shares is not None else torch.zeros(0, dtype=torch.float64)
    state = {"step": torch.full((K,), float(t > 0), dtype=torch.float64), **{k: zeros for k in step.state_keys}}
    th_bar, S, R = step.vjp(zeros, state, zeros, np.asarray(rec.lrs) * every, U, S, values=log.hyper(t))
    if logged_clip_spec(log, t) is not None:
        applied = w @ G  # Σ_i w_i g_i: this process's part of the step's unclipped gradient
        if shares is not None:
            got = share.all_reduce(torch.cat([applied, bits]))
            applied, bits = got[:K], got[K:]
            shares.verify(t, bits.numpy())
            bits = bits[:0]  # checked: not sent again
        # the step's applied gradient as one row of weight 1 (the sum of the processes' parts)
        R = step_clip_adjoint(log, t, np.ones(1), applied.numpy()[None, :])(R)
    GR = G @ R  # (B, C)
    HR = G.T @ (w.unsqueeze(1) * GR)
    if shares is not None:
        got = share.all_reduce(torch.cat([HR.reshape(-1), bits]))
        HR = got[: HR.numel()].reshape(HR.shape)
        if len(bits):
            shares.verify(t, got[HR.numel():].numpy())
    C = U.shape[1]
    np.add.at(scores[:, :C], rec.ids, (-w.unsqueeze(1) * GR).numpy())
    return th_bar + HR, S
