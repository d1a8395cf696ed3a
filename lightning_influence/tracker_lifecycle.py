"""The fit lifecycle of :class:`~lightning_influence.callback.InfluenceTracker`: what happens once per fit.

``on_train_start`` chooses the tracked parameters, the projection and the gradient engine, checks the fit and opens (or
continues) the log; ``on_train_end``/``on_fit_end``/``on_exception`` store ``θ_T`` and close it; checkpoints flush it.
The engine's bookkeeping (demotions agreed across ranks, ``meta.h5`` amendments) lives here too. The per-batch hooks,
the per-step path, are in :mod:`lightning_influence.callback`, whose class this one is the base of (never used alone).
"""

from __future__ import annotations

import functools
import json
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_influence.capture import KroneckerProjector, select_params
from lightning_influence.capture.layers import foldable_biases
from lightning_influence.capture.own_pass import LossObserver, OwnPasses, choose_engine
from lightning_influence.log.resume import (check_not_refit, continue_log, logged_fold_bias, logged_demotions,
                                           logged_param_groups, logged_splits, start_new_log, with_settled)
from lightning_influence.log.writer import LogWriter, acquire_writer_lock, write_meta
from lightning_influence.step.frozen import changed_frozen, mark_changed
from lightning_influence.step.pending import PendingStep
from lightning_influence.tensorboard import LiveTensorBoard
from lightning_influence.tracker_checks import (check_fit, check_materialized, check_optimizers, check_training_set,
                                                generators_kept, trainer_precision)
from lightning_influence.tracker_final import store_missing_final
from lightning_influence.tracker_meta import engine_metadata, fit_metadata
from lightning_influence.tracker_ranks import agree_on_demotions, refill_columns


