"""Replay: reconstruct ``θ_t`` and counterfactual trajectories from an influence log.

The log holds the batch sequence ``B_t``, the learning rates ``η_t`` and checkpoints of
``θ_t`` with the optimizer state. :func:`replay` re-runs the recorded steps from the
nearest checkpoint with the logged optimizer (rebuilt by :func:`build_optimizer`), and
compares every checkpoint it passes: a replay that drifts from the logged run is an error
that says where and why, never a silently wrong trajectory. With per-sample ``weights`` it
runs the counterfactual of docs/influence-math.md §2: the loss of step ``t`` is ``Σ_i m_i w_{i,t} ℓ_i``, with
``w_{i,t}`` the weight the step applied (:mod:`lightning_influence.step.weights`; ``1/|B_t|``
for a plain batch mean), so a removed sample (``m_i = 0``) leaves the others' weights unchanged.
Each step runs as Lightning ran it: its micro-batches back-propagated one at a time with
Lightning's loss scaling, the gradient clipped as recorded (:mod:`lightning_influence.step.clipping`),
so an as-trained replay on CPU is bit-identical to training.

Shared by DIT, Diff-In and the ground truth. Pure torch: no Lightning imports.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from lightning_influence.capture import call_with_params
from lightning_influence.data import WithCollate, as_pytree, by_id, collate_of
from lightning_influence.log.inputs import decode_batch
from lightning_influence.log.reader import InfluenceLog
from lightning_influence.log.windows import fraction_step
from lightning_influence.progress import Progress, resolve_progress  # noqa: F401 (re-exported)
from lightning_influence.queries import LossFn, default_loss_fn
from lightning_influence.replay_optimizer import (  # noqa: F401 (re-exported)
    _optimizer_spec,
    build_optimizer,
    load_optimizer_state,
    optimizer_class,
    set_step_hyper,
)
from lightning_influence.replay_drift import (  # noqa: F401 (re-exported)
    DEFAULT_TOLERANCE,
    DriftReport,
    ReplayMismatchError,
    check_checkpoint,
    resolve_tolerance,
    restore_buffers,
)
from lightning_influence.step.buffers import ParamsWithBuffers, buffers_of, cloned, persistent_buffers
from lightning_influence.step.compiled import compiled_parts, uncompiled_message
from lightning_influence.step.frozen import check_frozen, check_module_class
from lightning_influence.step.clipping import ClipSpec, apply_clipping, logged_clip_spec
from lightning_influence.step.micro import MicroBatch, Step
from lightning_influence.step.modes import ModeSchedule
from lightning_influence.step.precision import Precision, scaled, unscale_
from lightning_influence.step.rng import NONE, RandomState
from lightning_influence.step.shard import BatchShard, positions, take_rows
from lightning_influence.step.optimizers import UnsupportedOptimizerError  # noqa: F401 (re-exported)
from lightning_influence.step.weights import StepWeights, step_weights

__all__ = [
    "ReplayMismatchError",
    "ReplayStep",
    "TrainData",
    "UnsupportedOptimizerError",
    "batch_from_ids",
    "build_optimizer",
    "checkpoint_buffers",
    "checkpoint_params",
    "DriftReport",
    "load_step",
    "require_train_data",
    "samples_by_id_needed",
    "functional_loss",
    "grid_bounds",
    "grid_steps",
    "load_optimizer_state",
    "optimizer_class",
    "parameters_at",
    "replay",
    "replay_from",
    "replay_step",
    "set_step_hyper",
]

TrainData = Union[Callable[[np.ndarray], Any], Dataset]
"""The training samples by id: a map-style dataset (``ds[i]`` is sample ``i``), or a callable
``ids -> batch``. Either way the batch must be what the module's ``per_sample_loss`` takes."""

Weights = Callable[[int, np.ndarray], Tensor]
"""``weights(step, ids) -> Tensor[|B_t|]``: per-sample multipliers of the step's loss weights (1 = as trained, 0 = removed)."""


