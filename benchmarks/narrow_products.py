"""The convolution engine's batched product ``g colsᵀ`` in its two orders, per shape (issue 13, ``conv_layout.times_columns``).

``g`` ``(B, rows, L)`` is a layer's output gradient, ``cols`` ``(B, k, L)`` its projected columns, NCHW-contiguous or
a view of channels-last memory (``(B, L, k)``-contiguous, what the channels-last column convolution gives). The direct
order is ``bmm(g, colsᵀ)``; the transposed one ``bmm(cols, gᵀ)ᵀ``. Fastest of ``--reps`` alternating runs of
``--calls`` calls each, thread CPU, one thread. ``capture.conv_layout.times_columns`` measures the two orders per shape
and strides where a product is large enough (``chooses``), else takes its fixed rule (``fixed``: the transposed order
for at most 8 channels-last columns, fewer than the rows), which came from this table on an AMD EPYC.

    python benchmarks/narrow_products.py [--reps 5] [--calls 10] [--out benchmarks/results/narrow_products.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.accuracy import write_results  # noqa: E402
from lightning_influence.capture import conv_layout  # noqa: E402

SHAPES = [(32, 1024, 8), (64, 1024, 4), (32, 256, 8), (64, 256, 16), (128, 64, 16), (16, 4096, 16), (256, 64, 32),
          (8, 1024, 27)]  # (rows, L, k); the first is the benchmark CNN's first convolution


def _fastest(fns: dict, reps: int, calls: int) -> dict[str, float]:
    best = {k: float("inf") for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.thread_time()
            for _ in range(calls):
                fn()
            best[k] = min(best[k], 1e3 * (time.thread_time() - t0) / calls)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--out", default="benchmarks/results/narrow_products.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows_out = []
    print(f"{'rows x L x k':>16} {'layout':>13} {'direct ms':>10} {'transposed':>10} {'chosen':>10}  chooses")
    for rows, length, k in SHAPES:
        g = torch.randn(args.batch, rows, length)
        for layout in ("nchw", "channels_last"):
            cols = (torch.randn(args.batch, k, length) if layout == "nchw"
                    else torch.randn(args.batch, length, k).transpose(1, 2))
            direct = lambda: torch.bmm(g, cols.transpose(1, 2))  # noqa: E731
            transposed = lambda: torch.bmm(cols, g.transpose(1, 2)).transpose(1, 2)  # noqa: E731
            chosen = lambda: conv_layout.times_columns(g, cols)  # noqa: E731
            torch.testing.assert_close(transposed(), direct(), rtol=1e-4, atol=1e-3)
            ms = _fastest({"direct": direct, "transposed": transposed, "chosen": chosen}, args.reps, args.calls)
            key = (tuple(g.shape), g.stride(), tuple(cols.shape), cols.stride(), g.dtype, cols.dtype)
            fixed = k <= 8 and k < rows and layout == "channels_last"
            takes = ("transposed" if conv_layout.orders.get(key, fixed) else "direct") + ("" if key in conv_layout.orders else " (fixed)")
            print(f"{f'{rows}x{length}x{k}':>16} {layout:>13} {ms['direct']:10.3f} {ms['transposed']:10.3f} "
                  f"{ms['chosen']:10.3f}  {takes}")
            rows_out.append({"rows": rows, "length": length, "k": k, "layout": layout, **ms, "chooses": takes})
    write_results({"batch": args.batch, "reps": args.reps, "calls": args.calls, "shapes": rows_out}, args.out)


if __name__ == "__main__":
    main()
