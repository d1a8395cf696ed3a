"""The random state of a training micro-batch: recorded at its forward, restored by every re-evaluation.

Dropout (and any other random op in the loss) draws from the CPU generator and, for CUDA
tensors, from the generator of the tensor's device. The tracker records, at the start of
each micro-batch's forward (``on_train_batch_start``), the state of the CPU generator and of
every initialised CUDA device generator; every pass that evaluates that micro-batch again
(the tracker's own passes, replay, the DIT sweep, Diff-In, replay leave-one-out) runs inside
:func:`restored`, so it draws exactly the masks training drew, and the caller's generators
are left as they were found (``docs/log-format.md``, random state).

Compactly: a CUDA generator is a Philox seed and offset (16 bytes, ``torch.cuda.get_rng_state``);
the CPU generator is a Mersenne-Twister state (5056 bytes). Each is kept only when the
micro-batch's forward and backward actually drew from it (its state changed between the start
of the forward and the end of the backward, :func:`drawn`); a micro-batch that drew nothing
needs no state.
Pure torch.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

__all__ = ["NONE", "RandomState", "capture", "cuda_devices", "drawn", "forked", "restored", "started"]

CUDA_STATE_BYTES = 16  # Philox seed and offset


@dataclass(frozen=True)
class RandomState:
    """Generator states at a micro-batch's forward.

    Attributes:
        cpu: the CPU generator state (``uint8``), or ``None`` when the micro-batch drew no CPU
            random number (restoring then leaves the CPU generator alone).
        cuda: ``(n_devices, 16)`` ``uint8``: the state of CUDA devices ``0 .. n_devices−1``
            (empty when CUDA was not initialised).
    """

    cpu: np.ndarray | None  # a tensor only in a state from started(), until drawn() reduces it
    cuda: np.ndarray

    @property
    def drew(self) -> bool:
        """Holds a generator state (after :func:`drawn`: the forward drew random numbers)."""
        return self.cpu is not None or self.cuda.size > 0


NONE = RandomState(None, np.zeros((0, CUDA_STATE_BYTES), np.uint8))
"""The state of a micro-batch that needs none (or of a log that did not record it)."""


_CUDA_BUILT = torch.backends.cuda.is_built()  # a torch without CUDA never initialises it


def cuda_devices() -> list[int]:
    """Indices of every CUDA device whose generator may have been used (all, once CUDA is initialised)."""
    if not _CUDA_BUILT or not torch.cuda.is_initialized() or not torch.cuda.is_available():  # the cheapest first
        return []
    return list(range(torch.cuda.device_count()))


def capture() -> RandomState:
    """The current state of the CPU generator and of every initialised CUDA device generator."""
    with _plain():
        cpu = torch.get_rng_state().numpy()  # a new tensor each call: nothing else holds it
        cuda = [torch.cuda.get_rng_state(d).numpy() for d in cuda_devices()]
    return RandomState(cpu, np.stack(cuda) if cuda else NONE.cuda)


def started() -> RandomState:
    """The generator states at a training step's forward (and at its backward's end, ``now`` of :func:`drawn`), for
    :func:`drawn` alone: its CPU state stays a tensor.

    :func:`capture` at the cost a training step can pay for it: every call here runs on caches the step has just
    filled, where each one costs tens of µs, and a conversion to numpy is as dear as reading the state (only a state
    the forward drew from is converted, by :func:`drawn`). Outside ``torch.func`` transforms (Lightning's hooks).
    """
    return RandomState(torch.default_generator.get_state(), capture().cuda if cuda_devices() else NONE.cuda)


def drawn(before: RandomState, now: RandomState | None = None) -> RandomState:
    """``before`` (from :func:`capture` or :func:`started`) reduced to the generators that moved between it and ``now``
    (those a forward drew from).

    ``now``: the states when the forward and backward were done, from :func:`started` called then (its CUDA states
    read only where ``before`` has them); ``None``: read the generators now. The tracker reads ``now`` at every step's
    end and reduces later, a few steps at a time: the comparison is far cheaper on the warm caches of a batch of steps
    than between two training steps.
    """
    if now is None:
        with _plain():
            now = RandomState(torch.get_rng_state(), capture().cuda if before.cuda.size else NONE.cuda)
    cpu, cpu_now = before.cpu, now.cpu
    if type(cpu) is torch.Tensor and type(cpu_now) is torch.Tensor:  # states from started()
        # their bytes compared: between two training steps half the cost of torch.equal (the numpy view kept if they differ)
        cpu = cpu.numpy()
        if cpu.tobytes() == cpu_now.numpy().tobytes():
            cpu = None
    else:
        cpu = cpu.numpy() if isinstance(cpu, torch.Tensor) else cpu
        cpu_now = cpu_now.numpy() if isinstance(cpu_now, torch.Tensor) else cpu_now
        if cpu is not None and cpu.tobytes() == cpu_now.tobytes():
            cpu = None
    if not before.cuda.size:  # the CUDA generators are read only where they were (at every step: the fewest calls)
        return NONE if cpu is None else RandomState(cpu, NONE.cuda)
    moved = now.cuda.shape != before.cuda.shape or not np.array_equal(now.cuda, before.cuda)
    return RandomState(cpu, before.cuda if moved else NONE.cuda)


def _plain() -> Any:
    """Generator states are plain byte tensors even inside ``torch.func`` transforms (``vmap``/``jvp`` evaluate a
    step's losses under its random state), where tensors created would otherwise be wrapped."""
    return torch._C._DisableFuncTorch()


def _set(state: RandomState) -> None:
    if state.cpu is not None:
        torch.set_rng_state(torch.from_numpy(np.ascontiguousarray(state.cpu, dtype=np.uint8)))
    for d, s in enumerate(state.cuda):
        torch.cuda.set_rng_state(torch.from_numpy(np.ascontiguousarray(s, dtype=np.uint8)), d)


@contextmanager
def forked() -> Iterator[None]:
    """Run a block and put the CPU and every CUDA device generator back as they were found."""
    devices = cuda_devices()
    with _plain():
        cpu = torch.get_rng_state()
        cuda = [torch.cuda.get_rng_state(d) for d in devices]
    try:
        yield
    finally:
        with _plain():
            torch.set_rng_state(cpu)
            for d, state in zip(devices, cuda):
                torch.cuda.set_rng_state(state, d)


@contextmanager
def restored(state: RandomState | None) -> Iterator[None]:
    """Run a block with the generators set to ``state``; afterwards they are as the caller left them.

    ``None`` or an empty state (a micro-batch that drew nothing, a version-1 log) sets nothing
    but still forks, so the block cannot move the caller's generators either.
    """
    if state is not None and len(state.cuda) > len(cuda_devices()):
        raise ValueError(f"the run drew random numbers on {len(state.cuda)} CUDA device(s) but only "
                           f"{len(cuda_devices())} are initialised here: evaluate on the run's device "
                           "(module.to('cuda')) so dropout masks can be reproduced")
    with forked():
        if state is not None:
            with _plain():
                _set(state)
        yield