@dataclass
class ReplayStep:
    """One point of a replayed trajectory.

    Attributes:
        step: ``t``.
        params: ``θ_t``, the parameters *before* step ``t`` (detached copies), carrying the module's buffers then
            (``step.buffers``; ``None`` for a log that stores none).
        ids: ``B_t`` (empty for the final point ``θ_{t2}``).
        lrs: ``η_t`` per param group (empty for the final point).
        optimizer: the live optimizer, holding the state *before* step ``t`` (it moves on
            when the iteration continues: copy ``optimizer.state_dict()`` to keep it).
    """

    step: int
    params: ParamsWithBuffers
    ids: np.ndarray
    lrs: np.ndarray
    optimizer: torch.optim.Optimizer


# ------------------------------------------------------------------------------------- data
def batch_from_ids(train_data: TrainData, ids: np.ndarray) -> Any:
    """The batch of samples ``ids`` (in that order).

    A dataset gives ``default_collate([ds[i] for i in ids])`` (a :class:`~lightning_influence.data.WithCollate`:
    its DataLoader's ``collate_fn``; the training DataLoader itself: its dataset and ``collate_fn``); a callable is
    called with the ``int64`` id array.
    """
    ids = np.asarray(ids, dtype=np.int64)
    if isinstance(train_data, DataLoader):  # the training DataLoader itself: its dataset, with its collate_fn
        train_data = by_id(train_data)
    if hasattr(train_data, "__getitem__") and hasattr(train_data, "__len__"):
        if len(ids) and ids.max() >= len(train_data):
            if isinstance(train_data, (tuple, list)) and train_data and all(
                    isinstance(t, Tensor) and t.dim() and len(t) > ids.max() for t in train_data):
                raise TypeError(f"train_data is {len(train_data)} tensors of {len(train_data[0])} rows (the training set's "
                                "columns, as a batch), which is read as a dataset of "
                                f"{len(train_data)} samples: pass it by sample, WithIds(TensorDataset(*tensors)) as trained")
            raise ValueError(f"train_data has {len(train_data)} samples but the log holds sample id {int(ids.max())}: pass "
                             "the whole training set the run was trained on, indexed by the ids it logged")
        return as_pytree(collate_of(train_data)([train_data[int(i)] for i in ids]))
    if callable(train_data):
        return as_pytree(train_data(ids))
    if isinstance(train_data, IterableDataset):
        raise TypeError(f"train_data is an iterable-style dataset ({type(train_data).__name__}), whose samples cannot be "
                        "read by id: pass the same samples as a map-style dataset indexed by the logged ids, or a "
                        "callable ids -> batch (or train with InfluenceTracker(store_inputs=True))")
    raise TypeError(f"train_data must be a map-style Dataset or a callable ids -> batch, got {type(train_data).__name__}")


def require_train_data(log: InfluenceLog, train_data: TrainData | None, who: str, purpose: str) -> None:
    """Refuse ``train_data=None`` unless the log stores every step's inputs (``InfluenceTracker(store_inputs=True)``):
    the replay and the step batches read those. ``who`` needs the data ``purpose`` (for the message)."""
    if train_data is None and not log.meta.get("inputs_stored"):
        raise ValueError(f"{who} needs `train_data` (the training samples by id) {purpose} "
                         "(or a log of InfluenceTracker(store_inputs=True))")
    collate = ((log.meta.get("recipe") or {}).get("data") or {}).get("collate_fn")
    if collate and train_data is not None and not callable(train_data) and not isinstance(train_data, WithCollate):
        name = collate.get("function") or collate.get("name") or "its own collate_fn"
        stored = (" (or train_data=None: this log stores every step's inputs, which the steps are replayed from)"
                  if log.meta.get("inputs_stored") else "")
        raise ValueError(f"the run's DataLoader made its batches with {name}, not default_collate: pass "
                         f"train_data=WithCollate(train_set, {name.rsplit('.', 1)[-1]}) so that {who} rebuilds every "
                         f"step's batch as training did (lightning_influence.WithCollate){stored}")


