"""Accuracy on runs with dropout, bf16 autocast and attention: DIT, TracIn, Diff-In vs replay LOO (issue 11).

    python benchmarks/random_runs.py [--n-train 120] [--epochs 4] [--configs all]

The setup of ``benchmarks/step_runs.py`` (digits, a real ``lightning.Trainer`` with the tracker,
full per-sample gradients, a checkpoint every step, SGD with a step LR schedule and weight decay,
query = mean validation loss), on the runs issue 11 found failing:

- ``mlp-dropout``: a tanh MLP with ``nn.Dropout(0.2)`` (float64);
- ``mlp-bf16``: the MLP with dropout trained with ``precision="bf16-mixed"`` (float32 parameters,
  bf16 autocast on the CPU);
- ``transformer``: a tiny transformer classifier trained in float32: the 8x8 digit pooled 2x2 into
  16 tokens of 17 grey levels, ``nn.Embedding`` + positions, ``nn.LayerNorm``, one
  ``nn.TransformerEncoderLayer`` (dropout 0.1), mean pooling, a linear head;
- ``transformer-clip-accum2``: the same transformer with norm clipping and ``accumulate_grad_batches=2``,
  batch 24 (an odd number of batches per epoch: every epoch ends on an incomplete accumulation).

For every training sample each estimator's window score is compared with the replay
leave-one-out truth (every counterfactual run with the training dropout masks, autocast and
weights) on the windows whole run, first epoch, second half, last epoch: DIT with exact and
finite-difference HVPs, TracIn, Diff-In (step form). Also reported: the replay drift (a plain
replay against every stored checkpoint) and, for float32 runs, how far the finite-difference DIT
is from the exact one.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy import agreement, ce_loss, print_agreement, quiet_setup, train, windows_of  # noqa: E402
from step_runs import run_all  # noqa: E402

from lightning_influence.data import WithIds  # noqa: E402
from lightning_influence.estimators import diffin, timeline, tracin  # noqa: E402
from lightning_influence.evaluation.ground_truth import replay_loo  # noqa: E402
from lightning_influence.examples.digits import load_digits_split  # noqa: E402
from lightning_influence.log import InfluenceLog  # noqa: E402
from lightning_influence.queries import eval_mode, mean_loss  # noqa: E402
from lightning_influence.replay import DriftReport, replay  # noqa: E402
from lightning_influence.step.weights import step_summary  # noqa: E402

TARGETS = {"mlp-dropout": 0.97, "mlp-bf16": 0.97, "transformer": 0.90, "transformer-clip-accum2": 0.90}  # whole-run Spearman of DIT (exact)


def make_net(kind: str, lr: float, weight_decay: float, step_epochs: int, gamma: float, dropout: float | None = None) -> type:
    """The run's LightningModule: ``kind`` "mlp" (tanh, dropout 0.2) or "transformer" (dropout 0.1); ``dropout``
    overrides the rate."""
    import lightning.pytorch as pl

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            if kind == "transformer":
                d = 16
                self.tok = nn.Embedding(17, d)
                self.pos = nn.Embedding(16, d)
                self.norm = nn.LayerNorm(d)
                self.enc = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=32, dropout=0.1 if dropout is None else dropout,
                                                      batch_first=True)
                self.head = nn.Linear(d, 10)
            else:
                self.net = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Dropout(0.2 if dropout is None else dropout),
                                         nn.Linear(32, 10))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if kind != "transformer":
                return self.net(x)
            h = self.norm(self.tok(x) + self.pos.weight)
            return self.head(self.enc(h).mean(1))

        def per_sample_loss(self, batch: Any) -> torch.Tensor:
            return ce_loss(self, batch)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.per_sample_loss(batch).mean()

        def configure_optimizers(self) -> Any:
            opt = torch.optim.SGD(self.parameters(), lr=lr, weight_decay=weight_decay)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_epochs, gamma)}

    return Net


def tokens(x: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
    """Digits (raw grey levels 0..16, 8x8) as 16 tokens: 2x2 blocks, mean level rounded."""
    blocks = raw.reshape(-1, 4, 2, 4, 2).mean((2, 4)).round().long().clamp(0, 16)
    return blocks.reshape(len(raw), 16)


def digits_data(n_train: int, n_val: int, seed: int) -> dict[str, Any]:
    """The digits split of ``load_digits_split`` (float64 features) plus the raw grey levels (for :func:`tokens`)."""
    from sklearn.datasets import load_digits

    data = load_digits_split(n_train, n_val, 0.0, seed=seed, dtype=torch.float64)
    raw, _ = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(raw))  # the split of load_digits_split
    data["raw_train"] = torch.tensor(raw[order[:n_train]])
    data["raw_val"] = torch.tensor(raw[order[n_train:n_train + n_val]])
    return data


def inputs(kind: str, data: dict[str, Any], dtype: torch.dtype) -> tuple[Any, tuple[torch.Tensor, torch.Tensor]]:
    """The training set (with ids) and the validation pair of a ``kind`` of net: tokens or features in ``dtype``."""
    x_train, y_train = data["train"]
    x_val, y_val = data["val"]
    if kind == "transformer":
        x_train, x_val = tokens(x_train, data["raw_train"]), tokens(x_val, data["raw_val"])
    else:
        x_train, x_val = x_train.to(dtype), x_val.to(dtype)
    return WithIds(TensorDataset(x_train, y_train)), (x_val, y_val)


def eval_query(data: tuple[torch.Tensor, torch.Tensor]):
    """Mean validation loss with dropout off (the module is put in eval mode for the query only)."""
    query = eval_mode(mean_loss(data, ce_loss, name="val_loss"))
    query.__name__ = "val_loss"
    return query


def replay_drift(log: InfluenceLog, Net: type, dtype: torch.dtype, train_ds: Any) -> dict[str, Any]:
    """A plain replay of the run against every checkpoint, re-anchored at each (replay_drift.py)."""
    report = DriftReport()
    for _ in replay(log, Net().to(dtype), train_ds, 0, None, loss_fn=ce_loss, tolerance=float("inf"), report=report):
        pass
    return report.summary()


def run_config(name: str, cfg: dict[str, Any], data: dict[str, Any], args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    dtype = cfg["dtype"]
    train_ds, val = inputs(cfg["kind"], data, dtype)
    Net = make_net(cfg["kind"], **cfg["hyper"])
    log = train(str(workdir / name), Net, train_ds, args.epochs, cfg.get("batch_size", args.batch_size), args.seed,
                dtype=dtype, **cfg["trainer"])
    query = eval_query(val)
    wins = windows_of(log)
    grid = sorted({t for w in wins.values() for t in w})
    out: dict[str, Any] = {"trainer": cfg["trainer"], "dtype": str(dtype), "T": log.num_steps, "N": log.dataset_size,
                           "step": step_summary(log), "seconds": {"train": time.perf_counter() - t0}, "results": {}}
    timer = time.perf_counter()
    out["replay_drift"] = replay_drift(log, Net, dtype, train_ds)
    loo = replay_loo(log, Net().to(dtype), train_ds, query, grid=grid, loss_fn=ce_loss, copies=args.copies,
                     tolerance=float("inf"))
    out["loo_replay_drift"] = loo.info["replay_drift"]
    out["seconds"]["replay_loo"] = time.perf_counter() - timer
    tls = {}
    for hvp in ("exact", "fd"):
        timer = time.perf_counter()
        tls[hvp] = timeline(log, query, module=Net().to(dtype), train_data=train_ds, grid=grid, loss_fn=ce_loss, hvp=hvp,
                            tolerance=float("inf"))
        out["seconds"][f"dit_{hvp}"] = time.perf_counter() - timer
    out["seconds"].update(tracin=0.0, diffin=0.0)
    out["fd_vs_exact"] = {}
    for wname, (t1, t2) in wins.items():
        truth = loo.window(t1, t2)
        est = {f"dit ({hvp})": tl.window(t1, t2).column(0) for hvp, tl in tls.items()}
        ex = est["dit (exact)"]
        out["fd_vs_exact"][wname] = float(np.abs(est["dit (fd)"] - ex).max() / max(np.abs(ex).max(), 1e-300))
        timer = time.perf_counter()
        est["tracin"] = tracin(log, query, module=Net().to(dtype), window=(t1, t2)).column(0)
        out["seconds"]["tracin"] += time.perf_counter() - timer
        timer = time.perf_counter()
        est["diffin (step form)"] = diffin(log, query, module=Net().to(dtype), train_data=train_ds, window=(t1, t2),
                                           form="step", hvp="exact", loss_fn=ce_loss).column(0)
        out["seconds"]["diffin"] += time.perf_counter() - timer
        out["results"][wname] = {k: agreement(v, truth) for k, v in est.items()}
    out["seconds"]["total"] = time.perf_counter() - t0
    log.close()
    return out


def print_table(name: str, res: dict[str, Any]) -> None:
    d = res["replay_drift"]
    print(f"\n=== {name}: {res['trainer']}, {res['dtype']}, N={res['N']}, T={res['T']}; replay drift max {d['max']:.1e} "
          f"(over {d['checkpoints_compared']} checkpoints), LOO reference {res['loo_replay_drift']['max']:.1e}; "
          f"{res['seconds']['total']:.0f}s ===")
    st = res["step"]
    if st["clipping"] or len(st["accumulate"]) and max(st["accumulate"]) > 1:
        print(f"clipping bound on {st['clip_bound_fraction']:.0%} of steps; incomplete accumulations at steps "
              f"{st['incomplete_accumulation_steps']}")
    print_agreement(res["results"], TARGETS[name])
    print("max |DIT fd - DIT exact| / max |DIT exact|: " + ", ".join(f"{w} {v:.1e}" for w, v in res["fd_vs_exact"].items()))
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in res["seconds"].items()))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-train", type=int, default=120)
    parser.add_argument("--n-val", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--copies", type=int, default=121, help="LOO runs trained together per pass")
    parser.add_argument("--configs", default="all", help="comma-separated config names, or 'all'")
    parser.add_argument("--clip", type=float, default=0.1, help="gradient_clip_val (norm) of transformer-clip-accum2")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "random_runs.json"))
    args = parser.parse_args(argv)
    quiet_setup(args.threads)
    sgd = {"lr": 0.1, "weight_decay": 1e-3, "step_epochs": 3, "gamma": 0.5}
    configs = {
        "mlp-dropout": {"kind": "mlp", "dtype": torch.float64, "hyper": sgd, "trainer": {}},
        "mlp-bf16": {"kind": "mlp", "dtype": torch.float32, "hyper": sgd, "trainer": {"precision": "bf16-mixed"}},
        "transformer": {"kind": "transformer", "dtype": torch.float32, "hyper": {**sgd, "lr": 0.05}, "trainer": {}},
        "transformer-clip-accum2": {"kind": "transformer", "dtype": torch.float32, "hyper": {**sgd, "lr": 0.05},
                                    "batch_size": 24, "trainer": {"gradient_clip_val": args.clip, "accumulate_grad_batches": 2}},
    }
    chosen = list(configs) if args.configs == "all" else args.configs.split(",")
    data = digits_data(args.n_train, args.n_val, args.seed)
    return run_all(args, chosen, lambda name, work: run_config(name, configs[name], data, args, work), print_table,
                   "li-random-runs-")

if __name__ == "__main__":
    main()
