"""``lightning-influence info``: run metadata, records, size and integrity; reads only the log."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from lightning_influence.cli.common import emit, json_text, open_log, output_format, progress_bar
from lightning_influence.cli.methods import METHODS, unmet_needs
from lightning_influence.log.half import HalfRounding, merge, rounding_of_stored
from lightning_influence.log.lock import writer_state
from lightning_influence.log.reader import InfluenceLog
from lightning_influence.recipe import RecipeError, stored_data
from lightning_influence.step.frozen import load_frozen
from lightning_influence.step.weights import step_summary


def register(sub: Any, parents: dict[str, argparse.ArgumentParser]) -> None:
    p = sub.add_parser("info", parents=[parents["common"]], help="run metadata, steps, epochs, records, size, integrity",
                       description="Run metadata, steps and epochs, what was recorded, size on disk, integrity checks "
                                   "and which methods the log supports. Reads only the log. Exit code 0 when the "
                                   "integrity line says OK, 2 when it lists problems (or the log cannot be read).")
    p.add_argument("--verify", action="store_true",
                   help="read back every record and checkpoint (parameters and optimizer state) and check it")
    p.add_argument("--strict", action="store_true", help=argparse.SUPPRESS)  # kept for scripts: problems always exit 2
    p.set_defaults(func=cmd_info)


def cmd_info(args: argparse.Namespace) -> int:
    from lightning_influence.log.format import list_segments, list_unfinished

    log = open_log(args.log)  # checks every segment's (checksummed) index; a damaged file is named
    root = Path(args.log)
    files = [p for p in root.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    meta, recorded = log.meta, log.recorded
    T, ckpts = log.num_steps, log.checkpoint_steps
    every = int(meta.get("every_n_steps", 1))
    batch_sizes = np.array([len(log.batch_ids(t)) for t in log.steps]) if T else np.zeros(1)
    ids_seen = log.all_ids()
    problems, notes = [], []
    if not log.finished:  # a run still being written is not a damaged log (its complete steps read as they are)
        (notes if writer_state(root)[0] == "live" else problems).append(log.end_note)
    unfinished = list_unfinished(root)
    if unfinished and log.finished:
        problems.append(f"unfinished segment file(s) {[str(p.relative_to(root)) for p in unfinished]}: a write was "
                        "interrupted; they are ignored (delete them)")
    if recorded.get("gradients"):
        # a skipped step (the GradScaler's, a training_step returning None) stores none: it changed nothing
        missing = [int(t) for t in log.steps if t % every == 0 and not log.has_grads(int(t)) and not log.skipped(int(t))]
        if missing:
            problems.append(f"no gradient rows at steps {missing[:10]} (expected every {every} steps)")
    if len(ids_seen) and int(ids_seen.max()) >= log.dataset_size:
        problems.append(f"sample ids up to {int(ids_seen.max())} exceed the dataset size {log.dataset_size}")
    if args.verify and T:
        bad = _verify(log, args)
        if bad:
            problems.append(f"non-finite values at steps {bad[:10]}")
        notes.append("--verify: every record and checkpoint (parameters, optimizer state) read back, checksums verified")
        try:  # the data the CLI rebuilds the run from, when the log stores them
            stored_data(root)
        except RecipeError as err:
            problems.append(str(err))
        try:  # the frozen parameters the CLI loads into the module it rebuilds (step/frozen.py)
            load_frozen(root, meta.get("frozen"))
        except Exception as err:  # noqa: BLE001 - a missing or unreadable file is the problem reported
            problems.append(f"frozen parameters: {err}")
    half = _half_rounding(log, every_step=args.verify) if recorded.get("gradients") and T else None
    if half is not None and half.significant():
        notes.append(half.text("bounded by") + "; estimators read these rounded rows (re-record with "
                     "storage_dtype='float32' to keep them)")
    groups = meta.get("optimizer", {}).get("param_groups", [])
    proj_dim = (meta.get("projection") or {}).get("dim")
    cols = log.projector().out_dim if meta.get("tracked_params") else 0
    needs = {n: unmet_needs(n, log) for n, m in METHODS.items() if m.available()}
    usable = [n for n, unmet in needs.items() if not unmet]
    unusable = {n: unmet for n, unmet in needs.items() if unmet}
    epochs, counts = np.unique(log.epochs_of_step, return_counts=True)
    summary = {
        "log": str(root), "size_bytes": size, "files": len(files),
        "segments": sum(len(v) for v in list_segments(root).values()), "ranks": log.ranks,
        "created": meta.get("created"), "versions": meta.get("versions"),
        "module_class": meta.get("module_class"), "datamodule_class": meta.get("datamodule_class"),
        "recipe": meta.get("recipe"), "resumes": meta.get("resumes", []),
        "optimizer": meta.get("optimizer", {}).get("class"),
        "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in groups],
        "scheduled": _schedule(log),
        "steps": len(log.steps), "first_step": int(log.steps[0]) if T else None,
        "epochs": [int(epochs[0]), int(epochs[-1])] if T else [],
        "steps_per_epoch": {int(e): int(c) for e, c in zip(epochs, counts)},
        "batch_size": {"mean": float(batch_sizes.mean()), "min": int(batch_sizes.min()), "max": int(batch_sizes.max())},
        "dataset_size": log.dataset_size if T else meta.get("dataset_size"), "ids_seen": int(len(ids_seen)),
        "recorded": recorded, "every_n_steps": every, "gradient_columns": cols, "projection": proj_dim,
        "gradient_engine": meta.get("gradient_engine"), "gradient_engines": meta.get("gradient_engines"),
        "demoted": meta.get("demoted"),
        "storage_dtype": meta.get("storage_dtype"), "step": step_summary(log) if T else None,
        "float16_rounding": None if half is None else {"below_normal_fraction": half.fraction,
                                                       "row_relative_error_bound": half.worst,
                                                       "median_row_relative_error_bound": half.median},
        "precision": meta.get("precision"), "eval_modules": meta.get("eval_modules"),
        "checkpoints": {"count": len(ckpts), "every_n_steps": meta.get("checkpoint_every_n_steps"), "final": log.finished,
                        "final_weights_replaced_by": meta.get("final_weights_replaced_by")},
        "state": log.end_note,
        "methods": {"usable": usable, "not_usable": unusable},
        "integrity": {"ok": not problems, "problems": problems, "notes": notes},
    }
    code = 2 if problems else 0  # scripts can rely on it (README, CLI)
    if output_format(args) == "json":
        emit(args, json_text(summary))
        return code
    v = summary["versions"] or {}
    created = time.strftime("%Y-%m-%d %H:%M", time.localtime(summary["created"])) if summary["created"] else "?"
    hyper = "; ".join(", ".join([f"{k}={g[k]}" for k in ("lr", "momentum", "weight_decay", "betas") if k in g]
                                + [k for k in ("nesterov", "amsgrad", "centered", "fused", "foreach") if g.get(k)]
                                + [f"tensor {k}" for k in g.get("tensors") or ()])
                      for g in summary["param_groups"])
    per_epoch = "/".join(str(c) for c in sorted(set(counts.tolist())))
    what = [k for k in ("ids", "lrs", "losses", "gradients", "hvp", "checkpoints") if recorded.get(k)]
    rows = [
        ("log", f"{root}  ({_size(size)} on disk, {len(files)} files, {summary['segments']} segments, ranks {log.ranks})"),
        ("created", f"{created} with lightning-influence {v.get('lightning-influence')}, torch {v.get('torch')}, "
                    f"lightning {v.get('lightning')}"),
        ("model", str(summary["module_class"]) + (f", data {summary['datamodule_class']}" if summary["datamodule_class"] else "")),
        ("rebuild", _recipe_text(meta.get("recipe"))),
        ("optimizer", f"{summary['optimizer']} ({len(groups)} param group{'s' * (len(groups) != 1)}: {hyper})"
                      + "".join(f"; per step {k} {', '.join(f'{a:g}..{b:g}' for a, b in zip(r['min'], r['max']))}"
                                for k, r in summary["scheduled"].items())),
        ("steps", f"{len(log.steps)} ({int(log.steps[0]) if T else 0}..{T - 1}), epochs {int(epochs[0])}..{int(epochs[-1])} "
                  f"({per_epoch} steps per epoch), " + _batch_size(summary["batch_size"]) if T else "0 (no step recorded)"),
        ("samples", f"{summary['dataset_size']} training ids, {summary['ids_seen']} seen in the log"),
        ("step", _describe_step(summary["step"]) + _describe_precision(summary["precision"], summary["step"])
         + _describe_modes(meta.get("eval_modules"))),
        ("recorded", ", ".join(what)),
        ("gradients", f"{cols} columns per sample ({f'projected, {proj_dim} per tensor' if proj_dim else 'full'}, "
                      f"{summary['storage_dtype']}{_describe_stored(log.stored_widths(), cols)}), every {every} step{'s' * (every != 1)}"
                      + (", with HVP products" if recorded.get("hvp") else "") + _describe_engines(meta)
                      if recorded.get("gradients") else "not recorded"),
        *([("frozen", _describe_frozen(meta["frozen"]))] if meta.get("frozen") else []),
        ("checkpoints", f"{len(ckpts)} (every {meta.get('checkpoint_every_n_steps') or '-'} steps, "
                        f"{'final θ_T stored' if log.finished else 'no final θ_T'})"
                        + _replaced(meta.get("final_weights_replaced_by"))),
        *([("fits", _describe_resumes(int(meta.get("first_step") or 0), meta["resumes"]))] if meta.get("resumes") else []),
        ("state", log.end_note),
        ("methods", ", ".join(usable) + "".join(f"; not {n} (needs {', '.join(r)})" for n, r in unusable.items())),
        ("integrity", ("OK" + (f" ({'; '.join(notes)})" if notes else "")) if not problems
         else "PROBLEMS: " + "; ".join(problems)),
    ]
    width = max(len(k) for k, _ in rows)
    emit(args, "\n".join(f"{k.ljust(width)}  {val}" for k, val in rows))
    return code


def _describe_resumes(first: int, resumes: list[dict[str, Any]]) -> str:
    """The fits the log was written by, in order: where each resumed and which harmless settings it changed."""
    parts = [f"started at step {first}"]
    for r in resumes:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["time"])) if r.get("time") else "?"
        changed = sorted(r.get("changed") or {})
        parts.append(f"resumed at step {r.get('step')} ({when}{'; changed ' + ', '.join(changed) if changed else ''})")
    return f"{len(resumes) + 1}: " + ", ".join(parts) + " (each resume cut the log at its step)"


def _describe_frozen(entry: dict[str, Any]) -> str:
    """The run's frozen parameters (``step/frozen.py``): how many, their size, and whether the fit changed them."""
    names, changed = entry.get("names") or [], entry.get("changed")
    text = (f"{len(names)} parameter tensor{'s' * (len(names) != 1)} not trained ({_size(int(entry.get('bytes') or 0))}, "
            f"{entry.get('file')}), loaded into the module the CLI rebuilds")
    return text + (f"; CHANGED during the fit ({', '.join(changed[:3])}): the estimators refuse the log" if changed else "")