def samples_by_id_needed(what: str, instead: str = "") -> ValueError:
    """The refusal of ``train_data=None`` where ``what`` reads training samples by id: a log's stored inputs are only
    the steps' batches as trained (randomly augmented, perhaps), not the samples by id."""
    return ValueError(f"{what} by id, which needs `train_data`: stored inputs (InfluenceTracker(store_inputs=True)) are "
                      f"the steps' batches as trained, not the samples by id. Pass train_data{instead}")


def functional_loss(module: nn.Module, loss_fn: LossFn, params: Mapping[str, Tensor], batch: Any,
                    buffers: Mapping[str, Tensor] | None = None) -> Tensor:
    """Per-sample losses ``loss_fn(module, batch)`` evaluated at ``params`` (the live module is untouched), with
    ``buffers`` in place of the module's (taking the forward's updates, :func:`call_with_params`).

    The batch's tensors are moved to the parameters' device (:func:`call_with_params`).
    """
    return call_with_params(module, loss_fn, params, batch, buffers=buffers)


# ----------------------------------------------------------------------------- parameters
def _module_param_names(module: nn.Module) -> list[str]:
    return [n for n, p in module.named_parameters() if p.requires_grad]


def checkpoint_params(log: InfluenceLog, module: nn.Module, step: int, requires_grad: bool = False) -> ParamsWithBuffers:
    """``θ_step`` from the log's checkpoint, in the module's parameter order, checked against the module, carrying the
    module's buffers at that step (:func:`checkpoint_buffers`: what a query in eval mode normalises by)."""
    compiled = compiled_parts(module)
    if compiled:  # its double backward fails deep in torch (step.compiled)
        raise ValueError(uncompiled_message(module, compiled))
    check_frozen(log, module)  # the parameters the checkpoints lack: the module's own, which must be training's
    check_module_class(log, module)
    stored = log.checkpoint(step)
    names = _module_param_names(module)
    if set(stored) != set(names):
        raise ValueError(f"the module does not match the log: trainable parameters only in the module "
                         f"{sorted(set(names) - set(stored))[:5]}, only in the checkpoint {sorted(set(stored) - set(names))[:5]}")
    live = dict(module.named_parameters())
    out = {}
    for n in names:
        if tuple(stored[n].shape) != tuple(live[n].shape):
            raise ValueError(f"parameter {n!r}: shape {tuple(live[n].shape)} in the module, {tuple(stored[n].shape)} in the log")
        t = torch.from_numpy(np.array(stored[n])).to(live[n].device)
        if t.dtype != live[n].dtype:
            raise ValueError(f"parameter {n!r} is {live[n].dtype} in the module but {t.dtype} in the log: convert the module "
                             f"to the dtype the run trained in (e.g. module.to({t.dtype})) so buffers and inputs match")
        if t.stride() == live[n].stride():
            out[n] = t.requires_grad_(requires_grad)
        else:  # in the live parameter's memory format (channels_last): training's kernels, training's round-off
            out[n] = torch.empty_like(live[n], requires_grad=False).copy_(t).requires_grad_(requires_grad)
    return ParamsWithBuffers(out, checkpoint_buffers(log, module, step))


def checkpoint_buffers(log: InfluenceLog, module: nn.Module, step: int) -> dict[str, Tensor] | None:
    """The module's buffers stored with checkpoint ``step`` (BatchNorm running statistics, ``step.buffers``), on the
    module's device, checked against the module; ``None`` for a log whose checkpoints hold none (an older log: the
    module's own are used; with train-mode BatchNorm a warning says so)."""
    stored = log.checkpoint_buffers(step)
    if stored is None:
        if log.meta.get("train_batchnorm"):
            warnings.warn(f"the log was recorded with BatchNorm layers in train mode ({', '.join(log.meta['train_batchnorm'])}) "
                          "by a version that stored no running statistics with its checkpoints, so what runs in eval mode "
                          "(a query on model.eval()) uses the running statistics of the module given, at every step",
                          RuntimeWarning, stacklevel=3)
        return None
    live = persistent_buffers(module)
    if set(stored) != set(live):
        raise ValueError(f"the module does not match the log: buffers only in the module {sorted(set(live) - set(stored))[:5]}, "
                         f"only in the checkpoint {sorted(set(stored) - set(live))[:5]}")
    out = {}
    for n, b in live.items():
        t = torch.from_numpy(np.array(stored[n])).to(b.device)
        if t.shape != b.shape or t.dtype != b.dtype:
            raise ValueError(f"buffer {n!r} is {b.dtype} {tuple(b.shape)} in the module but {t.dtype} {tuple(t.shape)} in the "
                             f"log: convert the module to the dtype the run trained in (e.g. module.to({t.dtype}))")
        out[n] = t
    return out


