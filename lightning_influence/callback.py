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
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
import random
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_influence.capture import (
    HVP_SCHEMES,
    KINK_GUARD,
    HookGradientCapture,
    KroneckerProjector,
    fd_directional_derivative,
    per_sample_grads,
    call_with_params,
    per_sample_grads_vmap,
    select_params,
)
from lightning_influence.capture.transfer import HostCopy
from lightning_influence.data import IdsFn, batch_size_of, check_ids, extract_ids, ids_source, samples_with_replacement
from lightning_influence.log.format import META_FILE, list_segments, read_meta
from lightning_influence.log.lock import WriterLock
from lightning_influence.log.reader import InfluenceLog
from lightning_influence.log.resume import check_resume, with_resume_record
from lightning_influence.log.writer import (CheckpointRecord, LogWriter, MicroRecord, StepRecord, rank_end, remove_log,
                                            storage_error, write_meta)
from lightning_influence.recipe import class_path, record_recipe
from lightning_influence.step import rng
from lightning_influence.step.micro import MicroBatch, per_sample_grads_masked
from lightning_influence.step.optimizers import UnsupportedOptimizerError, check_optimizer
from lightning_influence.step.precision import FULL, Precision
from lightning_influence.step.recorder import StepRecorder
from lightning_influence.tensorboard import LiveTensorBoard

LossFn = Callable[[nn.Module, Any], torch.Tensor]

_STORAGE_DTYPES = ("float16", "float32", "float64")
_ENGINES = ("auto", "hooks", "vmap")
_IN_FLIGHT = 2  # steps whose device-to-host copies may still be running before the tracker waits for the oldest