def _describe_modes(schedule: list[dict] | None) -> str:
    """The submodules training kept in eval mode (meta ``eval_modules``, step/modes.py), where there are any."""
    if not schedule or not any(e["eval"] for e in schedule):
        return ""
    parts = [f"{', '.join(e['eval']) or 'none'} from step {e['step']}" for e in schedule]
    return "; modules in eval mode: " + "; ".join(parts)


def _replaced(by: list[str] | None) -> str:
    """The note on a θ_T whose module weights a callback replaced when training ended (tracker_final.py)."""
    return f"; θ_T is the last step's: {', '.join(by)} replaced the module's weights with an average after it" if by else ""


def _describe_stored(widths: list[int], cols: Any) -> str:
    """``, stored as 99 values a sample`` where outer-product blocks are stored as their factors (docs/log-format.md,
    Version 4)."""
    fewer = [w for w in widths if w != cols]
    return f"; outer-product blocks stored as factors: {' or '.join(map(str, fewer))} values a sample" if fewer else ""


def _describe_engines(meta: dict[str, Any]) -> str:
    """Which engine computed the columns: ``; engine hooks``, or the tensors ``vmap`` computed in a mixed run (and
    the step each demoted one left the hooks at, docs/log-format.md)."""
    engines, demoted = meta.get("gradient_engines"), meta.get("demoted") or {}
    if meta.get("gradient_engine") != "mixed" or not engines:  # older logs name one engine only
        return f"; engine {meta.get('gradient_engine')}"
    vmap = [n + (f" (from the hooks at step {demoted[n]})" if n in demoted else "") for n, e in engines.items()
            if e == "vmap"]
    more = f" and {len(vmap) - 5} more" if len(vmap) > 5 else ""
    return f"; engines hooks, vmap for {', '.join(vmap[:5])}{more}"


