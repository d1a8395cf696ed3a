"""Diff-In (docs/influence-math.md §4): influence as a cumulative sum of per-step differences.

Two forms, both reading the tracker's log (ids, learning rates, per-sample gradients, the
finite-difference products ``H_{z,t} Ĝ_t``) and taking the Hessian-vector products they need
by central differences of first-order gradients in float64 (``hvp="fd"``, :mod:`.fd`, as DIT) or exactly by
forward-over-reverse (``hvp="exact"``, to measure what the finite differences cost).
The derivation, its assumptions and the measurements are in ``docs/diffin.md``.

``form="published"``: the authors' checkpoint form, as written (docs/influence-math.md §4)::

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
Modules: the run's context and the Hessian-vector products are in :mod:`.diffin_context`, the step-form
self-influence in :mod:`.diffin_self`; self-influence splits over processes by steps (:mod:`.sharding`,
docs/scaling.md). No Lightning imports.
"""
from __future__ import annotations

import time
import warnings
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from lightning_influence.capture.projection import KroneckerProjector
from lightning_influence.estimators.diffin_context import (FD_EDGE, HVP_MODES, Vectors, _check_fd, _Context, _curvature,
                                                           batch_hvp)
from lightning_influence.estimators.diffin_self import step_self_influence
from lightning_influence.estimators.scores import InfluenceScores
from lightning_influence.estimators.sharding import ONE_PROCESS, StepShard
from lightning_influence.datacheck import check_estimator_data
from lightning_influence.estimators.signature import estimator_api
from lightning_influence.log.reader import InfluenceLog
from lightning_influence.queries import LossFn, Query, default_loss_fn
from lightning_influence.replay import Progress, TrainData, replay, resolve_progress, samples_by_id_needed
from lightning_influence.replay_drift import report_outside_changes

__all__ = ["FORMS", "HVP_MODES", "SAMPLES", "diffin", "diffin_self_influence", "published_coefficients", "batch_hvp"]

FORMS = ("step", "published")
SAMPLES = ("all", "batch")


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
               progress: Callable[[int, int], None] | None, shard: StepShard = ONE_PROCESS
               ) -> tuple[np.ndarray, list[str], dict[str, Any]]:
    """``I(z, V)`` (or ``I(z, z)`` with ``query=None``) of the published form, unnegated: ``(N, Q)``; this process's
    part of the sum over the selected steps (``shard``: one contiguous block of them each)."""
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
    lo, hi = shard.part(m)
    own = selected[lo:hi]
    scores: np.ndarray | None = None
    names: list[str] = []
    n_hvp = 0
    col_group = ctx.col_group
    fields = ("grad", "hvp") if ctx.hvp == "fd" else ("grad",)
    log_rows = log.iter_steps(own[0], own[-1] + 1, fields=fields) if samples == "batch" and own else None
    full = KroneckerProjector(ctx.shapes, None)  # self-influence: unprojected g_z, the HVP directions
    for done, (t, params) in enumerate(ctx.params_at(own, selected[hi] if hi < m else None), start=1):
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
                _check_fd(ctx, _curvature(ctx, t, V, HBgv), log.lr(t))
                HBg = ctx.project(HBgv)
                n_hvp += len(ids)
                np.add.at(scores[:, 0], ids, np.ravel(weight) * ((G * a_col) * (HBg + Hz)).sum(1))
        if progress is not None:
            progress(done, len(own))
    if scores is None:
        if not m:
            raise ValueError(f"no step of the window [{t1}, {t2}) has logged gradients")
        scores = np.zeros((N, 1))  # a process with no selected step of its own (self-influence: one column)
    info = {"form": "published", "samples": samples, "steps": selected, "m": m, "hvp_products": n_hvp, "raw_sign": -1,
            "shard_steps": [own[0], own[-1] + 1] if own else []}
    if ctx.hvp == "fd" and samples == "batch":
        info["logged_hvp_eps0"] = log.meta.get("hvp", {}).get("eps0")
    return scores, names, info