def grid_bounds(log: InfluenceLog, grid: Any, span: tuple[int, int] | None = None) -> np.ndarray:
    """The boundaries of a grid of windows over ``span`` (default: the log's steps, from its first): ``None``/``"epoch"``
    (the span's ends and every epoch's first step inside), an int ``n`` (``n`` equal windows, ends rounded to steps),
    or a list of steps or of fractions of training (of the log's steps ``[first_step, T]``, as a window's fractions:
    :func:`~lightning_influence.log.windows.fraction_step`), which must lie in the span (the log's steps without one).
    One meaning for :func:`~lightning_influence.estimators.dit.timeline`'s ``grid=`` and the CLI's ``--grid``."""
    T = log.num_steps
    t1, t2 = (int(log.first_step), T) if span is None else (int(span[0]), int(span[1]))
    if grid is None or (isinstance(grid, str) and grid in ("epoch", "epochs")):
        starts = {int(log.steps[np.nonzero(log.epochs_of_step == e)[0][0]]) for e in log.epochs}
        pts = {t1, t2} | {s for s in starts if t1 < s < t2}
    elif isinstance(grid, str) or isinstance(grid, (bool, np.bool_)):
        raise ValueError(f"grid={grid!r}: use None or 'epoch' (every epoch's first step), an int n (n equal windows, as "
                         "the CLI's --grid n), or a list of steps or of fractions of training")
    elif isinstance(grid, (float, np.floating)):
        raise ValueError(f"grid={grid!r}: a fractional grid is a list of boundaries, e.g. [0.0, 0.5, 1.0] (fractions of "
                         "the log's steps); an int n is n equal windows")
    elif isinstance(grid, (int, np.integer)):
        if grid < 1:
            raise ValueError(f"grid={grid}: an int grid is a number of equal windows >= 1")
        pts = {int(round(b)) for b in np.linspace(t1, t2, int(grid) + 1)}
    else:
        vals = list(grid)
        if any(isinstance(v, float) for v in vals):
            if not all(0.0 <= float(v) <= 1.0 for v in vals):
                raise ValueError("a fractional grid needs values in [0, 1]")
            pts = {fraction_step(log, v) for v in vals}
        else:
            pts = {int(v) for v in vals}
        if pts and (min(pts) < t1 or max(pts) > t2):
            started = (f" (the log starts at step {t1}: the fit that wrote it was resumed from a checkpoint of that "
                       "step into a new log, and no step before it is recorded)") if span is None and t1 > 0 else ""
            raise ValueError(f"grid steps must lie in [{t1}, {t2}]{started}, got {sorted(pts)}")
    return np.array(sorted(pts), dtype=np.int64)


def grid_steps(log: InfluenceLog, grid: Any) -> np.ndarray:
    """Steps of a time grid (:func:`grid_bounds` over the log's steps), with 0: where cumulative values start."""
    return np.array(sorted(set(grid_bounds(log, grid).tolist()) | {0}), dtype=np.int64)


