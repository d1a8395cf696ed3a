"""The optimizer step in progress as the tracker saw it, and the assembly of its log record.

:class:`~lightning_influence.InfluenceTracker` collects a :class:`TrackedMicroBatch` per
``training_step`` call (ids, inputs, random state, losses, gradients); at
``on_before_optimizer_step`` :func:`assemble` turns them into the step's
:class:`~lightning_influence.log.writer.StepRecord` and its device rows (copied to the host
without blocking, :mod:`lightning_influence.capture.transfer`), which :func:`fill_record`
puts into the record once the copy is done. :func:`checkpoint_record` is ``θ_t`` with the
optimizer state and the module's buffers. The step's weights and clipping come from :class:`.recorder.StepRecorder`.
No Lightning import: the trainer is used through its public attributes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_influence.capture.transfer import HostCopy
from lightning_influence.log.outer import OuterColumns, dense_rows
from lightning_influence.log.records import CheckpointRecord, MicroRecord, StepRecord
from lightning_influence.step import rng
from lightning_influence.step.buffers import persistent_buffers
from lightning_influence.step.micro import MicroBatch
from lightning_influence.step.recorder import StepRecorder

__all__ = ["PendingStep", "TrackedMicroBatch", "assemble", "drop_skipped", "checkpoint_record", "fill_record", "random_states"]

_COPIED_BYTES = 1 << 17  # fill_record copies a step's gradient rows up to this size
_NO_IDS = np.zeros(0, np.int64)  # a record's ids until fill_record; an own pass's micro-batch's (unused there)
_NO_IDS.flags.writeable = False


@dataclass(slots=True)
class TrackedMicroBatch:
    """One ``training_step`` call of the step in progress."""

    ids: Tensor
    batch: Any
    random: rng.RandomState  # at the forward's start (rng.started); reduced to the generators it drew from by settled()
    inputs: bytes | None = None  # the batch as fed, serialised (store_inputs)
    accumulate: int = 1  # Lightning's divisor of this micro-batch's loss
    returned: Tensor | None = None  # the loss Lightning back-propagated (checked against the per-sample losses)
    observed: Tensor | None = None  # per-sample losses seen inside training_step, when it calls per_sample_loss
    losses: Tensor | None = None
    grads: Tensor | None = None
    outer: OuterColumns | None = None  # grads stored with factored blocks (log/outer.py; HookGradientCapture.collect_factored)
    ended: rng.RandomState | None = None  # the states at the backward's end (rng.started then), until settled()
    backward: bool = False  # on_after_backward ran (a training_step that returns None gets no backward)
    buffers: dict[str, Tensor] | None = None  # the module's before the forward, where it changes them (MicroBatch.buffers)

    def dense_grads(self) -> Tensor:
        """``grads`` in the projector's columns (its factored blocks expanded: a new tensor; else ``grads`` itself)."""
        return dense_rows(self.grads, self.outer)

    def settled(self) -> rng.RandomState:
        """The generators the micro-batch's forward and backward drew from, with their states at its forward
        (``rng.drawn`` of ``random`` and ``ended``, once)."""
        if self.ended is not None:
            self.random, self.ended = rng.drawn(self.random, self.ended), None
        return self.random

    @property
    def micro(self) -> MicroBatch:
        """The micro-batch of an own pass; its ids are not used there (and may still be on the device)."""
        return MicroBatch(_NO_IDS, self.batch, self.settled(), buffers=self.buffers)


@dataclass(slots=True)
class PendingStep:
    """The micro-batches of the optimizer step in progress."""

    micro: list[TrackedMicroBatch] = field(default_factory=list)
    batch_idx: int = 0
    step: int = -1  # the trainer's global_step at its micro-batches (read once a hook: a chain of Lightning properties)
    seconds: float = 0.0
    buffers: dict[str, Tensor] | None = None  # at a checkpointed step, the module's buffers before its first forward
    # the trainable parameters before its first forward, where a forward changes them in place (Embedding(max_norm)):
    # θ_t of its checkpoint (or, at the fit's first step, the snapshot that finds out)
    params: dict[str, Tensor] | None = None


