"""``lightning-influence tensorboard``: a query's results over a grid of windows, exported to TensorBoard."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from lightning_influence.cli.common import UserError, emit, row_count
from lightning_influence.cli.context import load_function
from lightning_influence.cli.methods import default_method
from lightning_influence.cli.timeline import add_grid_parser, patterns_of, timeline_data
from lightning_influence.distributed import global_rank

SUMMARY = "export a query's results to TensorBoard"
EXPORT_MARK = ".lightning-influence-export"  # marks a run folder this command wrote (what --replace may replace)


def register(sub: Any, parents: dict[str, argparse.ArgumentParser]) -> None:
    p = add_grid_parser(sub, parents, "tensorboard", SUMMARY, cmd_tensorboard)
    p.add_argument("--logdir", required=True, help="TensorBoard log directory to write into")
    p.add_argument("--run", help="run name (sub-directory of --logdir; default: the method)")
    p.add_argument("--replace", action="store_true",
                   help="replace an earlier export in the same run (otherwise refused: TensorBoard would mix the two)")
    p.add_argument("--top", "-k", type=row_count, default=10, help="rows of the top-k tables (default 10)")
    p.add_argument("--no-embedding", dest="embedding", action="store_false", help="skip the projector view")
    p.add_argument("--decoder", metavar="MODULE:FUNCTION",
                   help="for token data: a function (module:function or file.py:function) turning a sample's token "
                        "ids into text for the sample tables (default: the ids)")


def cmd_tensorboard(args: argparse.Namespace) -> int:
    from lightning_influence.tensorboard import ExportData, export

    name = args.run or args.method or default_method()
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise UserError(f"--run {name!r}: a run is a folder inside --logdir (`tensorboard --logdir` shows it there); "
                        "give a name without '..' or a leading '/'")
    run_dir = Path(args.logdir) / name
    earlier = _earlier_export(run_dir, args.replace)  # refused before the work, replaced after it
    decode = load_function(args.decoder, "--decoder") if args.decoder else None  # a bad one fails before the work
    log, ctx, columns, windows, labels, scores, method_name, info = timeline_data(args)
    if global_rank() != 0:
        return 0  # rank 0 writes the event files
    for path in earlier:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / EXPORT_MARK).write_text("written by lightning-influence tensorboard; --replace replaces this run\n")
    n = scores.shape[0]
    embedding, note = None, ""
    if args.embedding and log.recorded.get("gradients"):
        embedding, note = _last_gradients(log, windows[-1], n)
    elif args.embedding:
        note = "no gradients recorded, no projector view"
    written_all: dict[str, list[str]] = {}
    train_labels = ctx.labels(np.arange(n)) if ctx else None
    get_item = _item_getter(ctx)
    for qi, qname, is_loss in columns:
        x = scores[:, qi, :]
        patterns, why = patterns_of(x)
        data = ExportData(query=qname, method=method_name, windows=windows, window_labels=labels, window_scores=x,
                          loss_query=is_loss, patterns=patterns, labels=train_labels,
                          flipped=ctx.flipped if ctx else None, embedding=embedding,
                          embedding_note=note, info={"log": args.log, "grid": args.grid, **({"patterns": why} if why else {})},
                          get_item=get_item, decode=decode)
        for kind, tags in export(run_dir, data, top_k=args.top or 10).items():
            written_all.setdefault(kind, []).extend(tags)
    lines = [f"wrote {method_name} scores of {n} samples over {len(windows)} windows to {run_dir}"]
    for kind, tags in written_all.items():
        if tags:
            shown = ", ".join(tags[:4]) + (f", ... ({len(tags)} tags)" if len(tags) > 4 else "")
            lines.append(f"  {kind}: {shown}")
    lines.append(f"view: tensorboard --logdir {args.logdir}")
    emit(args, "\n".join(lines))
    return 0


def _earlier_export(run_dir: Path, replace: bool) -> list[Path]:
    """The files of an earlier export in ``run_dir`` to replace (``--replace``); refuses to add a second export beside
    one (TensorBoard reads every event file of a run: both would show, mixed, the same tags twice) and to replace
    event files this command did not write (a training run's)."""
    events = sorted(run_dir.glob("events.out.tfevents.*")) if run_dir.is_dir() else []
    if not events:
        return []
    ours = (run_dir / EXPORT_MARK).exists()
    if not replace:
        todo = "pass --replace to replace it, or " if ours else ""
        raise UserError(f"--logdir: the run {run_dir} already holds TensorBoard events "
                        f"({'an earlier export' if ours else 'not written by this command'}); a second export there "
                        f"would show mixed with them: {todo}give --run NAME (a new run) or another --logdir")
    if not ours:
        raise UserError(f"--replace: {run_dir} holds TensorBoard events this command did not write (no {EXPORT_MARK}); "
                        "they are left alone: give --run NAME (a new run) or another --logdir")
    steps = [p for p in run_dir.iterdir() if p.is_dir() and p.name.isdigit()]  # the projector's tensors, by step
    return events + steps + [p for p in (run_dir / "projector_config.pbtxt",) if p.exists()]


def _item_getter(ctx: Any) -> Any:
    """``id -> training item`` for the sample views, or ``None`` when the run's data cannot be rebuilt."""
    if ctx is None:
        return None
    try:
        dataset = ctx.train_dataset
    except UserError:
        return None
    return lambda j: dataset[int(j)]


def _last_gradients(log: Any, window: tuple[int, int], n: int) -> tuple[np.ndarray, str]:
    """Each sample's gradient row at its last recorded step inside ``window`` (NaN where none)."""
    out = None
    for rec in log.iter_steps(window[0], window[1], fields=("grad",)):
        if out is None:
            out = np.full((n, rec.grads.shape[1]), np.nan, dtype=np.float32)
        out[rec.ids] = rec.grads
    note = (f"each sample's logged gradient at its last step in [{window[0]}, {window[1]}), reduced to its top 64 "
            "principal components")
    return out, note


