"""``lightning-influence evaluate``: leave-one-out ground truth on chosen samples, agreement metrics, trust tools."""

from __future__ import annotations

import argparse
from typing import Any, Callable

import numpy as np

from lightning_influence.cli.common import (UserError, add_process_args, check_workers, drift_line, emit, flip_cell,
                                            flip_text,
                                            format_table, json_text, output_format, parse_window, processes,
                                            progress_bar, status)
from lightning_influence.cli.context import RunContext, prepare
from lightning_influence.cli.datacheck import check_training_data
from lightning_influence.cli.methods import (METHODS, Method, call_with, canonical_method, check_records, default_method,
                                             estimator_inputs, method_help, run_method, train_data_of)
from lightning_influence.cli.queries import build_query, parse_query, query_columns
from lightning_influence.distributed import DistributedQueryError, global_rank
from lightning_influence.estimators.scores import csv_text, ranked, sort_order
from lightning_influence.evaluation.verdict import truth_linearity, truth_noise_floor, verdict
from lightning_influence.replay import samples_by_id_needed


def register(sub: Any, parents: dict[str, argparse.ArgumentParser]) -> None:
    p = sub.add_parser("evaluate", parents=[parents["common"], parents["model"], parents["query"]], help="ground truth on chosen samples, and metrics",
                       description="Replay training without each chosen sample (leave-one-out ground truth, "
                                   "docs/influence-math.md §6), compare with the estimators, and print agreement "
                                   "metrics; with known flipped labels, also their detection AUROC and precision.")
    p.add_argument("--method", "-m", type=canonical_method, choices=list(METHODS), action="append", metavar="METHOD",
                   help=method_help() + "; repeatable")
    p.add_argument("--window", "-w", metavar="W", help="the window (default: the whole run)")
    p.add_argument("--samples", "-s", default="top:10",
                   help="ids '3,17,42', 'top:K' (the K first in the first method's --sort order: by default most "
                        "negative, or largest self-influence, as query lists them), 'bottom:K' (the K last), "
                        "'random:K', 'flipped:K' (default top:10); with --sort the rows are listed in that order")
    p.add_argument("--truth", choices=("replay", "none"), default="replay",
                   help="ground truth: replay leave-one-out (default) or none (detection metrics only)")
    p.add_argument("--in-window", action="store_true",
                   help="ground truth drops the samples only inside the window (the counterpart of dit-local)")
    p.add_argument("--seed", type=int, default=0, help="seed of random:K")
    p.add_argument("--no-linearity", dest="linearity", action="store_false",
                   help="skip the second replay that measures how linear the truth is in the removal (half a removal, "
                        "doubled, against a whole one: docs/trust.md §4); it doubles the ground truth's time")
    t = p.add_argument_group("how far to trust the scores (whole run only; see docs/trust.md)")
    t.add_argument("--pbrf", action="store_true", help="proximal Bregman response of removing each chosen sample")
    t.add_argument("--gap", action="store_true", help="decompose the LOO vs PBRF gap into its terms (implies --pbrf)")
    t.add_argument("--damping", type=float, default=1e-2, help="PBRF proximity damping λ (default 0.01)")
    t.add_argument("--pbrf-steps", type=int, default=100, help="PBRF solver steps (default 100)")
    t.add_argument("--output-loss", default="cross_entropy", choices=("cross_entropy", "mse", "squared_error"),
                   help="the training loss in output space, for the Bregman divergence (default cross_entropy)")
    t.add_argument("--datamodel", action="store_true",
                   help="noise-stability estimate of the best linear datamodel's residual and the correlation ceiling")
    t.add_argument("--keep", type=float, default=0.5, help="keep-probability p of the random subsets (default 0.5)")
    t.add_argument("--pairs", type=int, default=100, help="correlated subset pairs per ρ (default 100)")
    t.add_argument("--workers", type=int, default=1, help="processes for the retraining runs (default 1)")
    t.add_argument("--groups", action="store_true", help="sum of single scores vs replayed group removal")
    t.add_argument("--group-sizes", type=_fractions, default=[0.01, 0.05, 0.1, 0.2],
                   help="group sizes as fractions of N (default 0.01,0.05,0.1,0.2)")
    t.add_argument("--group-kinds", type=lambda x: x.split(","), default=["random", "same_class", "top"],
                   help="random,same_class,top,bottom (default random,same_class,top)")
    t.add_argument("--group-repeats", type=int, default=1, help="groups drawn per kind and size (default 1)")
    add_process_args(p, "every --method (as for query), the ground truth's leave-one-out replays and --groups' group "
                        "removals; not --pbrf, --gap, --datamodel", split=True)
    p.set_defaults(func=cmd_evaluate)