@dataclass
class _MicroBatch:
    ids: torch.Tensor
    batch: Any
    random: rng.RandomState  # at the forward's start; reduced to the generators it drew from after the backward
    inputs: bytes | None = None  # the batch as fed, serialised (store_inputs)
    accumulate: int = 1  # Lightning's divisor of this micro-batch's loss
    returned: torch.Tensor | None = None  # the loss Lightning back-propagated (checked against the per-sample losses)
    observed: torch.Tensor | None = None  # per-sample losses seen inside training_step, when it calls per_sample_loss
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
            (math reference §1; checked at the first step, another reduction stops the fit); route
            ``training_step`` through it to get gradients for free. Gradient accumulation (incomplete
            accumulations included) and the Trainer's gradient clipping are recorded per step
            (``docs/step-semantics.md``).
        ids_key: key of the ids in dict batches.
        ids_fn: ``ids_fn(batch) -> Tensor[B]``, for batches of another shape.
        gradient_engine: ``"auto"`` (hooks for the parameters of Linear, Conv, Embedding, norm and attention
            layers, ``vmap`` for the others), ``"hooks"`` (refuses other parameters), ``"vmap"``.
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
        storage_dtype: str = "float32",
        compression: str | None = None,
        loss_fn: LossFn | None = None,
        ids_key: str = "ids",
        ids_fn: IdsFn | None = None,
        gradient_engine: str = "auto",
        hvp_eps: float = 1e-3,
        hvp_scheme: str = "central",
        flush_every_n_steps: int = 50,
        store_inputs: bool = False,
        allow_train_batchnorm: bool = False,
        overwrite: bool = False,
        store_data: bool | None = None,
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
        self.store_data = store_data
        self.store_inputs = store_inputs
        self._precision: Precision = FULL
        self._checked_dataset = False
        # runtime state
        self._writer: LogWriter | None = None
        self._names: list[str] = []
        self._projector: KroneckerProjector | None = None
        self._capture: HookGradientCapture | None = None
        self._engine: str = "none"
        self._vmap_names: list[str] = []  # tracked parameters no hook covers
        self._verified = False  # the hook engine was checked against autograd at this fit's first recorded step
        self._pending = _Pending()
        self._captured: list[torch.Tensor] = []
        self._captured_grad: list[torch.Tensor] = []
        self._capturing = False
        self._original_method: Any = None
        self._checked_batchnorm = False
        self._steps_recorded = 0
        self._first_step: int | None = None  # step whose θ_t starts a new log (None: continuing one)
        self._next_step: int | None = None
        self._fit_start = 0  # global step at which this fit started
        self._run_id: str | None = None
        self._resume_state: dict[str, Any] = {}
        self._live: LiveTensorBoard | None = None  # running signals in the trainer's TensorBoard, if any
        self._truncate_from: int | None = None  # a resumed fit continuing the log at this step (see _continue_log)
        self._lock: WriterLock | None = None  # this rank's exclusive writer lock, held from on_train_start to teardown
        self._with_ids = False  # the training set is a WithIds: (x, ids) batches carry ids
        self._dataset_size: int | None = None
        self._in_flight: deque[tuple[StepRecord, CheckpointRecord | None, HostCopy]] = deque()  # see _add_step
        self._step_model = StepRecorder()  # sample weights and gradient clipping of each step

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
        try:  # before the first step: a run the estimators cannot reproduce is never trained
            check_optimizer(optimizer)
        except UnsupportedOptimizerError as err:
            raise UnsupportedOptimizerError(f"InfluenceTracker does not support this run's optimizer: {err}") from None
        names = {id(p): n for n, p in pl_module.named_parameters()}
        self._names = select_params(pl_module, self.params, self.exclude_params) if self._needs_loss else []
        shapes = {n: tuple(dict(pl_module.named_parameters())[n].shape) for n in self._names}
        self._projector = KroneckerProjector(shapes, self.projection_dim, self.projection_seed)
        self._precision = _precision(trainer)
        self._setup_engine(pl_module)
        self._check_training_set(trainer)
        clipping = self._step_model.start(trainer, pl_module)
        start = trainer.global_step
        resume_state, self._resume_state = self._resume_state, {}
        with _generators_kept():  # what a resumed fit's rows would mean, to compare with the log's meta.h5
            fit_meta = {**self._metadata(trainer, pl_module, optimizer, names, start, recipe=False),
                        "gradient_clipping": clipping}
        fit_meta = json.loads(json.dumps(fit_meta))
        self._acquire_lock(trainer.global_rank)  # before any file of the log is touched; released in _teardown
        if not (start > 0 and self._continue_log(trainer, start, resume_state, fit_meta)):
            self._new_log(trainer, start)
            trainer.strategy.barrier("influence_tracker_setup")
            if trainer.is_global_zero:
                with _generators_kept():  # the recipe may read the dataset, whose __getitem__ may draw random numbers
                    meta = self._metadata(trainer, pl_module, optimizer, names, start)
                write_meta(self.log_dir, {**meta, "gradient_clipping": clipping})
        trainer.strategy.barrier("influence_tracker_meta")
        self._writer = LogWriter(self.log_dir, trainer.global_rank, self.flush_every_n_steps, self.storage_dtype,
                                 self.compression, truncate_from=self._truncate_from)
        self._truncate_from = None
        self._run_id = self._writer.run_id
        self._live = LiveTensorBoard.attach(trainer)
        self._next_step = self._fit_start = start
        self._pending = _Pending()
        self._in_flight.clear()
        self._verified = False
        self._checked_batchnorm = False
        self._checked_dataset = False

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
        check_resume(self.log_dir, meta, fit_meta, start)  # a refusal loses nothing
        self._truncate_from = start  # steps >= start are recorded again: dropped by the writer before its first write,
        # so a fit refused at its first step (ids, losses) leaves the log as it was
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
        self._land()
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
        self._step_model.commit()
        if self._writer is not None:
            self._land()
            self._writer.flush(wait=True)
            if trainer.world_size > 1:
                trainer.strategy.barrier("influence_tracker_checkpoint")

    # ---------------------------------------------------------------------------- per batch
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        t0 = time.perf_counter()
        if not self._checked_batchnorm:
            self._check_batchnorm(pl_module)
        ids = extract_ids(batch, self.ids_key, self.ids_fn, on_device=True, with_ids=self._with_ids,
                          dataset_size=self._dataset_size)  # device ids: checked in _land
        seen = [m.ids for m in self._pending.micro]
        if seen and ids.device.type == "cpu" and len(torch.unique(torch.cat([*seen, ids]))) != sum(len(s) for s in seen) + len(ids):
            raise ValueError(f"step {trainer.global_step}: the same sample id appears in two micro-batches of one optimizer step")
        if not self._checked_dataset:
            self._check_dataset(trainer)
        self._pending.micro.append(_MicroBatch(ids=ids, batch=batch, random=rng.capture(),
                                               inputs=_serialise(batch) if self.store_inputs else None,
                                               accumulate=int(trainer.accumulate_grad_batches)))
        self._pending.batch_idx = batch_idx
        self._captured, self._captured_grad = [], []
        self._capturing = self._needs_loss
        if self._capture is not None:
            if self._records_grads(trainer.global_step):
                self._capture.enable()
            else:
                self._capture.disable()
        self._pending.seconds += time.perf_counter() - t0

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if self._pending.micro:
            self._pending.micro[-1].returned = loss.detach()

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        t0 = time.perf_counter()
        self._capturing = False
        micro = self._pending.micro[-1]
        micro.random = rng.drawn(micro.random)  # what dropout drew from: recorded, restored by every own pass
        n = len(micro.ids)
        for out in self._captured:  # per_sample_loss as training_step called it: a reduced (0-d) loss is a mistake
            if out.dim() == 0:
                _check_losses(out, n, f"{type(pl_module).__name__}.per_sample_loss(batch)")
        captured = self._captured[-1] if len(self._captured) == 1 and self._captured[0].shape == (n,) else None
        want_grads = self._records_grads(trainer.global_step)
        micro.observed = captured.detach() if captured is not None else None
        if want_grads and self._capture is not None and captured is not None and len(self._captured_grad) == 1:
            micro.grads = self._capture.collect(self._captured_grad[0])
            micro.losses = captured.detach()
            if not self._verified:  # once per fit: one hooked row against autograd on its sample alone
                self._verified = True
                self._capture.verify(pl_module, self._loss, micro.batch, micro.grads)
            self._vmap_names = [n for n in self._names if n not in self._capture.param_names]  # after a demotion
            if self._vmap_names:  # parameters no hook covers: vmap (or, with dropout, the step's masks) for just those
                micro.grads += self._rest_grads(pl_module, micro, self._vmap_names, None)
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
        record = StepRecord(
            step=step, epoch=trainer.current_epoch, batch_idx=pending.batch_idx, micro_batches=len(pending.micro),
            lrs=[float(g["lr"]) for g in optimizer.param_groups], ids=np.zeros(0, np.int64))  # rows: see _land
        rows: dict[str, torch.Tensor] = {"ids": torch.cat([m.ids for m in pending.micro])}
        self._step_model.check_losses(  # a sum or any other reduction than the mean is refused (step.weights)
            step, [(m.returned, m.observed if m.observed is not None else m.losses, m.accumulate) for m in pending.micro],
            trainer)
        self._step_model.record(record, [len(m.ids) for m in pending.micro], [m.accumulate for m in pending.micro],
                                trainer.world_size, optimizer)
        if self.record_losses:
            rows["losses"] = torch.cat([m.losses for m in pending.micro])
        if torch.is_tensor(record.clip_coef):
            rows["clip_coef"] = record.clip_coef
        grad_dir = {n: p.grad for n, p in pl_module.named_parameters() if p.grad is not None}
        if grad_dir:
            rows["batch_grad_norm"] = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grad_dir.values()]))
        self._record_execution(trainer, record, pending.micro, grad_dir)
        if self._records_grads(step) and not record.skipped:
            rows["grads"] = torch.cat([m.grads for m in pending.micro])
            if self.record_hvp:
                rows["hvps"], rows["hvp_eps"] = self._hvp_products(pl_module, pending.micro, grad_dir)
        checkpoint = None  # θ_t is the same on every rank: rank 0 stores it
        if trainer.is_global_zero and (step == self._first_step or (self.checkpoint_every_n_steps and step % self.checkpoint_every_n_steps == 0)):
            checkpoint = self._checkpoint(trainer, pl_module, step, optimizer, wait=False)
        record.tracker_seconds = pending.seconds + time.perf_counter() - t0
        # the host copies start now (θ_t before the optimizer changes it), non-blocking from a GPU
        copy = HostCopy({"rows": rows, "checkpoint": None if checkpoint is None else
                         (checkpoint.params, checkpoint.optimizer_state)})
        # stored once Lightning's clipping of this step has been checked (step.recorder), else right away
        self._step_model.after_clipping(lambda: self._add_step(record, checkpoint, copy))

    def _add_step(self, record: StepRecord, checkpoint: CheckpointRecord | None, copy: HostCopy) -> None:
        """Queue the step for the writer and hand on every finished one.

        Up to ``_IN_FLIGHT`` steps stay in flight, so training never waits for the device at a step; the
        first step of a fit is handed on at once, so whatever it would refuse is refused at the first step.
        """
        step = record.step
        self._in_flight.append((record, checkpoint, copy))
        self._land(0 if step == self._fit_start else _IN_FLIGHT)
        self._steps_recorded += 1
        self._next_step = step + 1

    def _land(self, keep: int = 0) -> None:
        """Hand staged steps to the writer, oldest first: all whose copies are done, and any beyond ``keep``."""
        while self._in_flight and (len(self._in_flight) > keep or self._in_flight[0][2].ready()):
            record, checkpoint, copy = self._in_flight.popleft()
            host = copy.wait()
            rows = host["rows"]
            record.ids = rows["ids"]
            check_ids(torch.from_numpy(record.ids), self.ids_key, self._dataset_size)
            record.losses = rows["losses"].astype(np.float64) if "losses" in rows else None
            record.grads, record.hvps = rows.get("grads"), rows.get("hvps")
            record.batch_grad_norm = float(rows.get("batch_grad_norm", float("nan")))
            record.clip_coef = float(rows.get("clip_coef", float("nan")))
            record.hvp_eps = float(rows.get("hvp_eps", float("nan")))
            if checkpoint is not None:
                checkpoint.params, checkpoint.optimizer_state = host["checkpoint"]
            self._writer.add_step(record, checkpoint)  # validates: a non-finite value raises, naming step and sample ids
            if self._live is not None:
                self._live.on_step(record.step, record, self._writer.bytes_written)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._step_model.commit()  # a step whose clipping hook did not run (none does in automatic optimization)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._live is not None:
            self._land()
            self._live.on_epoch_end(trainer.global_step)

    # ---------------------------------------------------------------- the step as it ran
    def _record_execution(self, trainer: pl.Trainer, record: StepRecord, micro: list[_MicroBatch],
                          grads: dict[str, torch.Tensor]) -> None:
        """Micro-batch sizes, random states and inputs, the GradScaler factor and whether it skips this step."""
        record.micro = [MicroRecord(len(m.ids), m.random.cpu, m.random.cuda if m.random.cuda.size else None, m.inputs)
                        for m in micro]
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and self._precision.grad_scaler:
            record.grad_scale = float(scaler.get_scale())
            # on_before_optimizer_step runs after GradScaler.unscale_: a non-finite gradient makes it skip the step
            # one device sync (GradScaler.step makes the same one)
            record.skipped = bool(grads) and not bool(torch.stack([torch.isfinite(g).all() for g in grads.values()]).all())

    def _check_dataset(self, trainer: pl.Trainer) -> None:
        """Refuse, at the first step, a dataset whose ``ds[i]`` changes between calls (random augmentation): replay
        could not reproduce the inputs. Every random generator is left as found, so training is unchanged."""
        self._checked_dataset = True
        dataset = getattr(trainer.train_dataloader, "dataset", None)
        if self.store_inputs or dataset is None or not hasattr(dataset, "__getitem__"):
            return
        try:
            n = len(dataset)
        except TypeError:
            return
        with _generators_kept():
            for i in sorted({0, n // 2, n - 1}) if n else []:
                if not _same(dataset[i], dataset[i]):
                    raise RuntimeError(
                        f"InfluenceTracker: the training dataset returns different values for ds[{i}] on two calls "
                        "(random augmentation or other randomness in __getitem__), so replay and the estimators "
                        "could not reproduce the inputs of a step. Pass InfluenceTracker(store_inputs=True) to store "
                        "the exact inputs of every micro-batch, or make __getitem__ deterministic")

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
            raise ValueError(f"gradient_engine='hooks': no hook captures {unsupported[:5]} (hooks cover Linear, Conv1d/2d/3d, "
                             "Embedding, LayerNorm, GroupNorm, RMSNorm and MultiheadAttention parameters). Use "
                             "gradient_engine='auto' (vmap for just those) or exclude them with exclude_params")
        hooked = [] if self.gradient_engine == "vmap" else [n for n in self._names if n not in unsupported]
        self._vmap_names = [n for n in self._names if n not in hooked]
        self._engine = "mixed" if hooked and self._vmap_names else "hooks" if hooked else "vmap"
        if hooked:
            self._capture = HookGradientCapture(pl_module, hooked, self._projector)
        rank_zero_info(f"InfluenceTracker: {len(self._names)} tensors tracked, gradient engine '{self._engine}', "
                       f"{self._projector.out_dim} columns per sample")

    def _replaying(self, micro: _MicroBatch) -> Any:
        """The micro-batch's random state and autocast, for an own pass (every generator is left as found)."""
        return self._micro(micro).context(self._precision)

    @staticmethod
    def _micro(micro: _MicroBatch) -> MicroBatch:
        """The micro-batch of an own pass; its ids are not used there (and may still be on the device)."""
        return MicroBatch(np.zeros(0, np.int64), micro.batch, micro.random)

    def _own_grads(self, pl_module: nn.Module, micro: _MicroBatch, params: Mapping[str, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample (projected) gradients and losses of one micro-batch from an own pass at ``params``."""
        if not micro.random.drew:
            with self._replaying(micro):
                return per_sample_grads(pl_module, self._loss, micro.batch, self._names, self._projector, self._capture,
                                        params)
        hooked = [] if self._capture is None else self._capture.param_names
        rest = [n for n in self._names if n not in hooked]
        with self._replaying(micro):
            if hooked:
                grads, losses = per_sample_grads(pl_module, self._loss, micro.batch, hooked, self._projector,
                                                 self._capture, params)
            else:
                with torch.no_grad():
                    losses = call_with_params(pl_module, self._loss, params, micro.batch).detach()
                grads = None
        if rest:
            masked = self._rest_grads(pl_module, micro, rest, params)
            grads = masked if grads is None else grads + masked
        return grads, losses

    def _rest_grads(self, pl_module: nn.Module, micro: _MicroBatch, names: list[str],
                    params: Mapping[str, torch.Tensor] | None) -> torch.Tensor:
        """Projected per-sample gradients of ``names`` no hook covers: ``vmap`` over samples, or, when the forward
        drew random numbers (dropout), one batched forward with the step's masks (``per_sample_grads_masked``)."""
        if micro.random.drew:
            was = self._capture is not None and self._capture.enabled
            if was:
                self._capture.disable()  # its plain forward must not feed the hooks
            try:
                return per_sample_grads_masked(pl_module, self._loss, self._micro(micro), self._precision, names,
                                               params, self._projector)
            finally:
                if was:
                    self._capture.enabled = True
        with self._replaying(micro):
            return per_sample_grads_vmap(pl_module, self._loss, micro.batch, names, self._projector, params=params)

    def _own_losses(self, pl_module: nn.Module, micro: _MicroBatch) -> torch.Tensor:
        with self._replaying(micro), torch.no_grad():
            return self._loss(pl_module, micro.batch).detach()

    def _hvp_products(self, pl_module: nn.Module, micro: list[_MicroBatch], direction: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``H_{z,t} Ĝ_t`` for every sample of the step, by central differences along ``Ĝ_t``, and ``ε`` (on the device)."""
        theta = {n: p.detach() for n, p in pl_module.named_parameters() if n in direction}

        def grads_at(params: dict[str, torch.Tensor]) -> torch.Tensor:
            return torch.cat([self._own_grads(pl_module, m, params)[0] for m in micro])

        at = torch.cat([m.grads for m in micro])  # the step's own g_z(θ_t): the forward base, the central kink guard
        hvps, eps = fd_directional_derivative(grads_at, theta, {n: g.detach() for n, g in direction.items()}, self.hvp_eps,
                                              self.hvp_scheme, at, KINK_GUARD if self.hvp_scheme == "central" else None)
        return hvps.detach(), eps

    def _check_batchnorm(self, pl_module: nn.Module) -> None:
        self._checked_batchnorm = True
        if not self._needs_loss:
            return
        for name, module in pl_module.named_modules():
            if not (isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training):
                continue
            if self.allow_train_batchnorm and self._engine in ("vmap", "mixed") and self.record_gradients:
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
                    optimizer: torch.optim.Optimizer | None = None, wait: bool = True) -> CheckpointRecord:
        """``θ_step`` and the optimizer state: numpy copies, or (``wait=False``) tensors for a HostCopy."""
        optimizer = optimizer or trainer.optimizers[0]
        record = CheckpointRecord(step=step, params={})
        for name, p in pl_module.named_parameters():
            if not p.requires_grad:
                continue
            record.params[name] = p.detach()
            state = optimizer.state.get(p, {})
            tensors = {k: v.detach() for k, v in state.items() if isinstance(v, torch.Tensor)}
            if tensors:
                record.optimizer_state[name] = tensors
            scalars = {k: float(v) for k, v in state.items() if isinstance(v, (int, float))}
            if scalars:
                record.optimizer_scalars[name] = scalars
        if wait:
            record.params, record.optimizer_state = HostCopy((record.params, record.optimizer_state)).wait()
        return record

    # ------------------------------------------------------------------------------ metadata
    def _metadata(self, trainer: pl.Trainer, pl_module: nn.Module, optimizer: torch.optim.Optimizer,
                  names: dict[int, str], first_step: int, recipe: bool = True) -> dict[str, Any]:
        """The ``meta.h5`` of a new log; ``recipe=False`` leaves out the recipe (which stores ``data.pt``)."""
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
            "module_class": class_path(pl_module),
            "datamodule_class": class_path(trainer.datamodule) if getattr(trainer, "datamodule", None) is not None else None,
            **({"recipe": record_recipe(trainer, pl_module, self.log_dir, self.store_data)} if recipe else {}),  # recipe.py
            "world_size": trainer.world_size,
            "dataset_size": dataset_size,
            "loss_reduction": "mean",
            "precision": self._precision.to_meta(),
            "inputs_stored": self.store_inputs,
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
            self._step_model.teardown()
            if self._writer is not None:
                refused: Exception | None = None
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


def _precision(trainer: pl.Trainer) -> Precision:
    """The autocast and GradScaler of the trainer's precision plugin (Lightning's ``MixedPrecision``)."""
    plugin = trainer.precision_plugin
    name = str(getattr(plugin, "precision", "32-true"))
    if not name.endswith("-mixed"):
        return Precision(name)
    if not callable(getattr(plugin, "autocast_context_manager", None)) or not hasattr(plugin, "device"):
        raise RuntimeError(f"InfluenceTracker supports precision={name!r} through Lightning's MixedPrecision plugin, "
                           f"not {type(plugin).__name__}")
    dtype = plugin.autocast_context_manager().fast_dtype
    return Precision(name, str(plugin.device), str(dtype).replace("torch.", ""), getattr(plugin, "scaler", None) is not None)


@contextlib.contextmanager
def _generators_kept() -> Any:
    """Run a block that may draw random numbers (a dataset's ``__getitem__``) and put torch's (CPU and every CUDA
    device), Python's and NumPy's global generators back as they were: training must not notice the tracker."""
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with rng.forked():
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def _serialise(batch: Any) -> bytes:
    """The batch as ``torch.save`` bytes (tensors on the CPU), for ``store_inputs``."""
    buffer = io.BytesIO()
    torch.save(apply_to_collection(batch, torch.Tensor, lambda t: t.detach().cpu()), buffer)
    return buffer.getvalue()


def _same(a: Any, b: Any) -> bool:
    """Two samples of a dataset are equal (tensors and arrays elementwise, NaN equal to NaN)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b) or torch.allclose(a, b, rtol=0, atol=0, equal_nan=True))
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return a.shape == b.shape and bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - objects without a usable equality cannot be checked
        return True


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"InfluenceTracker: {message}")


def _exists(log_dir: str) -> bool:
    from pathlib import Path

    return (Path(log_dir) / META_FILE).exists()


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None
