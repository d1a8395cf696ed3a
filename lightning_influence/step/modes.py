"""The train/eval modes of the submodules as training ran each step, recorded and set again.

Lightning runs ``training_step`` on the module in train mode, but a user may keep submodules in eval mode
(a frozen BatchNorm, ``self.bn.eval()`` in ``on_train_epoch_start``, which the tracker's refusal of
train-mode BatchNorm suggests), and change that during the fit (unfreeze at epoch 5). A step evaluated
again with other modes is another function: a BatchNorm switched to train mode normalises with batch
statistics instead of its running ones, a dropout switched off draws no mask.

The tracker records, at the fit's first batch, each epoch's first and each checkpointed step's (one walk over the
modules each time, none at the other steps), the names of the modules in eval mode (``named_modules`` names, ``""`` the LightningModule itself) and, when they
differ from the last entry, the step they start at: ``meta.h5``'s ``eval_modules`` schedule
(``docs/log-format.md``; ``docs/replay.md``, Modes). Every re-evaluation of a step
(``step.micro.MicroBatch.context``) sets exactly those modes on whatever module it is given and restores the
module's own afterwards (:func:`exact_modes`). A log without the schedule (older logs) keeps the former rule
(``step.micro.training_mode``). Pure torch.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Any, Iterator, Mapping, Sequence

from torch import nn

__all__ = ["ModeSchedule", "ModeWatch", "batchnorm_in_train", "eval_module_names", "exact_modes", "with_modes"]

META_KEY = "eval_modules"  # [{"step": s, "eval": [names]}, ...] by increasing step: the modes from step s on


def eval_module_names(module: nn.Module) -> list[str]:
    """The ``named_modules`` names of the modules in eval mode (``""``: ``module`` itself), in module order."""
    return [name for name, m in module.named_modules() if not m.training]


@contextlib.contextmanager
def exact_modes(module: nn.Module | None, eval_names: Sequence[str]) -> Iterator[None]:
    """``module`` with exactly the modules named in ``eval_names`` in eval mode and every other one in train mode
    (each module's own flag, whatever ``train()`` overrides would do); every flag restored afterwards.

    Raises:
        ValueError: a name the module does not have (the module is not the one the log was recorded with).
    """
    if module is None:
        yield
        return
    frozen = set(eval_names)
    changed = []  # the modules whose flag differs from training's: set here, restored after
    for name, m in module.named_modules():
        train = name not in frozen
        frozen.discard(name)
        if m.training != train:
            changed.append((m, m.training))
            object.__setattr__(m, "training", train)  # the plain flag, without nn.Module.__setattr__'s lookups
    try:
        if frozen:
            raise ValueError(f"the module does not match the log: training ran modules {sorted(frozen)[:5]} in eval "
                             "mode, which the module given does not have")
        yield
    finally:
        for m, training in changed:
            object.__setattr__(m, "training", training)


class ModeSchedule:
    """The log's ``eval_modules`` schedule: the modules in eval mode at each step (:meth:`at`)."""

    def __init__(self, entries: Sequence[Mapping[str, Any]]) -> None:
        self.steps = [int(e["step"]) for e in entries]
        self.names = [tuple(str(n) for n in e["eval"]) for e in entries]

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> ModeSchedule | None:
        """The schedule of a log's meta; ``None`` for a log that holds none (written before modes were recorded)."""
        entries = meta.get(META_KEY)
        return None if entries is None else cls(entries)

    def at(self, step: int) -> tuple[str, ...] | None:
        """The names of the modules in eval mode at ``step``; ``None`` before the first entry (not recorded)."""
        out = None
        for s, names in zip(self.steps, self.names):
            if s > step:
                break
            out = names
        return out

    def ever_train(self, name: str) -> bool:
        """Module ``name`` ran in train mode at some step."""
        return any(name not in names for names in self.names)


def batchnorm_in_train(module: nn.Module, meta: Mapping[str, Any]) -> list[str]:
    """The BatchNorm layers of ``module`` that training ran in train mode at some step: by the log's schedule, else (a
    log without one) those its ``train_batchnorm`` names (in train mode at the fit's first step)."""
    schedule = ModeSchedule.from_meta(meta)
    if schedule is None:
        return list(meta.get("train_batchnorm") or [])
    return [name for name, m in module.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and schedule.ever_train(name)]


def with_modes(meta: Mapping[str, Any], step: int, names: Sequence[str]) -> dict[str, Any]:
    """``meta`` with the modules ``names`` in eval mode from ``step`` on: entries from ``step`` on (a resumed fit's
    steps, recorded again) dropped, an entry added unless the modes are the last entry's already."""
    kept = [e for e in meta.get(META_KEY) or [] if int(e["step"]) < step]
    if not kept or list(kept[-1]["eval"]) != list(names):
        kept.append({"step": int(step), "eval": list(names)})
    return {**meta, META_KEY: kept}


class ModeWatch:
    """The tracker's check of the modes: at a fit's first batch, each epoch's first (``batch_idx == 0``) and each
    checkpointed step's, one walk over the modules; the fit's first observation and every change go into ``meta.h5``
    (rank 0's ``LogWriter.amend_meta``, :func:`with_modes`). A change in the middle of an epoch is seen at the next
    checkpoint at best, with a warning: the steps since the last observation replay with the former modes (a replay
    verifying that checkpoint stops there), those from the checkpoint on with the new ones (``docs/replay.md``)."""

    def __init__(self) -> None:
        self._last: list[str] | None = None
        self._seen = 0  # the step of the last observation

    def start(self) -> None:
        """A new fit: its first batch records the modes (a resumed fit's start too: the log's schedule is cut there)."""
        self._last = None

    def observe(self, module: nn.Module, step: int, batch_idx: int, checkpoint: bool, writer: Any) -> bool:
        """At every batch start: cheap unless it is the fit's first batch, an epoch's first or a checkpointed step's
        (``checkpoint``). ``writer``: rank 0's (``LogWriter.amend_meta``), ``None`` on the other ranks (which record
        nothing). Returns whether the modes changed since the fit's first observation (the tracker's checks of the
        first step, train-mode BatchNorm, then run again)."""
        if batch_idx != 0 and not checkpoint and self._last is not None:
            return False
        names = eval_module_names(module)
        seen, self._seen = self._seen, step
        if names == self._last:
            return False
        changed = self._last is not None
        if changed and batch_idx != 0 and writer is not None:
            warnings.warn(f"InfluenceTracker: the modules in eval mode changed in the middle of an epoch, seen at step "
                          f"{step} (now {names or 'none'}, were {self._last or 'none'} at step {seen}): replay and the "
                          f"estimators run steps {seen}..{step - 1} with the former modes, some of which trained with "
                          f"the new ones (a replay verifying the checkpoint at step {step} stops there). Change modes in "
                          "on_train_epoch_start", RuntimeWarning, stacklevel=2)
        self._last = names
        if writer is not None:
            writer.amend_meta(functools.partial(with_modes, step=step, names=names))
        return changed
