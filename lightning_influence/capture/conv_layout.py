"""The convolution engine's measured choices on the CPU: a 2-D column convolution's memory format and the order of
its batched product with an output gradient, each measured once per shape (:mod:`.measured`).

A column convolution (:func:`.layers.conv_columns`) and the batched product after it run in either NCHW or
channels-last memory, and the product ``g colsᵀ`` as itself or as ``(cols gᵀ)ᵀ``. Which is faster depends on the
CPU's oneDNN and MKL kernels, not only on the shapes: the benchmark CNN's second layer (``[64, 32, 16, 16]`` by 16
columns) took 12% less time in channels-last on an AMD EPYC (AVX2) and 3-5% more on an Intel VM, and the first layer's
product ``[64, 32, 1024] x [64, 1024, 8]`` from channels-last columns was 2.9 against 1.2 ms transposed on the EPYC
but 0.51 against 0.93 ms untransposed on an Intel Xeon (AVX-512) (``benchmarks/column_layouts.py``,
``benchmarks/narrow_products.py``, ``docs/per-sample-gradients.md``). So a column convolution or product large enough
to matter (:data:`MEASURED_FLOPS`) is run both ways at its first call and the faster kept for that shape; the format
is measured with the product after it (in its own measured order). Smaller ones (every test model) follow the fixed
rules: channels-last for at most :data:`FEW_CHANNELS` input channels a group (the 3-channel first layer of an image
model: its columns then come out in the layout of their product), and the transposed product for a few
channels-last columns.

Either way gives the same rows up to float rounding (the summation order): the rows of two processes may differ in
their last bits where the measurement chose differently, as with ``cudnn.benchmark``. Under
``torch.use_deterministic_algorithms(True)`` (``Trainer(deterministic=True)``) nothing is measured: the fixed rules.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import measured

__all__ = ["channels_last", "times_columns", "FEW_CHANNELS", "MEASURED_FLOPS", "chosen", "orders"]

FEW_CHANNELS = 4
"""Input channels a group up to which the fixed rule takes channels-last."""
MEASURED_FLOPS = 2e7
"""Column convolutions and products of at least this many floating-point operations are measured (about 0.2-0.5 ms
on one core)."""

chosen: dict[tuple, bool] = {}
"""Column convolution geometry -> channels-last, for this process (a test may clear it or set an entry to force a
format)."""
orders: dict[tuple, bool] = {}
"""Product shapes and strides -> transposed, for this process (as :data:`chosen`)."""


def channels_last(x: Tensor, kernel: Tensor, geometry: tuple, conv: Callable[[Tensor], Tensor],
                  product: Callable[[Tensor], Any] | None) -> bool:
    """Whether the column convolution ``conv`` of the 4-D input ``x`` (``kernel`` its weight, ``geometry`` its stride,
    padding, dilation and groups) runs in channels-last memory: the fixed rule, or, on the CPU for a large enough
    convolution, the faster of the two formats measured on ``conv`` followed by ``product`` of its columns (``None``:
    the convolution alone). An input already in channels-last stays so."""
    default = kernel.shape[1] <= FEW_CHANNELS  # the kernel is (out, in / groups, kh, kw)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return True  # already channels-last: kept so, no copy either way
    if not measured.measurable(x):
        return default
    key = (tuple(x.shape), tuple(kernel.shape), geometry, x.dtype, product is None)
    if key not in chosen and 2 * x.shape[0] * kernel.numel() * x[0, 0].numel() < MEASURED_FLOPS:  # positions ~ input's
        chosen[key] = default

    def run(last: bool) -> Callable[[], Any]:
        def once() -> None:
            cols = conv(x.contiguous(memory_format=torch.channels_last) if last else x.contiguous())
            if product is not None:
                product(cols)
        return once

    return measured.fastest(chosen, key, [(last, run(last)) for last in (False, True)], default)


def times_columns(g: Tensor, cols: Tensor) -> Tensor:
    """``g colsᵀ`` ``(B, r, k)`` of an output gradient ``g`` ``(B, r, L)`` and columns ``cols`` ``(B, k, L)`` (a view
    of either layout), as itself or as the transposed product ``(cols gᵀ)ᵀ``: measured per shapes and strides on the
    CPU where large enough, else the fixed rule (transposed for at most 8 channels-last columns, fewer than ``r``, on
    the CPU: MKL's batched product with that narrow a right operand in that layout ran 2.5-3.4x slower on an AMD EPYC)."""
    default = g.is_cpu and cols.shape[1] <= 8 and cols.shape[1] < g.shape[1] and cols.stride(2) != 1

    def plain() -> Tensor:
        return torch.bmm(g, cols.transpose(1, 2))

    def transposed() -> Tensor:
        return torch.bmm(cols, g.transpose(1, 2)).transpose(1, 2)

    use = default
    if measured.measurable(g) and 2 * g.shape[0] * g.shape[1] * cols.shape[1] * g.shape[2] >= MEASURED_FLOPS:
        key = (tuple(g.shape), g.stride(), tuple(cols.shape), cols.stride(), g.dtype, cols.dtype)
        use = measured.fastest(orders, key, [(False, plain), (True, transposed)], default)
    return transposed() if use else plain()
