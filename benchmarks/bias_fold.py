"""Folded biases (issue 13): the hook projection's cost per step and the log's row size, folded against unfolded.

For each model of ``benchmarks/overhead_models.py`` (MLP, CNN with GroupNorm, small GPT), two hook captures
are attached to the same module, one with every Linear/Conv bias folded into its weight's projection
(``foldable_biases``, as ``InfluenceTracker(fold_bias=True)`` does) and one with every tensor its own block
(``fold_bias=False``), ``k`` per tensor. Measured alternately in one run (fastest of ``--reps``, CPU time of the
process by default, in both orders): the floor (forward+backward of the training step), and the same step capturing with
each projector and collecting the rows; the hook projection is the difference. Also the engines' work alone
(what the hooks compute: ``save`` and ``blocks`` of every layer call, on one recorded step's tensors), which
needs no floor subtracted. The row size is the projector's columns per sample (4 bytes each in the default
``float32`` storage).

    python benchmarks/bias_fold.py [--models mlp,cnn,gpt] [--k 256] [--reps 7] [--threads 1]
                                   [--out benchmarks/results/bias_fold.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import overhead  # noqa: E402
from benchmarks.accuracy import quiet_setup, write_results  # noqa: E402
from benchmarks.overhead_models import DEFAULT, make  # noqa: E402
from lightning_influence.capture import HookGradientCapture, KroneckerProjector, select_params  # noqa: E402
from lightning_influence.capture.layers import engine_for, foldable_biases  # noqa: E402


def measure(name: str, k: int, reps: int) -> dict[str, Any]:
    """Floor and hooked+collect (folded, unfolded) ms per step of model ``name``, and the columns per sample."""
    factory, ds, batch_size = make(name, 1)
    torch.manual_seed(0)
    module = factory()
    batch = next(iter(DataLoader(ds, batch_size=batch_size)))[:-1]  # without the ids
    names = select_params(module)
    shapes = {n: p.shape for n, p in module.named_parameters() if n in names}
    projectors = {"folded": KroneckerProjector(shapes, k, fold=foldable_biases(module, names)),
                  "unfolded": KroneckerProjector(shapes, k)}
    captures = {kind: HookGradientCapture(module, names, proj) for kind, proj in projectors.items()}
    loss_grad = torch.full((batch_size,), 1.0 / batch_size)

    def step(capture: HookGradientCapture | None) -> None:
        module.zero_grad(set_to_none=True)
        if capture is not None:
            capture.enable()
        module.per_sample_loss(batch).mean().backward()
        if capture is not None:
            capture.disable()
            capture.collect(loss_grad)

    fns = {"floor": lambda: step(None), **{kind: (lambda c=c: step(c)) for kind, c in captures.items()}}
    # in both orders: a fixed order favours one of them (caches, the allocator); fastest of all
    runs = [overhead._fastest(dict(order), reps) for order in (list(fns.items()), list(fns.items())[::-1])]
    ms = {kind: min(run[kind] for run in runs) for kind in fns}
    engine_ms = _engines_alone(module, batch, captures, reps)
    for capture in captures.values():
        capture.remove()
    out: dict[str, Any] = {"batch": batch_size, "floor_ms": ms["floor"],
                           "folded_biases": sum(s.bias is not None for s in projectors["folded"].specs)}
    for kind, proj in projectors.items():
        out[f"{kind}_projection_ms"] = ms[kind] - ms["floor"]
        out[f"{kind}_engines_ms"] = engine_ms[kind]
        out[f"{kind}_columns"] = proj.out_dim
    out["projection_ratio"] = out["folded_projection_ms"] / out["unfolded_projection_ms"]
    out["engines_ratio"] = out["folded_engines_ms"] / out["unfolded_engines_ms"]
    out["row_size_ratio"] = out["folded_columns"] / out["unfolded_columns"]
    return out


def _engines_alone(module: torch.nn.Module, batch: Any, captures: dict[str, HookGradientCapture],
                   reps: int) -> dict[str, float]:
    """ms of the engines' own work per step (``save`` on each layer input, ``blocks`` on its output gradient, the
    rows summed), on the inputs and output gradients of one recorded step: the floor-free part of the step's
    added time, which on a busy machine is lost in the noise of two large step times."""
    calls: list[tuple[str, torch.nn.Module, torch.Tensor, torch.Tensor]] = []
    mods = dict(module.named_modules())
    handles = []
    for mod_name in next(iter(captures.values()))._targets:
        def hook(mod: torch.nn.Module, args: tuple, output: torch.Tensor, mod_name: str = mod_name) -> None:
            entry = [mod_name, mod, args[0].detach(), None]
            calls.append(entry)
            output.register_hook(lambda g: entry.__setitem__(3, g.detach()))
        handles.append(mods[mod_name].register_forward_hook(hook))
    module.zero_grad(set_to_none=True)
    module.per_sample_loss(batch).mean().backward()
    for h in handles:
        h.remove()

    def project(capture: HookGradientCapture) -> None:
        proj = capture.projector
        out = torch.zeros(batch[0].shape[0], proj.out_dim)
        for mod_name, mod, x, g in calls:
            engine, targets = engine_for(mod), capture._targets[mod_name]
            for name, block in engine.blocks(mod, engine.save(mod, x, targets, proj), g, targets, proj).items():
                out[:, proj.slices[name]] += block

    fns = {kind: (lambda c=c: project(c)) for kind, c in captures.items()}
    runs = [overhead._fastest(dict(order), reps) for order in (list(fns.items()), list(fns.items())[::-1])]
    return {kind: min(run[kind] for run in runs) for kind in fns}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT))
    parser.add_argument("--k", type=int, default=overhead.K)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=sorted(overhead.CLOCKS), default="cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    quiet_setup(args.threads)
    overhead.clock = overhead.CLOCKS[args.clock]
    results = {}
    print(f"hook projection per step (captured step + collect - floor), k={args.k}, {args.clock} time, "
          f"fastest of {args.reps} alternating")
    print("  in the step: captured step + collect - floor; engines alone: save + blocks + sum on one step's tensors")
    print(f"{'model':6} {'floor ms':>9} | {'in the step: folded':>19} {'unfolded':>9} {'ratio':>6} | "
          f"{'engines alone: folded':>21} {'unfolded':>9} {'ratio':>6} | {'columns folded/unfolded':>23}")
    for name in args.models.split(","):
        r = results[name] = measure(name, args.k, args.reps)
        print(f"{name:6} {r['floor_ms']:9.2f} | {r['folded_projection_ms']:19.2f} {r['unfolded_projection_ms']:9.2f} "
              f"{r['projection_ratio']:6.2f} | {r['folded_engines_ms']:21.2f} {r['unfolded_engines_ms']:9.2f} "
              f"{r['engines_ratio']:6.2f} | {r['folded_columns']:>11d}/{r['unfolded_columns']:<11d}"
              f" (row size x{r['row_size_ratio']:.2f})")
    if args.out:
        write_results({"args": vars(args), "results": results}, args.out)


if __name__ == "__main__":
    main()
