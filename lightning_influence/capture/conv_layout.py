"""The memory format of a 2-D column convolution on the CPU: measured once per geometry, as ``cudnn.benchmark`` does.

A column convolution (:func:`.layers.conv_columns`) and the batched product after it run in either NCHW or
channels-last memory. Which is faster depends on the CPU's oneDNN kernels, not only on the shapes: the benchmark
CNN's second layer (``[64, 32, 16, 16]`` by 16 columns) took 12% less time in channels-last on an AMD EPYC (AVX2)
and 3-5% more on the Intel VM of earlier sessions, while a ``[64, 32, 32, 32]`` input was 26% slower in
channels-last on the EPYC (``benchmarks/column_layouts.py``, ``docs/per-sample-gradients.md``). So a column
convolution large enough to matter (:data:`MEASURED_FLOPS`) is run both ways, convolution and product, a few times
alternating after one run of each, at its first call, and the faster format is kept for that geometry for the rest of the process. The
other way wins only if it is at least :data:`MARGIN` faster, so near-ties keep the fixed rule. Smaller ones (every
test model) follow the fixed rule: channels-last for at most :data:`FEW_CHANNELS` input channels a group (the
3-channel first layer of an image model: its columns then come out in the layout of their product).

Both formats give the same columns up to float rounding (the summation order of the convolution): the rows of two
processes may differ in their last bits where the measurement chose differently, as with ``cudnn.benchmark``. Under
``torch.use_deterministic_algorithms(True)`` (``Trainer(deterministic=True)``) nothing is measured: the fixed rule.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["channels_last", "FEW_CHANNELS", "MEASURED_FLOPS", "MARGIN", "REPEATS", "LONG_SECONDS", "chosen"]

FEW_CHANNELS = 4
"""Input channels a group up to which the fixed rule takes channels-last."""
MEASURED_FLOPS = 2e7
"""Column convolutions of at least this many floating-point operations are measured (about 0.2-0.5 ms on one core)."""
MARGIN = 0.05
"""How much faster the other format must be than the fixed rule's to be taken."""
REPEATS = 5
"""Alternating runs of each format after a first pair, the fastest kept; the first pair alone where it takes over
:data:`LONG_SECONDS`."""
LONG_SECONDS = 0.1

chosen: dict[tuple, bool] = {}
"""Geometry -> channels-last, for this process (a test may clear it or set an entry to force a format)."""


def channels_last(x: Tensor, kernel: Tensor, geometry: tuple, conv: Callable[[Tensor], Tensor],
                  product: Callable[[Tensor], Any] | None) -> bool:
    """Whether the column convolution ``conv`` of the 4-D input ``x`` (``kernel`` its weight, ``geometry`` its stride,
    padding, dilation and groups) runs in channels-last
    memory: the fixed rule, or, on the CPU for a large enough convolution, the faster of the two formats measured on
    ``conv`` followed by ``product`` of its columns (``None``: the convolution alone). An input already in
    channels-last stays so."""
    default = kernel.shape[1] <= FEW_CHANNELS  # the kernel is (out, in / groups, kh, kw)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return True  # already channels-last: kept so, no copy either way
    if not x.is_cpu or torch.are_deterministic_algorithms_enabled():  # Trainer(deterministic=True): no timing decides
        return default
    key = (tuple(x.shape), tuple(kernel.shape), geometry, x.dtype, product is None)
    if key in chosen:
        return chosen[key]
    if 2 * x.shape[0] * kernel.numel() * x[0, 0].numel() < MEASURED_FLOPS:  # positions ~ the input's, a bound's order
        chosen[key] = default
        return default

    def run(last: bool) -> float:
        start = time.thread_time()
        cols = conv(x.contiguous(memory_format=torch.channels_last) if last else x.contiguous())
        if product is not None:
            product(cols)
        return time.thread_time() - start

    # a first pair, slow where oneDNN makes its primitive for a shape and format (its first call): the fastest of the
    # repeats after it decides; a large layer's first pair alone decides
    best = {last: run(last) for last in (default, not default)}
    if best[False] + best[True] <= LONG_SECONDS:
        for _ in range(REPEATS):
            for last in (default, not default):
                best[last] = min(best[last], run(last))
    chosen[key] = (not default) if best[not default] < (1 - MARGIN) * best[default] else default
    return chosen[key]
