"""Diff-In benchmark: approximation accuracy against replay LOO, and the data-centric tasks (issue #4).

    python benchmarks/tasks.py [--n-train 500] [--epochs 10] [--out benchmarks/results/tasks.json]

Defaults take about 6 minutes on one quiet CPU core (N = 500, 10 epochs = 160 steps; the 36
logged re-scoring runs of the iterative coreset, replay LOO of every sample and 450 group
replays dominate).

Digits (bundled with scikit-learn), float64, the demo's tanh MLP (``DigitsClassifier``) trained
by a real ``lightning.Trainer`` with the ``InfluenceTracker`` (per-sample gradients, the
finite-difference ``H_z Ĝ`` rows and a checkpoint at every step), plain SGD with weight decay
and a step LR schedule. Labels of 10% (and 30%) of the training samples are flipped.

1. Approximation accuracy (10% flipped run): every estimator's score of every training sample
   for the mean validation loss against replay leave-one-out over the whole run: Diff-In
   published checkpoint form (``m`` steps, all samples), the published expression on the
   logged batch rows at every step, the per-step form (finite-difference and exact HVPs),
   TracIn and exact DIT.
2. Cleaning (10% and 30% flipped): rank by harmfulness (Diff-In self-influence in both forms,
   Diff-In / DIT / TracIn on the validation loss), remove or relabel the top-k (k = number of
   flipped labels), retrain from scratch (3 seeds), test accuracy against no cleaning and
   random selection; detection AUROC.
3. Deletion (10% flipped run, query: mean test loss): sum of scores against the replayed change
   for 30 random and 30 top-scored sets of 1%, 5% and 10% of the training set.
4. Coreset (10% flipped run, and a run with clean labels): keep the top 30/50/70% most helpful
   for the validation loss, retrain from scratch (5 seeds), against random subsets: one-shot
   over the whole ranking (as published) and per class (random subsets with the same class
   quotas), and pruned in rounds of 10% of N, re-scored on a logged run of the kept set each
   round (per class; Diff-In step, DIT, TracIn).

The validation split is only ever used as the query; every accuracy and loss is measured on
the test split. Prints tables and writes JSON (``benchmarks/results/`` is git-ignored).
"""

from __future__ import annotations

import argparse
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

from accuracy import Timer, agreement, ce_loss, quiet_setup, train, write_results  # noqa: E402  (the accuracy benchmark's tracked run and helpers)

from lightning_influence.data import WithIds  # noqa: E402
from lightning_influence.estimators import diffin, diffin_self_influence, dit, tracin  # noqa: E402
from lightning_influence.evaluation.ground_truth import replay_loo  # noqa: E402
from lightning_influence.evaluation.metrics import spearman  # noqa: E402
from lightning_influence.examples.digits import load_digits_split  # noqa: E402
from lightning_influence.log import InfluenceLog  # noqa: E402
from lightning_influence.queries import mean_loss  # noqa: E402
from lightning_influence.tasks import Recipe, cleaning_experiment, coreset_experiment, deletion_experiment  # noqa: E402


def make_factory(args: argparse.Namespace):
    from lightning_influence.examples.digits import DigitsClassifier

    hyper = {"hidden": args.hidden, "lr": args.lr, "weight_decay": args.weight_decay, "lr_step_epochs": args.lr_step_epochs,
             "lr_gamma": args.lr_gamma}

    def make() -> torch.nn.Module:
        return DigitsClassifier(**hyper).double()

    recipe = Recipe(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                    lr_step_epochs=args.lr_step_epochs, lr_gamma=args.lr_gamma)
    return make, recipe


