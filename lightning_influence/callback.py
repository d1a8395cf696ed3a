"""``InfluenceTracker``: the Lightning callback that records what influence estimation needs.

At every optimizer step ``t`` it records, into the HDF5 log (``docs/log-format.md``), the
ids of ``B_t`` (all micro-batches), the learning rate of every param group and, as
configured, per-sample losses, per-sample gradients ``g_{i,t}`` at ``θ_t`` (optionally
projected), finite-difference Hessian-gradient products ``H_{z,t} Ĝ_t`` and checkpoints of
``θ_t`` with the optimizer state. It never computes influence scores: that is the
estimators' job, offline.

Per-sample gradients come, cheapest first, from the step's own backward pass (module hooks
on common layers, :mod:`lightning_influence.capture.layers`, when ``training_step`` computes
its loss through the module's ``per_sample_loss``), from an own hooked forward/backward pass,
or from ``torch.func.vmap`` (exact for any architecture; only for the parameters no hook covers). The tracker leaves training untouched:
its own passes run on parameter copies with the RNG forked and restored.

This module holds the configuration and the per-batch hooks (the per-step path); the once-per-fit hooks (start,
end, checkpoints, exceptions) are its base class's, :mod:`lightning_influence.tracker_lifecycle`. It only wires
Lightning's hooks: the own passes are :mod:`lightning_influence.capture.own_pass`,
the step's record :mod:`lightning_influence.step.pending` (weights and clipping: :mod:`.step.recorder`),
the refusals :mod:`lightning_influence.tracker_checks`, ``meta.h5`` :mod:`lightning_influence.tracker_meta`.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_influence.capture import HookGradientCapture, KroneckerProjector
from lightning_influence.capture.hvp import tracker_eps0
from lightning_influence.capture.own_pass import LossObserver, OwnPasses
from lightning_influence.capture.transfer import HostCopy
from lightning_influence.data import IdsFn, batch_size_of, check_ids, extract_ids
from lightning_influence.log.inputs import encode_batch
from lightning_influence.log.lock import WriterLock
from lightning_influence.log.outer import OuterColumns, dense_rows
from lightning_influence.log.resume import with_fit_record
from lightning_influence.log.writer import SEGMENT_BYTES, CheckpointRecord, LogWriter, StepRecord
from lightning_influence.step import rng
from lightning_influence.step.buffers import changed_buffers, cloned, persistent_buffers, trainable_copies
from lightning_influence.step.modes import ModeWatch
from lightning_influence.step.pending import (PendingStep, TrackedMicroBatch, assemble, checkpoint_record, drop_skipped,
                                              random_states, step_rows)
from lightning_influence.step.precision import FULL, Precision
from lightning_influence.step.recorder import StepRecorder
from lightning_influence.tensorboard import LiveTensorBoard
from lightning_influence.tracker_checks import (UpdateWatch, check_applied_gradient, check_arguments, check_batchnorm,
                                                check_distinct_ids, check_first_batch, check_losses,
                                                check_ranks_distinct, demoted_columns, distributed_padding,
                                                no_stop_iteration, synced_batchnorm)
from lightning_influence.tracker_final import FinalCheckpoint
from lightning_influence.tracker_inflight import IN_FLIGHT, InFlight
from lightning_influence.tracker_dev_run import DevRun
from lightning_influence.tracker_lifecycle import TrackerLifecycle

LossFn = Callable[[nn.Module, Any], torch.Tensor]


class InfluenceTracker(TrackerLifecycle):
    """Record batch membership, learning rates, per-sample losses/gradients, HVP products and checkpoints.

    Args:
        log_dir: directory of the influence log (created; one sub-folder per rank).
        record_losses: record per-sample losses ``ℓ(z_i; θ_t)`` at every step.
        record_gradients: record per-sample gradients ``g_{i,t}`` of the tracked parameters.
        record_hvp: record finite-difference products ``H_{z,t} Ĝ_t`` (needs ``record_gradients``); their passes run at
            perturbed parameters written into one copy of the trainable parameters, kept for the fit.
        every_n_steps: record gradients/HVP products at steps ``t % every_n_steps == 0`` (ids,
            learning rates and losses are recorded at every step).
        checkpoint_every_n_steps: store ``θ_t`` and the optimizer state every this many steps;
            ``None`` stores only ``θ_0`` and the final ``θ_T``.
        params: ``fnmatch`` patterns of the parameter names to track (``None``: all trainable).
        exclude_params: patterns of parameter names to leave out.
        projection_dim: per parameter tensor, the dimension of the seeded Kronecker random
            projection of gradients; ``None`` stores full gradients.
        projection_seed: seed of the projection (stored, so readers regenerate it).
        fold_bias: fold the bias of a Linear/Conv layer into its weight's projection (one block, the gradient
            of ``[W b]``, instead of a weight block and a bias block) where the weight is projected and both
            are tracked, in one optimizer param group and used by that layer alone: fewer columns, less work
            (``docs/per-sample-gradients.md``). ``False``: every tensor its own block (the layout of logs
            written before folding). ``None`` (default): fold, except that a fit resumed into an existing log
            keeps that log's layout; an explicit value that differs from the log's is refused.
        storage_dtype: dtype of gradient/HVP rows on disk: ``float16``, ``float32`` or ``float64``. A row value
            beyond its range (float16: 65504) is refused at its step (``FloatingPointError``), never stored as inf.
        compression: h5py filter for gradient rows: ``None``, ``"gzip"`` or ``"lzf"``.
        loss_fn: ``loss_fn(module, batch) -> Tensor[B]`` of per-sample losses; default: the
            module's ``per_sample_loss(batch)`` method. The training loss must be their mean
            (docs/influence-math.md §1; checked at the first step, another reduction stops the fit); route
            ``training_step`` through it to get gradients for free. Gradient accumulation (incomplete
            accumulations included) and the Trainer's gradient clipping are recorded per step
            (``docs/step-semantics.md``).
        ids_key: key of the ids in dict batches.
        ids_fn: ``ids_fn(batch) -> Tensor[B]``, for batches of another shape.
        gradient_engine: ``"auto"`` (hooks for the parameters of Linear, Conv, Embedding, norm and attention
            layers, ``vmap`` for the others), ``"hooks"`` (refuses other parameters), ``"vmap"``.
        hvp_eps: ``ε_0`` of the finite differences, ``ε = ε_0 (1 + ||θ||) / √p``; ``None`` (default): 1e-3, or
            under half precision (bf16/16 autocast, float16 parameters) ``u^{1/3}`` of that dtype (``tracker_eps0``).
        hvp_scheme: ``"central"`` (two extra per-sample-gradient passes at ``θ ± ε Ĝ_t``, error
            ``O(ε²)``; a sample whose two one-sided differences disagree, because one side
            crossed a ReLU kink, keeps the other) or ``"forward"`` (one pass at ``θ + ε Ĝ_t``
            against the step's own per-sample gradients, error ``O(ε)``; in float32 about twice
            the central error at the same ``ε_0``); see :mod:`lightning_influence.capture.hvp`.
        flush_every_n_steps: steps per segment file (``None``, the default: by time and size).
        flush_every_n_seconds: a segment file closes once it has been open this long, or (with
            ``flush_every_n_steps=None``) holds 64 MiB of rows and parameters, whichever comes first.
            A kill loses only steps not yet in a closed segment, at most four segments' worth (the
            buffer and the segments being written or queued: by default about 40 s of training);
            every Lightning checkpoint first flushes and waits, so a resumed fit never misses a step
            (``docs/log-format.md``, crash safety). Smaller loses less; larger writes fewer files.
        store_inputs: store the exact inputs of every micro-batch (the batch as ``training_step``
            received it, after collation and augmentation; ``torch.save`` bytes), so replay and the
            estimators need no dataset and are immune to random augmentation. Without it, a dataset
            whose ``ds[i]`` is not deterministic is refused at the first step.
        allow_train_batchnorm: accept train-mode BatchNorm (per-sample gradients then depend on
            the other samples of the batch; the records are not per-sample quantities).
        overwrite: replace an existing log in ``log_dir`` when a new (non-resumed) fit starts, or
            when a resumed fit cannot continue the log there (another run's log, or steps missing).
            A resumed fit (``Trainer.fit(ckpt_path=...)``) otherwise continues the log: steps from the
            checkpoint's step on are dropped and recorded again, never duplicated.
        store_data: store the training and validation sets in the log (``data.pt``) so the CLI can answer
            from the log alone: ``None`` (default) stores them for plain DataLoaders given to ``fit`` when
            under 64 MiB (a datamodule is rebuilt from its recorded recipe instead), ``True`` always,
            ``False`` never (see :mod:`lightning_influence.recipe`).

    Raises:
        ValueError: on an invalid configuration, at construction.
    """

    def __init__(
        self,
        log_dir: str,
        *,
        record_losses: bool = True,
        record_gradients: bool = False,
        record_hvp: bool = False,
        every_n_steps: int = 1,
        checkpoint_every_n_steps: int | None = None,
        params: list[str] | None = None,
        exclude_params: list[str] | None = None,
        projection_dim: int | None = None,
        projection_seed: int = 0,
        fold_bias: bool | None = None,
        storage_dtype: str = "float32",
        compression: str | None = None,
        loss_fn: LossFn | None = None,
        ids_key: str = "ids",
        ids_fn: IdsFn | None = None,
        gradient_engine: str = "auto",
        hvp_eps: float | None = None,
        hvp_scheme: str = "central",
        flush_every_n_steps: int | None = None,
        flush_every_n_seconds: float | None = 10.0,
        store_inputs: bool = False,
        allow_train_batchnorm: bool = False,
        overwrite: bool = False,
        store_data: bool | None = None,
    ) -> None:
        check_arguments(**locals())  # tracker_checks.py: a bad value is refused here, naming it
        self.log_dir = str(log_dir)
        self.record_losses = record_losses
        self.record_gradients = record_gradients
        self.record_hvp = record_hvp
        self.every_n_steps = every_n_steps
        self.checkpoint_every_n_steps = checkpoint_every_n_steps
        self.params = params
        self.exclude_params = exclude_params
        self.projection_dim = projection_dim
        self.projection_seed = projection_seed
        self.fold_bias = fold_bias
        self.storage_dtype = storage_dtype
        self.compression = compression
        self.loss_fn = loss_fn
        self.ids_key = ids_key
        self.ids_fn = ids_fn
        self.gradient_engine = gradient_engine
        self.hvp_eps = hvp_eps
        self.hvp_scheme = hvp_scheme
        self.flush_every_n_steps = flush_every_n_steps
        self.flush_every_n_seconds = flush_every_n_seconds
        self.allow_train_batchnorm = allow_train_batchnorm
        self.overwrite = overwrite
        self.store_data = store_data
        self.store_inputs = store_inputs
        self._precision: Precision = FULL
        self._scaler: Any = None  # the run's GradScaler, if any
        self._world_size, self._global_zero = 1, True
        self._checked_dataset = False
        # runtime state
        self._writer: LogWriter | None = None
        self._names: list[str] = []
        self._projector: KroneckerProjector | None = None
        self._capture: HookGradientCapture | None = None
        self._engine: str = "none"
        self._demoted: dict[str, int] = {}  # tensors the hooks handed to vmap in this fit: the step they left at
        self._noted = 0  # demotions of the capture (HookGradientCapture.demoted) in meta.h5
        self._continued = False  # this fit continues a log (a resume)
        self._vmap_names: list[str] = []  # tracked parameters no hook covers
        self._verified = False  # the hook engine was checked against autograd at this fit's first recorded step
        self._factored = False  # gradient rows with factored blocks (on_train_start)
        self._applied_checked = False  # the applied gradient was checked against the rows (check_applied_gradient)
        self._agreed = False  # the processes took the union of their demotions (tracker_ranks), once per fit
        self._pending = PendingStep()
        self._observer: LossObserver | None = None  # per_sample_loss as training_step calls it (no loss_fn)
        self._passes: OwnPasses | None = None  # the tracker's own passes (capture/own_pass.py)
        self._checked_batchnorm = False
        self._forward_buffers: bool | None = None  # a training forward changes buffers (spectral_norm); None: not known
        self._forward_params: bool | None = None  # ... or parameters in place (Embedding(max_norm)); None: not known
        self._steps_recorded = 0
        self._first_step: int | None = None  # step whose θ_t starts a new log (None: continuing one)
        self._next_step: int | None = None
        self._fit_start = 0  # global step at which this fit started
        self._run_id: str | None = None
        self._recorded_dir: str | None = None  # the log_dir of the fit this tracker recorded last (in this process)
        self._resume_state: dict[str, Any] = {}
        self._live: LiveTensorBoard | None = None  # running signals in the trainer's TensorBoard, if any
        self._lock: WriterLock | None = None  # this rank's exclusive writer lock, held from on_train_start to teardown
        self._with_ids = False  # the training set is a WithIds: (x, ids) batches carry ids
        self._dataset_size: int | None = None
        self._in_flight = InFlight()  # recorded steps on their way to the writer (tracker_inflight.py)
        self._step_model = StepRecorder()  # sample weights and gradient clipping of each step
        self._dev_run = DevRun()  # fast_dev_run writes its log to a temporary folder
        self._final = FinalCheckpoint()  # θ_T as the last step left it (a weight-averaging callback replaces it)
        self._modes = ModeWatch()  # the submodules' train/eval modes, checked per epoch (step/modes.py)
        self._update_watch = UpdateWatch()  # the logged learning rates and hyperparameters are the ones the update used

    # ------------------------------------------------------------------------------ config
    @property
    def _needs_loss(self) -> bool:
        return self.record_losses or self.record_gradients

    def state_dict(self) -> dict[str, Any]:
        """What a resumed fit needs: which log (``log_dir``, ``run_id``) and where it continues (``next_step``)."""
        return {"log_dir": self.log_dir, "steps_recorded": self._steps_recorded, "run_id": self._run_id,
                "next_step": self._next_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep a resumed fit's :meth:`state_dict` for ``on_train_start``, which continues the log from it."""
        self._steps_recorded = int(state_dict.get("steps_recorded", 0))
        self._resume_state = dict(state_dict)

    def _segment_limits(self) -> dict[str, Any]:
        """When a segment closes besides ``flush_every_n_steps``: its age and, by default, its size."""
        return {"flush_every_n_seconds": self.flush_every_n_seconds,
                "max_segment_bytes": SEGMENT_BYTES if self.flush_every_n_steps is None else None}

    # ---------------------------------------------------------------------------- per batch
    @no_stop_iteration
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        t0 = time.perf_counter()
        if not self._checked_batchnorm:
            self._checked_batchnorm = True
            train_bn = self._check_batchnorm(pl_module)
            if train_bn:  # replay must run them in train mode (step.micro.MicroBatch.train)
                synced = synced_batchnorm(pl_module, train_bn, self._world_size)  # across processes: not reproducible
                self._settle({"train_batchnorm": train_bn, **({"sync_batchnorm": synced} if synced else {})})
        # the ids' values are checked with the step's, when it is handed to the writer (_land): at once at a fit's
        # first step, a few steps at a time after it (device ids: once on the host)
        ids = extract_ids(batch, self.ids_key, self.ids_fn, checked=False, with_ids=self._with_ids)
        accumulate = int(trainer.accumulate_grad_batches)
        if accumulate > 1 or self._pending.micro:  # micro-batches of one step: host ids alone, then across them
            if ids.device.type == "cpu":
                check_ids(ids, self.ids_key, self._dataset_size)
            check_distinct_ids(trainer.global_step, [m.ids for m in self._pending.micro], ids)
        if not self._checked_dataset:
            self._checked_dataset = True
            check_first_batch(trainer.train_dataloader, batch, ids, pl_module, self.ids_key, self._dataset_size,
                              self.store_inputs)
        step = self._pending.step = trainer.global_step  # the same for every micro-batch of the step
        checkpoint = not self._pending.micro and self._checkpoints_at(step)
        if self._modes.observe(pl_module, step, batch_idx, checkpoint, self._writer if self._global_zero else None):
            self._check_batchnorm(pl_module)  # modes changed after the fit's first step: as at that step
        if checkpoint:  # θ_t's buffers: before the forward updates them
            self._pending.buffers = cloned(persistent_buffers(pl_module))
        if (checkpoint and self._forward_params) or (self._forward_params is None and not self._pending.micro):
            self._pending.params = trainable_copies(pl_module)  # θ_t before a forward that changes it in place
        before = None  # the buffers its forward starts from, where a forward changes them (known at the first one)
        if self._forward_buffers is not False:
            before = self._pending.buffers if checkpoint else cloned(persistent_buffers(pl_module))
        self._pending.micro.append(TrackedMicroBatch(ids=ids, batch=batch, random=rng.started(),
                                                     inputs=encode_batch(batch) if self.store_inputs else None,
                                                     accumulate=accumulate, buffers=before))
        self._pending.batch_idx = batch_idx
        observer = self._observer
        if observer is not None:
            if observer.losses or observer.grads:  # a training_step without a backward left them (else: cleared there)
                observer.clear()
            observer.capturing = True
        if self._capture is not None:
            if self._records_grads(step):
                self._capture.enable()
                self._capture.watch(int(ids.shape[0]))  # raw parameters: until on_before_backward (capture/raw_params.py)
            else:
                self._capture.disable()
        self._pending.seconds += time.perf_counter() - t0

    def _check_batchnorm(self, pl_module: pl.LightningModule) -> list[str]:
        """The BatchNorm layers in train mode, refused unless allowed (``tracker_checks.check_batchnorm``)."""
        return check_batchnorm(pl_module, self.allow_train_batchnorm, self._vmap_names if self.record_gradients else [],
                               self._needs_loss)

    @no_stop_iteration
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if self._capture is not None:
            self._capture.unwatch()
        if self._pending.micro and self._step_model.checks_reduction:  # read at the first step only (StepRecorder)
            self._pending.micro[-1].returned = loss.detach()

    @no_stop_iteration
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        t0 = time.perf_counter()
        micro = self._pending.micro[-1]
        micro.ended = rng.started()  # what dropout drew from (TrackedMicroBatch.settled): recorded, restored by own passes
        micro.backward = True
        if self._forward_buffers is None and micro.buffers is not None:  # the fit's first forward: did it change any?
            self._forward_buffers = bool(changed_buffers(pl_module, micro.buffers, persistent_buffers(pl_module)))
            micro.buffers = micro.buffers if self._forward_buffers else None
        if self._forward_params is None and self._pending.params is not None:  # and any parameter (in place)?
            changed = changed_buffers(pl_module, self._pending.params, trainable_copies(pl_module, clone=False))
            self._forward_params = bool(changed)
            if changed:  # its checkpoints hold θ_t from before the forward; DIT says what it leaves out
                self._settle({"forward_changes_params": changed})
            else:
                self._pending.params = None
        captured = seen_grad = None
        observer = self._observer
        if observer is not None:  # per_sample_loss as training_step called it
            seen, seen_grad = observer.losses, observer.grads
            observer.capturing = False
            observer.clear()
            n = micro.ids.shape[0]
            if len(seen) == 1 and seen[0].shape == (n,):  # the common case: one loss per sample
                captured = micro.observed = seen[0].detach()
            else:
                for out in seen:  # a reduced (0-d) loss is a mistake
                    if out.dim() == 0:
                        check_losses(out, n, f"{type(pl_module).__name__}.per_sample_loss(batch)")
        want_grads = self.record_gradients and self._records_grads(self._pending.step)
        if want_grads and self._capture is not None and captured is not None and len(seen_grad) == 1:
            if self._factored and micro.accumulate == 1 and not self._vmap_names:  # factored blocks (log/outer.py)
                micro.grads, blocks = self._capture.collect_factored(seen_grad[0])
                micro.outer = OuterColumns(self._projector.out_dim, blocks) if blocks else None
            else:
                micro.grads = self._capture.collect(seen_grad[0])
            micro.losses = micro.observed
            if not self._verified:  # once per fit: one hooked row against autograd on its sample alone
                self._verified = True
                dense = micro.dense_grads()
                if self._capture.verify(pl_module, self._loss, micro.batch, dense):  # demoted: their columns zeroed
                    micro.grads, micro.outer = dense, None
            if len(self._capture.param_names) + len(self._vmap_names) != len(self._names):  # a demotion: vmap takes over
                self._vmap_names = [n for n in self._names if n not in self._capture.param_names]
            if self._vmap_names:  # parameters no hook covers: vmap (or, with dropout, the step's masks) for just those
                micro.grads, micro.outer = micro.dense_grads(), None
                micro.grads += self._passes.rest_grads(pl_module, micro.micro, self._vmap_names, None)
        elif want_grads:
            if self._capture is not None:
                self._capture.clear()  # discard partial captures of a non-conforming forward
            micro.grads, micro.losses = self._passes.grads(pl_module, micro.micro, None)
        elif self.record_losses:
            micro.losses = micro.observed if captured is not None else self._passes.losses(pl_module, micro.micro)
        if self._capture is not None:
            self._capture.disable()
        self._pending.seconds += time.perf_counter() - t0

    @no_stop_iteration
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        t0 = time.perf_counter()
        pending, self._pending = self._pending, PendingStep()
        if not pending.micro:
            raise RuntimeError(f"step {trainer.global_step}: optimizer step without a recorded training batch")
        step = pending.step  # global_step at its batches' start (it moves only once the optimizer has stepped)
        no_op = drop_skipped(pending, self.record_losses)  # training_step returned None: Lightning ran no backward
        if self._world_size > 1 and self._capture is not None and not self._agreed and self._records_grads(step):
            self._agreed = True  # every process here at once: its first step with gradients
            self._agree_on_engines(trainer, pl_module, pending)
        record, rows, grad_dir, grad_norms = assemble(trainer, step, optimizer, pending, self._step_model, pl_module,
                                                      self.record_losses, self.record_hvp, self._scaler, self._world_size)
        record.skipped = record.skipped or no_op
        if self._world_size > 1 and step == self._fit_start:  # every process here at once: the fit's first step
            check_ranks_distinct(step, rows["ids"], trainer.strategy.all_gather,
                                 distributed_padding(trainer.train_dataloader))
        self._update_watch.expect(step, record, optimizer)  # record.hyper: what a schedule changed (step/hyper.py)
        if self.record_gradients and step % self.every_n_steps == 0 and not record.skipped:  # (_records_grads)
            rows["grads"], record.grad_outer = step_rows(pending.micro)
            if not self._applied_checked:  # once per fit (under DDP a collective: every process is at this step)
                self._applied_checked = True
                reduce = None if self._world_size == 1 else functools.partial(trainer.strategy.reduce, reduce_op="sum")
                left_out = demoted_columns(self._projector, self._capture.demoted if self._capture else (), pl_module,
                                           self._names)
                found = check_applied_gradient(step, dense_rows(rows["grads"], record.grad_outer), record.weights,
                                               self._projector.project, pl_module, self._names, self._precision, reduce,
                                               left_out)
                if self._global_zero:  # this fit's finding (a resumed fit's in its resumes entry)
                    self._writer.amend_meta(functools.partial(with_fit_record, values={"applied_gradient_check": found},
                                                              resumed=self._continued))
            if self.record_hvp:
                rows["hvps"], rows["hvp_eps"] = self._passes.hvp_products(pl_module, [m.micro for m in pending.micro],
                                                                           rows["grads"], grad_dir, grad_norms)
        if self._capture is not None and len(self._capture.demoted) != self._noted:
            self._note_demotions(step)
        checkpoint = None  # θ_t is the same on every rank: rank 0 stores it
        if self._checkpoints_at(step):
            checkpoint = checkpoint_record(pl_module, optimizer, step, wait=False, buffers=pending.buffers,
                                           params=pending.params)
        record.recorded_at = time.perf_counter()
        record.tracker_seconds = pending.seconds + record.recorded_at - t0
        # the host copies start now (θ_t before the optimizer changes it), non-blocking from a GPU
        copy = HostCopy.of_step(rows, None if checkpoint is None else (checkpoint.params, checkpoint.optimizer_state,
                                                                      checkpoint.buffers),
                                random_states(pending.micro))
        # stored once Lightning's clipping of this step has been checked (step.recorder), else right away
        self._step_model.after_clipping(lambda: self._add_step(record, checkpoint, copy))

    def _checkpoints_at(self, step: int) -> bool:  # rank 0 stores θ_t (the same on every rank)
        every = self.checkpoint_every_n_steps
        return self._global_zero and (step == self._first_step or bool(every and step % every == 0))

    def _add_step(self, record: StepRecord, checkpoint: CheckpointRecord | None, copy: HostCopy) -> None:
        """Queue the step for the writer and hand on finished ones (``tracker_inflight``)."""
        self._in_flight.add(record, checkpoint, copy)
        self._land(0 if record.step == self._fit_start else IN_FLIGHT)
        self._steps_recorded += 1
        self._next_step = record.step + 1

    def _land(self, keep: int = 0) -> None:
        """Hand the steps in flight beyond ``keep`` (and any whose copies are done) to the writer."""
        self._in_flight.land(self._writer, self.ids_key, self._dataset_size, self._live, keep)

    @no_stop_iteration
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._capture is not None:  # a training_step that returned no loss: no backward
            self._capture.unwatch()
            if self._pending.micro and not self._pending.micro[-1].backward:
                self._capture.clear()  # what its forward captured (no gradient will come)
        self._step_model.commit()  # a step whose clipping hook did not run (none does in automatic optimization)

    # ----------------------------------------------------------------------------- capture
    def _records_grads(self, step: int) -> bool:
        return self.record_gradients and step % self.every_n_steps == 0

    def _loss(self, module: nn.Module, batch: Any) -> torch.Tensor:
        if self.loss_fn is not None:
            out, name = self.loss_fn(module, batch), "loss_fn(module, batch)"
        else:
            out = self._observer.original(batch) if self._observer is not None else module.per_sample_loss(batch)
            name = f"{type(module).__name__}.per_sample_loss(batch)"
        check_losses(out, batch_size_of(batch), name)
        return out

    def hvp_eps0(self, pl_module: nn.Module) -> float:
        """The ``ε_0`` of this fit's HVP rows: ``hvp_eps``, else the default for the dtype of the tracked parameters,
        in which the HVP passes run (without autocast: ``OwnPasses.hvp_products``; ``capture.hvp.tracker_eps0``)."""
        if self.hvp_eps is not None:
            return float(self.hvp_eps)
        params = dict(pl_module.named_parameters())
        return tracker_eps0(params[self._names[0]].dtype if self._names else torch.float32)

