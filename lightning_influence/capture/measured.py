"""The faster of equivalent computations on this CPU, measured once per shape, as ``cudnn.benchmark`` does.

Which of two equal computations runs faster (a convolution's memory format, the order of a batched product) depends on
the CPU's oneDNN and MKL kernels, not only on the shapes: a rule measured on one CPU was backwards on another
(``docs/per-sample-gradients.md``). So a choice large enough to matter is timed at its first call, both ways
alternating, and the winner kept for that key for the rest of the process; the other way wins only if it is at least
:data:`MARGIN` faster, so near-ties keep the fixed rule. Under ``torch.use_deterministic_algorithms(True)``
(``Trainer(deterministic=True)``) and off the CPU nothing is measured (:func:`measurable`): the fixed rule, so that no
timing decides a row's rounding there.
"""

from __future__ import annotations

import time
from collections.abc import Callable, MutableMapping, Sequence
from typing import Any, Hashable

import torch

__all__ = ["fastest", "measurable", "MARGIN", "REPEATS", "LONG_SECONDS"]

MARGIN = 0.05
"""How much faster another option must be than the fixed rule's to be taken."""
REPEATS = 5
"""Alternating runs of each option after a first run of each, the fastest kept; the first runs alone decide where they
take over :data:`LONG_SECONDS`."""
LONG_SECONDS = 0.1


def measurable(t: torch.Tensor) -> bool:
    """Whether a choice for tensor ``t`` may be timed: on the CPU, with deterministic algorithms off."""
    return t.is_cpu and not torch.are_deterministic_algorithms_enabled()


def fastest(cache: MutableMapping[Hashable, Any], key: Hashable, options: Sequence[tuple[Any, Callable[[], Any]]],
            default: Any) -> Any:
    """The value of the fastest of ``options`` (``(value, run)`` pairs, thread CPU time of ``run()``), cached under
    ``key`` in ``cache``; ``default`` (one of the values: the fixed rule) unless another is :data:`MARGIN` faster.

    A first run of each (slow where oneDNN makes its primitive for a shape at its first call) is timed and kept as a
    candidate; :data:`REPEATS` alternating runs after it decide, unless the first runs alone took over
    :data:`LONG_SECONDS`."""
    if key in cache:
        return cache[key]
    runs = sorted(options, key=lambda o: o[0] != default)  # the fixed rule's first

    def timed(run: Callable[[], Any]) -> float:
        start = time.thread_time()
        run()
        return time.thread_time() - start

    best = {value: timed(run) for value, run in runs}
    if sum(best.values()) <= LONG_SECONDS:
        for _ in range(REPEATS):
            for value, run in runs:
                best[value] = min(best[value], timed(run))
    winner = min(best, key=best.__getitem__)
    cache[key] = winner if best[winner] < (1 - MARGIN) * best[default] else default
    return cache[key]
