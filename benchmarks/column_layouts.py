"""A column convolution and its product in NCHW against channels-last memory, per shape (issue 13, ``conv_layout``).

For each shape: the column convolution of an input ``(B, C, H, W)`` with a ``(k, C, 3, 3)`` projection kernel (padding
1), then its batched product with an output gradient ``(B, rows, H·W)`` (``conv_layout.times_columns``), once from the NCHW
input as it is and once converted to channels-last (the conversion counted). Fastest of ``--reps`` alternating runs of
``--calls`` calls each, thread CPU, one thread; ``ratio`` is channels-last over NCHW. ``chooses``: what
``capture.conv_layout.channels_last`` measured for that shape in this process (``fixed``: below its size, the fixed
rule). Which format wins depends on the CPU, hence the measurement at a fit's first step.

    python benchmarks/column_layouts.py [--reps 7] [--calls 3] [--out benchmarks/results/column_layouts.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.accuracy import write_results  # noqa: E402
from lightning_influence.capture import conv_layout  # noqa: E402

SHAPES = [(3, 32, 8, 32), (32, 16, 16, 64), (32, 16, 8, 64), (8, 32, 16, 32), (16, 16, 16, 32), (64, 8, 16, 128),
          (64, 16, 16, 64), (128, 8, 16, 128), (16, 32, 16, 32), (32, 32, 16, 32)]
# (C, H = W, k, rows); the first two are the benchmark CNN's convolutions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/column_layouts.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = []
    print(f"{'C x HW x k, rows':>20} {'NCHW ms':>9} {'ch.-last':>9} {'ratio':>7}  chooses")
    for channels, side, k, rows in SHAPES:
        b = args.batch
        x, kernel, g = torch.randn(b, channels, side, side), torch.randn(k, channels, 3, 3), torch.randn(b, rows, side ** 2)

        def conv(inp: torch.Tensor) -> torch.Tensor:
            return F.conv2d(inp, kernel, None, 1, 1)

        def run(last: bool) -> torch.Tensor:
            cols = conv(x.contiguous(memory_format=torch.channels_last) if last else x)
            return conv_layout.times_columns(g, cols.reshape(b, k, -1))

        torch.testing.assert_close(run(True), run(False), rtol=1e-4, atol=1e-3)
        best = {False: float("inf"), True: float("inf")}
        for _ in range(args.reps):
            for last in (False, True):
                t0 = time.thread_time()
                for _ in range(args.calls):
                    run(last)
                best[last] = min(best[last], 1e3 * (time.thread_time() - t0) / args.calls)
        measured = 2 * b * kernel.numel() * side ** 2 >= conv_layout.MEASURED_FLOPS
        chose = conv_layout.channels_last(x, kernel, (1, 1, 1, 1), conv,
                                          lambda cols: conv_layout.times_columns(g, cols.reshape(b, k, -1)))
        chooses = ("channels-last" if chose else "NCHW") + ("" if measured else " (fixed)")
        ratio = best[True] / best[False]
        print(f"{f'{channels}x{side}x{side} k{k}, {rows}':>20} {best[False]:9.3f} {best[True]:9.3f} {ratio:7.2f}  {chooses}")
        out.append({"channels": channels, "side": side, "k": k, "rows": rows, "nchw_ms": best[False],
                    "channels_last_ms": best[True], "ratio": ratio, "chooses": chooses})
    write_results({"batch": args.batch, "reps": args.reps, "calls": args.calls, "shapes": out}, args.out)


if __name__ == "__main__":
    main()