# ---------------------------------------------------------------------------------- replay
def load_step(log: InfluenceLog, train_data: TrainData | None, t: int, shard: BatchShard | None = None) -> Step:
    """The inputs of step ``t`` as Lightning ran them: its micro-batches (stored inputs, else ``train_data`` by
    id, cast by the precision plugin as in training) with their random states, the run's autocast, the GradScaler factor and skip (``docs/log-format.md``).
    With ``shard``, only that process's rows (:meth:`BatchShard.rows`; ``Step.rows`` says which)."""
    synced = log.meta.get("sync_batchnorm")
    if synced:
        raise ValueError(
            f"{log.path}: the run normalised with SyncBatchNorm in train mode ({', '.join(synced['layers'][:3])}) over "
            f"its {synced['world_size']} processes: each forward's batch statistics came from every process's samples, "
            "which re-running a step's forwards (replay, DIT, Diff-In, replay leave-one-out) cannot reproduce. "
            "TracIn and Gauss-Newton DIT read only the logged rows; for the others retrain with per-process BatchNorm "
            "(Trainer(sync_batchnorm=False)), BatchNorm in eval mode, or GroupNorm/LayerNorm")
    records = log.micro_batches(t)
    randoms = [RandomState(m.cpu_rng, m.cuda_rng if m.cuda_rng is not None else NONE.cuda) for m in records]
    train = bool(log.meta.get("train_batchnorm"))
    schedule = ModeSchedule.from_meta(log.meta)  # the modes training ran the step's forwards with (step.modes)
    modes = None if schedule is None else schedule.at(t)
    world = int(log.meta.get("world_size") or 1)  # DDP: rank 0's micro-batches come first (MicroBatch.updates_buffers)
    first_rank = len(records) // world if world > 1 and len(records) % world == 0 else len(records)
    sizes = [len(m.ids) for m in records]
    rows = None if shard is None else shard.rows(t, sizes, [r.drew for r in randoms])
    precision = Precision.from_meta(log.meta.get("precision"))
    micro = []
    for k, (m, random) in enumerate(zip(records, randoms)):
        part = None if rows is None else rows[k]
        ids = m.ids if part is None else m.ids[part]
        if part is not None and not len(ids):
            continue
        if m.inputs is not None:
            batch = as_pytree(decode_batch(m.inputs))
            batch = batch if part is None else take_rows(batch, part, len(m.ids))
        elif train_data is None:
            raise ValueError(f"step {t}: the log holds no inputs (InfluenceTracker(store_inputs=True)), so replaying it "
                             "needs train_data (the training samples by id)")
        else:  # cast as the precision plugin did ("64-true": a float32 training set's floats to float64)
            batch = precision.convert_input(batch_from_ids(train_data, ids))
        micro.append(MicroBatch(ids, batch, random, train, k < first_rank, modes))
    return Step(t, micro, precision, log.grad_scale(t), log.skipped(t), None if rows is None else positions(sizes, rows))


def replay_step(module: nn.Module, loss_fn: LossFn, opt: torch.optim.Optimizer, params: Mapping[str, Tensor],
                step: Step, sw: StepWeights, multipliers: Tensor | None, clip: ClipSpec | None,
                shard: BatchShard | None = None, buffers: Mapping[str, Tensor] | None = None) -> None:
    """One optimizer step at ``params`` as Lightning ran it: each micro-batch under its random state and autocast,
    its loss (``mean(ℓ)/A`` as trained, ``Σ m w ℓ`` with ``multipliers``) scaled by the GradScaler factor and
    back-propagated in turn; the summed gradient unscaled and clipped, the optimizer stepped. A step the GradScaler
    skipped changes nothing. With ``shard`` (``step`` holding that process's rows, :func:`load_step`) each process
    back-propagates ``Σ m w ℓ`` over its rows and the gradients are summed over the processes before the clipping
    (every process then takes the same step; not bit-identical to training: the drift check measures it). ``buffers``
    (``step.buffers``) take the forwards' in-place updates, as the module's did in training (the module's own are
    left untouched)."""
    opt.zero_grad(set_to_none=True)
    if step.skipped:
        return
    if shard is not None:
        _shard_gradients(module, loss_fn, params, step, sw, multipliers, shard, buffers)
    else:
        slices = list(sw.micro_slices())
        if len(slices) != len(step.micro):
            raise ValueError(f"step {step.step}: the log's weights describe {len(slices)} micro-batches, its "
                             f"micro-batch rows {len(step.micro)}: the log is inconsistent")
        W = sw.world_size if sw.world_size > 1 and len(slices) % sw.world_size == 0 else 1
        per_rank = len(slices) // W  # a DDP step: each process's micro-batches (rank 0's first), as many on each
        summed: list[Tensor | None] | None = None
        for k, (m, rows) in enumerate(zip(step.micro, slices)):
            with m.context(step.precision, module):
                own = buffers if m.updates_buffers else cloned(buffers)  # DDP: rank 0's forwards carry them
                losses = functional_loss(module, loss_fn, params, m.batch, own)
            loss = sw.micro_loss(losses, rows, None if multipliers is None else multipliers[rows])
            scaled(loss, step.grad_scale).backward()
            if W > 1 and (k + 1) % per_rank == 0:  # DDP sums each process's accumulated gradient, in rank order
                summed = _add_rank_gradients(params, summed)
        if summed is not None:
            for p, g in zip(params.values(), summed):
                p.grad = g
    if step.grad_scale is not None:
        unscale_([p.grad for p in params.values()], step.grad_scale)
    apply_clipping([p for g in opt.param_groups for p in g["params"]], clip)
    opt.step()


