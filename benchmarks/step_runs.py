"""Accuracy on runs with gradient clipping and gradient accumulation: DIT, TracIn, Diff-In vs replay LOO.

    python benchmarks/step_runs.py [--n-train 180] [--epochs 6] [--clip 0.5] [--configs all] [--linear-response K]

The setup of ``benchmarks/accuracy.py`` (digits, float64, tanh MLP, batch 20, SGD with a step LR
schedule and weight decay, a real ``lightning.Trainer`` with the tracker, full per-sample gradients
and a checkpoint every step, query = mean validation loss), trained the way issue 11 describes:

- ``mlp-clip``: ``Trainer(gradient_clip_val=c)`` (norm), at a threshold that binds on most steps;
- ``mlp-accum2``: ``accumulate_grad_batches=2`` with an odd number of batches per epoch, so the last
  step of every epoch is an incomplete accumulation (one micro-batch, whose loss Lightning still halves);
- ``mlp-clip-accum2``: both;
- ``mlp-plain``: neither, the reference.

For every training sample each estimator's window score is compared with the replay
leave-one-out truth (docs/influence-math.md §6; the removal replays the recorded micro-batches, weights and
clipping) for the windows whole run, first epoch, second half and last epoch: DIT exact and
finite-difference HVPs (one timeline sweep each; with clipping also DIT's linear removal, the derivative
of the clipped step, beside its default step removal), TracIn, Diff-In (step form). Reported: Pearson,
Spearman, the share of steps the clipping bound, the incomplete steps, and the replay drift (the
LOO reference run against the logged checkpoints). ``--linear-response K`` also replays the removal
of ``ε = 1e-3`` of each of ``K`` samples: the linear removal's own error is its gap to that linear
response; the rest of its gap to LOO is the nonlinearity of removing a whole sample, which DIT's default
step removal keeps at the step the sample is in.

Prints a table and writes JSON (``benchmarks/results/`` is git-ignored).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy import (  # noqa: E402
    agreement, ce_loss, make_module, print_agreement, quiet_setup, train, windows_of, write_results)

from lightning_influence.capture import call_with_params  # noqa: E402
from lightning_influence.data import WithIds  # noqa: E402
from lightning_influence.estimators import diffin, timeline, tracin  # noqa: E402
from lightning_influence.evaluation.ground_truth import replay_loo  # noqa: E402
from lightning_influence.examples.digits import load_digits_split  # noqa: E402
from lightning_influence.log import InfluenceLog  # noqa: E402
from lightning_influence.queries import mean_loss  # noqa: E402
from lightning_influence.replay import replay  # noqa: E402
from lightning_influence.step.weights import step_summary  # noqa: E402

TARGET = 0.97  # whole-run Spearman of DIT (exact) against replay LOO (issue 11)


def linear_response(log: InfluenceLog, Net: Any, train_ds: Any, query: Any, ids: np.ndarray, eps: float = 1e-3) -> np.ndarray:
    """``(f(θ_T^{−ε j}) − f(θ_T))/ε``: the effect of down-weighting sample ``j`` by ``ε`` (replayed with the
    recorded weights and clipping), the quantity DIT linearises; its gap to LOO is the nonlinearity of removal."""
    def final(weights: Any) -> float:
        last = None
        for rs in replay(log, Net().double(), train_ds, 0, None, loss_fn=ce_loss, weights=weights, verify=False):
            last = rs
        return float(call_with_params(Net().double(), query, last.params))

    base = final(None)
    out = [(final(lambda t, b, j=int(j): torch.tensor([1.0 - eps if i == j else 1.0 for i in b], dtype=torch.float64))
            - base) / eps for j in ids]
    return np.array(out)


def run_config(name: str, trainer_kw: dict[str, Any], hyper: dict[str, Any], data: dict[str, Any],
               args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    train_ds = WithIds(TensorDataset(*data["train"]))
    Net = make_module("mlp", "sgd", **hyper)
    log = train(str(workdir / name), Net, train_ds, args.epochs, args.batch_size, args.seed, **trainer_kw)
    query = mean_loss(data["val"], ce_loss, name="val_loss")
    wins = windows_of(log)
    grid = sorted({t for w in wins.values() for t in w})
    out: dict[str, Any] = {"trainer": trainer_kw, "hyper": hyper, "T": log.num_steps, "N": log.dataset_size,
                           **step_summary(log), "seconds": {"train": time.perf_counter() - t0}, "results": {}}
    timer = time.perf_counter()
    loo = replay_loo(log, Net().double(), train_ds, query, grid=grid, loss_fn=ce_loss, copies=args.copies)
    out["seconds"]["replay_loo"] = time.perf_counter() - timer
    out["replay_drift"] = loo.info["replay_drift"]["max"]
    tls = {}
    for hvp in ("exact", "fd"):
        timer = time.perf_counter()
        tls[hvp] = timeline(log, query, module=Net().double(), train_data=train_ds, grid=grid, loss_fn=ce_loss, hvp=hvp)
        out["seconds"][f"dit_{hvp}"] = time.perf_counter() - timer
    if "gradient_clip_val" in trainer_kw:  # clipping is not affine: the derivative (linear removal) differs
        timer = time.perf_counter()
        tls["linear removal"] = timeline(log, query, module=Net().double(), train_data=train_ds, grid=grid,
                                         loss_fn=ce_loss, removal="linear")
        out["seconds"]["dit_linear"] = time.perf_counter() - timer
    out["seconds"].update(tracin=0.0, diffin=0.0)
    for wname, (t1, t2) in wins.items():
        truth = loo.window(t1, t2)
        est = {f"dit ({hvp})": tl.window(t1, t2).column(0) for hvp, tl in tls.items()}
        timer = time.perf_counter()
        est["tracin"] = tracin(log, query, module=Net().double(), window=(t1, t2)).column(0)
        out["seconds"]["tracin"] += time.perf_counter() - timer
        timer = time.perf_counter()
        est["diffin (step form)"] = diffin(log, query, module=Net().double(), train_data=train_ds, window=(t1, t2),
                                           form="step", hvp="exact", loss_fn=ce_loss).column(0)
        out["seconds"]["diffin"] += time.perf_counter() - timer
        out["results"][wname] = {k: agreement(v, truth) for k, v in est.items()}
    if args.linear_response:  # whole run, samples spread over DIT's ranking
        t1, t2 = wins["whole run"]
        d = tls["exact"].window(t1, t2).column(0)
        deriv = tls.get("linear removal", tls["exact"]).window(t1, t2).column(0)  # the derivative (same without clipping)
        ids = np.argsort(d)[np.linspace(0, len(d) - 1, args.linear_response).astype(int)]
        timer = time.perf_counter()
        lin = linear_response(log, Net, train_ds, query, ids)
        out["seconds"]["linear_response"] = time.perf_counter() - timer
        truth = loo.window(t1, t2)[np.searchsorted(loo.ids, ids)]
        out["linear_response"] = {"samples": len(ids), "dit linear removal vs linear response": agreement(deriv[ids], lin),
                                  "dit linear removal max relative error": float(np.abs(deriv[ids] - lin).max()
                                                                                 / np.abs(lin).max()),
                                  "linear response vs replay LOO": agreement(lin, truth),
                                  "dit vs replay LOO (these samples)": agreement(d[ids], truth)}
    out["seconds"]["total"] = time.perf_counter() - t0
    log.close()
    return out


def print_table(name: str, res: dict[str, Any]) -> None:
    print(f"\n=== {name}: {res['trainer']}, N={res['N']}, T={res['T']}; clipping bound on "
          f"{res['clip_bound_fraction']:.0%} of steps (median coefficient {res['clip_coef_median']}); incomplete "
          f"accumulations at steps {res['incomplete_accumulation_steps']}; replay drift {res['replay_drift']:.1e}; "
          f"{res['seconds']['total']:.0f}s ===")
    print_agreement(res["results"], TARGET)
    if "linear_response" in res:
        lr = res["linear_response"]
        print(f"whole run, {lr['samples']} samples, removal by ε = 1e-3 replayed (the linear response DIT's linear "
              "removal computes):")
        for key in ("dit linear removal vs linear response", "linear response vs replay LOO",
                    "dit vs replay LOO (these samples)"):
            print(f"  {key:<38} pearson {lr[key]['pearson']:.4f} spearman {lr[key]['spearman']:.4f}")
        print(f"  dit linear removal max relative error vs linear response {lr['dit linear removal max relative error']:.1e}")
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in res["seconds"].items()))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-train", type=int, default=180, help="an odd number of batches per epoch (180/20 = 9)")
    parser.add_argument("--n-val", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--clip", type=float, default=0.5, help="gradient_clip_val (norm)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--copies", type=int, default=181, help="LOO runs trained together per pass")
    parser.add_argument("--configs", default="all", help="comma-separated config names, or 'all'")
    parser.add_argument("--linear-response", type=int, default=0, metavar="K",
                        help="also replay an ε-removal of K samples: separates DIT's error from removal's nonlinearity")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "step_runs.json"))
    args = parser.parse_args(argv)
    quiet_setup(args.threads)
    sgd = {"lr": 0.1, "weight_decay": 1e-3, "momentum": 0.0, "step_epochs": 4, "gamma": 0.5}
    configs = {
        "mlp-plain": {},  # the reference: neither clipping nor accumulation
        "mlp-clip": {"gradient_clip_val": args.clip},
        "mlp-accum2": {"accumulate_grad_batches": 2},
        "mlp-clip-accum2": {"gradient_clip_val": args.clip, "accumulate_grad_batches": 2},
    }
    chosen = list(configs) if args.configs == "all" else args.configs.split(",")
    data = load_digits_split(args.n_train, args.n_val, 0.0, seed=args.seed, dtype=torch.float64)
    return run_all(args, chosen, lambda name, work: run_config(name, configs[name], sgd, data, args, work), print_table,
                   "li-step-runs-")


def run_all(args: argparse.Namespace, names: list[str], run_one: Callable[[str, Path], dict[str, Any]],
            show: Callable[[str, dict[str, Any]], None], prefix: str) -> dict[str, Any]:
    """Run each config in a temporary work folder, print its table, write all results as JSON to ``args.out``."""
    results: dict[str, Any] = {"setup": {**vars(args), "torch": torch.__version__}, "configs": {}}
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        for name in names:
            res = run_one(name, workdir)
            results["configs"][name] = res
            show(name, res)
            sys.stdout.flush()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    write_results(results, args.out, default=str)
    return results

if __name__ == "__main__":
    main()