def drop_skipped(pending: PendingStep, record_losses: bool) -> bool:
    """Leave out of ``pending`` the micro-batches whose ``training_step`` returned ``None``: Lightning runs no backward
    for them, so their samples take no part in the step, and the others keep Lightning's weights ``1/(A·b)``
    (``step.weights``). A step none of whose micro-batches ran a backward changes nothing (every gradient ``None``:
    each supported ``torch.optim`` rule leaves such parameters and their state as they are); it keeps its micro-batches
    (ids, random states), with NaN losses where recorded, and returns ``True``: the caller records it as skipped
    (``θ_{t+1} = θ_t``, as a step the GradScaler skipped)."""
    if len(pending.micro) == 1 and pending.micro[0].backward:  # the common case
        return False
    ran = [m for m in pending.micro if m.backward]
    if len(ran) == len(pending.micro):
        return False
    if ran:
        pending.micro = ran
        return False
    for m in pending.micro:
        m.losses = torch.full(m.ids.shape, float("nan"), device=m.ids.device) if record_losses else None
        m.grads = m.outer = None
    return True


def step_rows(micro: list[TrackedMicroBatch]) -> tuple[Tensor, OuterColumns | None]:
    """A step's gradient rows, its micro-batches' one under the other, and their factored blocks (one layout a step:
    several micro-batches' rows expanded)."""
    if len(micro) == 1:
        return micro[0].grads, micro[0].outer
    return torch.cat([m.dense_grads() for m in micro]), None


def assemble(trainer: Any, step: int, optimizer: torch.optim.Optimizer, pending: PendingStep, recorder: StepRecorder,
             module: nn.Module, record_losses: bool, grad_norms: bool = False, scaler: Any = None, world_size: int = 1
             ) -> tuple[StepRecord, dict[str, Tensor], dict[str, Tensor], Tensor | None]:
    """``(record, device rows, batch gradient Ĝ_t by parameter, the norms of its tensors)`` of step ``step``.

    ``scaler``: the run's GradScaler (``None``: none); ``world_size``: the trainer's (both fixed for a fit, read once
    by the caller). The record's ids and row fields are filled by :func:`fill_record` once the rows are on the host.
    Refuses a loss reduction other than the mean (at the first step) and an ``accumulate_grad_batches`` changed
    mid-step. The norms (and ``batch_grad_norm``) are computed only where a step needs them: ``grad_norms`` (the HVP
    products' step direction) or norm clipping (its threshold is read against this norm). Otherwise they are
    ``None`` and the log's ``batch_grad_norm`` NaN: a pass over the whole gradient at every step, the largest part
    of the tracker's bookkeeping on a small model, for a column no estimator reads.
    """
    micro = pending.micro
    record = StepRecord(
        step=step, epoch=trainer.current_epoch, batch_idx=pending.batch_idx, micro_batches=len(micro),
        lrs=[float(g["lr"]) for g in optimizer.param_groups], ids=_NO_IDS)  # rows: see fill_record
    # rows are tensors nothing else writes to (fresh, see HostCopy): the ids the batch's (copied by fill_record); the
    # losses the step's own (per_sample_loss's output, which training only reads) or an own pass's
    rows: dict[str, Tensor] = {"ids": micro[0].ids if len(micro) == 1 else torch.cat([m.ids for m in micro])}
    if recorder.checks_reduction:  # a sum or any other reduction than the mean is refused (step.weights): first step
        recorder.check_losses(
            step, [(m.returned, m.observed if m.observed is not None else m.losses, m.accumulate) for m in micro], trainer)
    sizes = [m.ids.shape[0] for m in micro]  # read once (the weights' key, the micro-batch records)
    recorder.record(record, sizes, [m.accumulate for m in micro], world_size, optimizer)
    if record_losses:
        rows["losses"] = micro[0].losses if len(micro) == 1 else torch.cat([m.losses for m in micro])
    if isinstance(record.clip_coef, Tensor):
        rows["clip_coef"] = record.clip_coef
    norm_clip = recorder.spec is not None and recorder.spec.algorithm == "norm"
    # read only where used (the norms, the GradScaler's skip check): a walk over the modules at every step otherwise
    grad_dir = ({n: p.grad for n, p in module.named_parameters() if p.grad is not None}
                if grad_norms or norm_clip or scaler is not None else {})
    norms = None
    if grad_dir and (grad_norms or norm_clip):
        # one fused call (per-tensor kernels on the CPU: the values of vector_norm tensor by tensor)
        norms = torch.stack(torch._foreach_norm(list(grad_dir.values())))
        rows["batch_grad_norm"] = torch.linalg.vector_norm(norms)  # the HVP products reuse the norms (step direction)
    record_execution(scaler, record, micro, sizes, grad_dir)
    return record, rows, grad_dir, norms


