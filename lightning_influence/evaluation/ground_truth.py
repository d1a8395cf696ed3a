"""Ground truth for influence estimates: replay leave-one-out (docs/influence-math.md §6).

``replay_loo`` re-runs training from the logged ``θ_0`` on the recorded batch sequence,
learning rates and optimizer, with one sample (or a group) dropped from every batch that
held it, the other samples' weights ``w_{i,t}`` kept (docs/influence-math.md §2; the step's recorded weights and
gradient clipping, :mod:`lightning_influence.step`), and records

    LOO_j(t) = f(θ^{-j}_t) − f(θ_t)

on a grid of steps; the window truth is ``LOO_j(t2) − LOO_j(t1)``. The variant
``in_window_only`` drops the sample only inside ``[t1, t2)`` (starting from the real
``θ_{t1}`` and optimizer state), the counterpart of DIT's local variant.

Many counterfactual runs are trained at once as stacked copies of the parameters: copy 0
drops nothing (the reference run, checked against the log's checkpoints), copy ``c`` drops
its unit; each copy's loss depends only on its own parameters and SGD/Adam/AdamW act
elementwise, so the stacked optimizer gives every copy exactly its own update. With train-mode
BatchNorm (meta ``train_batchnorm``, or at any step by meta ``eval_modules``) the copies train one at a time, the unit's rows out of the
forward, each with its own running statistics (docs/replay.md, Buffers). No Lightning imports.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from lightning_influence.estimators.scores import InfluenceScores, grid_column
from lightning_influence.estimators.signature import positional_limit
from lightning_influence.log.reader import InfluenceLog
from lightning_influence.queries import (LossFn, Query, default_loss_fn, evaluate_query, query_column, query_names,
                                         shared_loss)
from lightning_influence.replay_drift import DriftReport, check_checkpoint, resolve_tolerance, restore_buffers
from lightning_influence.step.buffers import buffers_of, cloned, persistent_buffers, run_buffers
from lightning_influence.step.clipping import apply_clipping_stacked, logged_clip_spec
from lightning_influence.step.micro import Step
from lightning_influence.step.modes import batchnorm_in_train
from lightning_influence.step.shard import take_rows
from lightning_influence.replay import (
    Progress,
    TrainData,
    _optimizer_spec,
    build_optimizer,
    checkpoint_params,
    grid_steps,
    load_optimizer_state,
    load_step,
    replay,
    require_train_data,
    resolve_progress,
    set_step_hyper,
)

if TYPE_CHECKING:
    from lightning_influence.distributed import Processes

__all__ = ["LOOResult", "replay_loo"]


@dataclass
class LOOResult:
    """Replay leave-one-out values on a grid of steps.

    Attributes:
        ids: ``(n,)`` the dropped sample ids (with ``groups``: the group indices).
        values: ``(n, G, Q)`` ``LOO_j(grid[g]) = f(θ^{-j}_t) − f(θ_t)`` for query ``q``.
        grid: ``(G,)`` steps.
        base: ``(G, Q)`` ``f(θ_t)`` of the reference (nothing dropped) run.
        query_names: the ``Q`` query names.
        groups: the dropped id sets, for group removal.
        removal_window: ``(t1, t2)`` for ``in_window_only`` (dropped only in ``[t1, t2)``), else ``None``.
        info: run details (copies, seconds, largest deviation of the reference run from the log).
    """

    ids: np.ndarray
    values: np.ndarray
    grid: np.ndarray
    base: np.ndarray
    query_names: list[str]
    groups: list[np.ndarray] | None = None
    removal_window: tuple[int, int] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def at(self, t: int) -> np.ndarray:
        """``LOO(t)`` ``(n, Q)``."""
        return self.values[:, grid_column(self.grid, t, "LOO"), :]

    def window(self, t1: int, t2: int, query: int | str = 0) -> np.ndarray:
        """Window truth ``LOO(t2) − LOO(t1)`` ``(n,)`` for one query."""
        q = query_column(self.query_names, query)
        return self.at(t2)[:, q] - self.at(t1)[:, q]

    def as_scores(self, t1: int, t2: int, n_total: int) -> InfluenceScores:
        """The window truth as :class:`InfluenceScores` with ``n_total`` rows (NaN for samples not dropped)."""
        if self.groups is not None:
            raise ValueError("group removal has no per-sample rows; use window()")
        out = np.full((n_total, len(self.query_names)), np.nan)
        out[self.ids] = self.at(t2) - self.at(t1)
        method = "replay-loo (in-window removal)" if self.removal_window else "replay-loo"
        return InfluenceScores(out, method, (int(t1), int(t2)), list(self.query_names), info=dict(self.info))


def _evaluate(module: nn.Module, query: Query, stacked: Mapping[str, Tensor],
              buffers: Sequence[dict[str, Tensor] | None]) -> np.ndarray:
    """``f`` of every copy (with its buffers, ``step.buffers``): ``(copies, Q)``."""
    n = next(iter(stacked.values())).shape[0]
    out = []
    with torch.no_grad():
        for c in range(n):
            # copies: a query's forward may change parameters in place (Embedding(max_norm)), not the copies' run
            val = evaluate_query(module, query, {k: v[c].clone() for k, v in stacked.items()}, buffers[c])
            out.append(val.detach().reshape(-1).double().numpy())
    return np.stack(out)


def _names_in_optimizer_order(log: InfluenceLog) -> list[str]:
    return [n for g in _optimizer_spec(log)["param_groups"] for n in g["params"]]


def _state_by_name(state_dict: dict[str, Any], names: list[str]) -> dict[str, dict[str, Any]]:
    return {names[i]: {k: (v.detach().cpu().numpy() if torch.is_tensor(v) else v) for k, v in st.items()}
            for i, st in state_dict["state"].items()}


def _reanchor_copies(log: InfluenceLog, t: int, stacked: dict[str, Tensor], anchor: dict[str, Any], tolerance: float,
                     report: DriftReport, buffers: list[dict[str, Tensor] | None]) -> None:
    """At checkpoint ``t``: the reference copy's drift (stop beyond ``tolerance``); every copy is shifted by the
    reference copy's error, so the counterfactual differences survive and round-off does not accumulate (its floating
    buffers too; counts are set to the stored ones)."""
    stored = log.checkpoint(t)
    ref = {n: v[0] for n, v in stacked.items()}
    d = check_checkpoint(t, stored, ref, anchor, tolerance, report)
    if d > 0:
        with torch.no_grad():
            for n, v in stacked.items():
                v += (torch.from_numpy(np.array(stored[n])).to(v) - v[0]).unsqueeze(0)
    if buffers[0] is not None:  # the reference copy's checked and restored, every copy shifted by its error
        before = {n: b.clone() for n, b in buffers[0].items()}
        restore_buffers(t, log.checkpoint_buffers(t), buffers[0], anchor, tolerance)
        for b in buffers[1:]:
            for n, value in buffers[0].items():
                if value.is_floating_point():
                    b[n].add_(value - before[n])
                else:
                    b[n].copy_(value)
    anchor.update(step=t, params={n: v[0].detach().clone() for n, v in stacked.items()})


@positional_limit(4, "the log, the model, the training data and the query",
                  "replay_loo(log, module, train_data, query, *, sample_ids=..., grid=..., window=..., ...)")
def replay_loo(log: InfluenceLog, module: nn.Module, train_data: TrainData, query: Query, *,
               sample_ids: Sequence[int] | np.ndarray | None = None, grid: Any = None, window: Any = None,
               in_window_only: bool = False, groups: Sequence[Sequence[int]] | None = None,
               loss_fn: LossFn = default_loss_fn, copies: int = 256, verify: bool = True,
               tolerance: float | None = None, removal_weight: float = 0.0, progress: Progress = None,
               processes: Processes | int | None = None) -> LOOResult:
    """Replay leave-one-out (or leave-group-out): retrain without each unit, record ``f`` on a grid.

    Args:
        log: the influence log (needs a checkpoint at its first step: 0, or the step a resumed fit started the log
            at, whose runs then start there; at/before ``t1`` for ``in_window_only``).
        module: the architecture.
        train_data: training samples by id; ``None`` for a log with stored inputs (the retraining reads only the
            steps' batches: the stored inputs as trained, the unit's rows dropped).
        query: ``f(module) -> scalar or (Q,)``.
        sample_ids: ids to drop one at a time (default: every id ``0 .. N−1``).
        grid: steps at which ``LOO(t)`` is recorded (as :func:`~lightning_influence.replay.grid_steps`: ``"epoch"``,
            ``n`` equal windows, steps or fractions; default every epoch start and ``T``); the window's ends are
            always added.
        window: a window (see :meth:`InfluenceLog.window`); its ends join the grid; required
            for ``in_window_only``.
        in_window_only: drop the unit only inside ``[t1, t2)``, starting from the real ``θ_{t1}``.
        groups: drop each of these id sets as one unit instead of ``sample_ids``.
        loss_fn: the per-sample training loss.
        copies: counterfactual runs trained together per pass (memory ``copies · p`` plus state).
        verify: check the reference run (copy 0) against the log's checkpoints it passes.
        tolerance: the largest drift of the reference run at a checkpoint, relative to how far training
            moved since the previous one (:mod:`lightning_influence.replay_drift`, default 1%; the stacked
            copies run batched kernels whose round-off differs from training). At every checkpoint
            every copy is shifted by the reference run's error (re-anchored); ``info["replay_drift"]``.
        removal_weight: the factor on the dropped unit's loss weight (0: leave-one-out). ``1 − ε``
            with the values divided by ``ε`` gives the derivative ``∂f/∂w`` that DIT computes
            (docs/optimizer-adjoint.md §8), separating an estimator's error from the nonlinearity
            of a full removal. With train-mode BatchNorm a removed unit (0) is taken out of the forward (the
            batch statistics become the other rows'); another factor keeps its rows in the statistics.
        progress: ``progress(done, total)`` or ``True``.
        processes: run the counterfactual runs on several processes (a number of local processes, or a
            :class:`~lightning_influence.distributed.Processes`; docs/scaling.md): each process trains one
            contiguous block of the units (with its own reference copy) and the values are gathered in order on
            every process. ``module``, ``train_data``, ``query`` and ``loss_fn`` must be picklable for the default
            ``ddp_spawn``.

    Raises:
        ReplayMismatchError: the reference run does not reproduce the logged trajectory.
        DistributedQueryError: a process of a distributed run failed or was killed.
    """
    if not (isinstance(copies, int) and copies >= 1):
        raise ValueError(f"copies must be an int >= 1 (counterfactual runs trained together), got {copies!r}")
    loss_fn, query = shared_loss(module, query, loss_fn)  # given once, to replay_loo or to the query helper
    if not np.isfinite(removal_weight):
        raise ValueError(f"removal_weight must be a finite factor on the dropped unit's weight, got {removal_weight!r}")
    require_train_data(log, train_data, "replay_loo", "to retrain without each sample")
    win = log.window(window) if window is not None else None
    if in_window_only and win is None:
        raise ValueError("in_window_only=True needs a window")
    steps = set(grid_steps(log, grid).tolist())
    if win is not None:
        steps |= set(win)
    if in_window_only:
        t1, t2 = win
        steps = {t for t in steps if t1 <= t <= t2}
        lo, hi = t1, t2
    else:  # from the log's first step: 0, or where a resumed fit started the log (nothing was removed before)
        lo, hi = log.first_step, max(steps)
        steps = {t for t in steps if t >= lo}
    grid_arr = np.array(sorted(steps), dtype=np.int64)
    if groups is not None:
        units = [np.unique(np.asarray(g, dtype=np.int64)) for g in groups]
        unit_ids = np.arange(len(units))
    else:
        unit_ids = np.arange(log.dataset_size) if sample_ids is None else np.asarray(sample_ids, dtype=np.int64)
        units = [np.array([i]) for i in unit_ids]
    if not units:
        raise ValueError("nothing to drop: sample_ids/groups is empty")
    for u in units:
        if len(u) and (u.min() < 0 or u.max() >= log.dataset_size):
            raise ValueError(f"sample ids {u.tolist()[:5]} are outside [0, N = {log.dataset_size})")
    from lightning_influence.distributed import Processes, map_blocks

    if Processes.of(processes).many:
        block = partial(_loo_block, str(log.path), module, train_data, query, None if groups is not None else unit_ids,
                        units if groups is not None else None,
                        dict(grid=grid, window=window, in_window_only=in_window_only, loss_fn=loss_fn, copies=copies,
                             verify=verify, tolerance=tolerance, removal_weight=removal_weight, progress=progress))
        parts = map_blocks(block, len(units), processes, "replay leave-one-out")
        return _merge_blocks(parts, unit_ids, units if groups is not None else None, copies)

    names = _names_in_optimizer_order(log)
    # starting point: θ_0 from the log, or the real θ_{t1} and optimizer state (replayed)
    if in_window_only:
        last = None
        for rs in replay(log, module, train_data, lo, lo, loss_fn=loss_fn, verify=verify):
            last = rs
        start_params = last.params
        start_state = _state_by_name(last.optimizer.state_dict(), names)
    else:
        if lo not in log.checkpoint_steps:
            raise ValueError(f"replay_loo retrains from the log's first step {lo}, but the log has no checkpoint there "
                             f"({log.checkpoint_steps})")
        start_params = checkpoint_params(log, module, lo)
        start_state = log.optimizer_state(lo)
    dtype = next(iter(start_params.values())).dtype
    # a train-mode BatchNorm mixes the samples of a batch: each copy trains alone, its unit's rows out of the forward,
    # its running statistics carried (step.buffers; the module's own for a log that stores none)
    # at any step (step.modes: a BatchNorm unfrozen later too); likewise a forward that changes its own buffers
    # (spectral_norm's power iteration: each copy its own, and vmap has no rule for its in-place update)
    carry = bool(batchnorm_in_train(module, log.meta)) or bool(run_buffers(log, module))
    start_buffers = buffers_of(start_params)
    if carry and start_buffers is None:
        start_buffers = cloned(persistent_buffers(module))
    tolerance = resolve_tolerance(tolerance)
    drift = DriftReport()
    ckpts = [t for t in log.checkpoint_steps if lo < t <= hi]
    show = resolve_progress(progress, "replay-loo")
    chunks = [list(range(i, min(i + copies, len(units)))) for i in range(0, len(units), copies)]
    values = np.zeros((len(units), len(grid_arr), 0))
    base = None
    batched = True  # the copies of a step through vmap, until a model without batching rules (nn.LSTM) says otherwise
    qnames: list[str] = []
    t0 = time.perf_counter()
    done, total = 0, len(chunks) * (hi - lo)
    for chunk in chunks:
        C = len(chunk) + 1
        stacked = {n: v.detach().unsqueeze(0).expand(C, *v.shape).clone().requires_grad_(True) for n, v in start_params.items()}
        opt = build_optimizer(log, stacked)
        load_optimizer_state(opt, names, start_state)
        chunk_units = [units[i] for i in chunk]
        buffers = [cloned(start_buffers) for _ in range(C)]
        evals: dict[int, np.ndarray] = {}
        anchor = {"step": lo, "params": {n: v[0].detach().clone() for n, v in stacked.items()}, "buffers": cloned(start_buffers)}
        for t in range(lo, hi + 1):
            if t in ckpts and verify:
                _reanchor_copies(log, t, stacked, anchor, tolerance, drift, buffers)
            if t in steps:
                evals[t] = _evaluate(module, query, stacked, buffers)
            if t == hi:
                break
            step = load_step(log, train_data, t)
            ids = step.ids
            B = len(ids)
            W = torch.as_tensor(log.weights(t), dtype=dtype).expand(C, B).clone()  # w_{i,t} (step.weights)
            for c, u in enumerate(chunk_units, start=1):
                W[c, np.isin(ids, u)] *= removal_weight
            set_step_hyper(opt, log, t)
            opt.zero_grad(set_to_none=True)

            def per_copy(p: dict[str, Tensor], w: Tensor) -> Tensor:  # every copy with the training dropout masks
                return (w * step.losses(module, loss_fn, p)).sum()

            if step.skipped:  # a step the GradScaler skipped changes nothing
                pass
            elif carry:
                for c in range(C):
                    copy_step, w = (step, W[c]) if c == 0 or removal_weight != 0 else _without(step, chunk_units[c - 1], W[c])
                    if copy_step.micro:  # (a group may fill a whole batch)
                        p = {n: v[c] for n, v in stacked.items()}
                        (w * copy_step.losses(module, loss_fn, p, buffers=buffers[c])).sum().backward()
                apply_clipping_stacked([p for g in opt.param_groups for p in g["params"]], logged_clip_spec(log, t))
                opt.step()
            else:
                # copy by copy: a forward inside vmap may draw other dropout masks than training did, and its batched
                # kernels round other than training's under autocast (bf16: the reference copy left the run by 0.4%)
                one_by_one = step.drew or step.precision.autocast_device is not None or not batched
                if not one_by_one:
                    try:
                        torch.func.vmap(per_copy)(dict(stacked), W).sum().backward()
                    except (RuntimeError, NotImplementedError):  # no batching rule (nn.LSTM/GRU): one by one from now on
                        batched, one_by_one = False, True
                        opt.zero_grad(set_to_none=True)
                if one_by_one:
                    for c in range(C):
                        per_copy({n: v[c] for n, v in stacked.items()}, W[c]).backward()
                apply_clipping_stacked([p for g in opt.param_groups for p in g["params"]], logged_clip_spec(log, t))
                opt.step()
            done += 1
            if show is not None:
                show(done, total)
        ev = np.stack([evals[int(t)] for t in grid_arr], axis=1)  # (C, G, Q)
        if base is None:
            base = ev[0]
            qnames = query_names(query, ev.shape[2])
            values = np.zeros((len(units), len(grid_arr), ev.shape[2]))
        values[chunk] = ev[1:] - ev[0][None]
    info = {"copies_per_pass": copies, "passes": len(chunks), "seconds": time.perf_counter() - t0,
            "replay_drift": drift.summary(), "checkpoints_checked": ckpts if verify else []}
    return LOOResult(unit_ids, values, grid_arr, base, qnames, groups=units if groups is not None else None,
                     removal_window=win if in_window_only else None, info=info)


def _without(step: Step, unit: np.ndarray, w: Tensor) -> tuple[Step, Tensor]:
    """``step`` without the rows of ``unit`` (out of the forward: a train-mode BatchNorm's statistics are then those of
    the other rows, as a retraining without them) and the weights of the rows kept."""
    keep = ~np.isin(step.ids, unit)
    if keep.all():
        return step, w
    micro, off = [], 0
    for m in step.micro:
        part = keep[off:off + len(m.ids)]
        off += len(m.ids)
        if part.any():
            micro.append(m if part.all() else
                         dataclasses.replace(m, ids=m.ids[part], batch=take_rows(m.batch, torch.from_numpy(part), len(m.ids))))
    return dataclasses.replace(step, micro=micro), w[torch.from_numpy(keep).to(w.device)]


def _loo_block(log_path: str, module: nn.Module, train_data: TrainData, query: Query, sample_ids: np.ndarray | None,
               groups: list[np.ndarray] | None, kwargs: dict[str, Any], a: int, b: int, device: torch.device
               ) -> LOOResult:
    """One process's block ``[a, b)`` of the units of a distributed :func:`replay_loo`."""
    if device.type != "cpu":
        module = module.to(device)
    with InfluenceLog(log_path) as log:
        return replay_loo(log, module, train_data, query, sample_ids=None if sample_ids is None else sample_ids[a:b],
                          groups=None if groups is None else groups[a:b], **kwargs)


def _merge_blocks(parts: list[tuple[int, int, LOOResult | None, float]], unit_ids: np.ndarray,
                  groups: list[np.ndarray] | None, copies: int) -> LOOResult:
    """The processes' blocks as one :class:`LOOResult`, units in order; the largest drift of any process."""
    done = [r for _, _, r, _ in parts if r is not None]
    first = done[0]
    drifts = [r.info["replay_drift"] for r in done]
    drift = {**max(drifts, key=lambda d: d["max"]), "checkpoints_compared": sum(d["checkpoints_compared"] for d in drifts)}
    info = {"copies_per_pass": copies, "passes": sum(r.info["passes"] for r in done),
            "seconds": max(sec for *_, sec in parts), "replay_drift": drift,
            "checkpoints_checked": first.info["checkpoints_checked"], "processes": len(parts),
            "per_rank": [{"rank": i, "units": [a, b], "passes": r.info["passes"] if r is not None else 0, "seconds": sec}
                         for i, (a, b, r, sec) in enumerate(parts)]}
    return LOOResult(unit_ids, np.concatenate([r.values for r in done]), first.grid, first.base, first.query_names,
                     groups=groups, removal_window=first.removal_window, info=info)