def _parse_samples(spec: str, n: int, ctx: RunContext | None, estimate: Callable[[], np.ndarray], seed: int,
                   sort: str = "negative") -> np.ndarray:
    """The chosen sample ids; ``top``/``bottom`` the first/last in the first method's ``sort`` order
    (:func:`~lightning_influence.estimators.scores.ranked`, as ``query --sort`` lists them)."""
    kind, _, arg = spec.partition(":")
    chosen = kind in ("top", "random", "flipped", "bottom")
    k, ids = 0, np.zeros(0, dtype=np.int64)
    try:  # only the parsing: an error of the estimate (or of the query) is reported as itself
        if chosen:
            k = int(arg)
            if k < 1:
                raise ValueError
        else:
            ids = np.array([int(s) for s in spec.split(",") if s.strip()], dtype=np.int64)
    except ValueError:
        raise UserError(f"--samples {spec!r}: use ids '3,17,42', 'top:K' (the first in --sort order), 'bottom:K', "
                        "'random:K' or 'flipped:K'") from None
    if kind in ("top", "bottom"):
        est = estimate()
        if not np.all(np.isfinite(est)):
            raise UserError(f"--samples {spec}: the first method's scores contain NaN or infinite values")
        order = ranked(est, sort, None)
        return order[:k] if kind == "top" else order[::-1][:k]
    if kind == "random":
        if seed < 0:
            raise UserError(f"--seed must be an int >= 0, got {seed}")
        return np.sort(np.random.default_rng(seed).choice(n, size=min(k, n), replace=False))
    if kind == "flipped":
        flipped = ctx.flipped if ctx else None
        if not flipped:
            raise UserError("--samples flipped:K needs the datamodule's `flipped` ids, which this run does not have")
        return np.array(sorted(flipped)[:k])
    bad = ids[(ids < 0) | (ids >= n)]
    if len(bad) or not len(ids):
        raise UserError(f"--samples: unknown sample id {int(bad[0]) if len(bad) else spec!r}; training ids are 0..{n - 1}")
    return ids


GROUND_TRUTH = "lightning_influence.evaluation.ground_truth:replay_loo"