def record_execution(scaler: Any, record: StepRecord, micro: list[TrackedMicroBatch], sizes: list[int],
                     grads: dict[str, Tensor]) -> None:
    """Micro-batch sizes (``sizes``) and inputs, the GradScaler factor and whether it skips this step (``scaler``: the
    run's GradScaler, ``None`` without one). The random states are set by :func:`fill_record` (see
    :func:`random_states`)."""
    record.micro = [MicroRecord(size, inputs=m.inputs) for m, size in zip(micro, sizes)]
    if scaler is not None:
        record.grad_scale = float(scaler.get_scale())
        # on_before_optimizer_step runs after GradScaler.unscale_: a non-finite gradient makes it skip the step
        # one device sync (GradScaler.step makes the same one)
        record.skipped = bool(grads) and not bool(torch.stack([torch.isfinite(g).all() for g in grads.values()]).all())


def random_states(micro: list[TrackedMicroBatch]) -> list[tuple[rng.RandomState, rng.RandomState | None]]:
    """The ``(random, ended)`` states of each micro-batch, for :func:`fill_record` to reduce (``rng.drawn``) when the
    step is handed to the writer: a few steps at a time, on warm caches."""
    return [(m.random, m.ended) for m in micro]


def fill_record(record: StepRecord, checkpoint: CheckpointRecord | None, host: dict[str, Any]) -> None:
    """Put the host copies of a step's rows (and checkpoint) made by :func:`assemble`, and the generators each
    micro-batch drew from (``host["random"]``, :func:`random_states`), into its records."""
    for rec, (start, end) in zip(record.micro, host["random"]):
        state = start if end is None else rng.drawn(start, end)
        rec.cpu_rng, rec.cuda_rng = state.cpu, state.cuda if state.cuda.size else None
    rows = host["rows"]
    record.ids = rows["ids"].copy()  # the batch's own ids, where one micro-batch made the step (assemble)
    if "losses" in rows:
        record.losses = rows["losses"].copy()  # in their own dtype: the segment stores them as float64
    grads = rows.get("grads")  # small rows are copied, as the losses: allocated among the step's transient tensors and
    # held until the segment closes, they fragmented the heap (the MLP's factored rows, 50 KB: 46-94 page faults a step
    # on the training thread against 13-18 copied); a copy of larger rows (the GPT's 1 MB) cost more than it saved
    record.grads = grads.copy() if grads is not None and grads.nbytes <= _COPIED_BYTES else grads
    record.hvps = rows.get("hvps")
    for name in ("batch_grad_norm", "clip_coef", "hvp_eps"):  # NaN (the records' default) where not computed
        if name in rows:
            setattr(record, name, float(rows[name]))
    if checkpoint is not None:
        checkpoint.params, checkpoint.optimizer_state, checkpoint.buffers = host["checkpoint"]


def checkpoint_record(module: nn.Module, optimizer: torch.optim.Optimizer, step: int, wait: bool = True,
                      buffers: dict[str, Tensor] | None = None, params: dict[str, Tensor] | None = None) -> CheckpointRecord:
    """``θ_step``, the optimizer state and the module's buffers (``buffers``: taken before the step's forward changed
    them, :func:`~lightning_influence.step.buffers.persistent_buffers`; default the module's now; ``params`` likewise,
    by name, for a forward that changes parameters in place): numpy copies, or (``wait=False``) tensors for a
    HostCopy."""
    record = CheckpointRecord(step=step, params={})
    record.buffers = {n: b.detach() for n, b in (persistent_buffers(module) if buffers is None else buffers).items()}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        record.params[name] = p.detach() if params is None else params[name]
        state = optimizer.state.get(p, {})
        tensors = {k: v.detach() for k, v in state.items() if isinstance(v, torch.Tensor)}
        if tensors:
            record.optimizer_state[name] = tensors
        scalars = {k: float(v) for k, v in state.items() if isinstance(v, (int, float))}
        if scalars:
            record.optimizer_scalars[name] = scalars
    if wait:
        record.params, record.optimizer_state, record.buffers = HostCopy(
            (record.params, record.optimizer_state, record.buffers)).wait()
    return record
