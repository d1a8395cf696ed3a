"""``lightning-influence timeline``: scores on a grid of windows and each sample's temporal pattern."""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from lightning_influence.cli.common import (UserError, add_process_args, emit, flip_cell, flip_text, format_table,
                                            json_text, once, output_format, parse_grid, parse_window, processes, row_count,
                                            sign_line)
from lightning_influence.cli.context import prepare
from lightning_influence.evaluation.patterns import noise_scale
from lightning_influence.cli.methods import SPLITS_HELP, METHODS, compute_windows, method_help, canonical_method
from lightning_influence.distributed import DistributedQueryError, global_rank
from lightning_influence.estimators.scores import csv_text, ranked, sort_order
from lightning_influence.cli.queries import build_query, parse_query, query_columns

SUMMARY = "scores on a grid of windows and each sample's temporal pattern"
PATTERNS = ("early", "late", "fluctuating", "stable", "negligible")  # lightning_influence.evaluation.patterns


def add_grid_parser(sub: Any, parents: dict[str, argparse.ArgumentParser], name: str, summary: str,
                    func: Any) -> argparse.ArgumentParser:
    """The parser of a command computing scores on a grid of windows (``timeline``, ``tensorboard``)."""
    p = sub.add_parser(name, parents=[parents["common"], parents["model"], parents["query"]], help=summary,
                       description=summary + ".")
    p.add_argument("--method", "-m", type=canonical_method, choices=list(METHODS), metavar="METHOD", help=method_help(),
                   action=once("run it once per method"))
    p.add_argument("--grid", "-g", default="epochs",
                   help="windows: 'epochs' (default), a number of equal windows, or boundaries '0,100,200,480'")
    p.add_argument("--window", "-w", metavar="W", help="restrict the grid to this span (default: the whole run)",
                   action=once("--grid gives several windows"))
    add_process_args(p, SPLITS_HELP, split=True)
    p.set_defaults(func=func)
    return p


def register(sub: Any, parents: dict[str, argparse.ArgumentParser]) -> None:
    p = add_grid_parser(sub, parents, "timeline", SUMMARY, cmd_timeline)
    p.add_argument("--top", "-k", type=row_count, default=None,
                   help="rows shown (default: 20 in a table, all samples in CSV/JSON; 0: all)")
    p.add_argument("--pattern", choices=PATTERNS, help="only samples of this pattern (docs/trust.md: the rule)")


def timeline_data(args: argparse.Namespace):
    procs = processes(args)
    log, ctx = prepare(args)
    span = parse_window(log, args.window)
    windows, labels = parse_grid(log, args.grid, span)
    specs = args.query or [parse_query("val_loss")]
    query, names = build_query(specs, ctx) if METHODS[args.method].query else (None, [])
    try:
        scores, method_name, info = compute_windows(args, log, query, ctx, windows, procs)
    except DistributedQueryError as err:
        raise UserError(str(err)) from None
    columns = query_columns(info.pop("query_names"), names, specs)
    return log, ctx, columns, windows, labels, scores, method_name, info


def patterns_of(x: np.ndarray) -> tuple[np.ndarray | None, str]:
    from lightning_influence.evaluation import classify_windows

    if x.shape[1] < 3:
        return None, f"patterns need at least 3 windows, the grid has {x.shape[1]}"
    if x.shape[0] < 2:
        return None, "patterns need at least 2 samples"
    return classify_windows(x).labels, ""


