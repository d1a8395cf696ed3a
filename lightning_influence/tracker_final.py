"""θ_T, the log's final checkpoint, as the last optimizer step left it, and stored even when no training hook ran.

Lightning's weight-averaging callbacks (``StochasticWeightAveraging``; ``WeightAveraging``, e.g. EMA) copy their
average into the module at ``on_train_end``, before the tracker's when listed before it. θ_T taken then is no optimizer
step's result: replay to it failed at the last segment and blamed data or round-off. With such a callback in the fit,
the tracker takes θ_T at every ``on_train_epoch_end`` (after the epoch's last step; ``on_train_end`` follows the last
one, with no step between) and stores that one. The estimators then explain the trajectory up to its last step; the
averaged weights are not a point of it (``meta.h5``: ``final_weights_replaced_by``).

A fit resumed from a Lightning checkpoint taken at the very end of training runs no training hook; if the run that
wrote the log was killed after that checkpoint but before its ``on_train_end``, the log has every step but no θ_T:
:func:`store_missing_final` stores it at the resumed fit's end.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from lightning.pytorch.callbacks import Callback, StochasticWeightAveraging
from lightning.pytorch.utilities import rank_zero_info

from lightning_influence.log.reader import InfluenceLog
from lightning_influence.log.records import CheckpointRecord
from lightning_influence.log.resume import log_exists
from lightning_influence.log.writer import LogWriter, acquire_writer_lock
from lightning_influence.step.pending import checkpoint_record

try:  # Lightning >= 2.5
    from lightning.pytorch.callbacks import WeightAveraging
    _REPLACERS: tuple[type, ...] = (StochasticWeightAveraging, WeightAveraging)
except ImportError:  # pragma: no cover - older Lightning
    _REPLACERS = (StochasticWeightAveraging,)


def weight_replacers(callbacks: Sequence[Callback]) -> list[str]:
    """Class names of the callbacks that replace the module's weights when training ends."""
    return [type(cb).__name__ for cb in callbacks if isinstance(cb, _REPLACERS)]


class FinalCheckpoint:
    """θ_T for the log: the module's at ``on_train_end``, or, with a weight-replacing callback in the fit, the one taken
    at the last ``on_train_epoch_end`` (rank zero, which stores checkpoints)."""

    def __init__(self) -> None:
        self.replacers: list[str] = []
        self._taken: CheckpointRecord | None = None

    def start(self, callbacks: Sequence[Callback]) -> None:
        self.replacers, self._taken = weight_replacers(callbacks), None

    def epoch_end(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        if self.replacers:
            self._taken = checkpoint_record(module, optimizer, step)

    def take(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> CheckpointRecord:
        taken, self._taken = self._taken, None
        if taken is not None and taken.step == step:
            return taken
        return checkpoint_record(module, optimizer, step)

    def note(self, settle: Callable[[dict[str, Any]], None]) -> None:
        """With a weight-replacing callback, ``meta.h5`` (``settle``: the tracker's amendment) and the user are told."""
        if self.replacers:
            settle({"final_weights_replaced_by": self.replacers})
            rank_zero_info(f"InfluenceTracker: {', '.join(self.replacers)} replaces the module's weights with an average "
                           "when training ends; the log's final parameters are the last optimizer step's, whose "
                           "trajectory the estimators explain")


def store_missing_final(log_dir: str, run_id: str | None, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        step: int, new_writer: Callable[[], LogWriter]) -> None:
    """θ_T of the log ``run_id`` (the one the resumed fit continued) at ``step``, if it has every step but no θ_T."""
    if not (run_id and step > 0 and log_exists(log_dir)):
        return
    with InfluenceLog(log_dir) as log:
        if log.meta.get("run_id") != run_id or log.finished or log.num_steps != step:
            return
    lock = acquire_writer_lock(log_dir, 0)
    try:
        writer = new_writer()
        writer.add_checkpoint(checkpoint_record(module, optimizer, step))
        writer.close()
    finally:
        lock.release()