def cmd_evaluate(args: argparse.Namespace) -> int:
    from lightning_influence.evaluation import summarize
    from lightning_influence.tasks import detection

    methods = list(dict.fromkeys(args.method or [default_method()]))  # `-m dit -m dit` asks for one column
    args.method = methods[0]
    check_workers(args.workers)
    procs = processes(args)
    if procs is not None and (args.pbrf or args.gap or args.datamodel):
        raise UserError("--pbrf, --gap and --datamodel run in one process (every process of a --devices/--num-nodes "
                        "run would repeat them): run them without --devices (--datamodel spreads its retraining runs "
                        "over --workers forked processes); --method, the ground truth and --groups run on several")
    log, ctx = prepare(args, model=True)  # the query, the ground truth and the flipped labels come from the run
    if ctx is not None and (args.truth == "replay" or args.groups or args.datamodel or args.pbrf or args.gap
                            or any(METHODS[m].needs == "model+data" for m in methods)):
        check_training_data(log, ctx)  # every replay reads it (once: prepare may have checked it for the first method)
    for m in methods[1:]:
        check_records(m, log, args.hvp)
    if (args.pbrf or args.gap) and ctx is not None and train_data_of(ctx, log) is None:  # before any replay
        raise UserError(str(samples_by_id_needed("--pbrf/--gap: the PBRF evaluates every training sample's outputs "
                                                 "and loss at θ_T", " (return train_data from --builder), or drop "
                                                 "--pbrf/--gap (the ground truth, --groups and --datamodel read the "
                                                 "stored inputs)")))
    if (args.pbrf or args.gap) and ctx is not None:  # the outputs module(x) it needs, before any replay
        from lightning_influence.evaluation.pbrf.problem import check_inputs

        check_inputs(train_data_of(ctx, log), log.all_ids()[:1])
    t1, t2 = parse_window(log, args.window)
    specs = args.query or [parse_query("val_loss")]
    query, names = build_query(specs, ctx)
    n = log.dataset_size
    estimates: dict[str, np.ndarray] = {}
    kinds: dict[str, str] = {}  # "self" for self-influence (largest = most suspicious), else "loss" (tasks.KINDS)
    drifts: dict[str, Any] = {}  # each replay's drift at the checkpoints (docs/replay.md)
    for m in methods:
        try:
            scores = run_method(m, log, query, ctx, (t1, t2), progress_bar(args, f"{m} [{t1}, {t2})"), args.hvp, procs)
        except DistributedQueryError as err:
            raise UserError(str(err)) from None
        # the estimator's own name, or the one asked for where two coincide (dit-linear is dit for plain SGD)
        key = scores.method if scores.method not in estimates else m
        estimates[key] = scores.column(0)
        kinds[key] = "loss" if METHODS[m].query else "self"
        drifts[key] = (scores.info or {}).get("replay_drift")
        qname = query_columns(scores.query_names, names, specs)[0][1]
    first = next(iter(estimates.values()))
    sort = sort_order(args.sort, "self" if next(iter(kinds.values())) == "self" else qname)  # as query orders them
    samples = _parse_samples(args.samples, n, ctx, lambda: first, args.seed, sort)
    if args.sort:  # the rows in --sort order of the first method, as query and timeline list theirs
        samples = samples[ranked(first[samples], sort, None)]
    truth, floor, linearity, drift_floor, roundoff, delta = None, None, None, None, None, None
    answering = [m for m, k in kinds.items() if k == "loss"]  # self-influence answers each sample's own loss
    if args.truth == "replay" and not answering:
        status(args, "no ground truth: self-influence answers each sample's own loss, not --query (add a method that "
                     "answers it, e.g. -m dit)")
    if args.truth == "replay" and answering:
        fn = Method(GROUND_TRUTH, "model+data", (), "").load()
        status(args, f"replaying training without each of {len(samples)} samples (ground truth) ...")
        result = _replay_truth(args, fn, log, query, ctx, samples, (t1, t2), procs, 0.0)
        truth = np.asarray(result.window(t1, t2), dtype=np.float64)  # LOO(t2) - LOO(t1), in the order of `samples`
        drift_floor, rounding = _noise_floor(log, result, t1, t2)
        status(args, f"replaying training with {min(len(samples), ROUNDOFF_PROBES)} of them reweighted by "
                     f"{ROUNDOFF_ULPS} ulps (the truth's noise floor) ...")
        delta = ROUNDOFF_ULPS * rounding
        probe = _replay_truth(args, fn, log, query, ctx, samples[:ROUNDOFF_PROBES], (t1, t2), procs, 1.0 - delta)
        roundoff = float(np.abs(probe.window(t1, t2)).max())
        floor = max(drift_floor, roundoff)
        drifts["ground truth"] = result.info.get("replay_drift")
        if args.linearity and len(samples) >= 3:
            status(args, "replaying training with each of them at half weight (the truth's linearity) ...")
            half = _replay_truth(args, fn, log, query, ctx, samples, (t1, t2), procs, 0.5)
            linearity = truth_linearity(truth, np.asarray(half.window(t1, t2), dtype=np.float64))
    trust = _trust_tools(args, log, ctx, query, samples, estimates, truth, (t1, t2), procs)
    if procs is not None and global_rank() != 0:
        return 0  # rank 0 writes the result
    flipped = ctx.flipped if ctx else None
    labels = ctx.labels(samples) if ctx else np.full(len(samples), -1)
    metrics: dict[str, dict[str, float]] = {}
    for name, est in estimates.items():
        row: dict[str, float] = {}
        if truth is not None and len(samples) >= 2 and kinds[name] == "loss":
            row.update(summarize(est[samples], truth, k=max(1, min(len(samples) // 2, 10))))
            row["sign_agreement"] = float(np.mean(np.sign(est[samples]) == np.sign(truth)))
        if "pbrf" in trust and len(samples) >= 2 and kinds[name] == "loss":
            versus = summarize(est[samples], trust["pbrf"].scores[:, 0])
            row.update({f"pbrf_{k}": versus[k] for k in ("pearson", "spearman")})
        if flipped:  # suspicion as the method orders it: most negative first, largest self-influence first
            found = detection(est, np.asarray(sorted(flipped), dtype=np.int64), kinds[name])
            row["flipped_auroc"] = found["auroc"]
            row[f"flipped_precision@{len(flipped)}"] = found[f"precision@{len(flipped)}"]
        metrics[name] = row
    result = {"log": args.log, "window": args.window or "whole run", "steps": [t1, t2], "query": qname,
              "samples": [{"id": int(j), "label": int(lb) if lb >= 0 else None, "flipped": flip_cell(ctx, int(j)),
                           "truth": None if truth is None else float(truth[k]),
                           **({"pbrf": float(trust["pbrf"].scores[k, 0]),
                               "pbrf_converged": bool(trust["pbrf"].converged[k])} if "pbrf" in trust else {}),
                           **{m: float(e[j]) for m, e in estimates.items()}}
                          for k, (j, lb) in enumerate(zip(samples, labels))],
              "metrics": metrics, "truth_noise_floor": floor, "truth_noise_floor_drift": drift_floor,
              "truth_roundoff_response": roundoff, "truth_roundoff_weight_change": delta if truth is not None else None,
              "truth_above_floor": None if truth is None else int(np.count_nonzero(np.abs(truth) > floor)),
              "truth_linearity": linearity,
              "replay_drift": {k: v for k, v in drifts.items() if v}, "verdict": verdict(metrics, truth, floor, linearity, args.in_window)
              + _removal_mismatch(list(estimates) if truth is not None else [], methods, args.in_window,
                                  t1 > log.first_step),
              **{k: v.to_dict() for k, v in trust.items()}}
    fmt = output_format(args)
    if fmt == "json":
        emit(args, json_text(result))
        return 0
    extra = ["pbrf", "pbrf_converged"] if "pbrf" in trust else []  # per sample: an unconverged solve says so
    flips = ["flipped"] if flipped is not None else []  # a column only where the run knows its flipped labels
    if fmt == "csv":  # the cells as query's CSV writes them (InfluenceScores' table): flipped True/False
        header = ["id", "label", *flips, "truth", *extra, *estimates]
        emit(args, csv_text(header, [[s["id"], s["label"], *[s["flipped"] for _ in flips], s["truth"],
                                      *[s[c] for c in extra], *[s[m] for m in estimates]] for s in result["samples"]]))
        return 0
    head = [f"evaluate: query {qname}, window {result['window']} = steps [{t1}, {t2}), {len(samples)} samples "
            f"({args.samples}{f', sorted {sort} first by {next(iter(estimates))}' if args.sort else ''}), ground truth: "
            f"{'replay leave-one-out' if truth is not None else 'none'}"]
    header = ["id", "label", *flips, "truth", *extra, *estimates]
    body = [[s["id"], s["label"] if s["label"] is not None else "?", *[flip_text(s["flipped"]) for _ in flips], s["truth"],
             *[s[c] for c in extra], *[s[m] for m in estimates]] for s in result["samples"]]
    keys = sorted({k for row in metrics.values() for k in row}, key=lambda k: (k.startswith("flipped"), k))
    mtable = format_table(["method", *keys], [[m, *[f"{metrics[m][k]:.3f}" if k in metrics[m] else "-" for k in keys]]
                                             for m in metrics]) if keys else "no metric: no ground truth and no known flipped labels"
    noise = [] if truth is None else [
        f"truth noise floor {floor:.2e} (replay error: the truth's change when {min(len(truth), ROUNDOFF_PROBES)} "
        f"samples are reweighted by {ROUNDOFF_ULPS} ulps ({delta:.1e}), {roundoff:.2e}; from the replay drift alone {drift_floor:.2e}; "
        f"docs/trust.md §4): {result['truth_above_floor']} of {len(truth)} truth values above it"]
    if linearity is not None:
        noise.append(f"truth linearity: half a removal, doubled, against a whole one: Pearson {linearity['pearson']:.3f}, "
                     f"Spearman {linearity['spearman']:.3f} (1 where training responds linearly, docs/trust.md §4)")
    noise += [line for k, v in result["replay_drift"].items() if (line := drift_line(v, f"replay drift ({k})"))]
    emit(args, "\n".join(head + noise + [format_table(header, body), "", mtable]
                         + ["\n" + t.table() for t in trust.values()] + ["", f"verdict: {result['verdict']}"]))
    return 0


# the DIT methods that sweep only inside the window: the counterparts of a truth removed only there (--in-window)
_LOCAL = ("dit-local", "dit-gn-local")


def _removal_mismatch(columns: list[str], methods: list[str], in_window: bool, inside: bool) -> str:
    """The verdict's note where a DIT method and the truth remove the sample over different steps: a full DIT against
    a truth removed only inside the window (``--in-window``), or a local one against a truth removed from the run's
    start (no difference on a window that starts there, ``inside`` false)."""
    if not columns or not inside:
        return ""
    named = dict(zip(methods, columns))  # the CLI's name -> the column the method filled
    odd = [m for m in methods if m.startswith("dit") and (m in _LOCAL) != in_window]
    if not odd:
        return ""
    cols = ", ".join(named.get(m, m) for m in odd)
    if in_window:
        return (f"; {cols} removes each sample from every step before the window's end, the truth (--in-window) only "
                "inside the window: compare dit-local, or drop --in-window")
    return (f"; {cols} sweeps only inside the window, the truth removes each sample from every step before its end: "
            "add --in-window, or compare dit")


def _replay_truth(args: argparse.Namespace, fn: Callable[..., Any], log: Any, query: Any, ctx: RunContext | None,
                  samples: np.ndarray, window: tuple[int, int], procs: Any, removal_weight: float) -> Any:
    """Replay leave-one-out of ``samples`` with their weight multiplied by ``removal_weight`` (0: removed)."""
    progress = progress_bar(args, "replay LOO" if removal_weight == 0 else f"replay at weight {removal_weight}")
    try:
        return call_with(fn, log, query=query, window=window, sample_ids=samples, progress=progress,
                         in_window_only=args.in_window, processes=procs, removal_weight=removal_weight,
                         **estimator_inputs(ctx))
    except DistributedQueryError as err:
        raise UserError(str(err)) from None
    finally:
        progress.close()


# the truth's response to round-off: so many of the chosen samples replayed with their weight changed by so many ulps
ROUNDOFF_PROBES, ROUNDOFF_ULPS = 3, 4


def _noise_floor(log: Any, result: Any, t1: int, t2: int) -> tuple[float, float]:
    """The truth's noise floor from the replay drift (:func:`~lightning_influence.evaluation.verdict.truth_noise_floor`)
    for one window, and the run's rounding unit: the parameters' epsilon, or the autocast dtype's where coarser (a
    bf16-mixed run rounds a weight changed by a few float32 ulps away). A training that amplifies round-off (kinks
    crossed, chaotic) moves the truth by far more: :func:`cmd_evaluate` measures that too (a few samples reweighted
    by a few of these units)."""
    import torch

    dtype = next(iter(log.checkpoint(log.checkpoint_steps[0]).values())).dtype
    dtype = dtype if np.issubdtype(dtype, np.floating) else np.dtype(np.float32)
    eps = float(np.finfo(dtype).eps)
    autocast = (log.meta.get("precision") or {}).get("autocast_dtype")
    rounding = max(eps, float(torch.finfo(getattr(torch, autocast)).eps)) if autocast else eps
    drift = float(result.info.get("replay_drift", {}).get("max", 0.0))
    grid = [int(t) for t in result.grid]
    base = result.base[:, 0]  # f(θ_t) of the reference run on the grid
    return truth_noise_floor(base[grid.index(t1)] if t1 in grid else base[0], base[grid.index(t2)], drift, eps, t2), rounding


def _trust_tools(args: argparse.Namespace, log: Any, ctx: RunContext | None, query: Any, samples: np.ndarray,
                 estimates: dict[str, np.ndarray], truth: np.ndarray | None, window: tuple[int, int],
                 procs: Any = None) -> dict[str, Any]:
    """``--pbrf``/``--gap``, ``--datamodel``, ``--groups``: what the scores answer and how far to trust them."""
    if not (args.pbrf or args.gap or args.datamodel or args.groups):
        return {}
    if window != log.window(None):  # the whole log: from step 0, or from where a resumed fit started it
        raise UserError("--pbrf, --gap, --datamodel and --groups measure the whole run; drop --window")
    from lightning_influence.evaluation import datamodel_quality, gap_decomposition, group_additivity, pbrf

    inputs = {"module": ctx.module, "train_data": train_data_of(ctx, log), **ctx.loss_kwargs()}  # None: stored inputs
    out: dict[str, Any] = {}
    if args.pbrf or args.gap:
        status(args, f"solving the proximal Bregman response for {len(samples)} samples ...")
        out["pbrf"] = pbrf(log, query=query, samples=samples, damping=args.damping, steps=args.pbrf_steps,
                           output_loss=args.output_loss, **inputs)
    if args.gap:
        status(args, "decomposing the LOO vs PBRF gap (warm start, proximity, Bregman, linearisation) ...")
        out["gap"] = gap_decomposition(log, query=query, samples=samples, damping=args.damping, steps=args.pbrf_steps,
                                       output_loss=args.output_loss, pbrf_result=out["pbrf"],
                                       loo=None if truth is None else truth[:, None], **inputs)
    if args.datamodel:
        status(args, f"noise stability: {args.pairs} correlated subset pairs at keep-probability {args.keep} ...")
        out["datamodel"] = datamodel_quality(log, query=query, p=args.keep, pairs=args.pairs, scores=estimates,
                                             workers=args.workers, **inputs)
    if args.groups:
        status(args, "replaying group removals ...")
        n = log.dataset_size
        residual = {out["datamodel"].p: out["datamodel"].mass.residual} if "datamodel" in out else None
        try:
            out["groups"] = group_additivity(log, query=query, scores=estimates, fractions=args.group_sizes,
                                             kinds=args.group_kinds, labels=ctx.labels(np.arange(n)),
                                             repeats=args.group_repeats, residual=residual, processes=procs, **inputs)
        except DistributedQueryError as err:
            raise UserError(str(err)) from None
    return out


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _fractions(text: str) -> list[float]:
    """Comma-separated fractions of the training set, each in (0, 1]."""
    values = _floats(text)
    bad = [v for v in values if not 0 < v <= 1]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"{text!r}: group sizes are fractions of the training set, each in (0, 1] "
                                         "(0.05: 5% of the samples)")
    return values


