"""Accuracy benchmark: DIT (exact, local, Gauss-Newton) and TracIn against replay leave-one-out.

    python benchmarks/accuracy.py [--epochs 10] [--n-train 400] [--out benchmarks/results/accuracy.json]
    python benchmarks/accuracy.py --configs optimizers   # SGD baselines + Adam/AdamW/RMSprop (~15 min, 1 thread)

Digits (bundled with scikit-learn), float64, batch 20, SGD with a step LR schedule and L2
(weight decay), trained by a real ``lightning.Trainer`` with the ``InfluenceTracker``
(full per-sample gradients and a checkpoint every step, so TracIn uses ``q_t`` at every
step). Models: multinomial logistic regression and a small tanh MLP. Query: mean
validation loss. For every training sample the scores of each estimator are compared with
the replay-LOO window truth ``LOO_j(t2) − LOO_j(t1)`` (docs/influence-math.md §6) for the windows
whole run, first epoch, second half and last epoch; DIT-local is also compared with its own
counterpart, removal inside the window only. Then the same with momentum 0.9 and with
AdamW; then Adam, AdamW and RMSprop with a cosine schedule and warm-up
(docs/optimizer-adjoint.md), where exact DIT (the VJP of the full optimizer step) runs beside
the frozen-preconditioner approximation, both also against the removal of weight ε = 1e-3
(divided by ε: the derivative DIT computes, where the run is smooth at that scale), and the
sweeps' time and memory against the SGD sweep on the same model; DIT's default scores each removal
with its step's exact change (``removal="step"``), shown beside the derivative (``removal="linear"``); and corrupted-sample
detection on the MLP with 10% flipped labels: ranked by the validation-loss scores (harmful =
negative) and by self-influence (query = each training sample's own loss, all N swept
together; mislabelled = large positive), each against its replay-LOO truth.

Prints a table and writes JSON (``benchmarks/results/`` is git-ignored).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_influence.data import WithIds  # noqa: E402
from lightning_influence.estimators import dit_gauss_newton, dit_local, timeline, tracin  # noqa: E402
from lightning_influence.evaluation.ground_truth import replay_loo  # noqa: E402
from lightning_influence.evaluation.metrics import auroc, kendall_tau, pearson, precision_at_k, spearman  # noqa: E402
from lightning_influence.examples.digits import load_digits_split  # noqa: E402
from lightning_influence.log import InfluenceLog  # noqa: E402
from lightning_influence.queries import mean_loss, sample_losses  # noqa: E402

TARGETS = {"whole run": 0.97, "first epoch": 0.98}  # exact DIT Spearman targets (issue #3)
LINEAR_EPS = 1e-3  # removal weight 1 − ε for the linear-response truth of the adaptive-optimizer configs


def ce_loss(module: nn.Module, batch: Any) -> torch.Tensor:
    return F.cross_entropy(module(batch[0]), batch[1], reduction="none")


def make_module(model: str, optimizer: str, lr: float, weight_decay: float, momentum: float, step_epochs: int = 4,
                gamma: float = 0.5, schedule: str = "step", warmup: float = 0.1):
    """A LightningModule class; ``schedule="cosine"``: linear warm-up over the first ``warmup``
    fraction of the steps, then cosine decay to 0, stepped every optimizer step."""
    import lightning.pytorch as pl

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            if model == "logreg":
                self.net = nn.Sequential(nn.Linear(64, 10))
            else:
                self.net = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def per_sample_loss(self, batch: Any) -> torch.Tensor:
            return ce_loss(self, batch)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.per_sample_loss(batch).mean()

        def configure_optimizers(self) -> Any:
            if optimizer == "adamw":
                opt = torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=weight_decay)
            elif optimizer == "adam":
                opt = torch.optim.Adam(self.parameters(), lr=lr, weight_decay=weight_decay)
            elif optimizer == "rmsprop":
                opt = torch.optim.RMSprop(self.parameters(), lr=lr, weight_decay=weight_decay, momentum=momentum)
            else:
                opt = torch.optim.SGD(self.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
            if schedule == "step":
                return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=step_epochs, gamma=gamma)}
            total = int(self.trainer.estimated_stepping_batches)
            warm = max(1, int(warmup * total))

            def factor(t: int) -> float:
                return (t + 1) / warm if t < warm else 0.5 * (1 + math.cos(math.pi * (t - warm) / max(total - warm, 1)))

            sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return Net


def train(log_dir: str, Net: Callable[[], nn.Module], train_ds: WithIds, epochs: int, batch_size: int, seed: int,
          record_hvp: bool = False, dtype: torch.dtype = torch.float64, **trainer_kw: Any) -> InfluenceLog:
    """A real ``lightning.Trainer`` run of ``Net()`` (in ``dtype``, float64 by default) with the tracker: full per-sample
    gradients (and ``H_z Ĝ`` rows with ``record_hvp``) and a checkpoint at every step; ``trainer_kw``
    go to the Trainer (e.g. ``gradient_clip_val``, ``accumulate_grad_batches``)."""
    import lightning.pytorch as pl

    from lightning_influence import InfluenceTracker

    torch.manual_seed(seed)
    module = Net().to(dtype)
    tracker = InfluenceTracker(log_dir, record_gradients=True, record_hvp=record_hvp, checkpoint_every_n_steps=1,
                               storage_dtype="float64", overwrite=True, flush_every_n_steps=100)
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[tracker], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                         limit_val_batches=0, num_sanity_val_steps=0, deterministic=True, **trainer_kw)
    loader = DataLoader(train_ds, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    trainer.fit(module, loader)
    return InfluenceLog(log_dir)


class Timer:
    """Seconds per label, summed over ``with timer(label):`` blocks, each announced on stdout."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, label: str):
        timer = self

        class _Ctx:
            def __enter__(self) -> None:
                self.t0 = time.perf_counter()
                print(f"  .. {label}", flush=True)

            def __exit__(self, *exc: Any) -> None:
                timer.seconds[label] = timer.seconds.get(label, 0.0) + time.perf_counter() - self.t0

        return _Ctx()


