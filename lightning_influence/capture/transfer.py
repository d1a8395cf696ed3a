"""Device-to-host copies that do not stall training: non-blocking, into pinned buffers.

The tracker's rows (ids, losses, projected gradients, HVP products, checkpoints) are made on
the training device. Copying them with ``.cpu()`` would make the host wait, at every step,
for everything queued on the device so far (a synchronisation training itself does not do).
:class:`HostCopy` instead queues each copy on the current stream into page-locked host memory
(``non_blocking=True``) and records a CUDA event after them; :meth:`HostCopy.ready` asks the
event without waiting, :meth:`HostCopy.wait` waits for it (by then, usually, long done) and
returns numpy arrays. On the CPU the copies are plain clones and are ready at once; a CPU step's
rows (:meth:`HostCopy.of_step`) are not even cloned (new tensors, handed over).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

__all__ = ["HostCopy"]


def _start(t: Tensor, fresh: bool, devices: set[torch.device]) -> Tensor:
    t = t.detach()
    if t.device.type == "cuda":
        devices.add(t.device)
        buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        buf.copy_(t, non_blocking=True)
        return buf
    if fresh and t.device.type == "cpu":
        return t  # handed over: nothing else holds or changes it
    return t.to("cpu", copy=True)  # a clone: the source (a parameter, a buffer) may change before it is read


def _map(fn: Callable[[Tensor], Any], tree: Any) -> Any:
    """``tree`` with ``fn`` applied to its tensors (dicts, lists, tuples): a plain recursion, several times faster
    than ``torch.utils._pytree`` on the few small trees of a step, which it maps at every step."""
    if isinstance(tree, Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        return {k: _map(fn, v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map(fn, v) for v in tree)
    return tree


class HostCopy:
    """Host copies of every tensor in a tree (dicts, lists, tuples; other leaves kept as they are).

    Args:
        tree: the tensors to copy; CUDA tensors are copied without blocking into pinned memory.
        fresh: keys of ``tree`` (a dict) whose CPU tensors the caller hands over (new tensors nothing else
            holds or writes to): they are kept as they are, not cloned.
    """

    def __init__(self, tree: Any, fresh: tuple[str, ...] = ()) -> None:
        devices: set[torch.device] = set()
        if fresh:
            self._tree = {k: _map(lambda x, f=k in fresh: _start(x, f, devices), v) for k, v in tree.items()}
        else:
            self._tree = _map(lambda x: _start(x, False, devices), tree)
        self._events = []
        self._rows: tuple[dict[str, Tensor], Any] | None = None  # of_step's CPU rows, kept as they are (tree: None)
        for device in devices:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            self._events.append(event)

    @classmethod
    def of_step(cls, rows: dict[str, Tensor], checkpoint: tuple[Any, Any] | None, random: Any = None) -> HostCopy:
        """The copy of a step's rows (handed over, see ``fresh``), of its checkpoint's tensors and of ``random`` (also
        handed over), as ``{"rows": ..., "checkpoint": ..., "random": ...}``. CPU rows without a checkpoint (every
        step of a CPU run but the checkpointed ones) are kept as they are, not even walked: nothing to copy or to wait
        for, and :meth:`wait` makes the numpy views when the step is handed on (a few steps at a time)."""
        for t in rows.values():
            if not t.is_cpu:
                break
        else:
            if checkpoint is None:
                copy = cls.__new__(cls)
                copy._tree, copy._events, copy._rows = None, [], (rows, random)
                return copy
        return cls({"rows": rows, "checkpoint": checkpoint, "random": random}, fresh=("rows", "random"))

    def ready(self) -> bool:
        """Whether every copy has completed (never waits)."""
        return all(e.query() for e in self._events)

    def wait(self) -> Any:
        """The tree with every tensor as a numpy array, once the copies have completed."""
        if self._rows is not None:  # of_step's CPU rows: numpy views
            rows, random = self._rows
            return {"rows": {k: (t.detach() if t.requires_grad else t).numpy() for k, t in rows.items()},
                    "checkpoint": None, "random": random}
        for e in self._events:
            e.synchronize()
        self._events = []
        return _map(lambda x: x.numpy(), self._tree)