class TrackerLifecycle(Callback):
    """The once-per-fit hooks of ``InfluenceTracker`` (its base class; its state is set up in its ``__init__``)."""

    # ------------------------------------------------------------------------ fit lifecycle
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_fit(trainer, pl_module, self._needs_loss, self.loss_fn is not None)
        self._dev_run.start(trainer, self)  # fast_dev_run: a temporary log (tracker_dev_run.py)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """A ``fast_dev_run``'s temporary log is removed (``tracker_dev_run``)."""
        self._dev_run.end(trainer, self)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_materialized(pl_module)  # lazy layers take their shapes in a forward: the sanity check's, or none yet
        optimizer, rule = check_optimizers(trainer.optimizers)
        names = {id(p): n for n, p in pl_module.named_parameters()}
        self._names = select_params(pl_module, self.params, self.exclude_params) if self._needs_loss else []
        shapes = {n: tuple(dict(pl_module.named_parameters())[n].shape) for n in self._names}
        groups = [g["params"] for g in optimizer.param_groups]
        fold_bias = self.fold_bias if self.fold_bias is not None else logged_fold_bias(
            self.log_dir, trainer.global_step)  # log/resume.py
        fold = foldable_biases(pl_module, self._names, groups) if fold_bias else None
        self._projector = KroneckerProjector(shapes, self.projection_dim, self.projection_seed, fold)
        kept = logged_splits(self.log_dir, trainer.global_step, self._projector)  # a resumed log's own split
        if kept:
            self._projector = KroneckerProjector(shapes, self.projection_dim, self.projection_seed, fold, kept)
        self._precision = trainer_precision(trainer)
        # fixed for the fit, read once (each a chain of Lightning properties at every step otherwise)
        self._scaler = getattr(trainer.precision_plugin, "scaler", None) if self._precision.grad_scaler else None
        self._world_size, self._global_zero = trainer.world_size, trainer.is_global_zero
        self._demoted = logged_demotions(self.log_dir, trainer.global_step)  # a resumed fit keeps the log's
        self._noted = 0
        self._setup_engine(pl_module)
        # a Linear on (B, in)'s blocks stored as their factors: not where the HVP passes difference the step's rows, nor
        # where ranks exchange columns, nor into float16 (factors multiplied by a reader there would lose precision)
        self._factored = (self.record_gradients and not self.record_hvp and self._world_size == 1
                          and self.storage_dtype != "float16")
        self._with_ids, self._dataset_size = check_training_set(trainer.train_dataloader, self.ids_fn is not None)
        clipping = self._step_model.start(trainer, pl_module, self)
        start = trainer.global_step
        resume_state, self._resume_state = self._resume_state, {}
        check_not_refit(self.log_dir, self._run_id, resume_state, start)  # log/resume.py: fit called again
        with generators_kept():  # what a resumed fit's rows would mean, to compare with the log's meta.h5
            fit_meta = {**self._metadata(trainer, pl_module, optimizer, names, start, recipe=False),
                        "gradient_clipping": clipping}
        fit_meta = json.loads(json.dumps(fit_meta))
        self._lock = acquire_writer_lock(self.log_dir, trainer.global_rank)  # before any file of the log is touched
        continued, self._first_step, resume_meta = (False, None, None) if start == 0 else continue_log(
            self.log_dir, trainer.global_rank, trainer.world_size, trainer.is_global_zero, start, resume_state, fit_meta,
            self.overwrite)  # log/resume.py
        self._continued = continued
        self._update_watch.install(optimizer, rule, logged_param_groups(self.log_dir) if continued else None,  # log/resume.py
                                   names)
        if not continued:
            self._demoted = {}
            if self._run_id is not None and self._recorded_dir == self.log_dir and trainer.is_global_zero:
                warnings.warn(f"InfluenceTracker: this fit starts a new log in {self.log_dir} (overwrite=True), "
                              f"replacing the log of this tracker's earlier fit (run {self._run_id}): a new Trainer's "
                              "fit starts again at step 0 with a new optimizer. To keep the earlier log, give this fit a "
                              "new InfluenceTracker with another log_dir; to train longer as one run, resume from a "
                              "Lightning checkpoint (Trainer.fit(ckpt_path=...)) or raise max_epochs before the first "
                              "fit", UserWarning, stacklevel=2)
            start_new_log(self.log_dir, self.overwrite, trainer.is_global_zero)
            self._first_step = start
            trainer.strategy.barrier("influence_tracker_setup")
            if trainer.is_global_zero:
                with generators_kept():  # the recipe may read the dataset, whose __getitem__ may draw random numbers
                    meta = self._metadata(trainer, pl_module, optimizer, names, start)
                write_meta(self.log_dir, {**meta, "gradient_clipping": clipping})
        trainer.strategy.barrier("influence_tracker_meta")
        self._writer = LogWriter(self.log_dir, trainer.global_rank, self.flush_every_n_steps, self.storage_dtype,
                                 self.compression, truncate_from=start if continued else None,  # drops steps >= start
                                 resume_meta=resume_meta, **self._segment_limits())
        self._run_id, self._recorded_dir = self._writer.run_id, self.log_dir
        self._live = LiveTensorBoard.attach(trainer)
        self._final.start(trainer.callbacks)
        self._next_step = self._fit_start = start
        self._pending = PendingStep()
        self._in_flight.clear()
        self._verified = self._agreed = self._applied_checked = False
        self._checked_batchnorm = False
        self._forward_buffers = self._forward_params = None
        self._checked_dataset = False
        self._modes.start()

    def _metadata(self, trainer: pl.Trainer, pl_module: nn.Module, optimizer: torch.optim.Optimizer,
                  names: dict[int, str], first_step: int, recipe: bool = True) -> dict[str, Any]:
        return fit_metadata(self, trainer, pl_module, optimizer, names, first_step, tracked=self._names,
                            projector=self._projector, precision=self._precision, engines=self._engines(), recipe=recipe)

    def _engines(self) -> dict[str, Any]:
        """The log's gradient engine entries, as they stand (``tracker_meta.engine_metadata``)."""
        hooked = [] if self._capture is None else self._capture.param_names
        return engine_metadata(self._names, hooked, self._demoted, self.record_gradients)

    def _note_demotions(self, step: int) -> None:
        """Tensors the hooks handed to vmap at ``step`` (``HookGradientCapture.demoted``: a module run without the
        batch first, or one differing from autograd at the first step): ``meta.h5`` says so from then on."""
        self._noted = len(self._capture.demoted)
        self._demoted.update({n: step for n in self._capture.demoted if n not in self._demoted})
        engines = self._engines()
        self._engine = engines["gradient_engine"]
        self._settle(engines)

    def _settle(self, values: dict[str, Any]) -> None:
        """``meta.h5`` takes ``values`` the fit settled after its start (rank 0; ``log/resume.with_settled``)."""
        if self._global_zero:
            self._writer.amend_meta(functools.partial(with_settled, values=values, resumed=self._continued))

    def _agree_on_engines(self, trainer: pl.Trainer, pl_module: pl.LightningModule, pending: PendingStep) -> None:
        """The union of the processes' demotions (``tracker_ranks``): the tensors another process demoted leave the
        hooks here too, their columns of this step from vmap."""
        extra = agree_on_demotions(trainer.strategy, self._capture, self._names)
        if extra:
            self._vmap_names = [n for n in self._names if n not in self._capture.param_names]
            refill_columns(pending.micro, extra, self._projector,
                           lambda m: self._passes.rest_grads(pl_module, m.micro, extra, None))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._land()
        if self._writer is not None and trainer.is_global_zero:
            self._writer.add_checkpoint(self._final.take(pl_module, trainer.optimizers[0], trainer.global_step))
            self._final.note(self._settle)
            changed = changed_frozen(self.log_dir, pl_module)  # step/frozen.py: stored once, as at the log's start
            if changed:
                self._writer.amend_meta(functools.partial(mark_changed, names=changed))
        self._teardown(pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state, self._resume_state = self._resume_state, {}
        if trainer.is_global_zero:  # a fit resumed at its very end ran no training hook (tracker_final.py)
            store_missing_final(self.log_dir, state.get("run_id"), pl_module, trainer.optimizers[0], trainer.global_step,
                                lambda: LogWriter(self.log_dir, 0, self.flush_every_n_steps, self.storage_dtype,
                                                  self.compression, **self._segment_limits()))

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._teardown(pl_module, raise_errors=False)  # keeps every completed step; the original exception propagates
        self._dev_run.end(trainer, self)  # Lightning calls no teardown hook after an exception

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Every step before the checkpoint is on disk, on every rank, before rank 0 writes the checkpoint file,
        # so a fit resumed from it never misses a step; a failed write raises here and no checkpoint is saved.
        self._step_model.commit()
        if self._writer is not None:
            self._land()
            self._writer.flush(wait=True)
            if trainer.world_size > 1:
                trainer.strategy.barrier("influence_tracker_checkpoint")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._writer is not None and trainer.is_global_zero:
            self._final.epoch_end(pl_module, trainer.optimizers[0], trainer.global_step)
        if self._live is not None:
            self._land()
            self._live.on_epoch_end(trainer.global_step)

    def _setup_engine(self, pl_module: pl.LightningModule) -> None:
        """Observe ``per_sample_loss`` inside ``training_step`` and choose the gradient engine (capture/own_pass.py)."""
        if not self._needs_loss:
            return
        if self.loss_fn is None:  # observe per_sample_loss inside training_step: losses (and gradients) for free
            self._observer = LossObserver(pl_module, grads=self.record_gradients)
        if self.record_gradients:
            self._capture, self._vmap_names, self._engine = choose_engine(pl_module, self._names, self._projector,
                                                                          self.gradient_engine)
            rank_zero_info(f"InfluenceTracker: {len(self._names)} tensors tracked, gradient engine '{self._engine}', "
                           f"{self._projector.out_dim} columns per sample")
        self._passes = OwnPasses(self._loss, self._names, self._projector, self._capture, self._precision,
                                 self.hvp_eps0(pl_module), self.hvp_scheme)

    def _drop_refused_step(self) -> None:
        """A step the update watch refused after it was recorded (a rate set after the tracker's hook) leaves the log
        with the steps before it, as a fit killed there would."""
        step = self._update_watch.refused
        if step is None:
            return
        self._in_flight.drop_from(step)
        if not self._writer.discard_from(step):
            warnings.warn(f"InfluenceTracker: step {step}, refused, was already written in a closed segment; the log "
                           "keeps it as recorded (its learning rates are not the ones the update used)")

    def _teardown(self, pl_module: nn.Module, raise_errors: bool = True) -> None:
        if self._capture is not None:  # an exception inside training_step: the raw-parameter mode leaves the stack
            self._capture.unwatch()
        try:
            self._step_model.teardown()
            self._update_watch.remove()
            if self._writer is not None:
                refused: Exception | None = None
                self._drop_refused_step()
                try:
                    self._land()  # steps whose copies are in flight are complete steps: keep them
                except Exception as e:  # raised after the writer is closed (keeping every step before it)
                    refused = e
                self._in_flight.clear()
                try:
                    self._writer.close(raise_errors=raise_errors)
                finally:
                    self._writer = None
                if refused is not None and raise_errors:
                    raise refused
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None
        if self._capture is not None:
            self._capture.remove()
            self._capture = None
        if self._observer is not None:
            self._observer.remove()
            self._observer = None
        self._passes = None