# ================================================================================= step form
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
        kap = _curvature(ctx, r, V, batch_hvp(ctx, params, ctx.step_batch(r), V, ctx.step_weights(r)),
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

# ================================================================================ public API
def _combine(ctx: _Context, info: dict[str, Any], shard: StepShard, steps: list[int]) -> None:
    """The counts of every process (products, finite-difference checks and noise, fallbacks, replay drift) into this
    process's ``ctx`` and ``info``, with each process's steps and seconds in ``info["per_rank"]``."""
    fd = ctx.fd
    kinks, products = (fd.kinks, fd.products) if fd is not None else (0, 0)
    counts = shard.sum(np.array([info["hvp_products"], ctx.fd_checked, ctx.fd_blowups, kinks, products],
                                dtype=np.float64))
    info["hvp_products"], ctx.fd_checked, ctx.fd_blowups, kinks, products = (int(c) for c in counts)
    mine: dict[str, Any] = {"rank": shard.rank, "steps": steps, "seconds": info["seconds"], "drift": ctx.drift.checkpoints}
    if fd is not None:  # every process's one-sided disagreements, for one median; a fallback on any process
        mine["fd"] = (torch.cat(fd.asymmetries).double().cpu().numpy() if fd.asymmetries else np.zeros(0),
                      fd.fallback)
    parts = shard.gather(mine)
    if fd is not None:
        fd.kinks, fd.products = kinks, products
        fd.asymmetries = [torch.from_numpy(np.concatenate([p["fd"][0] for p in parts]))]
        fd.fallback = next((p["fd"][1] for p in parts if p["fd"][1] is not None), None)
        for p in parts:
            p.pop("fd")
    ctx.drift.checkpoints = sorted({c for p in parts for c in p.pop("drift")})  # a checkpoint two replays passed: once
    info.update(processes=shard.world, per_rank=parts)


def _replay_one_segment(ctx: _Context, t1: int, t2: int) -> None:
    """Where the sweep took every ``θ_t`` from a checkpoint (nothing replayed, nothing compared), the window's first
    segment between two checkpoints replayed once, so that ``ctx.drift`` tells whether the run changed θ or its buffers
    other than by its logged steps (a hook, an EMA; :func:`~lightning_influence.replay_drift.report_outside_changes`)
    and a change beyond the tolerance is refused, as DIT's replay refuses it. One step with a checkpoint at every
    step; nothing where the log has fewer than two checkpoints in the window or no batches to replay."""
    ckpts = [int(c) for c in ctx.log.checkpoint_steps if t1 <= c <= t2]
    if ctx.drift.checkpoints or len(ckpts) < 2 or (ctx.train_data is None and not ctx.log.meta.get("inputs_stored")):
        return
    for _ in replay(ctx.log, ctx.module, ctx.train_data, ckpts[0], ckpts[1], loss_fn=ctx.loss_fn, verify=ctx.verify,
                    tolerance=ctx.tolerance, report=ctx.drift):
        pass


def _diffin(query: Query | None, log: InfluenceLog, module: nn.Module, train_data: TrainData, window: Any, form: str,
            hvp: str, eps0: float | None, steps: Any, samples: str, loss_fn: LossFn, verify: bool, chunk_size: int,
            progress: Progress, shard: StepShard = ONE_PROCESS, tolerance: float | None = None) -> InfluenceScores:
    """Both public entry points: ``query=None`` is self-influence (split over processes by ``shard``)."""
    t0 = time.perf_counter()
    t1, t2 = log.window(window)
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if form == "step" and (steps is not None or samples != "all"):
        raise ValueError("steps/samples select the published form's checkpoints; the step form uses every step")
    ctx = _Context(log, module, train_data, loss_fn, hvp, eps0, verify, chunk_size, tolerance)
    if train_data is None and (samples == "all" if form == "published" else query is None):
        what = "samples='all' evaluates every training sample" if form == "published" else \
            "self-influence in the step form evaluates every sample's own gradient at the window's ends"
        raise samples_by_id_needed(f"Diff-In: {what}",
                                   ", or use form='published' with samples='batch' (the logged rows of each step's batch)")
    check_estimator_data(log, module, query, train_data, loss_fn)  # data the model cannot take: now, not in the sweep
    suffix = " self" if query is None else ""
    show = resolve_progress(progress, f"diffin-{form}{suffix.replace(' ', '-')}")
    if form == "published":
        raw, names, info = _published(ctx, query, t1, t2, steps, samples, show, shard)
        scores = -shard.sum(raw)
        method = ctx.method(f"diffin-published{suffix}", [f"m={info['m']}" if samples == "all" else "batch rows"])
    else:
        if query is None:
            scores, info = step_self_influence(ctx, t1, t2, show, shard)
            scores = shard.sum(scores)
        else:
            scores, names, info = _step(ctx, query, t1, t2, show)
        method = ctx.method(f"diffin-step{suffix}")
    own = info.pop("shard_steps", None)
    _replay_one_segment(ctx, t1, t2)
    info.update(hvp=hvp, seconds=time.perf_counter() - t0, optimizer=ctx.opt_class)
    if shard.world > 1:
        _combine(ctx, info, shard, own)
    info["replay_drift"] = ctx.drift.summary()
    method = report_outside_changes(info, method, ctx.dtype, "Diff-In", stacklevel=4,
                                    fit_threads=ctx.log.meta.get("cpu_threads"))
    if ctx.fd is not None:
        info.update(fd_checked=ctx.fd_checked, fd_blowups=ctx.fd_blowups, **ctx.fd.info())
        problems = []
        if ctx.fd_blowups:
            problems.append(f"{ctx.fd_blowups} of {ctx.fd_checked} curvatures lie beyond the SGD stability edge "
                            f"(|κ|·η > {FD_EDGE:g})")
        if ctx.fd.unreliable():
            problems.append(str(ctx.fd.unreliable()))
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
           progress: Progress = None, tolerance: float | None = None) -> InfluenceScores:
    """Diff-In scores of every training sample id for ``query`` over ``window``.

    Args:
        log: the influence log (per-sample gradients; ``H_z Ĝ`` rows for the published form with
            ``samples="batch"``; checkpoints, replayed between when sparse).
        module: the architecture (weights come from the log).
        train_data: training samples by id (a dataset or a callable ``ids -> batch``); ``None`` for a log with stored
            inputs where only the steps' batches are read (a query's step form; the published form with
            ``samples="batch"``).
        query: ``f(module) -> scalar or (Q,)`` (see :mod:`lightning_influence.queries`).
        window: steps ``(t1, t2)``, fractions, ``("epoch", a, b)`` or a string (see
            :meth:`InfluenceLog.window`); ``None`` is the whole run.
        form: ``"published"`` (default: the paper's checkpoint form, the CLI's ``--method diffin``)
            or ``"step"`` (per-step cumulative form, docs/diffin.md; ``--method diffin-step``).
        hvp: ``"exact"`` (default: forward-over-reverse, also for ``H_z Ĝ`` instead of the logged rows)
            or ``"fd"`` (central differences of first-order gradients in float64, DIT's
            :mod:`~lightning_influence.estimators.fd`; checked: kinks, noise and curvatures beyond the
            stability edge are counted in ``info``, tagged in the method name and warned about).
        eps0: ``ε_0`` of the finite differences, ``ε = ε_0 (1 + ‖θ‖)/√p`` (default 1e-6 in the float64
            evaluation, :func:`~lightning_influence.estimators.fd.native_eps0` on its fallback; the logged
            ``H_z Ĝ`` rows keep the tracker's ``hvp_eps``).
        steps: published form, ``samples="all"``: the ``m`` selected steps ``T_m``: an int ``m``
            (evenly spaced in the window; default ``min(20, t2 − t1)``), a list of steps, or ``"all"``.
        samples: published form: ``"batch"`` (the default there: the rows of ``B_t`` at every step,
            weighted ``N/|B_t|``) or ``"all"`` (every training sample at each selected step).
        loss_fn: per-sample training loss ``loss_fn(module, batch) -> Tensor[B]``.
        verify: check replayed ``θ_t`` against the checkpoints passed.
        tolerance: the largest drift accepted at a checkpoint, as :func:`~lightning_influence.estimators.dit.dit`'s
            (default 1%); a drift beyond rounding within it is a change outside the optimizer: warned about, tagged
            and in ``info["changed_outside_optimizer"]``. Where every ``θ_t`` comes from a checkpoint, the window's
            first segment between two checkpoints is replayed to measure it.
        chunk_size: samples per per-sample-gradient pass.
        progress: ``progress(done, total)`` or ``True`` for a bar on stderr.

    Returns:
        :class:`InfluenceScores` with ``N`` rows, one column per query output. Sign: positive
        = removing the sample raises ``f`` (the published expression is negated, see module doc).
    """
    samples = samples or ("batch" if form == "published" and steps is None else "all")
    return _diffin(query, log, module, train_data, window, form, hvp, eps0, steps, samples, loss_fn, verify,
                   chunk_size, progress, tolerance=tolerance)


@estimator_api
def diffin_self_influence(log: InfluenceLog, query: None = None, *, module: nn.Module | None = None,
                          train_data: TrainData | None = None, window: Any = None, form: str = "step", hvp: str = "exact",
                          eps0: float | None = None, steps: Any = None, samples: str = "all", loss_fn: LossFn = default_loss_fn, verify: bool = True,
                          chunk_size: int = 512, progress: Progress = None, shard: StepShard = ONE_PROCESS,
                          tolerance: float | None = None) -> InfluenceScores:
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
    Arguments as :func:`diffin` (``query`` must stay ``None``: each sample's own loss is the query); ``shard``: this
    process's part when the steps are split over processes (:func:`lightning_influence.distributed.by_steps` builds it;
    every process returns the whole result).
    """
    if query is not None:
        raise TypeError("diffin_self_influence() answers each sample's own loss and takes no query; pass query=None")
    return _diffin(None, log, module, train_data, window, form, hvp, eps0, steps, samples, loss_fn, verify,
                   chunk_size, progress, shard, tolerance)
