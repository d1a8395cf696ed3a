"""``lightning-influence query``: the top training samples for a query over one or more windows."""

from __future__ import annotations

import argparse
from typing import Any

from lightning_influence.cli.common import (PROG, UserError, add_process_args, drift_line, emit, flip_cell, flip_text,
                                            format_table, json_text, once, output_format, parse_window, processes,
                                            progress_bar, row_count, sign_line)
from lightning_influence.cli.context import prepare
from lightning_influence.cli.methods import SPLITS_HELP, METHODS, method_help, canonical_method, run_method
from lightning_influence.cli.queries import build_query, parse_query, query_columns
from lightning_influence.distributed import DistributedQueryError, global_rank
from lightning_influence.estimators.scores import flipped_summary, rows_csv, sort_order, table_rows


def register(sub: Any, parents: dict[str, argparse.ArgumentParser]) -> None:
    p = sub.add_parser("query", parents=[parents["common"], parents["model"], parents["query"]],
                       help="top samples for a query over windows", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Score every training sample for a query over one or more windows and list the top.",
                       epilog="examples:\n"
                              f"  {PROG} query runs/digits/influence --config configs/digits.yaml --window 'epoch 14:'\n"
                              f"  {PROG} query LOG -c CONFIG --window 100:500 --window 0.8:1.0 --query test:3 -o top.csv")
    p.add_argument("--method", "-m", type=canonical_method, choices=list(METHODS), metavar="METHOD", help=method_help(),
                   action=once("run it once per method, or compare methods with evaluate (its --method repeats)"))
    p.add_argument("--window", "-w", action="append", metavar="W",
                   help="steps '100:500', fractions '0.8:1.0' or epochs 'epoch 3:5' (epochs 3 and 4); empty ends mean "
                        "start/end; repeatable; default: the whole run")
    p.add_argument("--top", "-k", type=row_count, default=10, help="rows per window and query (0: all samples; default 10)")
    add_process_args(p, SPLITS_HELP, split=True)
    p.set_defaults(func=cmd_query)


def cmd_query(args: argparse.Namespace) -> int:
    procs = processes(args)  # refuses processes this machine cannot run before the model is rebuilt
    log, ctx = prepare(args)
    parallel = procs is not None
    specs = args.query or [parse_query("val_loss")]
    windows = [(w, parse_window(log, w)) for w in (args.window or [None])]
    query, names = build_query(specs, ctx) if METHODS[args.method].query else (None, [])
    labels = ctx.labels if ctx else None
    flipped = ctx.flipped if ctx else None
    results = []
    for spec_text, (t1, t2) in windows:
        label = spec_text or "whole run"
        progress = progress_bar(args, f"{args.method} [{t1}, {t2})")  # quiet on ranks other than 0
        try:
            scores = run_method(args.method, log, query, ctx, (t1, t2), progress, args.hvp, procs)
        except DistributedQueryError as err:
            raise UserError(str(err)) from None
        for qi, qname, is_loss in query_columns(scores.query_names, names, specs):
            table = table_rows(scores, top=args.top, sort=args.sort, labels=labels, flipped=flipped, query=qi)
            rows = [{"rank": r["rank"], "id": r["id"], "score": r["score"], "label": r["label"],
                     "flipped": flip_cell(ctx, r["id"])} for r in table]
            results.append({"method": scores.method, "query": qname, "loss_query": is_loss, "window": label,
                            "steps": [int(t1), int(t2)], "n_samples": int(scores.scores.shape[0]),
                            "sort": sort_order(args.sort, qname), "rows": rows, "table": table,
                            "flipped_total": len(flipped) if flipped is not None else None, "info": scores.info})
    if parallel and global_rank() != 0:
        return 0  # rank 0 writes the result
    fmt = output_format(args)
    if fmt == "json":
        emit(args, json_text({"log": args.log, "results": [{k: v for k, v in res.items() if k != "table"}
                                                           for res in results]}))
    elif fmt == "csv":  # the table of InfluenceScores.to_csv: the same CSV from Python
        emit(args, rows_csv([row for res in results for row in res["table"]], flipped is not None))
    else:
        emit(args, "\n\n".join(_query_text(res, args) for res in results))
    return 0


def _query_text(res: dict[str, Any], args: argparse.Namespace) -> str:
    t1, t2 = res["steps"]
    head = [f"{res['method']}: query {res['query']}, window {res['window']} = steps [{t1}, {t2}), "
            f"{res['n_samples']} training samples, sorted {res['sort']} first",
            f"sign: {sign_line(res['loss_query'], res['query'])}"]
    has_label = any(r["label"] is not None for r in res["rows"])
    has_flip = res["flipped_total"] is not None
    header = ["rank", "id", "score"] + (["label"] if has_label else []) + (["flipped"] if has_flip else [])
    rows = [[r["rank"], r["id"], r["score"]] + ([r["label"] if r["label"] is not None else "?"] if has_label else [])
            + ([flip_text(r["flipped"])] if has_flip else []) for r in res["rows"]]
    tail = []
    if has_flip and res["rows"]:
        hits = sum(bool(r["flipped"]) for r in res["rows"])
        tail.append(flipped_summary(hits, len(res["rows"]), res["flipped_total"], res["n_samples"]))
    drift = drift_line((res.get("info") or {}).get("replay_drift"))  # what the replay could not reproduce
    tail += [drift] if drift else []
    return "\n".join(head + [format_table(header, rows)] + tail)