def _add_rank_gradients(params: Mapping[str, Tensor], summed: list[Tensor | None] | None) -> list[Tensor | None]:
    """``summed`` plus one process's accumulated ``p.grad`` (then cleared for the next): DDP's all-reduce of 2 processes
    adds the two accumulated gradients, so a replay of rank 0's micro-batches and then rank 1's into one ``p.grad``
    would associate the sum otherwise under gradient accumulation (round-off drift; bit-identical like this)."""
    grads = [p.grad for p in params.values()]
    for p in params.values():
        p.grad = None
    if summed is None:
        return grads
    return [b if a is None else a if b is None else a + b for a, b in zip(summed, grads)]


def _shard_gradients(module: nn.Module, loss_fn: LossFn, params: Mapping[str, Tensor], step: Step, sw: StepWeights,
                     multipliers: Tensor | None, shard: BatchShard, buffers: Mapping[str, Tensor] | None) -> None:
    """``p.grad`` of every parameter: the scaled gradient of ``Σ m_i w_i ℓ_i`` over this process's rows of ``step``,
    summed over the processes (one all-reduce of every gradient together)."""
    off = 0
    for m in step.micro:
        rows = step.rows[off:off + len(m.ids)]
        off += len(m.ids)
        with m.context(step.precision, module):
            losses = functional_loss(module, loss_fn, params, m.batch, buffers if m.updates_buffers else cloned(buffers))
        mult = torch.ones(len(rows)) if multipliers is None else multipliers[torch.as_tensor(rows)]
        scaled(sw.micro_loss(losses, rows, mult), step.grad_scale).backward()
    leaves = list(params.values())
    flat = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in leaves])
    total = shard.all_reduce(flat)
    for p, g in zip(leaves, torch.split(total, [p.numel() for p in leaves])):
        p.grad = g.view_as(p).clone()


def _reanchor(log: InfluenceLog, t: int, params: dict[str, Tensor], opt: torch.optim.Optimizer, anchor: dict[str, Any],
              tolerance: float, report: DriftReport | None, buffers: dict[str, Tensor] | None = None) -> None:
    """At checkpoint ``t``: measure the drift since ``anchor``, stop if beyond ``tolerance``, else continue from the
    stored ``θ_t``, optimizer state and buffers (so float round-off never accumulates past a checkpoint)."""
    stored = log.checkpoint(t)
    for n, p in params.items():
        if stored[n].dtype != p.detach().cpu().numpy().dtype:
            raise ReplayMismatchError(f"replay at step {t}: parameter {n!r} is {p.dtype} in the replay but "
                                      f"{stored[n].dtype} in the log: replay with the dtype the run trained in")
    drift = check_checkpoint(t, stored, params, anchor, tolerance, report)
    if drift > 0:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(torch.from_numpy(np.array(stored[n])).to(p.device))
        load_optimizer_state(opt, [n for g in log.param_groups() for n in g], log.optimizer_state(t))
    if buffers:  # checked and restored as the params: they follow from the same steps
        restore_buffers(t, log.checkpoint_buffers(t), buffers, anchor, tolerance, report)
    anchor.update(step=t, params={n: p.detach().clone() for n, p in params.items()})


