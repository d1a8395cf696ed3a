"""glibc's heap trimming: the page faults a fit takes a step, with and without the tracker, default heap and kept.

On Linux, glibc returns the top of its heap to the system whenever a ``free`` leaves more than its trim threshold
free there; a CNN whose activations are allocated and freed at every step may then take thousands of minor page
faults a step (every page of its activations touched afresh), or almost none, depending on the heap's history:
a lottery drawn per process. This script draws it: each fit runs in a fresh process (the CNN of
``benchmarks/overhead_models.py`` by default, ``--steps`` steps), without the tracker, at ``+losses`` and at
``+proj. gradients k=256``, each with glibc's default heap and with the heap kept
(``GLIBC_TUNABLES=glibc.malloc.trim_threshold=4294967296:glibc.malloc.mmap_threshold=33554432``, what
``benchmarks/overhead.py --keep-heap`` runs), alternating, ``--rounds`` times. Per fit: the training thread's CPU
ms and minor page faults a step after ``--warmup`` steps. It prints, per configuration, the median ms a step, the
median and range of faults a step, and how many fits took over ``--many`` faults a step; the JSON has every fit.
``docs/per-sample-gradients.md`` (The heap lottery) has a run and what a user can do about it.

    python benchmarks/heap_faults.py [--model cnn] [--steps 60] [--warmup 10] [--rounds 3] [--many 1000]
                                     [--out benchmarks/results/heap_faults.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

KEEP_HEAP = "glibc.malloc.trim_threshold=4294967296:glibc.malloc.mmap_threshold=33554432"
LEVELS = {"none": None, "+losses": {"record_losses": True},
          "+proj. gradients k=256": {"record_losses": True, "record_gradients": True, "projection_dim": 256}}


def one_fit(model: str, level: str, steps: int, warmup: int) -> dict[str, float]:
    """One fit in this process: the training thread's CPU ms and minor page faults a step after ``warmup``."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader

    from benchmarks.overhead_models import make
    from lightning_influence import InfluenceTracker

    class Marks(pl.Callback):
        def __init__(self) -> None:
            self.marks: list[tuple[float, int]] = []

        def on_train_batch_start(self, *args: Any) -> None:
            self.marks.append((time.thread_time(), resource.getrusage(resource.RUSAGE_THREAD).ru_minflt))

    factory, ds, batch_size = make(model, 8)
    data = DataLoader(ds, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
    pl.seed_everything(0, verbose=False)
    marks = Marks()
    with tempfile.TemporaryDirectory() as tmp:
        callbacks: list[pl.Callback] = [marks]
        if LEVELS[level] is not None:
            callbacks.append(InfluenceTracker(str(Path(tmp) / "log"), **LEVELS[level]))
        trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
        trainer.fit(factory(), data)
    (t0, f0), (t1, f1) = marks.marks[warmup], marks.marks[-1]
    n = len(marks.marks) - 1 - warmup
    return {"ms": 1e3 * (t1 - t0) / n, "faults": (f1 - f0) / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--many", type=float, default=1000.0, help="faults a step counted as the trimming regime")
    ap.add_argument("--out", default="benchmarks/results/heap_faults.json")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # a child: run this level's fit and print its JSON
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one_fit(args.model, args.one, args.steps, args.warmup)))
        return
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    configs = [(heap, level) for heap in ("default", "kept") for level in LEVELS]
    fits: dict[str, list[dict[str, float]]] = {f"{heap} heap, {level}": [] for heap, level in configs}
    for r in range(args.rounds):
        for heap, level in (configs if r % 2 == 0 else configs[::-1]):  # alternating order: same moments of the box
            child_env = env if heap == "default" else {**env, "GLIBC_TUNABLES": KEEP_HEAP}
            out = subprocess.run([sys.executable, __file__, "--one", level, "--model", args.model, "--steps",
                                  str(args.steps), "--warmup", str(args.warmup)], env=child_env, capture_output=True,
                                 text=True, check=True).stdout
            fits[f"{heap} heap, {level}"].append(json.loads(out.split("RESULT ", 1)[1]))
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    rows = []
    for name, runs in fits.items():
        faults = [f["faults"] for f in runs]
        rows.append({"config": name, "ms_per_step": statistics.median(f["ms"] for f in runs),
                     "faults_median": statistics.median(faults), "faults_min": min(faults), "faults_max": max(faults),
                     "fits_over_many": sum(f > args.many for f in faults), "fits": len(runs)})
    print(f"\n{args.model}, {args.steps} steps a fit, {args.rounds} fits each (training thread, after {args.warmup} steps)")
    print(f"{'configuration':40s} {'ms/step':>8s} {'faults/step median [range]':>30s} {'fits over ' + str(int(args.many)):>14s}")
    for row in rows:
        span = f"{row['faults_median']:.0f} [{row['faults_min']:.0f}-{row['faults_max']:.0f}]"
        print(f"{row['config']:40s} {row['ms_per_step']:8.2f} {span:>30s} {row['fits_over_many']:>8d} of {row['fits']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows, "fits": fits}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