def rescorers(data: dict[str, Any], make, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Score functions for the iterative coreset: train a logged run on the kept ids alone (same recipe),
    score them for the mean validation loss, delete the log."""
    x, y = data["train"]
    query = mean_loss(data["val"], ce_loss)
    estimators = {
        "diffin-step (fd)": lambda log, ds: diffin(log, query, module=make(), train_data=ds, loss_fn=ce_loss,
                                                   form="step"),
        "dit (exact)": lambda log, ds: dit(log, query, module=make(), train_data=ds, loss_fn=ce_loss),
        "tracin": lambda log, ds: tracin(log, query, module=make()),
    }

    def scorer(estimate):
        def score(ids: np.ndarray) -> np.ndarray:
            rows = torch.from_numpy(ids)
            ds = WithIds(TensorDataset(x[rows], y[rows]))
            log = train(str(workdir), make, ds, args.epochs, args.batch_size, args.seed, record_hvp=True)
            try:
                return estimate(log, ds).column(0)
            finally:
                log.close()
                shutil.rmtree(workdir, ignore_errors=True)
        return score

    return {name: scorer(fn) for name, fn in estimators.items()}


def scores_for(log: InfluenceLog, make, ds: WithIds, query, args: argparse.Namespace, T: Timer, tag: str,
               full: bool) -> dict[str, np.ndarray]:
    """Every estimator's scores for ``query`` (``full``: also the exact-HVP and logged-rows variants)."""
    out: dict[str, np.ndarray] = {}
    with T(f"{tag} tracin"):
        out["tracin"] = tracin(log, query, module=make()).column(0)
    with T(f"{tag} dit"):
        out["dit (exact)"] = dit(log, query, module=make(), train_data=ds, loss_fn=ce_loss).column(0)
    with T(f"{tag} diffin-step fd"):
        out["diffin-step (fd)"] = diffin(log, query, module=make(), train_data=ds, loss_fn=ce_loss,
                                         form="step").column(0)
    with T(f"{tag} diffin-published fd"):
        out[f"diffin-published (fd, m={args.m})"] = diffin(log, query, module=make(), train_data=ds, form="published",
                                                           steps=args.m, loss_fn=ce_loss, samples="all").column(0)
    if full:
        with T(f"{tag} diffin-step exact"):
            out["diffin-step (exact)"] = diffin(log, query, module=make(), train_data=ds, hvp="exact",
                                                loss_fn=ce_loss, form="step").column(0)
        with T(f"{tag} diffin-published exact"):
            out[f"diffin-published (exact, m={args.m})"] = diffin(log, query, module=make(), train_data=ds,
                                                                  form="published", steps=args.m, hvp="exact",
                                                                  loss_fn=ce_loss, samples="all").column(0)
        with T(f"{tag} diffin-published rows"):
            out["diffin-published (fd, logged batch rows, all steps)"] = diffin(log, query, module=make(),
                                                                                train_data=ds, form="published",
                                                                                samples="batch",
                                                                                loss_fn=ce_loss).column(0)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-train", type=int, default=500)
    parser.add_argument("--n-val", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--lr-step-epochs", type=int, default=5)
    parser.add_argument("--lr-gamma", type=float, default=0.5)
    parser.add_argument("--m", type=int, default=20, help="sampled steps of the published checkpoint form")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sets", type=int, default=30, help="random and top-scored sets per size (deletion)")
    parser.add_argument("--copies", type=int, default=256)
    parser.add_argument("--skip-clean-coreset", action="store_true", help="no clean-label run for coreset")
    parser.add_argument("--coreset-seeds", type=int, default=5, help="retraining seeds per coreset")
    parser.add_argument("--rescore-step", type=float, default=0.1,
                        help="iterative coreset: fraction of N pruned per round before re-scoring")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "tasks.json"))
    args = parser.parse_args(argv)
    quiet_setup(args.threads)
    make, recipe = make_factory(args)
    T = Timer()
    t_start = time.perf_counter()
    results: dict[str, Any] = {"setup": {k: v for k, v in vars(args).items() if k != "out"}, "versions": {
        "torch": torch.__version__, "python": platform.python_version()}}
    workdir = Path(tempfile.mkdtemp(prefix="li-tasks-"))
    try:
        runs: dict[float, dict[str, Any]] = {}
        for flip in (0.1, 0.3):
            data = load_digits_split(args.n_train, args.n_val, flip, seed=args.seed, dtype=torch.float64)
            ds = WithIds(TensorDataset(*data["train"]))
            with T(f"train (flip {flip:.0%})"):
                log = train(str(workdir / f"flip{flip}"), make, ds, args.epochs, args.batch_size, args.seed,
                            record_hvp=True)
            runs[flip] = {"data": data, "ds": ds, "log": log}
        print(f"N={args.n_train}, T={runs[0.1]['log'].num_steps} steps")

        # ---------------------------------------------------------------- 1. accuracy
        run = runs[0.1]
        log, ds, data = run["log"], run["ds"], run["data"]
        val_q = mean_loss(data["val"], ce_loss, name="val_loss")
        with T("replay LOO (every sample)"):
            loo = replay_loo(log, make(), ds, val_q, grid=[0, log.num_steps], loss_fn=ce_loss, copies=args.copies)
        truth = loo.window(0, log.num_steps)
        val_scores = scores_for(log, make, ds, val_q, args, T, "val", full=True)
        results["accuracy"] = {k: agreement(v, truth) for k, v in val_scores.items()}
        results["fd_vs_exact"] = {}
        for fd_key, ex_key in (("diffin-step (fd)", "diffin-step (exact)"),
                               (f"diffin-published (fd, m={args.m})", f"diffin-published (exact, m={args.m})")):
            a, b = val_scores[fd_key], val_scores[ex_key]
            results["fd_vs_exact"][fd_key] = {"max_abs_diff_over_max_abs": float(np.abs(a - b).max() / np.abs(b).max()),
                                              "spearman": spearman(a, b)}
        results["accuracy_truth_std"] = float(np.std(truth))

        # ---------------------------------------------------------------- 2. cleaning
        results["cleaning"] = {}
        for flip, run in runs.items():
            log, ds, data = run["log"], run["ds"], run["data"]
            vs = val_scores if flip == 0.1 else scores_for(log, make, ds, mean_loss(data["val"], ce_loss), args, T,
                                                          f"val {flip:.0%}", full=False)
            with T(f"self-influence (flip {flip:.0%})"):
                self_step = diffin_self_influence(log, module=make(), train_data=ds, loss_fn=ce_loss).column(0)
                self_pub = diffin_self_influence(log, module=make(), train_data=ds, form="published", steps=args.m,
                                                 loss_fn=ce_loss).column(0)
            rankings = {
                "diffin-published self-influence": (self_pub, "self"),
                "diffin-step self-influence": (self_step, "self"),
                "diffin-published val loss": (vs[f"diffin-published (fd, m={args.m})"], "loss"),
                "diffin-step val loss": (vs["diffin-step (fd)"], "loss"),
                "dit val loss": (vs["dit (exact)"], "loss"),
                "tracin val loss": (vs["tracin"], "loss"),
            }
            with T(f"cleaning retrains (flip {flip:.0%})"):
                results["cleaning"][f"{flip:.0%}"] = cleaning_experiment(
                    make, data["train"], data["clean_train_labels"], data["flipped"], data["test"], rankings, recipe)

        # ---------------------------------------------------------------- 3. deletion
        run = runs[0.1]
        log, ds, data = run["log"], run["ds"], run["data"]
        test_q = mean_loss(data["test"], ce_loss, name="test_loss")
        ts = scores_for(log, make, ds, test_q, args, T, "test", full=False)
        with T("deletion replays"):
            results["deletion"] = deletion_experiment(log, make(), ds, test_q, ts, n_random=args.sets, n_top=args.sets,
                                                      loss_fn=ce_loss, seed=args.seed, copies=args.copies)

        # ---------------------------------------------------------------- 4. coreset
        coreset_scores = {k: val_scores[k] for k in ("diffin-step (fd)", f"diffin-published (fd, m={args.m})",
                                                     "dit (exact)", "tracin")}
        results["coreset"] = {}
        with T("coreset (flip 10%)"):
            results["coreset"]["10% flipped"] = coreset_experiment(
                make, data["train"], data["test"], coreset_scores, recipe, seeds=range(args.coreset_seeds),
                rescore=rescorers(data, make, args, workdir / "rescore"), rescore_step=args.rescore_step)
        if not args.skip_clean_coreset:
            data0 = load_digits_split(args.n_train, args.n_val, 0.0, seed=args.seed, dtype=torch.float64)
            ds0 = WithIds(TensorDataset(*data0["train"]))
            with T("train (clean labels)"):
                log0 = train(str(workdir / "clean"), make, ds0, args.epochs, args.batch_size, args.seed, record_hvp=True)
            s0 = scores_for(log0, make, ds0, mean_loss(data0["val"], ce_loss), args, T, "val clean", full=False)
            with T("coreset (clean)"):
                results["coreset"]["clean labels"] = coreset_experiment(
                    make, data0["train"], data0["test"], {k: s0[k] for k in coreset_scores}, recipe,
                    seeds=range(args.coreset_seeds), rescore=rescorers(data0, make, args, workdir / "rescore"),
                    rescore_step=args.rescore_step)
            log0.close()
        for run in runs.values():
            run["log"].close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results["seconds"] = {**T.seconds, "total": time.perf_counter() - t_start}
    print_tables(results)
    write_results(results, args.out, default=float)
    return results