def _replay_run(log: InfluenceLog, module: nn.Module, train_data: TrainData, params: dict[str, Tensor],
                opt: torch.optim.Optimizer, start: int, t1: int, t2: int, loss_fn: LossFn, weights: Weights | None,
                verify: bool, tolerance: float | None, report: DriftReport | None,
                progress: Callable[[int, int], None] | None, shard: BatchShard | None = None) -> Iterator[ReplayStep]:
    buffers = cloned(buffers_of(params))  # carried from step to step, as the module's in training (None: its own)
    ckpts = set(log.checkpoint_steps)
    check = verify and weights is None
    tolerance = resolve_tolerance(tolerance)
    anchor: dict[str, Any] = {"step": start, "params": {n: p.detach().clone() for n, p in params.items()},
                              "buffers": cloned(buffers)}
    T = log.num_steps
    for t in range(start, t2):
        if check and t in ckpts and t != start:
            _reanchor(log, t, params, opt, anchor, tolerance, report, buffers)
        ids, lrs = log.batch_ids(t), log.lr(t)
        if t >= t1:
            yield ReplayStep(t, _snapshot(params, buffers), ids, lrs, opt)
        set_step_hyper(opt, log, t)
        w = None
        if weights is not None:
            w = torch.as_tensor(weights(t, ids))
            if w.shape != (len(ids),):
                raise ValueError(f"weights({t}, ids) returned shape {tuple(w.shape)}, expected ({len(ids)},)")
        replay_step(module, loss_fn, opt, params, load_step(log, train_data, t, shard), step_weights(log, t), w,
                    logged_clip_spec(log, t), shard, buffers)
        if progress is not None:
            progress(t - start + 1, t2 - start)
    if check and t2 in ckpts and t2 != start:
        _reanchor(log, t2, params, opt, anchor, tolerance, report, buffers)
    yield ReplayStep(t2, _snapshot(params, buffers), np.zeros(0, np.int64),
                     log.lr(t2) if t2 < T else np.zeros(0), opt)


def _snapshot(params: Mapping[str, Tensor], buffers: Mapping[str, Tensor] | None) -> ParamsWithBuffers:
    """Detached copies of ``θ_t`` and of the buffers carried to step ``t``."""
    return ParamsWithBuffers({n: p.detach().clone() for n, p in params.items()}, cloned(buffers))


