"""The DIT adjoint's per-step optimizer VJP against one forward update of the same optimizer (docs/optimizer-adjoint.md).

    python benchmarks/optimizer_vjp.py [--p 2500000] [--columns 1] [--dtype float32] [--repeats 5] [--json out.json]

For SGD with momentum, Adam, AdamW (amsgrad), RMSprop (centered, momentum) and Adagrad over ``--p`` coordinates:
the median seconds of ``torch.optim``'s ``foreach`` step (the floor: one forward update, what training pays), of the
functional twin's forward (:meth:`OptimizerStep.update`) and of :meth:`OptimizerStep.vjp` with ``--columns`` adjoint
columns; the table's ratios are within this one run (same machine, same moment). Writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_influence.step.optimizers import RULES, OptimizerStep  # noqa: E402

OPTIMIZERS = {
    "SGD-momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-4, foreach=True),
    "Adam": lambda ps: torch.optim.Adam(ps, lr=1e-3, weight_decay=1e-4, foreach=True),
    "AdamW-amsgrad": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=1e-2, amsgrad=True, foreach=True),
    "RMSprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-3, momentum=0.5, centered=True, foreach=True),
    "Adagrad": lambda ps: torch.optim.Adagrad(ps, lr=1e-2, foreach=True),
}


def _median(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(name: str, p: int, columns: int, dtype: torch.dtype, repeats: int) -> dict:
    """Seconds of the foreach step, the twin's update and its VJP for optimizer ``name`` at ``p`` coordinates."""
    gen = torch.Generator().manual_seed(0)
    sizes = [p // 2, p // 4, p - p // 2 - p // 4]  # a few tensors, as a model's (foreach works over the list)
    params = [torch.nn.Parameter(torch.randn(k, generator=gen, dtype=dtype)) for k in sizes]
    opt = OPTIMIZERS[name](params)
    for q in params:
        q.grad = torch.randn(q.shape, generator=gen, dtype=dtype)
    opt.step()  # state exists (step >= 1), as in the sweep
    forward = _median(lambda: opt.step(), repeats)
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": ["a", "b", "c"]} for g in opt.param_groups]
    step = OptimizerStep(RULES[type(opt).__name__], groups, np.zeros(p, np.int64), dtype)
    state = step.state_from({n: opt.state[q] for n, q in zip("abc", params)}, list("abc"), sizes)
    theta = torch.cat([q.detach() for q in params])
    g = torch.randn(p, generator=gen, dtype=dtype)
    lrs = [groups[0]["lr"]]
    U = torch.randn(p, columns, generator=gen, dtype=dtype)
    S = {k: torch.randn(p, columns, generator=gen, dtype=dtype) for k in step.adjoint_keys}
    update = _median(lambda: step.update(theta, state, g, lrs), repeats)
    vjp = _median(lambda: step.vjp(theta, state, g, lrs, U, S), repeats)
    return {"optimizer": name, "p": p, "columns": columns, "dtype": str(dtype).replace("torch.", ""),
            "foreach_step_s": forward, "twin_update_s": update, "vjp_s": vjp,
            "update_over_step": update / forward, "vjp_over_step": vjp / forward}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--p", type=int, default=2_500_000)
    ap.add_argument("--columns", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    ap.add_argument("--json", default="optimizer_vjp.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    rows = [measure(n, args.p, args.columns, dtype, args.repeats) for n in args.optimizers.split(",")]
    print(f"p = {args.p:,}, {args.columns} adjoint column(s), {args.dtype}, median of {args.repeats}, 1 thread")
    print(f"{'optimizer':<15} {'foreach step ms':>16} {'twin update ms':>15} {'vjp ms':>9} {'update/step':>12} "
          f"{'vjp/step':>9}")
    for r in rows:
        print(f"{r['optimizer']:<15} {1e3 * r['foreach_step_s']:>16.1f} {1e3 * r['twin_update_s']:>15.1f} "
              f"{1e3 * r['vjp_s']:>9.1f} {r['update_over_step']:>12.2f} {r['vjp_over_step']:>9.2f}")
    Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
