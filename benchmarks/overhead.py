"""Tracker overhead and log size per recording level (issue #2 targets).

Wall time of ``Trainer.fit`` with the tracker at each recording level, divided by the same
fit without it, measured alternately (round-robin over levels, several rounds) in one
process so machine noise hits every level alike; the ratio is that of the fastest fits
(noise only adds time), the median of the per-round ratios is printed beside it. Model: MLP 784-512-512-10 on synthetic
data, batch 128, SGD. Also reports the bytes per sample-step on disk against the raw size
of what is stored. The tracker runs with its defaults otherwise (segments of 50 steps,
central-difference HVPs except in the "forward" level).

    python benchmarks/overhead.py [--steps 200] [--short-steps 50] [--rounds 5] [--threads 1] [--out ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import InfluenceLog, InfluenceTracker, WithIds

LEVELS = {
    "ids+lr": dict(record_losses=False),
    "+losses": dict(record_losses=True),
    "+proj. gradients k=256": dict(record_losses=True, record_gradients=True, projection_dim=256),
    "+HVP products": dict(record_losses=True, record_gradients=True, projection_dim=256, record_hvp=True),
    "+HVP products, forward": dict(record_losses=True, record_gradients=True, projection_dim=256, record_hvp=True,
                                   hvp_scheme="forward"),
    "+checkpoints every step": dict(record_losses=True, record_gradients=True, projection_dim=256, record_hvp=True,
                                    checkpoint_every_n_steps=1),
}
TARGETS = {"+losses": 1.10, "+proj. gradients k=256": 1.5, "+HVP products": 3.0, "+HVP products, forward": 3.0}


class MLP(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))

    def per_sample_loss(self, batch):
        return F.cross_entropy(self.net(batch[0]), batch[1], reduction="none")

    def training_step(self, batch, batch_idx):
        return self.per_sample_loss(batch).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


def run_fit(data: DataLoader, steps: int, tracker: InfluenceTracker | None) -> float:
    pl.seed_everything(0, verbose=False)
    module = MLP()
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[tracker] if tracker else [])
    t0 = time.perf_counter()
    trainer.fit(module, data)
    return time.perf_counter() - t0


def raw_bytes_per_sample_step(log: InfluenceLog, batch: int) -> float:
    """Size of the stored values themselves (no HDF5 overhead), per sample-step."""
    rec = log.recorded
    k = log.projector().out_dim
    item = np.dtype(log.meta["storage_dtype"]).itemsize
    per = 8.0 + (8 * 10) / batch  # id + step-table row (10 int/float columns + lr) shared by the batch
    per += 8 if rec["losses"] else 0
    per += k * item if rec["gradients"] else 0
    per += k * item if rec["hvp"] else 0
    n_params = sum(int(np.prod(s)) for s in log.param_shapes.values())
    per += 4 * n_params * len(log.checkpoint_steps) / (log.num_steps * batch)
    return per


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--short-steps", type=int, default=50,
                    help="also fit this many steps, to split each level's cost into per step and per fit")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/overhead.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n = args.batch * 16
    g = torch.Generator().manual_seed(0)
    ds = WithIds(TensorDataset(torch.randn(n, 784, generator=g), torch.randint(0, 10, (n,), generator=g)))
    data = DataLoader(ds, batch_size=args.batch, shuffle=True, generator=g)
    tmp = Path(tempfile.mkdtemp(prefix="li-overhead-"))
    times: dict[str, list[float]] = {"baseline": [], **{k: [] for k in LEVELS}}
    short: dict[str, list[float]] = {k: [] for k in times}
    sizes: dict[str, dict[str, float]] = {}
    tracker_share: dict[str, float] = {}
    try:
        run_fit(data, 5, None)  # warm-up
        for r in range(args.rounds):
            for level in times:
                log_dir = tmp / "log"
                for steps, record in ((args.short_steps, short), (args.steps, times)):
                    shutil.rmtree(log_dir, ignore_errors=True)
                    tracker = None if level == "baseline" else InfluenceTracker(str(log_dir), **LEVELS[level])
                    record[level].append(run_fit(data, steps, tracker))  # the tracker's defaults: 50-step segments
                if level == "baseline":
                    continue
                if r == 0:
                    log = InfluenceLog(log_dir)
                    disk = sum(p.stat().st_size for p in log_dir.rglob("*.h5"))
                    sample_steps = log.num_steps * args.batch
                    sizes[level] = {"disk_bytes_per_sample_step": disk / sample_steps,
                                    "raw_bytes_per_sample_step": raw_bytes_per_sample_step(log, args.batch),
                                    "columns_per_sample": log.projector().out_dim}
                    seconds = sum(float(np.sum(log._file(s)["steps/tracker_seconds"][()])) for s in range(len(log._segments)))
                    tracker_share[level] = seconds
                    log.close()
                shutil.rmtree(log_dir)
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # Machine noise only ever adds time: the fastest of the alternating fits is the cleanest
    # estimate of each level's cost; the median of the per-round ratios is shown beside it.
    base = min(times["baseline"])
    base_step = (base - min(short["baseline"])) / (args.steps - args.short_steps)
    rows = []
    print(f"\nMLP 784-512-512-10, batch {args.batch}, {args.steps} steps/fit, {args.rounds} alternating rounds, "
          f"{args.threads} thread(s); baseline fit {base:.2f} s (fastest), {statistics.median(times['baseline']):.2f} s "
          f"(median), {1e3 * base_step:.2f} ms per step")
    print("ratio: fastest fits; median: of the per-round ratios; per step / per fit: the added cost split by the "
          f"{args.short_steps}-step fits; steady: the ratio once per-fit costs are amortised\n")
    print(f"{'level':<26}{'ratio':>7}{'median':>8}{'target':>8}{'ms/step':>9}{'s/fit':>7}{'steady':>8}"
          f"{'in hooks s':>11}{'disk B/s-s':>11}{'raw B/s-s':>10}")
    for level in LEVELS:
        ratio = min(times[level]) / base
        per_round = statistics.median(t / b for t, b in zip(times[level], times["baseline"]))
        added_long, added_short = min(times[level]) - base, min(short[level]) - min(short["baseline"])
        per_step = (added_long - added_short) / (args.steps - args.short_steps)
        per_fit = added_short - args.short_steps * per_step
        row = {"level": level, "ratio": ratio, "median_round_ratio": per_round, "target": TARGETS.get(level),
               "fastest_seconds": min(times[level]), "added_ms_per_step": 1e3 * per_step, "added_s_per_fit": per_fit,
               "steady_ratio": 1 + per_step / base_step, "tracker_hook_seconds_per_fit": tracker_share[level],
               **sizes[level]}
        rows.append(row)
        tgt = f"{TARGETS[level]:.2f}" if level in TARGETS else "-"
        print(f"{level:<26}{ratio:>7.3f}{per_round:>8.3f}{tgt:>8}{1e3 * per_step:>9.2f}{per_fit:>7.2f}"
              f"{row['steady_ratio']:>8.3f}{tracker_share[level]:>11.2f}"
              f"{sizes[level]['disk_bytes_per_sample_step']:>11.0f}{sizes[level]['raw_bytes_per_sample_step']:>10.0f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"baseline_seconds": base, "baseline_ms_per_step": 1e3 * base_step, "times": times,
                               "short_times": short, "levels": rows, "args": vars(args)}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