def _batch_size(b: dict[str, Any]) -> str:
    """``batch size 32`` or, when steps differ (last batch, incomplete accumulation), the mean and the range."""
    if b["min"] == b["max"]:
        return f"batch size {b['max']}"
    return f"batch size {b['mean']:.4g} on average ({b['min']}..{b['max']})"


def _describe_precision(p: dict[str, Any] | None, s: dict[str, Any] | None = None) -> str:
    """``; bf16-mixed autocast`` for a mixed-precision run (every re-evaluation of a step uses it), else nothing; with a
    GradScaler, the steps it skipped and the ids whose losses were not finite there (scores keep those steps skipped:
    removing such a sample would have let its steps run, which no estimator nor replay leave-one-out shows)."""
    if not p or not p.get("autocast_dtype"):
        return ""
    text = f"; {p.get('name') or p['autocast_dtype']} autocast" + (", GradScaler" if p.get("grad_scaler") else "")
    skipped, bad = (s or {}).get("skipped_steps") or [], (s or {}).get("non_finite_loss_ids") or []
    if p.get("grad_scaler") and skipped:
        more = f", ... ({len(skipped)})" if len(skipped) > 8 else ""
        text += f" skipped step{'s' * (len(skipped) != 1)} {', '.join(map(str, skipped[:8]))}{more}"
        if bad:
            text += (f"; non-finite losses there for ids {bad[:10]}{' ...' if len(bad) > 10 else ''} (every score "
                     "keeps those steps skipped, as if removing these samples would not let them run)")
    return text