def quiet_setup(threads: int) -> None:
    """Benchmarks run on ``threads`` threads and print only their tables (no warnings, no Lightning info lines)."""
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


def write_results(results: dict[str, Any], out: str, default: Callable[[Any], Any] | None = None) -> None:
    """Write a benchmark's results as JSON to ``out`` (folders created) and say where."""
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=1, default=default)
    print(f"\nwrote {out}")


def agreement(est: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    return {"pearson": pearson(est, truth), "spearman": spearman(est, truth), "kendall": kendall_tau(est, truth)}


def print_agreement(results: dict[str, dict[str, dict[str, float]]], target: float) -> None:
    """The ``{window: {estimator: agreement}}`` table; DIT (exact) on the whole run is flagged against ``target``."""
    print(f"{'window':<13} {'estimator':<20} {'pearson':>8} {'spearman':>9}")
    for wname, ests in results.items():
        for est, m in ests.items():
            flag = ""
            if est == "dit (exact)" and wname == "whole run":
                flag = "  ok" if m["spearman"] >= target else f"  MISSED (target {target})"
            print(f"{wname:<13} {est:<20} {m['pearson']:>8.4f} {m['spearman']:>9.4f}{flag}")


def windows_of(log: InfluenceLog) -> dict[str, tuple[int, int]]:
    T = log.num_steps
    last = int(log.epochs[-1])
    return {
        "whole run": log.window(None),
        "first epoch": log.window(("epoch", 0, 1)),
        "second half": log.window((0.5, 1.0)),
        "last epoch": log.window(("epoch", last, last + 1)),
    } if T else {}


def run_config(name: str, model: str, optimizer: str, hyper: dict[str, Any], data: dict[str, Any], args: argparse.Namespace,
               workdir: Path, flipped: np.ndarray | None = None) -> dict[str, Any]:
    t_start = time.perf_counter()
    train_ds = WithIds(TensorDataset(*data["train"]))
    Net = make_module(model, optimizer, **hyper)
    log = train(str(workdir / name), Net, train_ds, args.epochs, args.batch_size, args.seed)
    t_train = time.perf_counter() - t_start
    query = mean_loss(data["val"], ce_loss, name="val_loss")
    wins = windows_of(log)
    grid = sorted({t for w in wins.values() for t in w})
    out: dict[str, Any] = {"model": model, "optimizer": optimizer, "hyper": hyper, "T": log.num_steps, "N": log.dataset_size,
                           "p": sum(int(np.prod(s)) for s in log.param_shapes.values()), "windows": {k: list(v) for k, v in wins.items()},
                           "seconds": {"train": t_train}, "results": {}}
    timer = time.perf_counter()
    loo = replay_loo(log, Net().double(), train_ds, query, grid=grid, loss_fn=ce_loss, copies=args.copies)
    out["seconds"]["replay_loo"] = time.perf_counter() - timer
    out["loo_reference_max_deviation"] = loo.info["replay_drift"]["max_abs"]
    linear = None
    if optimizer != "sgd":  # removal weight 1 − ε, divided by ε: ∂f/∂w, what DIT computes, where f is smooth at that scale
        timer = time.perf_counter()
        linear = replay_loo(log, Net().double(), train_ds, query, grid=grid, loss_fn=ce_loss, copies=args.copies,
                            removal_weight=1.0 - LINEAR_EPS)
        out["seconds"]["replay_linear_response"] = time.perf_counter() - timer
    timer = time.perf_counter()
    tl = timeline(log, query, module=Net().double(), train_data=train_ds, grid=grid, loss_fn=ce_loss)
    out["seconds"]["dit_timeline"] = time.perf_counter() - timer
    out["dit_method"] = tl.method
    out["memory_bytes"] = {"dit": {k: tl.info[k] for k in ("peak_adjoint_bytes", "peak_trajectory_bytes",
                                                           "peak_removal_rows_bytes")}}
    adaptive = optimizer != "sgd"
    if adaptive:  # the derivative (linear removal) and the frozen-preconditioner approximation, same grid
        timer = time.perf_counter()
        lin_tl = timeline(log, query, module=Net().double(), train_data=train_ds, grid=grid, loss_fn=ce_loss,
                          removal="linear")
        out["seconds"]["dit_linear_timeline"] = time.perf_counter() - timer
        timer = time.perf_counter()
        frozen = timeline(log, query, module=Net().double(), train_data=train_ds, grid=grid, loss_fn=ce_loss,
                          preconditioner="frozen")
        out["seconds"]["dit_frozen_timeline"] = time.perf_counter() - timer
        out["memory_bytes"]["dit-frozen"] = {k: frozen.info[k] for k in ("peak_adjoint_bytes", "peak_trajectory_bytes")}
    add_err = max(float(np.abs(tl.window(0, b).column(0) + tl.window(b, c).column(0) - tl.window(0, c).column(0)).max())
                  for b, c in zip(grid[1:-1], grid[2:]))
    out["timeline_additivity_max_abs_error"] = add_err
    out["seconds"].update({"dit_local": 0.0, "dit_gauss_newton": 0.0, "tracin": 0.0, "replay_loo_in_window": 0.0})
    scores: dict[str, dict[str, np.ndarray]] = {}
    for wname, (t1, t2) in wins.items():
        truth = loo.window(t1, t2)
        est = {"dit (exact)": tl.window(t1, t2).column(0)}
        if adaptive:
            est["dit (linear removal)"] = lin_tl.window(t1, t2).column(0)
            est["dit-frozen (approx.)"] = frozen.window(t1, t2).column(0)
        timer = time.perf_counter()
        local = dit_local(log, query, module=Net().double(), train_data=train_ds, window=(t1, t2), loss_fn=ce_loss)
        est["dit-local (approx.)"] = local.column(0)
        out["seconds"]["dit_local"] += time.perf_counter() - timer
        timer = time.perf_counter()
        if adaptive:
            est["dit-gauss-newton (approx.)"] = None
        else:
            est["dit-gauss-newton (approx.)"] = dit_gauss_newton(log, query, module=Net().double(), window=(t1, t2)).column(0)
        out["seconds"]["dit_gauss_newton"] += time.perf_counter() - timer
        timer = time.perf_counter()
        est["tracin"] = tracin(log, query, module=Net().double(), window=(t1, t2)).column(0)
        out["seconds"]["tracin"] += time.perf_counter() - timer
        res = {k: (agreement(v, truth) if v is not None else None) for k, v in est.items()}
        if t1 > 0:  # local DIT against its own counterpart: the sample removed inside the window only
            timer = time.perf_counter()
            inw = replay_loo(log, Net().double(), train_ds, query, window=(t1, t2), in_window_only=True, loss_fn=ce_loss,
                             copies=args.copies)
            out["seconds"]["replay_loo_in_window"] += time.perf_counter() - timer
            res["dit-local vs in-window LOO"] = agreement(est["dit-local (approx.)"], inw.window(t1, t2))
        if linear is not None:  # exactness in the linearisation vs the nonlinearity of a full removal
            lin = linear.window(t1, t2) / LINEAR_EPS
            res["dit (linear removal) vs eps-removal"] = agreement(est["dit (linear removal)"], lin)
            res["eps-removal vs LOO"] = agreement(lin, truth)
        res["truth_std"] = float(np.std(truth))
        out["results"][wname] = res
        scores[wname] = {k: v for k, v in est.items() if v is not None}
    if flipped is not None:
        mask = np.zeros(log.dataset_size, dtype=bool)
        mask[flipped] = True
        k = int(mask.sum())
        det = {}
        for label, (wname, key) in {"dit whole run": ("whole run", "dit (exact)"), "dit last epoch": ("last epoch", "dit (exact)"),
                                    "tracin whole run": ("whole run", "tracin"), "tracin last epoch": ("last epoch", "tracin"),
                                    "replay-loo whole run (truth)": ("whole run", None)}.items():
            s = scores[wname][key] if key else loo.window(*wins[wname])
            det[label] = {"auroc": auroc(-s, mask), f"precision@{k}": precision_at_k(-s, mask, k)}
        out["detection"] = det
        out["detection_self_influence"] = self_influence_detection(log, Net, train_ds, data, wins, mask, args)
    out["seconds"]["total"] = time.perf_counter() - t_start
    log.close()
    return out


def self_influence_detection(log: InfluenceLog, Net: type, train_ds: WithIds, data: dict[str, Any],
                             wins: dict[str, tuple[int, int]], mask: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    """Detection by self-influence: the query of sample ``j`` is its own loss ``ℓ(z_j)`` (all N swept together).

    A mislabelled sample is fitted only by memorising it, so removing it raises its own loss
    the most: rank by ``+score``. TracIn's self-influence ``Σ_t η_t/|B_t| ‖g_{j,t}‖²`` comes
    from the logged per-sample gradients.
    """
    k = int(mask.sum())
    own = sample_losses(data["train"], ce_loss)
    t_last = wins["last epoch"][0]
    T = log.num_steps
    timer = time.perf_counter()
    tl = timeline(log, own, module=Net().double(), train_data=train_ds, grid=[0, t_last, T], loss_fn=ce_loss)
    seconds = {"dit_self_timeline": time.perf_counter() - timer}
    timer = time.perf_counter()
    loo = replay_loo(log, Net().double(), train_ds, own, grid=[0, t_last, T], loss_fn=ce_loss, copies=args.copies)
    seconds["replay_loo_self"] = time.perf_counter() - timer
    cols = log.column_groups()
    tr_whole, tr_last = np.zeros(log.dataset_size), np.zeros(log.dataset_size)
    for rec in log.iter_steps(0, T, fields=("grad",)):
        contrib = (rec.grads.astype(np.float64) ** 2 * rec.lrs[cols]).sum(axis=1) / len(rec.ids)
        np.add.at(tr_whole, rec.ids, contrib)
        if rec.step >= t_last:
            np.add.at(tr_last, rec.ids, contrib)
    diag = np.arange(log.dataset_size)
    rows = {
        "dit whole run": tl.window(0, T).scores[diag, diag],
        "dit last epoch": tl.window(t_last, T).scores[diag, diag],
        "tracin whole run": tr_whole,
        "tracin last epoch": tr_last,
        "replay-loo whole run (truth)": loo.at(T)[diag, diag],
        "replay-loo last epoch (truth)": (loo.at(T) - loo.at(t_last))[diag, diag],
    }
    out: dict[str, Any] = {label: {"auroc": auroc(s, mask), f"precision@{k}": precision_at_k(s, mask, k)} for label, s in rows.items()}
    truth = rows["replay-loo whole run (truth)"]
    out["agreement_with_self_loo"] = {lab: agreement(rows[lab], truth) for lab in ("dit whole run", "tracin whole run")}
    out["seconds"] = seconds
    return out


def print_table(name: str, res: dict[str, Any]) -> None:
    print(f"\n=== {name}: {res['model']}, {res['optimizer']} {res['hyper']}, N={res['N']}, T={res['T']}, p={res['p']}, "
          f"{res['seconds']['total']:.0f}s ===")
    print(f"{'window':<13} {'estimator':<30} {'pearson':>8} {'spearman':>9} {'kendall':>8}")
    for wname, ests in res["results"].items():
        for est, m in ests.items():
            if est == "truth_std":
                continue
            if m is None:
                print(f"{wname:<13} {est:<30} {'n/a (SGD only)':>27}")
                continue
            flag = ""
            if est == "dit (exact)" and wname in TARGETS:
                flag = "  ok" if m["spearman"] >= TARGETS[wname] else f"  MISSED (target {TARGETS[wname]})"
            print(f"{wname:<13} {est:<30} {m['pearson']:>8.4f} {m['spearman']:>9.4f} {m['kendall']:>8.4f}{flag}")
    if "detection" in res:
        print("corrupted-sample detection (rank by -score, val-loss query):")
        for label, m in res["detection"].items():
            print("  " + f"{label:<30} " + "  ".join(f"{k}={v:.4f}" for k, v in m.items()))
    if "detection_self_influence" in res:
        print("corrupted-sample detection by self-influence (query = the sample's own loss, rank by +score):")
        for label, m in res["detection_self_influence"].items():
            if label in ("seconds", "agreement_with_self_loo"):
                continue
            print("  " + f"{label:<30} " + "  ".join(f"{k}={v:.4f}" for k, v in m.items()))
        for label, m in res["detection_self_influence"]["agreement_with_self_loo"].items():
            print(f"  {label} vs self-LOO: spearman={m['spearman']:.4f} pearson={m['pearson']:.4f}")
    print("sweep memory (bytes held: adjoint columns / replayed trajectory segment): " + ", ".join(
        f"{k} {m['peak_adjoint_bytes']}/{m['peak_trajectory_bytes']}" for k, m in res["memory_bytes"].items()))
    print(f"timeline additivity max |error| {res['timeline_additivity_max_abs_error']:.2e}; LOO reference max deviation from "
          f"log {res['loo_reference_max_deviation']:.2e}; seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in res["seconds"].items()))


def sweep_cost(configs: dict[str, tuple], chosen: list[str], args: argparse.Namespace, workdir: Path,
               rounds: int = 3) -> dict[str, Any]:
    """DIT timeline sweep time and memory of each adaptive config against the SGD config on the same
    model: the same grid (epoch starts and T), the sweeps alternated ``rounds`` times, median seconds."""
    out: dict[str, Any] = {}
    for name in chosen:
        model, opt, hyper, _ = configs[name]
        base = f"{model}-sgd"
        if opt == "sgd" or base not in chosen:
            continue
        data = load_digits_split(args.n_train, args.n_val, 0.0, seed=args.seed, dtype=torch.float64)
        train_ds = WithIds(TensorDataset(*data["train"]))
        query = mean_loss(data["val"], ce_loss, name="val_loss")
        runs = {label: (make_module(configs[label][0], configs[label][1], **configs[label][2]), InfluenceLog(workdir / label))
                for label in (base, name)}
        seconds: dict[str, list[float]] = {(lab + suffix): [] for lab in runs for suffix in ("", " frozen")}
        memory: dict[str, int] = {}
        for _ in range(rounds):
            for label, (Net, log) in runs.items():
                for suffix, pre in (("", "exact"), (" frozen", "frozen")):
                    if suffix and label == base:
                        continue
                    t0 = time.perf_counter()
                    tl = timeline(log, query, module=Net().double(), train_data=train_ds, loss_fn=ce_loss, preconditioner=pre)
                    seconds[label + suffix].append(time.perf_counter() - t0)
                    memory[label + suffix] = (tl.info["peak_adjoint_bytes"] + tl.info["peak_trajectory_bytes"]
                                              + tl.info["peak_removal_rows_bytes"])
        med = {k: float(np.median(v)) for k, v in seconds.items() if v}
        out[name] = {"baseline": base, "median_seconds": med, "bytes": memory,
                     "time_ratio": med[name] / med[base], "time_ratio_frozen": med[name + " frozen"] / med[base],
                     "memory_ratio": memory[name] / memory[base], "memory_ratio_frozen": memory[name + " frozen"] / memory[base]}
        print(f"sweep cost {name} vs {base} (median of {rounds} alternating rounds): time x{out[name]['time_ratio']:.2f} "
              f"(frozen x{out[name]['time_ratio_frozen']:.2f}), memory x{out[name]['memory_ratio']:.2f} (frozen "
              f"x{out[name]['memory_ratio_frozen']:.2f}); seconds " + ", ".join(f"{k} {v:.2f}" for k, v in med.items()))
        sys.stdout.flush()
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-train", type=int, default=400)
    parser.add_argument("--n-val", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--copies", type=int, default=401, help="LOO runs trained together per pass")
    parser.add_argument("--configs", default="all", help="comma-separated config names, 'all', or 'optimizers' (the SGD "
                        "baselines and the adaptive-optimizer configs)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "accuracy.json"))
    args = parser.parse_args(argv)
    quiet_setup(args.threads)
    sgd = {"lr": 0.1, "weight_decay": 1e-3, "momentum": 0.0, "step_epochs": 4, "gamma": 0.5}
    cos = {"momentum": 0.0, "schedule": "cosine", "warmup": 0.1}
    configs = {
        "logreg-sgd": ("logreg", "sgd", sgd, 0.0),
        "mlp-sgd": ("mlp", "sgd", sgd, 0.0),
        "logreg-momentum": ("logreg", "sgd", {**sgd, "lr": 0.02, "momentum": 0.9}, 0.0),
        "mlp-momentum": ("mlp", "sgd", {**sgd, "lr": 0.02, "momentum": 0.9}, 0.0),
        "logreg-adamw": ("logreg", "adamw", {"lr": 0.01, "weight_decay": 1e-2, "momentum": 0.0, "step_epochs": 4, "gamma": 0.5}, 0.0),
        "mlp-adamw": ("mlp", "adamw", {"lr": 0.005, "weight_decay": 1e-2, "momentum": 0.0, "step_epochs": 4, "gamma": 0.5}, 0.0),
        "mlp-sgd-flipped10": ("mlp", "sgd", sgd, 0.1),
        # adaptive optimizers, cosine schedule with 10% linear warm-up (issue #12); exact DIT beside the frozen one
        "logreg-adamw-cos": ("logreg", "adamw", {**cos, "lr": 0.01, "weight_decay": 1e-2}, 0.0),
        "mlp-adamw-cos": ("mlp", "adamw", {**cos, "lr": 0.005, "weight_decay": 1e-2}, 0.0),
        "logreg-adam-cos": ("logreg", "adam", {**cos, "lr": 0.01, "weight_decay": 1e-3}, 0.0),
        "mlp-adam-cos": ("mlp", "adam", {**cos, "lr": 0.005, "weight_decay": 1e-3}, 0.0),
        "mlp-rmsprop-cos": ("mlp", "rmsprop", {**cos, "lr": 0.002, "weight_decay": 1e-3}, 0.0),
    }
    groups = {"optimizers": ["logreg-sgd", "mlp-sgd", "logreg-adamw-cos", "mlp-adamw-cos", "logreg-adam-cos", "mlp-adam-cos",
                             "mlp-rmsprop-cos"]}
    chosen = list(configs) if args.configs == "all" else groups.get(args.configs, args.configs.split(","))
    results: dict[str, Any] = {
        "setup": {"data": "sklearn digits, standardised", "n_train": args.n_train, "n_val": args.n_val, "epochs": args.epochs,
                  "batch_size": args.batch_size, "dtype": "float64", "query": "mean validation cross-entropy",
                  "truth": "replay leave-one-out, window truth LOO(t2) - LOO(t1) (docs/influence-math.md §6)",
                  "seed": args.seed,
                  "torch": torch.__version__, "python": platform.python_version(), "threads": args.threads},
        "configs": {},
    }
    workdir = Path(tempfile.mkdtemp(prefix="li-accuracy-"))
    try:
        for name in chosen:
            model, opt, hyper, flip = configs[name]
            data = load_digits_split(args.n_train, args.n_val, flip, seed=args.seed, dtype=torch.float64)
            res = run_config(name, model, opt, hyper, data, args, workdir, flipped=data["flipped"] if flip > 0 else None)
            results["configs"][name] = res
            print_table(name, res)
            sys.stdout.flush()
        if args.configs == "optimizers":
            results["sweep_cost"] = sweep_cost(configs, chosen, args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    write_results(results, args.out)
    return results


if __name__ == "__main__":
    main()
