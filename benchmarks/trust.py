"""What are the scores answering? PBRF, datamodel quality and group additivity (issue #7, docs/influence-math.md §6).

    python benchmarks/trust.py [--models logreg,mlp] [--samples 120] [--pairs 300] [--out benchmarks/results/trust.json]

Setup (the same runs as ``benchmarks/accuracy.py``): sklearn digits, standardised, 400 training
and 200 validation samples, float64, batch 20, 10 epochs, SGD lr 0.1 with L2 1e-3 and a step
schedule (x0.5 every 4 epochs), trained by a real ``lightning.Trainer`` with the
``InfluenceTracker`` (full per-sample gradients, a checkpoint every step). Models: multinomial
logistic regression (650 parameters) and a 64-32-10 tanh MLP (2410). Query: mean validation
cross-entropy. For each model:

1. Estimators for every sample over the whole run: DIT (exact), Diff-In (step and published
   forms), TracIn, and the influence function (= linearised PBRF, Gauss-Newton, damping λ).
2. Ground truths on ``--samples`` random samples: replay LOO (cold start) and the PBRF
   (converged, Gauss-Newton-preconditioned L-BFGS); correlations side by side, and a damping
   sweep of PBRF and linearised PBRF against LOO.
3. The LOO -> PBRF -> influence-function gap split into its terms (warm start, proximity,
   training non-convergence, solver non-convergence, linearisation), each stage computed.
4. Noise-stability datamodel quality at keep-probabilities 0.5 and 0.9: linear share, residual,
   the correlation ceiling of any additive attribution, next to the LDS (Spearman) and the
   Pearson counterpart each estimator reaches on the same retrained subsets.
5. Group additivity: groups of 1/5/10/20 % (random, same-class, top- and bottom-scored), sum of
   single scores against the replayed group removal.

Then the small-case check: the same logistic regression on 60 training samples, where a linear
datamodel can be fitted directly (least squares over retrained subsets) and compared with the
noise-stability estimate.

Sizes (120 samples, 800/600 noise-stability pairs, 3 ρ each) were chosen to run in about
10 minutes of CPU time on one core (float64, ``torch.set_num_threads(1)``). Prints tables and writes JSON
(``benchmarks/results/`` is git-ignored).
"""

from __future__ import annotations

import argparse
import logging
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy import Timer, ce_loss, quiet_setup, train, write_results  # noqa: E402  (the same model and tracked run as the accuracy benchmark)
from accuracy import make_module as accuracy_module  # noqa: E402

from lightning_influence.data import WithIds  # noqa: E402
from lightning_influence.estimators import dit, tracin  # noqa: E402
from lightning_influence.evaluation.datamodels import datamodel_quality  # noqa: E402
from lightning_influence.evaluation.ground_truth import replay_loo  # noqa: E402
from lightning_influence.evaluation.groups import group_additivity  # noqa: E402
from lightning_influence.evaluation.metrics import pearson, spearman  # noqa: E402
from lightning_influence.evaluation.pbrf import gap_decomposition, linear_pbrf, pbrf  # noqa: E402
from lightning_influence.examples.digits import load_digits_split  # noqa: E402
from lightning_influence.log import InfluenceLog  # noqa: E402
from lightning_influence.queries import mean_loss  # noqa: E402

try:  # Diff-In (issue #4) may not be installed in every checkout
    from lightning_influence.estimators.diffin import diffin  # noqa: E402
except ImportError:  # pragma: no cover
    diffin = None

HYPER = {"lr": 0.1, "weight_decay": 1e-3, "step_epochs": 4, "gamma": 0.5}


def make_module(model: str) -> type:
    """The accuracy benchmark's digits model, trained with plain SGD and the hyper-parameters above."""
    return accuracy_module(model, "sgd", momentum=0.0, **HYPER)