def _describe_step(s: dict[str, Any] | None) -> str:
    """The step as Lightning ran it, in words: accumulation (incomplete steps) and clipping (where it bound)."""
    if s is None:
        return "-"
    acc = [a for a in s["accumulate"] if a > 0]
    parts = [f"accumulate_grad_batches {'/'.join(map(str, acc))}, {len(s['incomplete_accumulation_steps'])} incomplete "
             "accumulation step(s) (weighted as Lightning scaled them)" if acc and max(acc) > 1 else
             "one batch mean per step" if acc else "a batch mean per step (weights not recorded: format version 1)"]
    if s["clipping"]:
        parts.append(f"{s['clipping']} clipping at {s['clip_value']:g}, bound on {s['clip_bound_fraction']:.0%} of steps"
                     + (f" (median coefficient {s['clip_coef_median']:.3g})" if s["clip_coef_median"] is not None else ""))
    else:
        parts.append("no gradient clipping")
    return "; ".join(parts)


def _recipe_text(recipe: dict[str, Any] | None) -> str:
    """How the CLI rebuilds the model and the data from this log (``recipe`` in meta.h5)."""
    if not recipe:
        return "no recipe recorded (format version 1): pass --config, --model/--data or --builder"
    parts = []
    for what in ("module", "datamodule"):
        entry = recipe.get(what) or {}
        if entry:
            hp = entry.get("hparams")
            parts.append(f"{what} hparams " + (", ".join(f"{k}={v}" for k, v in hp.items()) if hp else "none saved"))
    data = recipe.get("data") or {}
    stored = data.get("stored")
    source = f"data from {data.get('train') or '?'}"
    parts.append(source + (f", stored in the log ({stored.get('train', 0)} train, {stored.get('val', 0)} val)" if stored
                           else f" ({data.get('not_stored')})" if data.get("not_stored") else ""))
    collate = data.get("collate_fn")
    if collate:
        parts.append(f"batches collated by {collate.get('function') or collate.get('name')}"
                     + ("" if collate.get("function") else f" ({collate.get('why')})"))
    script = (recipe.get("script") or {}).get("dir")
    if script:
        parts.append(f"script dir {script}")
    return "; ".join(parts)