def print_tables(res: dict[str, Any]) -> None:
    s = res["setup"]
    print(f"\n=== Approximation accuracy vs replay LOO, whole run (N={s['n_train']}, {s['epochs']} epochs, 10% flipped, "
          f"query: mean validation loss; truth std {res['accuracy_truth_std']:.2e}) ===")
    print(f"{'estimator':<52} {'pearson':>8} {'spearman':>9} {'kendall':>8} {'seconds':>8}")
    secs = res["seconds"]
    key_secs = {"tracin": "val tracin", "dit (exact)": "val dit", "diffin-step (fd)": "val diffin-step fd",
                "diffin-step (exact)": "val diffin-step exact"}
    for k, m in res["accuracy"].items():
        sk = key_secs.get(k) or ("val diffin-published rows" if "rows" in k else
                                 "val diffin-published exact" if "exact" in k else "val diffin-published fd")
        print(f"{k:<52} {m['pearson']:>8.4f} {m['spearman']:>9.4f} {m['kendall']:>8.4f} {secs.get(sk, float('nan')):>8.1f}")
    for k, m in res["fd_vs_exact"].items():
        print(f"finite differences vs exact HVPs, {k}: max |fd − exact| / max |exact| = "
              f"{m['max_abs_diff_over_max_abs']:.1e}, Spearman {m['spearman']:.6f}")
    for flip, c in res["cleaning"].items():
        print(f"\n=== Cleaning, {flip} flipped (k = {c['k']}, retrained from scratch, test accuracy mean ± std over "
              f"{len(c['seeds'])} seeds) ===")
        b = c["baseline"]
        print(f"no cleaning {b['no cleaning']['mean']:.4f} ± {b['no cleaning']['std']:.4f}; all labels clean (oracle) "
              f"{b['all labels clean (oracle)']['mean']:.4f}")
        print(f"{'ranking':<34} {'AUROC':>6} {'hit@k':>6} {'remove':>16} {'relabel':>16}")
        for name, m in c["methods"].items():
            print(f"{name:<34} {m['detection']['auroc']:>6.3f} {m['hit']:>6.3f} {m['remove']['mean']:>9.4f} ± "
                  f"{m['remove']['std']:.4f} {m['relabel']['mean']:>9.4f} ± {m['relabel']['std']:.4f}")
        r = c["random"]
        print(f"{'random':<34} {0.5:>6.3f} {r['remove']['hit']:>6.3f} {r['remove']['mean']:>9.4f} ± {r['remove']['std']:.4f} "
              f"{r['relabel']['mean']:>9.4f} ± {r['relabel']['std']:.4f}")
    d = res["deletion"]
    print(f"\n=== Deletion (query: mean test loss; predicted = sum of scores, truth = replay without the set; "
          f"{d['n_sets']} sets, Pearson / Spearman) ===")
    for frac, e in d["fractions"].items():
        print(f"-- {float(frac):.0%} of the training set ({e['size']} samples)")
        print(f"{'estimator':<40} {'random sets':>18} {'top-scored sets':>18}")
        for name in e["random"]:
            ra, tp = e["random"][name], e["top"][name]
            print(f"{name:<40} {ra['pearson']:>8.3f} {ra['spearman']:>8.3f}  {tp['pearson']:>8.3f} {tp['spearman']:>8.3f}")
    for label, c in res["coreset"].items():
        print(f"\n=== Coreset ({label}): keep the top x% most helpful (val loss), retrain, test accuracy over "
              f"{len(c['seeds'])} seeds; full data {c['full data']['mean']:.4f} ===")
        for sel in next(iter(c["fractions"].values())):
            if sel == "size":
                continue
            names = list(next(iter(c["fractions"].values()))[sel])
            print(f"-- {sel} selection" + (" (random: same class quotas)" if sel == "per class" else ""))
            print(f"{'x':>4} " + " ".join(f"{n[:28]:>28}" for n in names) + "   class share min-max")
            for frac, e in c["fractions"].items():
                r = e[sel]
                print(f"{float(frac):>4.0%} " + " ".join(f"{r[n]['mean']:>19.4f} ± {r[n]['std']:.3f}" for n in names)
                      + "   " + ", ".join(f"{r[n]['class_share']['min']:.2f}-{r[n]['class_share']['max']:.2f}" for n in names))
            means = {n: np.mean([e[sel][n]["mean"] for e in c["fractions"].values()]) for n in names}
            print("mean " + " ".join(f"{means[n]:>28.4f}" for n in names))
    print("\nseconds: " + ", ".join(f"{k} {v:.1f}" for k, v in res["seconds"].items()))


if __name__ == "__main__":
    main()
