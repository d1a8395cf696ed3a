"""``InfluenceTracker``: the Lightning callback that records what influence estimation needs.

At every optimizer step ``t`` it records, into the HDF5 log (``docs/log-format.md``), the
ids of ``B_t`` (all micro-batches), the learning rate of every param group and, as
configured, per-sample losses, per-sample gradients ``g_{i,t}`` at ``θ_t`` (optionally
projected), finite-difference Hessian-gradient products ``H_{z,t} Ĝ_t`` and checkpoints of
``θ_t`` with the optimizer state. It never computes influence scores: that is the
estimators' job, offline.

Per-sample gradients come, cheapest first, from the step's own backward pass (module hooks
on ``nn.Linear``/``nn.Conv2d``, when ``training_step`` computes its loss through the
module's ``per_sample_loss``), from an own hooked forward/backward pass, or from
``torch.func.vmap`` (exact for any architecture). The tracker leaves training untouched:
its own passes run on parameter copies with the RNG forked and restored.
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_influence.capture import (
    HVP_SCHEMES,
    KINK_GUARD,
    HookGradientCapture,
    call_with_params,
    KroneckerProjector,
    fd_directional_derivative,
    per_sample_grads_hooks,
    per_sample_grads_vmap,
    select_params,
)
from lightning_influence.data import IdsFn, batch_size_of, check_ids_in_range, extract_ids, ids_source, samples_with_replacement
from lightning_influence.log.format import META_FILE, list_segments, read_meta
from lightning_influence.log.lock import WriterLock
from lightning_influence.log.reader import InfluenceLog
from lightning_influence.log.resume import check_resume, with_resume_record
from lightning_influence.log.writer import (CheckpointRecord, LogWriter, StepRecord, rank_end, remove_log, storage_error,
                                            truncate_log, write_meta)
from lightning_influence.tensorboard import LiveTensorBoard

LossFn = Callable[[nn.Module, Any], torch.Tensor]

SUPPORTED_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)
_STORAGE_DTYPES = ("float16", "float32", "float64")
_ENGINES = ("auto", "hooks", "vmap")


@dataclass
class _MicroBatch:
    ids: torch.Tensor
    batch: Any
    rng_state: torch.Tensor
    losses: torch.Tensor | None = None
    grads: torch.Tensor | None = None


@dataclass
class _Pending:
    """The micro-batches of the optimizer step in progress."""

    micro: list[_MicroBatch] = field(default_factory=list)
    batch_idx: int = 0
    seconds: float = 0.0


class InfluenceTracker(Callback):
    """Record batch membership, learning rates, per-sample losses/gradients, HVP products and checkpoints.

    Args:
        log_dir: directory of the influence log (created; one sub-folder per rank).
        record_losses: record per-sample losses ``ℓ(z_i; θ_t)`` at every step.
        record_gradients: record per-sample gradients ``g_{i,t}`` of the tracked parameters.
        record_hvp: record finite-difference products ``H_{z,t} Ĝ_t`` (needs ``record_gradients``).
        every_n_steps: record gradients/HVP products at steps ``t % every_n_steps == 0`` (ids,
            learning rates and losses are recorded at every step).
        checkpoint_every_n_steps: store ``θ_t`` and the optimizer state every this many steps;
            ``None`` stores only ``θ_0`` and the final ``θ_T``.
        params: ``fnmatch`` patterns of the parameter names to track (``None``: all trainable).
        exclude_params: patterns of parameter names to leave out.
        projection_dim: per parameter tensor, the dimension of the seeded Kronecker random
            projection of gradients; ``None`` stores full gradients.
        projection_seed: seed of the projection (stored, so readers regenerate it).
        storage_dtype: dtype of gradient/HVP rows on disk: ``float16``, ``float32`` or ``float64``.
        compression: h5py filter for gradient rows: ``None``, ``"gzip"`` or ``"lzf"``.
        loss_fn: ``loss_fn(module, batch) -> Tensor[B]`` of per-sample losses; default: the
            module's ``per_sample_loss(batch)`` method. The training loss must be their mean
            (math reference §1); route ``training_step`` through it to get gradients for free.
        ids_key: key of the ids in dict batches.
        ids_fn: ``ids_fn(batch) -> Tensor[B]``, for batches of another shape.
        gradient_engine: ``"auto"`` (hooks for Linear/Conv2d models, else vmap), ``"hooks"``, ``"vmap"``.
        hvp_eps: ``ε_0`` of the finite differences, ``ε = ε_0 (1 + ||θ||) / √p``.
        hvp_scheme: ``"central"`` (two extra per-sample-gradient passes at ``θ ± ε Ĝ_t``, error
            ``O(ε²)``; a sample whose two one-sided differences disagree, because one side
            crossed a ReLU kink, keeps the other) or ``"forward"`` (one pass at ``θ + ε Ĝ_t``
            against the step's own per-sample gradients, error ``O(ε)``; in float32 about twice
            the central error at the same ``ε_0``); see :mod:`lightning_influence.capture.hvp`.
        flush_every_n_steps: steps per segment file. A kill loses only steps not yet in a closed
            segment, at most ``4 × flush_every_n_steps`` (the buffer and the segments being written
            or queued); every Lightning checkpoint first flushes and waits, so a resumed fit never
            misses a step (``docs/log-format.md``, crash safety).
        allow_train_batchnorm: accept train-mode BatchNorm (per-sample gradients then depend on
            the other samples of the batch; the records are not per-sample quantities).
        overwrite: replace an existing log in ``log_dir`` when a new (non-resumed) fit starts, or
            when a resumed fit cannot continue the log there (another run's log, or steps missing).
            A resumed fit (``Trainer.fit(ckpt_path=...)``) otherwise continues the log: steps from the
            checkpoint's step on are dropped and recorded again, never duplicated.

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
        storage_dtype: str = "float32",
        compression: str | None = None,
        loss_fn: LossFn | None = None,
        ids_key: str = "ids",
        ids_fn: IdsFn | None = None,
        gradient_engine: str = "auto",
        hvp_eps: float = 1e-3,
        hvp_scheme: str = "central",
        flush_every_n_steps: int = 50,
        allow_train_batchnorm: bool = False,
        overwrite: bool = False,
    ) -> None:
        _require(isinstance(every_n_steps, int) and every_n_steps >= 1, f"every_n_steps must be an int >= 1, got {every_n_steps!r}")
        _require(
            checkpoint_every_n_steps is None or (isinstance(checkpoint_every_n_steps, int) and checkpoint_every_n_steps >= 1),
            f"checkpoint_every_n_steps must be None or an int >= 1, got {checkpoint_every_n_steps!r}",
        )
        _require(projection_dim is None or (isinstance(projection_dim, int) and projection_dim >= 1),
                 f"projection_dim must be None (full gradients) or an int >= 1, got {projection_dim!r}")
        _require(storage_dtype in _STORAGE_DTYPES, f"storage_dtype must be one of {_STORAGE_DTYPES}, got {storage_dtype!r}")
        _require(compression in (None, "gzip", "lzf"), f"compression must be None, 'gzip' or 'lzf', got {compression!r}")
        _require(gradient_engine in _ENGINES, f"gradient_engine must be one of {_ENGINES}, got {gradient_engine!r}")
        _require(not record_hvp or record_gradients, "record_hvp=True needs record_gradients=True (HVP products share the gradient rows)")
        _require(hvp_eps > 0, f"hvp_eps must be > 0, got {hvp_eps!r}")
        _require(hvp_scheme in HVP_SCHEMES, f"hvp_scheme must be one of {HVP_SCHEMES}, got {hvp_scheme!r}")
        _require(isinstance(flush_every_n_steps, int) and flush_every_n_steps >= 1, "flush_every_n_steps must be an int >= 1")
        _require(loss_fn is None or callable(loss_fn), "loss_fn must be callable: loss_fn(module, batch) -> Tensor[B]")
        _require(ids_fn is None or callable(ids_fn), "ids_fn must be callable: ids_fn(batch) -> Tensor[B]")
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
        self.storage_dtype = storage_dtype
        self.compression = compression
        self.loss_fn = loss_fn
        self.ids_key = ids_key
        self.ids_fn = ids_fn
        self.gradient_engine = gradient_engine
        self.hvp_eps = hvp_eps
        self.hvp_scheme = hvp_scheme
        self.flush_every_n_steps = flush_every_n_steps
        self.allow_train_batchnorm = allow_train_batchnorm
        self.overwrite = overwrite
        # runtime state
        self._writer: LogWriter | None = None
        self._names: list[str] = []
        self._projector: KroneckerProjector | None = None
        self._capture: HookGradientCapture | None = None
        self._engine: str = "none"
        self._pending = _Pending()
        self._captured: list[torch.Tensor] = []
        self._captured_grad: list[torch.Tensor] = []
        self._capturing = False
        self._original_method: Any = None
        self._checked_batchnorm = False
        self._steps_recorded = 0
        self._first_step: int | None = None  # step whose θ_t starts a new log (None: continuing one)
        self._next_step: int | None = None
        self._run_id: str | None = None
        self._resume_state: dict[str, Any] = {}
        self._live: LiveTensorBoard | None = None  # running signals in the trainer's TensorBoard, if any
        self._lock: WriterLock | None = None  # this rank's exclusive writer lock, held from on_train_start to teardown
        self._with_ids = False  # the training set is a WithIds: (x, ids) batches carry ids
        self._dataset_size: int | None = None

    # ------------------------------------------------------------------------------ config
    @property
    def _needs_loss(self) -> bool:
        return self.record_losses or self.record_gradients

    def state_dict(self) -> dict[str, Any]:
        """What a resumed fit needs: which log (``log_dir``, ``run_id``) and where it continues (``next_step``)."""
        return {"log_dir": self.log_dir, "steps_recorded": self._steps_recorded, "run_id": self._run_id,
                "next_step": self._next_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._steps_recorded = int(state_dict.get("steps_recorded", 0))
        self._resume_state = dict(state_dict)

    # ------------------------------------------------------------------------ fit lifecycle
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise RuntimeError("InfluenceTracker needs automatic optimization (one optimizer.step per training step); "
                               "manual optimization is not supported")
        strategy = type(trainer.strategy).__name__
        if strategy not in ("SingleDeviceStrategy", "DDPStrategy"):
            raise RuntimeError(f"InfluenceTracker supports single-device and DDP training, not {strategy}")
        if self._needs_loss and self.loss_fn is None and not callable(getattr(pl_module, "per_sample_loss", None)):
            raise TypeError(
                f"{type(pl_module).__name__} has no per_sample_loss(batch) method; define one returning the "
                "unreduced loss (shape [B]) and have training_step return its mean, or pass "
                "InfluenceTracker(loss_fn=...)")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise RuntimeError(f"InfluenceTracker supports exactly one optimizer, the module configures {len(trainer.optimizers)}")
        optimizer = trainer.optimizers[0]
        if not isinstance(optimizer, SUPPORTED_OPTIMIZERS):
            raise RuntimeError(
                f"InfluenceTracker does not support {type(optimizer).__name__}: use SGD (momentum, weight decay and "
                "LR schedules are exact), Adam or AdamW (approximated by estimators)")
        names = {id(p): n for n, p in pl_module.named_parameters()}
        self._names = select_params(pl_module, self.params, self.exclude_params) if self._needs_loss else []
        shapes = {n: tuple(dict(pl_module.named_parameters())[n].shape) for n in self._names}
        self._projector = KroneckerProjector(shapes, self.projection_dim, self.projection_seed)
        self._setup_engine(pl_module)
        self._check_training_set(trainer)
        start = trainer.global_step
        resume_state, self._resume_state = self._resume_state, {}
        fit_meta = json.loads(json.dumps(self._metadata(trainer, pl_module, optimizer, names, start)))
        self._acquire_lock(trainer.global_rank)  # before any file of the log is touched; released in _teardown
        if not (start > 0 and self._continue_log(trainer, start, resume_state, fit_meta)):
            self._new_log(trainer, start)
            trainer.strategy.barrier("influence_tracker_setup")
            if trainer.is_global_zero:
                write_meta(self.log_dir, fit_meta)
        trainer.strategy.barrier("influence_tracker_meta")
        self._writer = LogWriter(self.log_dir, trainer.global_rank, self.flush_every_n_steps, self.storage_dtype, self.compression)
        self._run_id = self._writer.run_id
        self._live = LiveTensorBoard.attach(trainer)
        self._next_step = start
        self._pending = _Pending()
        self._checked_batchnorm = False

    def _check_training_set(self, trainer: pl.Trainer) -> None:
        """Where ids come from and what they index; sampling with replacement is refused before anything is written."""
        loader = trainer.train_dataloader
        dataset = getattr(loader, "dataset", None)
        self._with_ids, problem = ids_source(dataset)
        if problem and self.ids_fn is None:
            raise ValueError(f"InfluenceTracker: {problem}")
        try:
            self._dataset_size = len(dataset) if dataset is not None else None
        except TypeError:
            self._dataset_size = None
        if samples_with_replacement(loader):
            raise ValueError("InfluenceTracker: the training DataLoader samples with replacement (RandomSampler("
                             "replacement=True) or WeightedRandomSampler), so a sample can appear twice in a step; the "
                             "log and the estimators count each sample once per step. Sample without replacement.")

    def _acquire_lock(self, rank: int) -> None:
        """Hold this rank's writer lock (``log/lock.py``): a second fit writing the same log is refused at once."""
        self._lock = WriterLock(self.log_dir, rank)
        try:
            self._lock.acquire()
        except OSError as err:
            raise storage_error(self.log_dir, f"{self._lock.path.parent.name}/{self._lock.path.name} (the writer lock)", err,
                                "Nothing of this fit is in the log yet", started=False) from None
        finally:
            if not self._lock.held:
                self._lock = None

    def _continue_log(self, trainer: pl.Trainer, start: int, state: dict[str, Any], fit_meta: dict[str, Any]) -> bool:
        """Resumed at step ``start``: truncate the existing log to ``start`` and continue it; ``False`` if there is none.

        Raises:
            ValueError: the log belongs to another run, was written with another world size, or with a
                configuration that changes what its rows mean (``log/resume.py``; nothing is touched).
            RuntimeError: the log misses steps before ``start`` (it cannot be continued without a gap).
        """
        if not _exists(self.log_dir):
            if state.get("run_id") and not self.overwrite:
                raise FileNotFoundError(
                    f"InfluenceTracker: resuming at step {start} from a checkpoint whose run was tracked into the log "
                    f"{state.get('log_dir')!r} (run id {state['run_id']}), but {self.log_dir} holds no influence log. "
                    f"Point log_dir at that log to continue it, or pass overwrite=True to start a new log at step {start}")
            return False
        meta = read_meta(self.log_dir)
        rank = trainer.global_rank
        hint = f"or pass overwrite=True to replace it with a new log starting at step {start}"
        if state.get("run_id") and meta.get("run_id") != state["run_id"]:
            if self.overwrite:
                return False
            raise ValueError(f"InfluenceTracker: {self.log_dir} holds the log of another run (run id {meta.get('run_id')}), "
                             f"not the one this checkpoint was tracked into (run id {state['run_id']}); point log_dir at "
                             f"that run's log, {hint}")
        if int(meta.get("world_size") or 1) != trainer.world_size:
            if self.overwrite:
                return False
            raise ValueError(f"InfluenceTracker: the log in {self.log_dir} was written by {meta.get('world_size')} "
                             f"process(es) but this fit runs {trainer.world_size}; resume with the same number of "
                             f"processes, {hint}")
        first = int(meta.get("first_step") or 0)
        end = rank_end(self.log_dir, rank)
        have = (end if end is not None else first - 1)
        if start < first or have < start - 1:
            if self.overwrite:
                return False
            held = f"steps {first}..{end}" if end is not None else f"no step (it starts at step {first})"
            raise RuntimeError(
                f"InfluenceTracker: training resumes at step {start} but the log of rank {rank} in {self.log_dir} holds "
                f"{held}, so it cannot continue without a gap (was the checkpoint saved without this callback, or were "
                f"segment files lost?). Resume from a checkpoint at a step in {first}..{have + 1}, {hint}")
        check_resume(self.log_dir, meta, fit_meta, start)  # before the truncation: a refusal loses nothing
        truncate_log(self.log_dir, rank, start)  # steps >= start are recorded again by this fit
        if trainer.is_global_zero:
            write_meta(self.log_dir, with_resume_record(meta, fit_meta, start))
        self._first_step = start if end is None else None  # θ_start if the log holds no step yet
        return True

    def _new_log(self, trainer: pl.Trainer, start: int) -> None:
        """Start a new log at step ``start`` (rank 0 removes an existing one if ``overwrite``)."""
        if list_segments(self.log_dir) or _exists(self.log_dir):
            if not self.overwrite:
                raise FileExistsError(f"{self.log_dir} already holds an influence log; choose a new log_dir, "
                                      "pass overwrite=True, or resume with Trainer.fit(ckpt_path=...)")
            if trainer.is_global_zero:
                remove_log(self.log_dir)  # the log's own files only: anything else in log_dir stays
        self._first_step = start

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._writer is not None and trainer.is_global_zero:
            self._writer.add_checkpoint(self._checkpoint(trainer, pl_module, trainer.global_step))
        self._teardown(pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A fit resumed from a checkpoint taken at the very end of training runs no training hook, so a run killed
        # after that checkpoint but before on_train_end would keep a log without θ_T: store it now.
        state, self._resume_state = self._resume_state, {}
        if not (state.get("run_id") and trainer.is_global_zero and trainer.global_step > 0 and _exists(self.log_dir)):
            return
        with InfluenceLog(self.log_dir) as log:
            if log.meta.get("run_id") != state["run_id"] or log.finished or log.num_steps != trainer.global_step:
                return
        self._acquire_lock(0)
        try:
            writer = LogWriter(self.log_dir, 0, self.flush_every_n_steps, self.storage_dtype, self.compression)
            writer.add_checkpoint(self._checkpoint(trainer, pl_module, trainer.global_step))
            writer.close()
        finally:
            self._lock.release()
            self._lock = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._teardown(pl_module, raise_errors=False)  # keeps every completed step; the original exception propagates

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Every step before the checkpoint is on disk, on every rank, before rank 0 writes the checkpoint file,
        # so a fit resumed from it never misses a step; a failed write raises here and no checkpoint is saved.
        if self._writer is not None:
            self._writer.flush(wait=True)
            if trainer.world_size > 1:
                trainer.strategy.barrier("influence_tracker_checkpoint")

    # ---------------------------------------------------------------------------- per batch
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        t0 = time.perf_counter()
        if not self._checked_batchnorm:
            self._check_batchnorm(pl_module)
        ids = extract_ids(batch, self.ids_key, self.ids_fn, self._with_ids)
        check_ids_in_range(ids, self._dataset_size)
        seen = [m.ids for m in self._pending.micro]
        if seen and len(torch.unique(torch.cat([*seen, ids]))) != sum(len(s) for s in seen) + len(ids):
            raise ValueError(f"step {trainer.global_step}: the same sample id appears in two micro-batches of one optimizer step")
        self._pending.micro.append(_MicroBatch(ids=ids, batch=batch, rng_state=torch.get_rng_state()))
        self._pending.batch_idx = batch_idx
        self._captured, self._captured_grad = [], []
        self._capturing = self._needs_loss
        if self._capture is not None:
            if self._records_grads(trainer.global_step):
                self._capture.enable()
            else:
                self._capture.disable()
        self._pending.seconds += time.perf_counter() - t0

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        t0 = time.perf_counter()
        self._capturing = False
        micro = self._pending.micro[-1]
        n = len(micro.ids)
        for out in self._captured:  # per_sample_loss as training_step called it: a reduced (0-d) loss is a mistake
            if out.dim() == 0:
                _check_losses(out, n, f"{type(pl_module).__name__}.per_sample_loss(batch)")
        captured = self._captured[-1] if len(self._captured) == 1 and self._captured[0].shape == (n,) else None
        want_grads = self._records_grads(trainer.global_step)
        if want_grads and self._engine == "hooks" and captured is not None and len(self._captured_grad) == 1:
            micro.grads = self._capture.collect(self._captured_grad[0])
            micro.losses = captured.detach()
        elif want_grads:
            if self._capture is not None:
                self._capture.clear()  # discard partial captures of a non-conforming forward
            micro.grads, micro.losses = self._own_grads(pl_module, micro, None)
        elif self.record_losses:
            micro.losses = captured.detach() if captured is not None else self._own_losses(pl_module, micro)
        if self._capture is not None:
            self._capture.disable()
        self._captured, self._captured_grad = [], []
        self._pending.seconds += time.perf_counter() - t0

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        t0 = time.perf_counter()
        step = trainer.global_step
        pending, self._pending = self._pending, _Pending()
        if not pending.micro:
            raise RuntimeError(f"step {step}: optimizer step without a recorded training batch")
        ids = torch.cat([m.ids for m in pending.micro])
        record = StepRecord(
            step=step, epoch=trainer.current_epoch, batch_idx=pending.batch_idx, micro_batches=len(pending.micro),
            lrs=[float(g["lr"]) for g in optimizer.param_groups], ids=ids.numpy())
        if self.record_losses:
            record.losses = torch.cat([m.losses for m in pending.micro]).detach().to("cpu", torch.float64).numpy()
        grad_dir = {n: p.grad for n, p in pl_module.named_parameters() if p.grad is not None}
        if grad_dir:
            record.batch_grad_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grad_dir.values()])))
        if self._records_grads(step):
            record.grads = torch.cat([m.grads for m in pending.micro]).detach().cpu().numpy()
            if self.record_hvp:
                hvps, record.hvp_eps = self._hvp_products(pl_module, pending.micro, grad_dir)
                record.hvps = hvps.numpy()
        checkpoint = None  # θ_t is the same on every rank: rank 0 stores it
        if trainer.is_global_zero and (step == self._first_step or (self.checkpoint_every_n_steps and step % self.checkpoint_every_n_steps == 0)):
            checkpoint = self._checkpoint(trainer, pl_module, step, optimizer)
        record.tracker_seconds = pending.seconds + time.perf_counter() - t0
        self._writer.add_step(record, checkpoint)  # validates: a non-finite value raises, naming step and sample ids
        self._steps_recorded += 1
        self._next_step = step + 1
        if self._live is not None:
            self._live.on_step(step, record, self._writer.bytes_written)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._live is not None:
            self._live.on_epoch_end(trainer.global_step)

    # ----------------------------------------------------------------------------- capture
    def _records_grads(self, step: int) -> bool:
        return self.record_gradients and step % self.every_n_steps == 0

    def _loss(self, module: nn.Module, batch: Any) -> torch.Tensor:
        if self.loss_fn is not None:
            out, name = self.loss_fn(module, batch), "loss_fn(module, batch)"
        else:
            out = self._original_method(batch) if self._original_method is not None else module.per_sample_loss(batch)
            name = f"{type(module).__name__}.per_sample_loss(batch)"
        _check_losses(out, batch_size_of(batch), name)
        return out

    def _setup_engine(self, pl_module: pl.LightningModule) -> None:
        if not self._needs_loss:
            return
        if self.loss_fn is None:  # observe per_sample_loss inside training_step: losses (and gradients) for free
            self._original_method = pl_module.per_sample_loss
            tracker = self

            def per_sample_loss(batch: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
                out = tracker._original_method(batch, *args, **kwargs)
                if tracker._capturing and isinstance(out, torch.Tensor) and torch.is_grad_enabled():
                    tracker._captured.append(out)
                    if out.requires_grad:
                        out.register_hook(lambda g: tracker._captured_grad.append(g.detach()))
                return out

            pl_module.per_sample_loss = per_sample_loss
        if not self.record_gradients:
            return
        unsupported = HookGradientCapture.unsupported(pl_module, self._names)
        if self.gradient_engine == "hooks" and unsupported:
            raise ValueError(f"gradient_engine='hooks' supports nn.Linear and nn.Conv2d parameters; not {unsupported[:5]}. "
                             "Use gradient_engine='vmap' or exclude them with exclude_params")
        self._engine = "vmap" if (self.gradient_engine == "vmap" or unsupported) else "hooks"
        if self._engine == "hooks":
            self._capture = HookGradientCapture(pl_module, self._names, self._projector)
        rank_zero_info(f"InfluenceTracker: {len(self._names)} tensors tracked, gradient engine '{self._engine}', "
                       f"{self._projector.out_dim} columns per sample")

    def _own_grads(self, pl_module: nn.Module, micro: _MicroBatch, params: Mapping[str, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample (projected) gradients and losses of one micro-batch from an own pass at ``params``."""
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(micro.rng_state)
            if self._engine == "hooks":
                return per_sample_grads_hooks(pl_module, self._loss, micro.batch, self._capture, params=params)
            grads = per_sample_grads_vmap(pl_module, self._loss, micro.batch, self._names, self._projector, params=params)
            with torch.no_grad():
                losses = call_with_params(pl_module, self._loss, params, micro.batch)
            return grads, losses

    def _own_losses(self, pl_module: nn.Module, micro: _MicroBatch) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.set_rng_state(micro.rng_state)
            return self._loss(pl_module, micro.batch).detach()

    def _hvp_products(self, pl_module: nn.Module, micro: list[_MicroBatch], direction: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
        """``H_{z,t} Ĝ_t`` for every sample of the step, by central differences along ``Ĝ_t``."""
        theta = {n: p.detach() for n, p in pl_module.named_parameters() if n in direction}

        def grads_at(params: dict[str, torch.Tensor]) -> torch.Tensor:
            return torch.cat([self._own_grads(pl_module, m, params)[0] for m in micro])

        at = torch.cat([m.grads for m in micro])  # the step's own g_z(θ_t): the forward base, the central kink guard
        hvps, eps = fd_directional_derivative(grads_at, theta, {n: g.detach() for n, g in direction.items()}, self.hvp_eps,
                                              self.hvp_scheme, at, KINK_GUARD if self.hvp_scheme == "central" else None)
        return hvps.detach().cpu(), float(eps)

    def _check_batchnorm(self, pl_module: nn.Module) -> None:
        self._checked_batchnorm = True
        if not self._needs_loss:
            return
        for name, module in pl_module.named_modules():
            if not (isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training):
                continue
            if self.allow_train_batchnorm and self._engine == "vmap" and self.record_gradients:
                raise RuntimeError(
                    f"BatchNorm layer '{name}' is in train mode, which the vmap gradient engine cannot evaluate one "
                    "sample at a time; track only Linear/Conv2d parameters (params=[...]) so the hooks engine is used")
            if not self.allow_train_batchnorm:
                raise RuntimeError(
                    f"BatchNorm layer '{name}' is in train mode: its output mixes the samples of a batch, so per-sample "
                    "losses and gradients are ill-defined. Put it in eval mode during training (e.g. in "
                    "on_train_epoch_start), replace it (GroupNorm/LayerNorm), or pass allow_train_batchnorm=True")

    # -------------------------------------------------------------------------- checkpoints
    def _checkpoint(self, trainer: pl.Trainer, pl_module: nn.Module, step: int,
                    optimizer: torch.optim.Optimizer | None = None) -> CheckpointRecord:
        optimizer = optimizer or trainer.optimizers[0]
        record = CheckpointRecord(step=step, params={})
        for name, p in pl_module.named_parameters():
            if not p.requires_grad:
                continue
            record.params[name] = p.detach().cpu().numpy().copy()
            state = optimizer.state.get(p, {})
            tensors = {k: v.detach().cpu().numpy().copy() for k, v in state.items() if isinstance(v, torch.Tensor)}
            if tensors:
                record.optimizer_state[name] = tensors
            scalars = {k: float(v) for k, v in state.items() if isinstance(v, (int, float))}
            if scalars:
                record.optimizer_scalars[name] = scalars
        return record

    # ------------------------------------------------------------------------------ metadata
    def _metadata(self, trainer: pl.Trainer, pl_module: nn.Module, optimizer: torch.optim.Optimizer,
                  names: dict[int, str], first_step: int) -> dict[str, Any]:
        groups = []
        for g in optimizer.param_groups:
            hyper = {k: v for k, v in g.items() if k != "params" and isinstance(v, (int, float, bool, str, type(None), tuple, list))}
            groups.append({**hyper, "params": [names[id(p)] for p in g["params"]]})
        dataset = getattr(trainer.train_dataloader, "dataset", None)
        try:
            dataset_size = len(dataset) if dataset is not None else None
        except TypeError:
            dataset_size = None
        return {
            "created": time.time(),
            "run_id": uuid.uuid4().hex,
            "first_step": first_step,
            "versions": {pkg: _version(pkg) for pkg in ("lightning-influence", "torch", "lightning", "h5py")},
            "module_class": _class_path(pl_module),
            "datamodule_class": _class_path(trainer.datamodule) if getattr(trainer, "datamodule", None) is not None else None,
            "world_size": trainer.world_size,
            "dataset_size": dataset_size,
            "loss_reduction": "mean",
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
            "recorded": {
                "ids": True,
                "lrs": True,
                "losses": self.record_losses,
                "gradients": self.record_gradients,
                "hvp": self.record_hvp,
                "checkpoints": True,
            },
            "every_n_steps": self.every_n_steps,
            "checkpoint_every_n_steps": self.checkpoint_every_n_steps,
            "gradient_engine": self._engine,
            "hvp": {"eps0": self.hvp_eps, "direction": "batch_mean_gradient", "scheme": self.hvp_scheme,
                    "kink_guard": KINK_GUARD if self.hvp_scheme == "central" else None},
            "storage_dtype": self.storage_dtype,
            "compression": self.compression,
            "flush_every_n_steps": self.flush_every_n_steps,
            "tracked_params": self._names,
            "param_shapes": {n: list(p.shape) for n, p in pl_module.named_parameters() if p.requires_grad},
            "projection": self._projector.to_metadata(),
            "optimizer": {"class": f"{type(optimizer).__module__}.{type(optimizer).__qualname__}",
                          "param_groups": groups},
        }

    def _teardown(self, pl_module: nn.Module, raise_errors: bool = True) -> None:
        try:
            if self._writer is not None:
                try:
                    self._writer.close(raise_errors=raise_errors)
                finally:
                    self._writer = None
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None
        if self._capture is not None:
            self._capture.remove()
            self._capture = None
        if self._original_method is not None:
            del pl_module.per_sample_loss  # drop the instance attribute: the class method shows again
            self._original_method = None


def _check_losses(out: Any, n: int, name: str) -> None:
    """Per-sample losses must be a tensor of shape ``[n]``; the message names the function that returned them."""
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (n,):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"InfluenceTracker: {name} returned {shape} for a batch of {n} samples; it must return one "
                         f"loss per sample, shape [{n}] (e.g. F.cross_entropy(..., reduction='none')), whose mean is "
                         "the training loss")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"InfluenceTracker: {message}")


def _exists(log_dir: str) -> bool:
    from pathlib import Path

    return (Path(log_dir) / META_FILE).exists()


def _class_path(obj: Any) -> str:
    """``module.QualName`` of ``obj``'s class, importable also when the run was started with ``python -m``."""
    module = type(obj).__module__
    if module == "__main__":
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        module = spec.name if spec is not None and spec.name else module
    return f"{module}.{type(obj).__qualname__}"


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None