def _verify(log: Any, args: argparse.Namespace) -> list[int]:
    """Read back every record and checkpoint, optimizer state and buffers included (the reader verifies every CRC-32); steps with
    non-finite values. A log started by a resumed fit is read from its first step."""
    fields = [f for f, rec in (("loss", "losses"), ("grad", "gradients"), ("hvp", "hvp")) if log.recorded.get(rec)]
    bad: set[int] = set()
    progress = progress_bar(args, "verify")
    first, T = int(log.steps[0]), log.num_steps
    for group in ([f for f in fields if f == "loss"], [f for f in fields if f != "loss"]):
        if not group:
            continue
        for rec in log.iter_steps(first, T, fields=group):
            for arr in (rec.losses, rec.grads, rec.hvps):
                # a skipped step's losses may be non-finite (the GradScaler's overflow; NaN: no backward ran)
                if arr is not None and not np.all(np.isfinite(arr)) and not (arr is rec.losses and log.skipped(rec.step)):
                    bad.add(rec.step)
            if "loss" not in group:
                progress(rec.step + 1 - first, T - first)
    progress.close()
    for t in log.checkpoint_steps:
        log.checkpoint(t)
        log.optimizer_state(t)
        log.checkpoint_buffers(t)
    return sorted(bad)


def _half_rounding(log: InfluenceLog, every_step: bool, sample: int = 32) -> HalfRounding | None:
    """float16 gradient rows: entries below its normal range and the rows' rounding error bound (log/half.py), from
    ``sample`` evenly spaced steps (every step with ``--verify``); ``None`` for another storage dtype."""
    if str(log.meta.get("storage_dtype")) != "float16":
        return None
    steps = [int(t) for t in log.steps if log.has_grads(int(t))]
    if not every_step and len(steps) > sample:
        steps = [steps[i] for i in np.linspace(0, len(steps) - 1, sample).round().astype(int)]
    parts = [rounding_of_stored(r.grads) for t in steps for r in log.iter_steps(t, t + 1, fields=("grad",))
             if r.grads is not None and len(r.grads)]
    return merge(parts)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _schedule(log: InfluenceLog) -> dict[str, dict[str, list[float]]]:
    """The hyperparameters a schedule changed during the run (``InfluenceLog.hyper``) with their range per param group
    (``betas``: per group, β₁ then β₂), only those whose value moved."""
    out = {}
    for key, values in log.scheduled.items():
        lo, hi = values.min(axis=0).ravel(), values.max(axis=0).ravel()
        if (lo != hi).any():
            out[key] = {"min": lo.tolist(), "max": hi.tolist()}
    return out
