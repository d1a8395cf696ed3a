"""What :class:`~lightning_influence.InfluenceTracker` refuses before or at the first step.

A run the estimators could not reproduce is refused before it trains (or at its first step,
with nothing of it stored): manual optimization or an unsupported strategy, several or
unsupported optimizers (and, at the step it happens, an update whose hyperparameters are not the recorded ones,
or a change of one the update rules take as fixed), a missing ``per_sample_loss``, sampling with replacement, train-mode
BatchNorm, a dataset whose ``ds[i]`` changes between calls (without ``store_inputs``), a
sample twice in one step, per-sample losses of the wrong shape, a precision plugin other than
Lightning's ``MixedPrecision``, gradients changed before the tracker's ``on_before_optimizer_step``. Each message says what to do instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import random
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from torch import nn
from torch.utils.data import default_collate

from lightning_influence.capture import HVP_SCHEMES
from lightning_influence.data import as_pytree, check_ids, ids_source, loader_collate, samples_with_replacement
from lightning_influence.step import rng
from lightning_influence.step.compiled import compiled_wrappers
from lightning_influence.step.hyper import ScheduleRecorder
from lightning_influence.step.optimizers import UnsupportedOptimizerError, UpdateRule, check_optimizer
from lightning_influence.step.precision import Precision

__all__ = ["GradientMismatchError", "UpdateWatch", "applied_tolerance", "check_applied_gradient", "check_arguments", "check_batchnorm", "check_dataset", "check_distinct_ids", "check_ranks_distinct", "distributed_padding", "demoted_columns", "check_fit", "check_losses",
           "check_optimizers", "check_training_set", "generators_kept", "synced_batchnorm", "trainer_precision"]


STORAGE_DTYPES = ("float16", "float32", "float64")
ENGINES = ("auto", "hooks", "vmap")


def check_arguments(*, every_n_steps: Any, checkpoint_every_n_steps: Any, projection_dim: Any, storage_dtype: Any,
                    compression: Any, gradient_engine: Any, record_hvp: Any, record_gradients: Any, hvp_eps: Any,
                    hvp_scheme: Any, flush_every_n_steps: Any, flush_every_n_seconds: Any, loss_fn: Any, ids_fn: Any,
                    **_: Any) -> None:
    """The tracker's arguments (``InfluenceTracker.__init__``'s; the others are taken as they are), checked at
    construction: a bad value is refused there, naming it and what it must be."""
    _require(isinstance(every_n_steps, int) and every_n_steps >= 1, f"every_n_steps must be an int >= 1, got {every_n_steps!r}")
    _require(
        checkpoint_every_n_steps is None or (isinstance(checkpoint_every_n_steps, int) and checkpoint_every_n_steps >= 1),
        f"checkpoint_every_n_steps must be None or an int >= 1, got {checkpoint_every_n_steps!r}",
    )
    _require(projection_dim is None or (isinstance(projection_dim, int) and projection_dim >= 1),
             f"projection_dim must be None (full gradients) or an int >= 1, got {projection_dim!r}")
    _require(storage_dtype in STORAGE_DTYPES, f"storage_dtype must be one of {STORAGE_DTYPES}, got {storage_dtype!r}")
    _require(compression in (None, "gzip", "lzf"), f"compression must be None, 'gzip' or 'lzf', got {compression!r}")
    _require(gradient_engine in ENGINES, f"gradient_engine must be one of {ENGINES}, got {gradient_engine!r}")
    _require(not record_hvp or record_gradients, "record_hvp=True needs record_gradients=True (HVP products share the gradient rows)")
    _require(hvp_eps is None or hvp_eps > 0, f"hvp_eps must be None or > 0, got {hvp_eps!r}")
    _require(hvp_scheme in HVP_SCHEMES, f"hvp_scheme must be one of {HVP_SCHEMES}, got {hvp_scheme!r}")
    _require(flush_every_n_steps is None or (isinstance(flush_every_n_steps, int) and flush_every_n_steps >= 1),
             f"flush_every_n_steps must be None or an int >= 1, got {flush_every_n_steps!r}")
    _require(flush_every_n_seconds is None or (isinstance(flush_every_n_seconds, (int, float))
                                               and math.isfinite(flush_every_n_seconds) and flush_every_n_seconds > 0),
             f"flush_every_n_seconds must be None or a number of seconds > 0, got {flush_every_n_seconds!r}")
    _require(flush_every_n_steps is not None or flush_every_n_seconds is not None,
             "flush_every_n_steps and flush_every_n_seconds are both None: set one of them, so a segment file "
             "closes now and then (a kill loses the steps not yet in a closed segment)")
    _require(loss_fn is None or callable(loss_fn), "loss_fn must be callable: loss_fn(module, batch) -> Tensor[B]")
    _require(ids_fn is None or callable(ids_fn), "ids_fn must be callable: ids_fn(batch) -> Tensor[B]")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"InfluenceTracker: {message}")


def check_fit(trainer: Any, module: Any, needs_loss: bool, has_loss_fn: bool) -> None:
    """Automatic optimization, a single-device or DDP strategy, no fine-tuning callback (it changes the trained
    parameters mid-fit), no sparse-gradient embedding, no ``torch.compile`` wrapper of a submodule, no bfloat16 parameters, and a ``per_sample_loss`` when losses
    are needed."""
    if not module.automatic_optimization:
        raise RuntimeError("InfluenceTracker needs automatic optimization (one optimizer.step per training step); "
                           "manual optimization is not supported")
    strategy = type(trainer.strategy).__name__
    if strategy not in ("SingleDeviceStrategy", "DDPStrategy"):
        raise RuntimeError(f"InfluenceTracker supports single-device and DDP training, not {strategy}")
    from lightning.pytorch.callbacks import BaseFinetuning

    finetuning = [type(cb).__name__ for cb in trainer.callbacks if isinstance(cb, BaseFinetuning)]
    if finetuning:  # refused before the first step, not at the step it unfreezes (UpdateWatch), epochs into the fit
        raise UnsupportedOptimizerError(
            f"InfluenceTracker does not support {finetuning[0]}: it unfreezes parameters during the fit and adds them "
            "to the optimizer as a new param group, while the log's tracked parameters, checkpoints and param groups "
            "are those of the fit's start. Track the fine-tuning as its own fit (a log per stage), or train without it")
    sparse = [n for n, m in module.named_modules()
              if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse and m.weight.requires_grad]
    if sparse:  # refused before the first step: its sparse gradients reach the checks, replay and every estimator
        raise RuntimeError(f"InfluenceTracker does not support sparse gradients: {sparse[:3]} are "
                           "nn.Embedding/EmbeddingBag(sparse=True). Train with sparse=False (a dense gradient of the "
                           "same values) or freeze them (requires_grad_(False))")
    wrappers = compiled_wrappers(module)
    if wrappers:  # its parameters are named "<name>._orig_mod.…", which a rebuilt model lacks (step.compiled)
        raise RuntimeError(f"InfluenceTracker: submodule {wrappers[0]!r} is a torch.compile wrapper "
                           f"(self.{wrappers[0]} = torch.compile(...)), whose parameters are named "
                           f"'{wrappers[0]}._orig_mod.…': the model the CLI and the estimators rebuild has no such "
                           f"parameters. Compile it in place (self.{wrappers[0]}.compile(): the same module and names) "
                           "or compile the whole LightningModule (torch.compile(model) before Trainer.fit)")
    bf16 = [n for n, p in module.named_parameters() if p.requires_grad and p.dtype == torch.bfloat16]
    if bf16:  # the checkpoints (and the loss rows) are numpy/HDF5 arrays, which have no bfloat16
        raise RuntimeError(f"InfluenceTracker cannot store bfloat16 parameters ({bf16[:3]}{', ...' if len(bf16) > 3 else ''}: "
                           "precision='bf16-true' or a bf16 model) in its log: train with precision='bf16-mixed' "
                           "(float32 parameters under bfloat16 autocast), in float16 or in float32")
    if needs_loss and not has_loss_fn and not callable(getattr(module, "per_sample_loss", None)):
        raise TypeError(
            f"{type(module).__name__} has no per_sample_loss(batch) method; define one returning the "
            "unreduced loss (shape [B]) and have training_step return its mean, or pass "
            "InfluenceTracker(loss_fn=...)")


def check_materialized(module: nn.Module) -> None:
    """Every parameter has its shape when training starts: a lazy layer (``nn.LazyLinear``) not yet run has none, and
    the tracker's projection and checkpoints need them."""
    lazy = [n for n, p in module.named_parameters() if isinstance(p, nn.parameter.UninitializedParameter)]
    if lazy:
        raise RuntimeError(f"InfluenceTracker: parameters {lazy[:3]}{', ...' if len(lazy) > 3 else ''} have no shape "
                           "yet when training starts (lazy layers such as nn.LazyLinear, not run yet): run one forward "
                           "before Trainer.fit (model(example_input)), or give the layers their sizes")