def replay(log: InfluenceLog, module: nn.Module, train_data: TrainData, t1: int | None = None, t2: int | None = None, *,
           loss_fn: LossFn = default_loss_fn, weights: Weights | None = None, start: int | None = None,
           verify: bool = True, tolerance: float | None = None, report: DriftReport | None = None,
           progress: Progress = None, shard: BatchShard | None = None) -> Iterator[ReplayStep]:
    """Replay the logged steps and yield ``θ_t`` for ``t`` in ``[t1, t2)``, then the final ``θ_{t2}``.

    Starts from the nearest checkpoint ``<= t1`` (or ``start``, a checkpoint step) with its
    optimizer state, and replays every step with the logged batch, learning rates, per-sample
    weights and clipping (:func:`replay_step`). With ``weights`` the loss of step ``t`` is
    ``Σ_i m_i w_{i,t} ℓ_i`` (removal = ``m_i = 0``, the others' weights are kept: docs/influence-math.md §2).

    Args:
        log: the influence log.
        module: the architecture (its trainable parameters are replaced by the logged ones; the
            live module is never modified).
        train_data: the training samples by id (a dataset or a callable ``ids -> batch``).
        t1, t2: the steps to yield (``t1=None``: the log's first step, 0 or where a resumed fit started the log;
            ``t2=None``: the end of the run).
        loss_fn: ``loss_fn(module, batch) -> Tensor[B]``, the per-sample training loss.
        weights: ``weights(step, ids) -> Tensor[B]``, per-sample multipliers of the logged weights (counterfactuals).
        start: checkpoint step to start from (default: the latest checkpoint ``<= t1``).
        verify: compare the replayed ``θ_t`` with every checkpoint the replay passes and re-anchor
            there (only without ``weights``: a counterfactual is meant to differ).
        tolerance: the largest drift accepted at a checkpoint, relative to how far training moved
            since the previous one (:mod:`lightning_influence.replay_drift`; default 1%, 0 demands
            a bit-identical replay).
        report: a :class:`DriftReport` that collects the drift measured at every checkpoint.
        progress: ``progress(done, total)`` callback, or ``True`` for a bar on stderr.
        shard: replay only this process's rows of every step, the gradients summed over the processes
            (:func:`replay_step`; every process calls alike and gets the same trajectory).

    Raises:
        ReplayMismatchError: a replayed ``θ_t`` drifts from the stored checkpoint beyond ``tolerance``.
        UnsupportedOptimizerError: the logged optimizer cannot be replayed.
    """
    require_train_data(log, train_data, "replay", "to rerun the logged steps")
    T, t0 = log.num_steps, log.first_step
    t2 = T if t2 is None else int(t2)
    t1 = t0 if t1 is None else int(t1)
    if not (t0 <= t1 <= t2 <= T):
        raise ValueError(f"replay range [{t1}, {t2}) is outside the run: need {t0} <= t1 <= t2 <= T = {T} (the log holds "
                         f"steps {t0}..{T - 1})")
    ckpts = log.checkpoint_steps
    if start is None:
        earlier = [c for c in ckpts if c <= t1]
        if not earlier:
            raise ValueError(f"no checkpoint at or before step {t1} to replay from (checkpoints: {ckpts})")
        start = earlier[-1]
    elif start not in ckpts or start > t1:
        raise ValueError(f"start={start} must be a checkpoint step <= t1={t1} (checkpoints: {ckpts})")
    params = checkpoint_params(log, module, start, requires_grad=True)
    opt = build_optimizer(log, params, state_step=start)
    return _replay_run(log, module, train_data, params, opt, start, t1, t2, loss_fn, weights, verify, tolerance, report,
                       resolve_progress(progress, "replay"), shard)


def replay_from(log: InfluenceLog, module: nn.Module, train_data: TrainData, params: Mapping[str, Tensor],
                optimizer_state: dict[str, Any] | None, start: int, t2: int, *, loss_fn: LossFn = default_loss_fn,
                weights: Weights | None = None, verify: bool = True, tolerance: float | None = None,
                report: DriftReport | None = None, progress: Progress = None,
                shard: BatchShard | None = None) -> Iterator[ReplayStep]:
    """Like :func:`replay`, from ``θ_start = params`` (with the buffers it carries, ``step.buffers``) and an
    ``optimizer.state_dict()`` held in memory."""
    leaves = ParamsWithBuffers({n: p.detach().clone().requires_grad_(True) for n, p in params.items()}, buffers_of(params))
    opt = build_optimizer(log, leaves)
    if optimizer_state is not None:
        opt.load_state_dict(optimizer_state)
    return _replay_run(log, module, train_data, leaves, opt, start, start, t2, loss_fn, weights, verify, tolerance,
                       report, resolve_progress(progress, "replay"), shard)


def parameters_at(log: InfluenceLog, module: nn.Module, train_data: TrainData, step: int, **kw: Any) -> dict[str, Tensor]:
    """``θ_step``: the stored checkpoint, or replayed from the nearest earlier one (``kw`` go to :func:`replay`)."""
    if step in log.checkpoint_steps and not kw.get("weights"):
        return checkpoint_params(log, module, step)
    last = None
    for rs in replay(log, module, train_data, step, step, **kw):
        last = rs
    assert last is not None
    return last.params