def corr(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    return {"pearson": pearson(a, b), "spearman": spearman(a, b)}


def estimators(log: InfluenceLog, Net: type, td: Any, query: Any, lam: float, timer: Timer) -> tuple[dict[str, np.ndarray], dict]:
    out: dict[str, np.ndarray] = {}
    notes: dict[str, Any] = {}
    with timer("dit"):
        out["dit"] = dit(log, query, module=Net().double(), train_data=td, loss_fn=ce_loss).column(0)
    if diffin is not None:
        with timer("diffin"):
            out["diffin-step"] = diffin(log, query, module=Net().double(), train_data=td, loss_fn=ce_loss,
                                        form="step").column(0)
            r = diffin(log, query, module=Net().double(), train_data=td, loss_fn=ce_loss, form="published",
                       samples="all")
            out["diffin-published"] = r.column(0)
            notes["diffin-published"] = r.method
    else:
        notes["diffin"] = "not available in this checkout"
    with timer("tracin"):
        out["tracin"] = tracin(log, query, module=Net().double()).column(0)
    with timer("influence-function"):
        lin = linear_pbrf(log, Net().double(), td, query, damping=lam, loss_fn=ce_loss)
    out[f"if (λ={lam:g})"] = lin.scores[:, 0]
    notes["influence-function"] = lin.summary()
    return out, notes


def run_model(model: str, data: dict[str, Any], args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    t_start = time.perf_counter()
    timer = Timer()
    X, Y = data["train"]

    def td(ids: Any) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        return X[ids], Y[ids]

    Net = make_module(model)
    with timer("train"):
        log = train(str(workdir / model), Net, WithIds(TensorDataset(X, Y)), args.epochs, args.batch_size, args.seed)
    query = mean_loss(data["val"], ce_loss, name="val_loss")
    N, T = log.dataset_size, log.num_steps
    lam = args.damping
    res: dict[str, Any] = {"model": model, "N": N, "T": T, "p": sum(int(np.prod(s)) for s in log.param_shapes.values()),
                           "damping": lam}
    # 1. estimators, all samples
    est, notes = estimators(log, Net, td, query, lam, timer)
    res["estimator_notes"] = notes
    # 2. ground truths on S samples
    with timer("replay_loo_all"):
        loo_all = replay_loo(log, Net().double(), td, query, grid=[T], loss_fn=ce_loss, copies=args.copies).at(T)[:, 0]
    rng = np.random.default_rng(args.seed)
    S = np.sort(rng.choice(N, size=min(args.samples, N), replace=False))
    pb: dict[float, Any] = {}
    lin: dict[float, Any] = {}
    for lam_k in sorted(set(args.sweep) | {lam}):
        with timer("pbrf"):
            pb[lam_k] = pbrf(log, Net().double(), td, query, samples=S, damping=lam_k, steps=args.pbrf_steps,
                             loss_fn=ce_loss, record_at=(1, 5) if lam_k == lam else ())
        with timer("influence-function"):
            lin[lam_k] = linear_pbrf(log, Net().double(), td, query, damping=lam_k, loss_fn=ce_loss)
    P = pb[lam].scores[:, 0]
    L = loo_all[S]
    side = {}
    for name, v in {**est, "pbrf": None, "loo": None}.items():
        if name == "pbrf":
            side[name] = {"vs_loo": corr(P, L), "vs_pbrf": corr(P, P), "vs_loo_all": None}
        elif name == "loo":
            side[name] = {"vs_loo": corr(L, L), "vs_pbrf": corr(L, P), "vs_loo_all": corr(loo_all, loo_all)}
        else:
            side[name] = {"vs_loo": corr(v[S], L), "vs_pbrf": corr(v[S], P), "vs_loo_all": corr(v, loo_all)}
    res["side_by_side"] = side
    res["samples"] = S.tolist()
    res["pbrf_convergence"] = {f"{k:g}": v.summary() for k, v in pb.items()}
    res["damping_sweep"] = {f"{k:g}": {"pbrf_vs_loo": corr(pb[k].scores[:, 0], L),
                                       "linear_vs_loo": corr(lin[k].scores[S, 0], L),
                                       "linear_vs_pbrf": corr(lin[k].scores[S, 0], pb[k].scores[:, 0]),
                                       "rms_pbrf_over_rms_loo": float(np.sqrt(np.mean(pb[k].scores ** 2)) /
                                                                      np.sqrt(np.mean(L ** 2))),
                                       "converged": float(np.mean(pb[k].converged))} for k in sorted(pb)}
    res["pbrf_few_steps"] = {str(k): {"vs_loo": corr(v[:, 0], L), "vs_converged": corr(v[:, 0], P),
                                      "rms_over_converged": float(np.sqrt(np.mean(v[:, 0] ** 2)) / np.sqrt(np.mean(P ** 2)))}
                             for k, v in pb[lam].intermediate.items()}
    # 3. gap decomposition at the main damping (LOO and PBRF reused)
    with timer("gap_warm_stages"):
        gd = gap_decomposition(log, Net().double(), td, query, samples=S, damping=lam, loss_fn=ce_loss, loo=L[:, None],
                               pbrf_result=pb[lam], copies=args.copies)
    res["gap"] = {"terms": gd.terms(), "correlations": gd.correlations(), "descriptions": gd.descriptions,
                  "baseline_drift": gd.info["baseline_drift"]}
    res["gap_table"] = gd.table()
    # 4. datamodel quality (noise stability), LDS per estimator on the same subsets
    scores = {**est, "loo": loo_all}
    res["datamodel"] = {}
    for p_keep, pairs in ((0.5, args.pairs), (0.9, args.pairs_p09)):
        with timer(f"datamodel_p{p_keep:g}"):
            dq = datamodel_quality(log, Net().double(), td, query, p=p_keep, pairs=pairs, scores=scores,
                                   copies=args.copies, seed=args.seed, loss_fn=ce_loss)
        res["datamodel"][f"{p_keep:g}"] = {**dq.to_dict(), "table": dq.table()}
    # 5. group additivity
    with timer("groups"):
        ga = group_additivity(log, Net().double(), td, query, {k: v for k, v in scores.items()
                                                               if not k.startswith("diffin-published")},
                              fractions=(0.01, 0.05, 0.1, 0.2), kinds=("random", "same_class", "top", "bottom"),
                              labels=Y.numpy(), repeats=3, top_by=["dit", "loo"], loss_fn=ce_loss,
                              residual={float(k): v["residual"] for k, v in res["datamodel"].items()},
                              seed=args.seed, copies=args.copies)
    res["groups"] = ga.to_dict()
    res["groups_table"] = ga.table()
    res["seconds"] = {**timer.seconds, "total": time.perf_counter() - t_start}
    log.close()
    return res


def small_case(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Logistic regression on 60 samples: noise stability against a directly fitted linear datamodel."""
    t0 = time.perf_counter()
    n = args.small_n
    data = load_digits_split(n, args.n_val, 0.0, seed=args.seed, dtype=torch.float64)
    X, Y = data["train"]

    def td(ids: Any) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        return X[ids], Y[ids]

    Net = make_module("logreg")
    log = train(str(workdir / "small"), Net, WithIds(TensorDataset(X, Y)), args.epochs, args.batch_size, args.seed)
    query = mean_loss(data["val"], ce_loss, name="val_loss")
    T = log.num_steps
    loo = replay_loo(log, Net().double(), td, query, grid=[T], loss_fn=ce_loss, copies=args.copies).at(T)[:, 0]
    scores = {"dit": dit(log, query, module=Net().double(), train_data=td, loss_fn=ce_loss).column(0),
              "tracin": tracin(log, query, module=Net().double()).column(0), "loo": loo}
    out = {"N": n, "T": T}
    for p_keep in (0.5, 0.9):
        dq = datamodel_quality(log, Net().double(), td, query, p=p_keep, pairs=args.small_pairs, scores=scores,
                               fit_masks=8 * n, test_masks=400, copies=args.copies, seed=args.seed, loss_fn=ce_loss)
        out[f"{p_keep:g}"] = {**dq.to_dict(), "table": dq.table()}
    out["seconds"] = time.perf_counter() - t0
    log.close()
    return out


# ------------------------------------------------------------------------------- printing
def print_model(res: dict[str, Any]) -> None:
    print(f"\n=== {res['model']}: N={res['N']}, T={res['T']}, p={res['p']}, damping λ={res['damping']:g}, "
          f"{len(res['samples'])} samples, {res['seconds']['total']:.0f}s ===")
    print(f"{'estimator':<22} {'r(LOO)':>7} {'ρ(LOO)':>7} {'r(PBRF)':>8} {'ρ(PBRF)':>8} {'ρ(LOO) all N':>13}")
    for name, row in res["side_by_side"].items():
        allc = f"{row['vs_loo_all']['spearman']:>13.3f}" if row["vs_loo_all"] else f"{'-':>13}"
        print(f"{name:<22} {row['vs_loo']['pearson']:>7.3f} {row['vs_loo']['spearman']:>7.3f} "
              f"{row['vs_pbrf']['pearson']:>8.3f} {row['vs_pbrf']['spearman']:>8.3f} {allc}")
    print("damping sweep (PBRF and linearised PBRF vs LOO, same samples):")
    print(f"  {'λ':>6} {'ρ(PBRF,LOO)':>12} {'ρ(IF,LOO)':>10} {'ρ(IF,PBRF)':>11} {'RMS PBRF/LOO':>13} {'converged':>10}")
    for lam, row in res["damping_sweep"].items():
        print(f"  {lam:>6} {row['pbrf_vs_loo']['spearman']:>12.3f} {row['linear_vs_loo']['spearman']:>10.3f} "
              f"{row['linear_vs_pbrf']['spearman']:>11.3f} {row['rms_pbrf_over_rms_loo']:>13.2f} {row['converged']:>10.0%}")
    few = res["pbrf_few_steps"]
    print("PBRF solver after few steps (Gauss-Newton-preconditioned L-BFGS, main λ): " + "; ".join(
        f"{k} step(s): ρ(LOO) {v['vs_loo']['spearman']:.3f}, ρ(converged) {v['vs_converged']['spearman']:.3f}, "
        f"RMS/converged {v['rms_over_converged']:.2f}" for k, v in few.items()))
    print(res["gap_table"])
    for p_keep, dq in res["datamodel"].items():
        print(dq["table"])
    print(res["groups_table"])
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in res["seconds"].items()))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="logreg,mlp")
    parser.add_argument("--n-train", type=int, default=400)
    parser.add_argument("--n-val", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--samples", type=int, default=120, help="samples with replay LOO and PBRF side by side")
    parser.add_argument("--damping", type=float, default=0.01, help="λ of the PBRF, the gap and the influence function")
    parser.add_argument("--sweep", type=float, nargs="*", default=[1e-3, 1e-2, 1e-1], help="damping sweep")
    parser.add_argument("--pbrf-steps", type=int, default=100)
    parser.add_argument("--pairs", type=int, default=800, help="noise-stability pairs per ρ at p = 0.5")
    parser.add_argument("--pairs-p09", type=int, default=600, help="noise-stability pairs per ρ at p = 0.9")
    parser.add_argument("--small-n", type=int, default=60)
    parser.add_argument("--small-pairs", type=int, default=1000)
    parser.add_argument("--copies", type=int, default=256, help="counterfactual runs trained together per pass")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-small", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "trust.json"))
    args = parser.parse_args(argv)
    quiet_setup(args.threads)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    results: dict[str, Any] = {
        "setup": {"data": "sklearn digits, standardised", "n_train": args.n_train, "n_val": args.n_val,
                  "epochs": args.epochs, "batch_size": args.batch_size, "dtype": "float64", "optimizer": HYPER,
                  "query": "mean validation cross-entropy", "samples": args.samples, "damping": args.damping,
                  "sweep": args.sweep, "pairs": {"0.5": args.pairs, "0.9": args.pairs_p09}, "seed": args.seed,
                  "torch": torch.__version__, "python": platform.python_version(), "threads": args.threads,
                  "diffin": diffin is not None},
        "models": {},
    }
    workdir = Path(tempfile.mkdtemp(prefix="li-trust-"))
    try:
        data = load_digits_split(args.n_train, args.n_val, 0.0, seed=args.seed, dtype=torch.float64)
        for model in args.models.split(","):
            res = run_model(model, data, args, workdir)
            results["models"][model] = res
            print_model(res)
            sys.stdout.flush()
        if not args.skip_small:
            sc = small_case(args, workdir)
            results["small_case"] = sc
            print(f"\n=== small case: logistic regression, N={sc['N']}, T={sc['T']} (noise stability vs a fitted "
                  f"linear datamodel), {sc['seconds']:.0f}s ===")
            for p_keep in ("0.5", "0.9"):
                print(sc[p_keep]["table"])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    write_results(results, args.out, default=float)
    return results


if __name__ == "__main__":
    main()