def check_optimizers(optimizers: Sequence[torch.optim.Optimizer]) -> tuple[torch.optim.Optimizer, UpdateRule]:
    """The run's one optimizer and its update rule, which the estimators reproduce (``step/optimizers.py``)."""
    if len(optimizers) != 1:
        raise RuntimeError(f"InfluenceTracker supports exactly one optimizer, the module configures {len(optimizers)}")
    try:  # before the first step: a run the estimators cannot reproduce is never trained
        rule = check_optimizer(optimizers[0])
    except UnsupportedOptimizerError as err:
        raise UnsupportedOptimizerError(f"InfluenceTracker does not support this run's optimizer: {err}") from None
    return optimizers[0], rule


class UpdateWatch:
    """What each step's update will use and did use (an optimizer step post-hook).

    At the tracker's ``on_before_optimizer_step`` (:meth:`expect`) the step's record takes the learning rates and,
    where a schedule changed them from the log's param groups, the update rule's other hyperparameters (momentum,
    betas, weight decay, ...: :class:`~lightning_influence.step.hyper.ScheduleRecorder`, which refuses a change the
    rules cannot reproduce). The post-hook compares what the update used with what was recorded: a value set after
    the tracker's hook (in the LightningModule's own ``on_before_optimizer_step``, which Lightning calls after the
    callbacks') was recorded one change late and made the logged run irreproducible (replay stopped at the next
    checkpoint, blaming data or round-off); refused at the step it happens."""

    def __init__(self) -> None:
        self._handle: Any = None
        self._schedule: ScheduleRecorder | None = None
        self._names: dict[int, str] = {}
        self._none: list[bool] | None = None  # which parameters had no gradient at the last step
        self._had: set[int] = set()  # positions of the parameters that had a gradient at some step of the fit
        self._step, self._lrs, self._values = -1, None, None
        self.refused: int | None = None  # the step refused (its record must not stay in the log)

    def install(self, optimizer: torch.optim.Optimizer, rule: UpdateRule, logged_groups: Sequence[Any] | None = None,
                names: dict[int, str] | None = None) -> None:
        """Watch ``optimizer`` (its update ``rule``: :func:`check_optimizers`); ``logged_groups``: the log's param groups
        (a resumed fit's log), by default the optimizer's own as they are now (a new log's ``meta.h5``); ``names``:
        parameter name by ``id`` (for messages)."""
        self._schedule = ScheduleRecorder(rule, optimizer.param_groups if logged_groups is None else logged_groups)
        self._names, self._none, self._had = dict(names or {}), None, set()
        self._handle = optimizer.register_step_post_hook(self._used)

    def expect(self, step: int, record: Any, optimizer: torch.optim.Optimizer) -> None:
        """Step ``step`` will update with ``record.lrs`` and the optimizer's other hyperparameters as they are now:
        those that differ from the log's go into ``record.hyper``. Refuses a parameter without a gradient at this step
        after it had one (:meth:`_check_skipped`)."""
        groups = optimizer.param_groups
        flags = [p.grad is None for g in groups for p in g["params"]]  # (a list: no generator)
        if flags != self._none:  # else as at the last step: nothing to check
            self._check_skipped(step, optimizer, flags)
        self._values, record.hyper = self._schedule.values(step, groups)
        self._step, self._lrs = step, record.lrs

    def _check_skipped(self, step: int, optimizer: torch.optim.Optimizer, flags: list[bool]) -> None:
        """A parameter whose ``.grad`` is ``None`` at a step is skipped by ``torch.optim`` (no momentum, Adam moment or
        weight decay update), which the update rules (``step/optimizers.py``), taking it as a zero gradient, do not
        model: DIT's adjoint of the step would be wrong there (2-15% off the derivative of replay on an expert used on
        half the batches). Refused at the step a parameter that had a gradient has none; one that never had one (unused,
        frozen) does not matter (its deviation stays 0). ``flags``: which parameters have no gradient now (:meth:`expect`
        reads them, one pass over the parameters per step, and calls this where they differ from the last step's)."""
        if all(flags):  # a step without a backward (it changes nothing)
            return
        lost = [i for i, none in enumerate(flags) if none and i in self._had]
        if lost:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            which = [self._names.get(id(params[i]), f"#{i}") for i in lost]
            raise UnsupportedOptimizerError(
                f"InfluenceTracker: at step {step} the parameters {which[:5]} got no gradient (.grad is None: this step's "
                "forward did not use them, a branch or an expert was skipped) after they had one at an earlier step: "
                "torch.optim then leaves them out of the update (no momentum, no Adam moments, no weight decay), which "
                "the estimators' update rules do not model. Let the branch contribute a zero gradient instead of "
                "skipping it (e.g. add 0 * branch(x) to the output when it is not used)")
        self._had.update(i for i, none in enumerate(flags) if not none)
        self._none = flags

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _used(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        expected, self._lrs = self._lrs, None
        if expected is None:
            return
        used = [float(g["lr"]) for g in optimizer.param_groups]
        if used != expected:
            self.refused = self._step
            raise RuntimeError(
                f"InfluenceTracker: step {self._step} updated the parameters with learning rates {used}, but {expected} "
                f"were recorded at its on_before_optimizer_step: {_LATE}")
        values = self._schedule.read(optimizer.param_groups)
        if values != self._values:
            keys = self._schedule.keys
            changed = sorted({k for old, new in zip(self._values, values) for k, a, b in zip(keys, old, new) if a != b})
            self.refused = self._step
            raise RuntimeError(
                f"InfluenceTracker: step {self._step} updated the parameters with {', '.join(changed)} "
                f"{[[g[keys.index(k)] for k in changed] for g in values]} per param group, but "
                f"{[[g[keys.index(k)] for k in changed] for g in self._values]} were recorded at its "
                f"on_before_optimizer_step: {_LATE}")


class GradientMismatchError(RuntimeError):
    """The gradient the optimizer receives is not the weighted sum of the recorded per-sample gradients."""


def check_applied_gradient(step: int, rows: torch.Tensor, weights: Any, project: Any, module: nn.Module,
                           names: Sequence[str], precision: Precision,
                           reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                           left_out: dict[str, Sequence[slice]] | None = None) -> dict[str, Any]:
    """At the fit's first step with gradient rows: the gradient at the tracker's ``on_before_optimizer_step`` (what the
    optimizer will receive, before Lightning's clipping) projected as the rows are (``project``: the tracker's
    projector's ``project``) must be ``Σ_i w_i g_i`` of the step's rows (``weights``: ``step.weights``). Anything that
    changed the gradients before the tracker's hook (a callback listed before it that clips or adds noise, a
    ``Tensor.register_hook`` on a parameter) makes a step replay and the estimators cannot reproduce: refused there,
    nothing of the step stored. One host synchronisation, once per fit.

    Under DDP (``reduce``: the sum over the processes, a collective every process calls at this step) each process's
    ``Σ_i w_i g_i`` over its own rows is summed, as DDP averaged the gradients (the weights hold the ``1/world_size``).
    Under autocast the rows and the applied gradient are each rounded in the autocast dtype: the tolerance follows it
    (:func:`applied_tolerance`). With train-mode BatchNorm the rows are not parts of the applied gradient (its batch
    statistics couple the samples): not checked. ``left_out``: the columns (by tensor name) of tensors the hook
    engine demoted (its first-step check found their hooked row differs from autograd on the sample alone: a loss that
    mixes the samples, whose rows ``vmap`` then computes on each sample alone, so they are not parts of the applied
    gradient either): left out of the comparison, named in the entry. Returns the check's entry for ``meta.h5``: what
    was compared and how far apart, or why it was not checked, so no reader takes an unchecked log for a checked one."""
    train_bn = check_batchnorm(module, True, False, refuse=False)
    if train_bn:
        return {"step": step, "checked": False,
                "why": f"train-mode BatchNorm ({', '.join(train_bn[:3])}): its batch statistics couple the samples, so "
                       "the per-sample rows are not parts of the applied gradient"}
    live = dict(module.named_parameters())
    grads = {n: (live[n].grad if live[n].grad is not None else torch.zeros_like(live[n])).detach().unsqueeze(0).to(rows.dtype)
             for n in names}
    applied = project(grads)[0].double()
    summed = torch.tensor(np.asarray(weights, dtype=np.float64), device=rows.device) @ rows.double()  # a copy: the weights are read-only
    if reduce is not None:  # every process's share of the averaged gradient
        summed = reduce(summed)
    left_out = left_out or {}
    for cols in (c for slices in left_out.values() for c in slices):
        applied[cols] = summed[cols] = 0
    excluded = {"left_out": sorted(left_out)} if left_out else {}
    if left_out and not bool(applied.any()) and not bool(summed.any()):
        return {"step": step, "checked": False, **excluded,
                "why": "every tracked tensor's rows come from vmap on each sample alone after the hooks' check found "
                       "a loss that mixes the samples of a batch: they are not parts of the applied gradient"}
    scale = max(float(applied.norm()), float(summed.norm()), 1e-30)
    diff = float((applied - summed).norm()) / scale
    dtype = next((live[n].dtype for n in names if live[n].is_floating_point()), torch.float32)
    tolerance = applied_tolerance(dtype, precision)
    if diff > tolerance:
        raise GradientMismatchError(
            f"InfluenceTracker: at step {step} the gradient the optimizer receives is not the weighted sum of the "
            f"per-sample gradients of the step's losses (relative difference {diff:.2e}, tolerance {tolerance:.1e}): "
            "something changed the gradients before the tracker's on_before_optimizer_step (a callback listed before "
            "the tracker that clips them or adds noise, a gradient hook on a parameter, Tensor.register_hook), so "
            "replay and the estimators could not reproduce the step. Clip through Trainer(gradient_clip_val=...) and "
            "remove the change. Nothing of this step was stored.")
    return {"step": step, "checked": True, "relative_difference": diff, "tolerance": tolerance, **excluded}


def demoted_columns(projector: Any, demoted: Sequence[str], module: nn.Module, names: Sequence[str]
                    ) -> dict[str, list[slice]]:
    """The columns (by tensor) :func:`check_applied_gradient` leaves out: those of the tensors the hook engine demoted
    (``demoted``; a loss that mixes the samples, whose ``vmap`` rows are not parts of its gradient), except a block
    holding a parameter with a ``Tensor.register_hook`` (which explains the demotion: its columns show the change)."""
    live = dict(module.named_parameters())
    hooked = {projector.block_of[n] for n in names if getattr(live[n], "_backward_hooks", None)}
    return {n: [projector.slices[projector.block_of[n]]] for n in demoted if projector.block_of[n] not in hooked}


def applied_tolerance(dtype: torch.dtype, precision: Precision) -> float:
    """How far the applied gradient may be from ``Σ_i w_i g_i`` of the rows (relative, in norm): 1e-3, or 64 ulps of
    the parameters' dtype (float16 parameters, ``"16-true"``: their sums' rounding, 6%); under autocast 4 ulps of its
    dtype (bf16: 3%, fp16: 0.4%), where the batch's and the samples' products are each rounded there (bf16 on the CPU,
    an MLP of 64 hidden units: 0.16% full, 0.37% projected to 8 columns a tensor)."""
    tolerance = max(1e-3, 64 * torch.finfo(dtype).eps)
    if precision.autocast_dtype is not None:
        tolerance = max(tolerance, 4 * torch.finfo(getattr(torch, precision.autocast_dtype)).eps)
    return tolerance


_LATE = ("a value set after that hook (in the LightningModule's on_before_optimizer_step, which Lightning calls after "
         "the callbacks') cannot be recorded. Set it in training_step, in optimizer_step before optimizer.step(), or "
         "with a scheduler")


def check_training_set(loader: Any, has_ids_fn: bool) -> tuple[bool, int | None]:
    """``(batches carry ids as (x, ids), dataset size)``: where ids come from and what they index; sampling with
    replacement is refused before anything is written."""
    dataset = getattr(loader, "dataset", None)
    with_ids, problem = ids_source(dataset)
    if problem and not has_ids_fn:
        raise ValueError(f"InfluenceTracker: {problem}")
    try:
        size = len(dataset) if dataset is not None else None
    except TypeError:
        size = None
    if samples_with_replacement(loader):
        raise ValueError("InfluenceTracker: the training DataLoader samples with replacement (RandomSampler("
                         "replacement=True) or WeightedRandomSampler), so a sample can appear twice in a step; the "
                         "log and the estimators count each sample once per step. Sample without replacement.")
    return with_ids, size


def check_batchnorm(module: nn.Module, allow_train: bool, vmap_gradients: Sequence[str], refuse: bool = True) -> list[str]:
    """The BatchNorm layers in train mode; unless ``allow_train`` (or ``refuse`` is off: nothing per-sample is
    recorded), refused (its output mixes the samples of a batch); with it, the vmap engine still cannot evaluate it one
    sample at a time for the tracked parameters no hook covers (``vmap_gradients``, by name)."""
    names = []
    for name, mod in module.named_modules():
        if not (isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.training):
            continue
        names.append(name)
        if not refuse:
            continue
        if allow_train and vmap_gradients:
            raise RuntimeError(
                f"BatchNorm layer '{name}' is in train mode, which the vmap gradient engine cannot evaluate one "
                f"sample at a time, and no hook covers the tracked parameters {list(vmap_gradients)[:5]}: leave them "
                "out (exclude_params=[...] or params=[...]; the layers hooks cover: docs/per-sample-gradients.md, "
                "the table of layers)")
        if not allow_train and isinstance(mod, nn.SyncBatchNorm):
            raise RuntimeError(
                f"SyncBatchNorm layer '{name}' is in train mode (Trainer(sync_batchnorm=True) or "
                "nn.SyncBatchNorm.convert_sync_batchnorm): its batch statistics are taken over the samples of every "
                "process, so a sample's loss and gradient depend on the other processes' samples. Put it in eval mode "
                "during training (e.g. in on_train_epoch_start), replace it (GroupNorm/LayerNorm), train with "
                "per-process BatchNorm (Trainer(sync_batchnorm=False) and allow_train_batchnorm=True: replay "
                "reproduces each process's statistics), or pass allow_train_batchnorm=True to record it anyway: the "
                "log then says so, and replay, DIT and Diff-In refuse it (they cannot recompute statistics across "
                "processes); TracIn and Gauss-Newton DIT read only the logged rows")
        if not allow_train:
            raise RuntimeError(
                f"BatchNorm layer '{name}' is in train mode: its output mixes the samples of a batch, so per-sample "
                "losses and gradients are ill-defined. Put it in eval mode during training (e.g. in "
                "on_train_epoch_start), replace it (GroupNorm/LayerNorm), or pass allow_train_batchnorm=True")
    return names


def synced_batchnorm(module: nn.Module, train_bn: Sequence[str], world_size: int) -> dict[str, Any] | None:
    """``meta.h5``'s ``sync_batchnorm`` entry where some of the train-mode BatchNorm layers ``train_bn`` are
    ``nn.SyncBatchNorm`` in a fit of several processes (their statistics over every process's samples, which a
    step's re-evaluation, one process's micro-batch at a time, cannot reproduce: ``replay.load_step`` refuses the
    log); ``None`` otherwise (one process: SyncBatchNorm normalises as BatchNorm)."""
    synced = [n for n in train_bn if isinstance(module.get_submodule(n), nn.SyncBatchNorm)]
    return {"layers": synced, "world_size": int(world_size)} if synced and world_size > 1 else None


def no_stop_iteration(hook: Callable[..., Any]) -> Callable[..., Any]:
    """A training-loop hook whose ``StopIteration`` is re-raised as a ``RuntimeError``: Lightning takes one for the end
    of the epoch's data and ends the epoch silently, so one escaping the tracker (a dataset's ``__getitem__`` or a loss
    function met in a check) would drop the rest of the epoch and mix the half-recorded step into the next."""

    @functools.wraps(hook)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return hook(*args, **kwargs)
        except StopIteration as err:
            raise RuntimeError(f"InfluenceTracker.{hook.__name__}: a StopIteration was raised inside it ({err!r}); "
                               "Lightning would have ended the epoch silently. See the traceback for where") from err

    return guarded


def check_first_batch(loader: Any, batch: Any, ids: torch.Tensor, module: Any, ids_key: str, dataset_size: int | None,
                      store_inputs: bool) -> None:
    """The fit's first batch: a dataclass batch's type registered for torch's pytrees (``data.as_pytree``), and,
    unless its inputs are stored, its ids (valid ids first: the batch is rebuilt from them) and its dataset
    (:func:`check_dataset`)."""
    as_pytree(batch)
    if not store_inputs:
        check_ids(ids, ids_key, dataset_size)
        check_dataset(loader, batch, ids, module)


def check_dataset(loader: Any, batch: Any = None, ids: torch.Tensor | None = None, module: Any = None) -> None:
    """Refuse, at the first step, training inputs that replay could not rebuild from the training set by id: a
    dataset whose ``ds[i]`` changes between calls (random augmentation), and a first ``batch`` that is not
    ``collate([ds[i] for i in ids])`` with the loader's ``collate_fn`` (a random collate, such as token masking; the
    module's batch-transfer hooks changing the batch), up to the precision plugin's cast of its floats. Every random
    generator is left as found, so training is unchanged."""
    dataset = getattr(loader, "dataset", None)
    if dataset is None or not hasattr(dataset, "__getitem__"):
        return
    try:
        n = len(dataset)
    except TypeError:
        return
    with generators_kept():
        for i in sorted({0, n // 2, n - 1}) if n else []:
            if not _same(dataset[i], dataset[i]):
                raise RuntimeError(
                    f"InfluenceTracker: the training dataset returns different values for ds[{i}] on two calls "
                    "(random augmentation or other randomness in __getitem__), so replay and the estimators "
                    "could not reproduce the inputs of a step. Pass InfluenceTracker(store_inputs=True) to store "
                    "the exact inputs of every micro-batch, or make __getitem__ deterministic")
        if batch is None or ids is None:
            return
        collate = loader_collate(loader)
        rebuilt = (collate or default_collate)([dataset[int(i)] for i in ids.tolist()])
    if not _same(_cast_like(rebuilt, batch), apply_to_collection(batch, torch.Tensor, lambda t: t.detach().cpu())):
        how = f"its DataLoader's collate_fn {getattr(collate, '__qualname__', collate)!r}" if collate else "default_collate"
        hooks = [h for h in ("on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer")
                 if not getattr(getattr(type(module), h, None), "__module__", "lightning.").startswith("lightning.")]
        raise RuntimeError(
            "InfluenceTracker: the first training batch is not what its samples give when collated again: "
            f"{how} applied to ds[i] for the batch's ids made other values"
            + (f", and the module changes batches in {', '.join(hooks)}" if hooks else "")
            + ". Replay and the estimators rebuild every step's batch that way, so they would train on other inputs. "
            + (f"Do what {hooks[0]} does in the dataset or the collate function instead" if hooks else
               "Make the collate function deterministic (random masking or cropping belongs in the training step, "
               "drawn from torch's generator)")
            + ", or pass InfluenceTracker(store_inputs=True) to store the exact inputs of every micro-batch")


def _cast_like(rebuilt: Any, batch: Any) -> Any:
    """``rebuilt`` with each floating tensor in the dtype of ``batch``'s (the precision plugin's ``convert_input``:
    ``"64-true"``, ``"bf16-true"``)."""
    if isinstance(rebuilt, torch.Tensor) and isinstance(batch, torch.Tensor):
        return rebuilt.to(batch.dtype) if rebuilt.is_floating_point() and batch.is_floating_point() else rebuilt
    if isinstance(rebuilt, dict) and isinstance(batch, dict):
        return {k: _cast_like(v, batch[k]) if k in batch else v for k, v in rebuilt.items()}
    if isinstance(rebuilt, (list, tuple)) and isinstance(batch, (list, tuple)) and len(rebuilt) == len(batch):
        return type(rebuilt)(_cast_like(a, b) for a, b in zip(rebuilt, batch)) if type(rebuilt) in (list, tuple) \
            else rebuilt
    return rebuilt


def check_distinct_ids(step: int, seen: Sequence[torch.Tensor], ids: torch.Tensor) -> None:
    """A sample may appear in only one micro-batch of an optimizer step (host ids; device ids are checked later)."""
    if seen and ids.device.type == "cpu" and len(torch.unique(torch.cat([*seen, ids]))) != sum(len(s) for s in seen) + len(ids):
        raise ValueError(f"step {step}: the same sample id appears in two micro-batches of one optimizer step")


def distributed_padding(loader: Any) -> str | None:
    """What a ``DistributedSampler`` of ``loader`` repeats to give every process as many samples (``drop_last=False``
    and a dataset size not divisible by the processes: the epoch's last samples repeat its first), or ``None``."""
    from torch.utils.data import DistributedSampler

    for sampler in (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        if isinstance(sampler, DistributedSampler) and not sampler.drop_last:
            n, world = len(sampler.dataset), sampler.num_replicas
            if n % world:
                return (f"the DistributedSampler of {n} samples on {world} processes repeats {world - n % world} of "
                        "each epoch's first samples at its end")
    return None


def check_ranks_distinct(step: int, ids: torch.Tensor, all_gather: Callable[[torch.Tensor], torch.Tensor],
                         padding: str | None = None) -> None:
    """Under DDP, at the fit's first step: no sample is in the batches of two processes (``all_gather``: the
    strategy's, a collective every process calls at this step; ``ids``: this process's ids of the step). A sampler
    that does not split the data by rank makes every process train on the same batches, each sample counted once per
    process in the averaged gradient; the log would hold it several times a step, which it counts once
    (:func:`check_distinct_ids`). Two ``all_gather`` calls of a few integers, once per fit. ``padding``
    (:func:`distributed_padding`): the sampler repeats samples at each epoch's end, which fall in the step of their
    first use only where an epoch is one optimizer step (elsewhere a repeat is another step's sample, logged there
    with the weight its gradient had), so this step shows it for every epoch."""
    sizes = all_gather(torch.tensor([len(ids)], device=ids.device)).reshape(-1)
    longest = int(sizes.max())
    padded = torch.full((longest,), -1, dtype=torch.int64, device=ids.device)
    padded[:len(ids)] = ids.to(torch.int64)
    every = all_gather(padded).reshape(-1).cpu()
    every = every[every >= 0]
    values, counts = torch.unique(every, return_counts=True)
    if bool((counts > 1).any()):
        twice = values[counts > 1].tolist()
        if padding is not None:
            raise ValueError(
                f"InfluenceTracker: at step {step} the samples {twice[:5]}{' ...' if len(twice) > 5 else ''} are in the "
                f"batches of more than one process: {padding}, and an epoch here is one optimizer step, so those "
                "repeats are in the step that uses them first; each counts twice in the averaged gradient, which the "
                "log (one row per sample and step) cannot say. Give the DataLoader a sampler that does not repeat "
                "samples: DataLoader(dataset, sampler=DistributedSampler(dataset, drop_last=True), ...) with "
                "Trainer(use_distributed_sampler=False), or a dataset size divisible by the number of processes, or "
                "more steps an epoch (a smaller batch or accumulate_grad_batches)")
        raise ValueError(
            f"InfluenceTracker: at step {step} the samples {twice[:5]}{' ...' if len(twice) > 5 else ''} are in the "
            f"batches of more than one process ({len(twice)} of {len(values)}): the processes do not train on "
            "disjoint parts of the data (a sampler, batch_sampler or IterableDataset that does not split it by rank), "
            "so each such sample counts once per process in the averaged gradient, which the log (one row per sample "
            "and step) cannot say. Split the data by rank (Lightning's default DistributedSampler, "
            "use_distributed_sampler=True, or your sampler sharding by trainer.global_rank); with a dataset smaller "
            "than the processes' batch, DistributedSampler pads it with repeated samples: use fewer processes")


def check_losses(out: Any, n: int, name: str) -> None:
    """Per-sample losses must be a tensor of shape ``[n]``; the message names the function that returned them."""
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (n,):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"InfluenceTracker: {name} returned {shape} for a batch of {n} samples; it must return one "
                         f"loss per sample, shape [{n}] (e.g. F.cross_entropy(..., reduction='none')), whose mean is "
                         "the training loss")


def trainer_precision(trainer: Any) -> Precision:
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
def generators_kept() -> Iterator[None]:
    """Run a block that may draw random numbers (a dataset's ``__getitem__``) and put torch's (CPU and every CUDA
    device), Python's and NumPy's global generators back as they were: training must not notice the tracker."""
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with rng.forked():
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


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
    if dataclasses.is_dataclass(a) and not isinstance(a, type) and type(a) is type(b):  # a dataclass batch, field by field
        return all(_same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - objects without a usable equality cannot be checked
        return True
