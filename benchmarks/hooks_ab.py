"""Thread CPU of the tracker's per-step hooks, two source trees alternating in one process (an A/B of its bookkeeping).

Both trees' ``lightning_influence`` are imported side by side (``sys.modules`` swapped before each fit, so imports made
inside functions resolve to the fit's own tree); 400-step fits of the overhead benchmark's model alternate between
them, and ``time.thread_time_ns`` wrappers around the five per-step hooks give each fit's median and mean hook time
per step (steps from the 20th on). Separate processes would compare two heap and cache histories instead.

    OMP_NUM_THREADS=1 python benchmarks/hooks_ab.py /tmp/base_tree . --level losses --rounds 6

(``/tmp/base_tree``: e.g. ``git archive main lightning_influence benchmarks | tar -x -C /tmp/base_tree``.)
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

HOOKS = ("on_train_batch_start", "on_before_backward", "on_after_backward", "on_before_optimizer_step",
         "on_train_batch_end")
LEVELS = {"losses": {"record_losses": True},
          "proj": {"record_losses": True, "record_gradients": True, "projection_dim": 256}}
_OURS = ("lightning_influence", "overhead_models")


def _ours(name: str) -> bool:
    return name.split(".")[0] in _OURS


def load(root: str) -> dict[str, ModuleType]:
    """The modules of ``root``'s ``lightning_influence`` (the callback included) and its ``overhead_models``."""
    for name in [n for n in sys.modules if _ours(n)]:
        del sys.modules[name]
    root = str(Path(root).resolve())
    sys.path[:0] = [root, f"{root}/benchmarks"]
    try:
        import lightning_influence.callback  # noqa: F401  (InfluenceTracker is a lazy attribute of the package)
        import overhead_models  # noqa: F401
    finally:
        del sys.path[:2]
    where = sys.modules["lightning_influence"].__file__ or ""
    if not where.startswith(root):
        raise RuntimeError(f"{root}: imported lightning_influence from {where} instead")
    return {n: m for n, m in sys.modules.items() if _ours(n)}


def timed(tree: dict[str, ModuleType], acc: dict[str, int], key: str) -> None:
    """Wrap the tree's hooks so that their thread CPU time adds up in ``acc[key]``."""
    cls = tree["lightning_influence.callback"].InfluenceTracker
    for hook in HOOKS:
        def wrapper(self: Any, *args: Any, _hook: Any = getattr(cls, hook), **kwargs: Any) -> Any:
            t0 = time.thread_time_ns()
            try:
                return _hook(self, *args, **kwargs)
            finally:
                acc[key] += time.thread_time_ns() - t0
        setattr(cls, hook, wrapper)


def fit(tree: dict[str, ModuleType], acc: dict[str, int], key: str, model: str, level: str, steps: int
        ) -> tuple[float, float]:
    """``(median, mean)`` hook ms per step of one fit with ``tree``'s tracker."""
    sys.modules.update(tree)
    factory, data, batch_size = tree["overhead_models"].make(model, steps)
    torch.manual_seed(0)
    module = factory()
    tracker = tree["lightning_influence.callback"].InfluenceTracker(log_dir=tempfile.mkdtemp(), **LEVELS[level])
    seen: list[int] = []

    class Mark(pl.Callback):  # after the tracker's on_train_batch_end: the step's total so far
        def on_train_batch_end(self, *args: Any) -> None:
            seen.append(acc[key])

    trainer = pl.Trainer(max_steps=steps, callbacks=[tracker, Mark()], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    acc[key] = 0
    trainer.fit(module, DataLoader(data, batch_size=batch_size))
    per_step = [b - a for a, b in zip(seen[20:], seen[21:])]
    return statistics.median(per_step) / 1e6, statistics.mean(per_step) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("base")
    parser.add_argument("new", nargs="?", default=".")
    parser.add_argument("--level", choices=sorted(LEVELS), default="losses")
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    trees = {"base": load(args.base), "new": load(args.new)}
    acc = {"base": 0, "new": 0}
    for key, tree in trees.items():
        timed(tree, acc, key)
    results: dict[str, list[tuple[float, float]]] = {"base": [], "new": []}
    for r in range(args.rounds):
        for key in ("base", "new") if r % 2 == 0 else ("new", "base"):
            results[key].append(fit(trees[key], acc, key, args.model, args.level, args.steps))
            print(f"{key}: hooks median {results[key][-1][0]:.4f}, mean {results[key][-1][1]:.4f} ms/step", flush=True)
    for i, what in enumerate(("median", "mean")):
        base, new = ([x[i] for x in results[k]] for k in ("base", "new"))
        paired = statistics.median(n - b for b, n in zip(base, new))
        print(f"hooks {what}: base {statistics.median(base):.4f} -> new {statistics.median(new):.4f} ms/step "
              f"(median paired difference {paired * 1e3:+.1f} µs)")


if __name__ == "__main__":
    main()
