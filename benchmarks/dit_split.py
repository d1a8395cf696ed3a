"""DIT sweep on one process against two, split by batch rows and by query column (docs/scaling.md).

    python benchmarks/dit_split.py [--n-train 2000] [--batch 500] [--hidden 256] [--epochs 4] [--queries 8] [--rounds 2]

A float64 tanh MLP 64→``--hidden``→10 on random data (SGD, momentum 0.9), trained by a real
``lightning.Trainer`` with the tracker (a checkpoint every ``--checkpoint-every`` steps); then
``dit`` over the whole run with ``--queries``
query outputs swept together: in this process, and on 2 ``gloo`` processes (``ddp_spawn``)
split by batch rows and by query column, alternated ``--rounds`` times. Prints, per variant,
the wall time (with the processes' start-up), the sweep's own seconds (``info["seconds"]``,
the slowest process) and each process's CPU seconds in its sweep (what the split divides, on a
machine whose cores are shared), and checks that every variant gives the one-process scores. The
last line is process 0's share of the batch split computed here alone (its rows, no collectives:
wrong scores, only its cost), to separate the division of the work from the processes' overheads.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy import quiet_setup  # noqa: E402
from lightning_influence import InfluenceTracker  # noqa: E402
from lightning_influence.data import WithIds  # noqa: E402
from lightning_influence.distributed import Processes, sweep  # noqa: E402
from lightning_influence.estimators import dit  # noqa: E402
from lightning_influence.log import InfluenceLog  # noqa: E402
from lightning_influence.step.shard import BatchShard  # noqa: E402


SHARE = "rank 0's share, in here"


class Mlp(nn.Module):
    """The trained architecture, picklable for ``ddp_spawn``."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def per_sample_loss(self, batch: Any) -> torch.Tensor:
        return F.cross_entropy(self(batch[0]), batch[1], reduction="none")


class ValLosses:
    """The losses of ``n`` fixed validation samples: ``n`` query outputs."""

    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(7)
        self.batch = (torch.randn(n, 64, generator=g, dtype=torch.float64), torch.randint(0, 10, (n,), generator=g))

    def __call__(self, module: nn.Module) -> torch.Tensor:
        return module.per_sample_loss(self.batch)


def train(log_dir: str, hidden: int, data: TensorDataset, epochs: int, batch: int, every: int) -> InfluenceLog:
    """A real ``lightning.Trainer`` fit of ``Mlp(hidden)`` with the tracker (no gradient rows: DIT needs none)."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    class Net(Mlp, pl.LightningModule):
        def training_step(self, b: Any, i: int) -> torch.Tensor:
            return self.per_sample_loss(b).mean()

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    torch.manual_seed(0)
    tracker = InfluenceTracker(log_dir, checkpoint_every_n_steps=every, storage_dtype="float64")
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[tracker], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                         deterministic=True)
    trainer.fit(Net(hidden).double(), DataLoader(WithIds(data), batch_size=batch, shuffle=True,
                                                 generator=torch.Generator().manual_seed(0)))
    return InfluenceLog(log_dir)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--checkpoint-every", type=int, default=8)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--queries", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    quiet_setup(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.n_train, 64, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (args.n_train,), generator=g)
    train_ds = TensorDataset(x, y)
    query = ValLosses(args.queries)
    variants = {"1 process": None, "2 processes, batch rows": Processes(devices=2, split="batch"),
                "2 processes, query columns": Processes(devices=2, split="columns"), SHARE: "share"}
    wall: dict[str, list[float]] = {k: [] for k in variants}
    sweep_s: dict[str, list[float]] = {k: [] for k in variants}
    cpu_s: dict[str, list[list[float]]] = {k: [] for k in variants}  # CPU seconds of each process's sweep
    with tempfile.TemporaryDirectory() as tmp:
        log = train(str(Path(tmp) / "log"), args.hidden, train_ds, args.epochs, args.batch, args.checkpoint_every)
        T = log.num_steps
        ref = None
        for _ in range(args.rounds):
            for name, procs in variants.items():
                t0, cpu0 = time.perf_counter(), time.process_time()
                kw = {"module": Mlp(args.hidden).double(), "train_data": train_ds}
                if procs == "share":  # process 0's work alone: its rows, the sums replaced by its own part
                    res = dit(log, query, **kw, shard=BatchShard(0, 2, lambda x: x), verify=False)
                    wall[name].append(time.perf_counter() - t0)
                    sweep_s[name].append(res.info["seconds"])
                    cpu_s[name].append([time.process_time() - cpu0])
                    continue
                res = sweep(dit, log, query, procs, **kw)
                wall[name].append(time.perf_counter() - t0)
                per_rank = res.info.get("per_rank")
                sweep_s[name].append(max(r["seconds"] for r in per_rank) if per_rank else res.info["seconds"])
                cpu_s[name].append([r.get("cpu_seconds", math.nan) for r in per_rank] if per_rank
                                   else [time.process_time() - cpu0])
                ref = res.scores if ref is None else ref
                err = float(np.abs(res.scores - ref).max() / np.abs(ref).max())
                assert err < 1e-12, (name, err)
        log.close()
    print(f"DIT over {T} steps of {args.batch} samples, {args.queries} query outputs, MLP 64-{args.hidden}-10 float64, "
          f"{torch.get_num_threads()} thread per process")
    print(f"{'variant':<28} {'wall s (with start-up)':>24} {'sweep s (slowest process)':>27} "
          f"{'CPU s per process':>24}")
    for name in variants:
        cpu = " / ".join("+".join(f"{c:.2f}" if math.isfinite(c) else "-" for c in r) for r in cpu_s[name])
        print(f"{name:<28} {' / '.join(f'{s:.1f}' for s in wall[name]):>24} "
              f"{' / '.join(f'{s:.2f}' for s in sweep_s[name]):>27} {cpu:>24}")
    return {"steps": T, "wall": wall, "sweep": sweep_s, "cpu": cpu_s}


if __name__ == "__main__":
    main()
