"""Activation checkpointing (``torch.utils.checkpoint``) switched off inside the package's own passes.

A checkpointed block runs its forward again during the backward to rebuild its activations, reading the module's
parameters *then*. The package's passes evaluate the model at parameters of its own choosing through
``torch.func.functional_call`` (replay, replay leave-one-out, DIT's curvature passes, the tracker's own and HVP
passes), whose parameter swap ends when the forward returns: the recomputation in the backward read the live
module's parameters instead, so every gradient through a checkpointed block was the gradient at the wrong point
(replay of a run with ``checkpoint(block, x, use_reentrant=False)`` left the logged run by 27-50% of a step's
movement from its third step on). Inside :func:`plain_checkpoints` ``checkpoint`` runs its function as a plain call
(its activations kept, nothing recomputed): the same values, the same gradients, at the parameters the pass gave.
Training itself is untouched. Pure torch.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator

import torch.utils.checkpoint as _checkpoint

__all__ = ["plain_checkpoints"]


def _plain_generator(*args: Any, **kwargs: Any) -> Iterator[None]:
    """Stands in for ``_checkpoint_without_reentrant_generator``: nothing before or after the function (one yield)."""
    yield


class _PlainFunction:
    """Stands in for the reentrant ``CheckpointFunction``: ``apply(function, preserve_rng_state, *args)`` calls it."""

    @staticmethod
    def apply(function: Any, preserve_rng_state: bool, *args: Any) -> Any:
        return function(*args)


class _Switch:
    """The module globals ``checkpoint`` looks up, swapped while any thread is inside :func:`plain_checkpoints` (they
    are process-wide: another thread's checkpointed block then also runs plain, the same values with more memory)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._saved: tuple[Any, Any] | None = None

    def enter(self) -> None:
        with self._lock:
            if self._depth == 0:
                self._saved = (_checkpoint._checkpoint_without_reentrant_generator, _checkpoint.CheckpointFunction)
                _checkpoint._checkpoint_without_reentrant_generator = _plain_generator
                _checkpoint.CheckpointFunction = _PlainFunction
            self._depth += 1

    def exit(self) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                _checkpoint._checkpoint_without_reentrant_generator, _checkpoint.CheckpointFunction = self._saved
                self._saved = None


_SWITCH = _Switch()


@contextlib.contextmanager
def plain_checkpoints() -> Iterator[None]:
    """``torch.utils.checkpoint.checkpoint`` (either variant, and ``checkpoint_sequential``) as a plain call."""
    _SWITCH.enter()
    try:
        yield
    finally:
        _SWITCH.exit()