def cmd_timeline(args: argparse.Namespace) -> int:
    log, ctx, columns, windows, labels, scores, method_name, info = timeline_data(args)
    if global_rank() != 0:
        return 0  # rank 0 writes the result
    fmt = output_format(args)
    top = args.top if args.top is not None else (20 if fmt == "table" else 0)
    results, texts = [], []
    for qi, qname, is_loss in columns:
        x = scores[:, qi, :]
        patterns, why = patterns_of(x)
        total = x.sum(axis=1)
        ids = ranked(total, sort_order(args.sort, qname), None)
        if args.pattern:
            if patterns is None:
                raise UserError(f"--pattern: {why}; choose a finer --grid")
            ids = ids[patterns[ids] == args.pattern]
        ids = ids[:top] if top else ids
        lbl = ctx.labels(ids) if ctx else np.full(len(ids), -1)
        counts = {p: int(np.count_nonzero(patterns == p)) for p in PATTERNS} \
            if patterns is not None else {}
        flipped = ctx.flipped if ctx else None
        rows = [{"id": int(j), "label": int(lb) if lb >= 0 else None, "flipped": flip_cell(ctx, int(j)),
                 "pattern": None if patterns is None else str(patterns[j]), "total": float(total[j]),
                 "windows": [float(v) for v in x[j]]} for j, lb in zip(ids, lbl)]
        noise = None if patterns is None else noise_scale(x)  # the σ_w classify_windows calibrated the patterns with
        results.append({"method": method_name, "query": qname, "grid": [list(w) for w in windows], "grid_labels": labels,
                        "pattern_counts": counts, "noise": None if noise is None else [float(v) for v in noise],
                        "rows": rows})
        if fmt == "table":
            head = [f"{method_name}: query {qname}, {len(windows)} windows over steps [{windows[0][0]}, {windows[-1][1]}) "
                    f"({args.grid}), {x.shape[0]} samples; {sign_line(is_loss, qname)}"]
            if patterns is None:
                head.append(f"patterns: none ({why})")
            else:
                per = []
                for p, c in counts.items():
                    extra = f" ({len(set(np.nonzero(patterns == p)[0].tolist()) & flipped)} flipped)" if flipped is not None else ""
                    per.append(f"{p} {c}{extra}")
                head.append("patterns: " + ", ".join(per))
                head.append(noise_line(noise, total, patterns))
            has_label = any(r["label"] is not None for r in rows)
            header = ["id"] + (["label"] if has_label else []) + (["flipped"] if flipped is not None else []) + \
                ["pattern", "total"] + labels
            body = [[r["id"]] + ([r["label"] if r["label"] is not None else "?"] if has_label else [])
                    + ([flip_text(r["flipped"])] if flipped is not None else []) + [r["pattern"] or "-", r["total"]]
                    + [_short(v) for v in r["windows"]] for r in rows]
            texts.append("\n".join(head + [format_table(header, body)]))
    if fmt == "json":
        emit(args, json_text({"log": args.log, "results": results, "info": info}))
    elif fmt == "csv":
        header = ["query", "id", "label", "flipped", "pattern", "total"] + labels
        body = [[res["query"], r["id"], r["label"], r["flipped"],
                 r["pattern"], r["total"], *r["windows"]] for res in results for r in res["rows"]]
        emit(args, csv_text(header, body))
    else:
        emit(args, "\n\n".join(texts))
    return 0


def noise_line(noise: np.ndarray, total: np.ndarray, patterns: np.ndarray) -> str:
    """The noise level σ_w the patterns were calibrated with (the robust spread of each window's scores, docs/trust.md
    §4), and, where samples of the largest totals are 'negligible', what that says: the scores spread as one population
    (every sample of a small training set matters), so σ_w is their spread, not a noise, and 'negligible' is relative."""
    line = (f"noise σ per window (1.4826·median |score|, docs/trust.md §4): {' '.join(_short(v) for v in noise)}; "
            "negligible = no window's score and not their sum beyond 3σ")
    top = np.argsort(-np.abs(total), kind="stable")[:10]
    flat = int(np.count_nonzero(patterns[top] == "negligible"))
    if flat:
        line += (f"\nnote: {flat} of the {len(top)} samples of largest |total| are negligible: the scores spread as one "
                 "population, so σ is their spread, not a noise level, and the patterns compare samples with each other")
    return line


def _short(v: float) -> str:
    return f"{v:.2e}"


