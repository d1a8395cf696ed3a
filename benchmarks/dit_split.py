"""DIT sweep on one process against two, split by batch rows and by query column (docs/scaling.md).

    python benchmarks/dit_split.py [--n-train 600] [--batch 100] [--epochs 4] [--queries 4] [--rounds 2]

A float64 tanh MLP 64→32→10 on random data (SGD, momentum 0.9), trained by a real
``lightning.Trainer`` with the tracker; then ``dit`` over the whole run with ``--queries``
query outputs swept together: in this process, and on 2 ``gloo`` processes (``ddp_spawn``)
split by batch rows and by query column, alternated ``--rounds`` times. Prints, per variant,
the wall time (with the processes' start-up) and the sweep's own seconds (``info["seconds"]``,
the slowest process), and checks that every variant gives the one-process scores.
"""

from __future__ import annotations

import argparse
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

from accuracy import make_module, quiet_setup, train  # noqa: E402
from lightning_influence.data import WithIds  # noqa: E402
from lightning_influence.distributed import Processes, sweep  # noqa: E402
from lightning_influence.estimators import dit  # noqa: E402
from lightning_influence.log import InfluenceLog  # noqa: E402


class Mlp(nn.Module):
    """The trained architecture (parameter names as the LightningModule's), picklable for ``ddp_spawn``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))

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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-train", type=int, default=600)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--queries", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    quiet_setup(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.n_train, 64, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (args.n_train,), generator=g)
    train_ds = TensorDataset(x, y)
    query = ValLosses(args.queries)
    variants = {"1 process": None, "2 processes, batch rows": Processes(devices=2, split="batch"),
                "2 processes, query columns": Processes(devices=2, split="columns")}
    wall: dict[str, list[float]] = {k: [] for k in variants}
    sweep_s: dict[str, list[float]] = {k: [] for k in variants}
    with tempfile.TemporaryDirectory() as tmp:
        log = train(str(Path(tmp) / "log"), make_module("mlp", "sgd", 0.1, 0.0, 0.9), WithIds(train_ds), args.epochs,
                    args.batch, seed=0)
        T = log.num_steps
        ref = None
        for _ in range(args.rounds):
            for name, procs in variants.items():
                t0 = time.perf_counter()
                res = sweep(dit, log, query, procs, module=Mlp().double(), train_data=train_ds)
                wall[name].append(time.perf_counter() - t0)
                per_rank = res.info.get("per_rank")
                sweep_s[name].append(max(r["seconds"] for r in per_rank) if per_rank else res.info["seconds"])
                ref = res.scores if ref is None else ref
                err = float(np.abs(res.scores - ref).max() / np.abs(ref).max())
                assert err < 1e-12, (name, err)
        log.close()
    print(f"DIT over {T} steps of {args.batch} samples, {args.queries} query outputs, MLP 64-32-10 float64, "
          f"{torch.get_num_threads()} thread per process")
    print(f"{'variant':<28} {'wall s (with start-up)':>24} {'sweep s (slowest process)':>27}")
    for name in variants:
        print(f"{name:<28} {' / '.join(f'{s:.1f}' for s in wall[name]):>24} "
              f"{' / '.join(f'{s:.2f}' for s in sweep_s[name]):>27}")
    return {"steps": T, "wall": wall, "sweep": sweep_s}


if __name__ == "__main__":
    main()
