"""Shared pieces of the command line: errors, progress, log and window parsing, output formats."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from lightning_influence.estimators.scores import strict_json
from lightning_influence.progress import ProgressBar, process_rank

if TYPE_CHECKING:
    from lightning_influence.cli.context import RunContext
    from lightning_influence.log import InfluenceLog

PROG = "lightning-influence"


class UserError(Exception):
    """Something the user can fix: shown as one line, exit code 2."""



# ----------------------------------------------------------------------------------- progress
def progress_bar(args: argparse.Namespace, label: str) -> ProgressBar:
    """A tqdm bar on stderr: off with ``--quiet``, drawn on a terminal, and elsewhere only with ``--progress``."""
    return ProgressBar(label, enabled=not getattr(args, "quiet", False), force=getattr(args, "progress", False))


def first_process() -> bool:
    """Whether this is the first process of a ``--devices`` (or torchrun) command, or the only one: rank 0 of its
    process group, or before any group exists, of the launcher's ``RANK``/``LOCAL_RANK``/``NODE_RANK``."""
    rank, world = process_rank()
    if world > 1:
        return rank == 0
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def status(args: argparse.Namespace, message: str) -> None:
    """A status line on stderr: off with ``--quiet`` and in every process but the first of a ``--devices`` query."""
    if getattr(args, "quiet", False) or not first_process():
        return
    print(message, file=sys.stderr, flush=True)


def add_process_args(p: argparse.ArgumentParser, what: str, split: bool = False) -> None:
    """``--devices``, ``--num-nodes``, ``--accelerator`` (and with ``split``, ``--split``): run ``what`` on several
    processes (docs/scaling.md)."""
    g = p.add_argument_group(f"several processes (docs/scaling.md; {what})")
    g.add_argument("--devices", type=int, default=1, metavar="N", help="processes per node (default 1)")
    g.add_argument("--num-nodes", type=int, default=1, metavar="M", help="nodes (default 1; launch with torchrun/SLURM)")
    g.add_argument("--accelerator", choices=("cpu", "cuda"), default="cpu", help="gloo on CPUs or nccl on GPUs")
    if split:
        from lightning_influence.distributed import SPLITS

        g.add_argument("--split", choices=SPLITS, default="auto",
                       help="divide a sweep by each step's batch rows (DIT; Gauss-Newton DIT: each process reads only "
                            "its rows of the log) or by query output (auto: batch where the method allows, else columns)")


def processes(args: argparse.Namespace) -> Any:
    """The :class:`~lightning_influence.distributed.Processes` of ``--devices``/``--num-nodes``, or ``None`` for one
    process; this command re-runs itself in the others (Lightning's ``ddp``), or is already one of them. Processes
    other than rank 0 stay quiet."""
    from lightning_influence.distributed import Processes, launched_outside

    if args.devices < 1 or args.num_nodes < 1:
        raise UserError(f"--devices and --num-nodes must be >= 1, got {args.devices} and {args.num_nodes}")
    check_processes(args.devices, args.num_nodes, args.accelerator, launched_outside())
    if args.devices * args.num_nodes == 1 and not launched_outside():
        if args.accelerator == "cuda":  # said, not silently ignored
            status(args, "note: one process computes on the CPU; --accelerator cuda applies to --devices 2 or more")
        return None
    if os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0":
        args.quiet = True
    return Processes(devices=args.devices, num_nodes=args.num_nodes, strategy="ddp", accelerator=args.accelerator,
                     split=getattr(args, "split", "auto"))


def check_processes(devices: int, num_nodes: int, accelerator: str, outside: bool) -> None:
    """Refuse, before any work, processes this machine cannot run: ``--accelerator cuda`` without a CUDA device or
    with more ``--devices`` than it has, more CPU processes than usable cores (started here: more only share the
    cores, each holding its own copy of the model and data), or ``--num-nodes`` above 1
    without a launcher on every node (the processes of this node would wait for the others' forever)."""
    if accelerator == "cuda":
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError("--accelerator cuda: this machine has no usable CUDA device (torch.cuda.is_available() is "
                            "False); run without --accelerator (CPU processes), or on a machine with GPUs")
        if devices > count:
            raise UserError(f"--devices {devices}: this machine has {count} CUDA device(s); use --devices {count} or fewer")
    elif not outside:
        cores = usable_cores()
        if devices > cores:
            raise UserError(f"--devices {devices}: more processes than the {cores} CPU core(s) this command may use (they "
                            f"would only share them, each holding the model and data); use --devices {cores} or fewer")
    if num_nodes > 1 and not outside and not {"MASTER_ADDR", "NODE_RANK"} & os.environ.keys():
        raise UserError(f"--num-nodes {num_nodes}: the command must be started on every node, by torchrun or SLURM "
                        "(srun), or by hand with MASTER_ADDR, MASTER_PORT and NODE_RANK set on each "
                        "(docs/scaling.md); started alone here it would wait for the other nodes forever")


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def check_workers(workers: int) -> None:
    """``--workers``: forked processes, at least one and at most the usable cores (more would only share them)."""
    cores = usable_cores()
    if not 1 <= workers <= cores:
        raise UserError(f"--workers {workers}: give 1 to {cores} (the CPU cores this command may use)")


# ------------------------------------------------------------------------------ log loading
def open_log(path: str) -> InfluenceLog:
    """The log at ``path``; a missing path, a file or a damaged log is a :class:`UserError` saying what to pass."""
    from lightning_influence.log import InfluenceLog, LogFormatError

    p = Path(path)
    if not p.exists():
        raise UserError(f"{path}: no such log directory; pass the log_dir given to InfluenceTracker "
                        "(e.g. runs/digits/influence)")
    if not p.is_dir():
        raise UserError(f"{path}: not a directory; an influence log is the directory InfluenceTracker(log_dir=...) wrote")
    try:
        return InfluenceLog(p)
    except LogFormatError as err:  # the reader names the file, the problem and what to do
        raise UserError(str(err)) from None


def parse_window(log: Any, spec: str | None) -> tuple[int, int]:
    """``--window`` as a step range of ``log`` (``InfluenceLog.window``); a bad spec is a :class:`UserError`."""
    try:
        return log.window(spec)
    except ValueError as err:
        epochs, first = log.epochs, int(log.steps[0]) if len(log.steps) else 0
        extent = "" if "the run has" in str(err) or not len(epochs) else \
            f"; the run has steps {first}..{log.num_steps - 1} and epochs {int(epochs[0])}..{int(epochs[-1])}"
        raise UserError(f"window {spec!r}: {err}{extent} (see `{PROG} info`)") from None


def windows_of(args: argparse.Namespace) -> list[str]:
    """The ``--window`` values of a command (a list for ``query``, one string or none for the others)."""
    w = getattr(args, "window", None)
    return [w] if isinstance(w, str) else list(w or [])


def row_count(text: str) -> int:
    """argparse type of ``--top``: 0 (all rows) or a positive number of rows."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of rows, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (all rows) or a positive number of rows, got {value}")
    return value


def drift_tolerance(text: str) -> float:
    """argparse type of ``--replay-tolerance``: a number >= 0 (:func:`~lightning_influence.replay_drift.resolve_tolerance`)."""
    from lightning_influence.replay_drift import resolve_tolerance

    try:
        return resolve_tolerance(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected the drift accepted, a number >= 0 (0 = bit-identical), got {text!r}"
                                         ) from None


def join_negative_windows(argv: Sequence[str]) -> list[str]:
    """``--window -3:4`` as ``--window=-3:4``: argparse would take ``-3:4`` for an option and fail on its own terms;
    joined, the window reaches the window parser, which says what is wrong with it."""
    out: list[str] = []
    it = iter(argv)
    for token in it:
        if token in ("--window", "-w"):
            value = next(it, None)
            if value is not None and value.startswith("-") and len(value) > 1 and (value[1].isdigit() or value[1] in ".:"):
                out.append(f"{token}={value}" if token.startswith("--") else f"{token}{value}")
                continue
            out.append(token)
            if value is not None:
                out.append(value)
            continue
        out.append(token)
    return out


def parse_grid(log: Any, spec: str, span: tuple[int, int]) -> tuple[list[tuple[int, int]], list[str]]:
    """Consecutive windows covering ``span``: ``epochs``, ``N`` equal windows, or explicit steps ``a,b,c``
    (:func:`~lightning_influence.replay.grid_bounds`, the grid of the Python ``timeline``)."""
    from lightning_influence.replay import grid_bounds

    t1, t2 = span
    spec = spec.strip()
    epochs = spec in ("epoch", "epochs")
    try:
        grid: Any = "epoch" if epochs else [int(s) for s in spec.split(",") if s.strip()] if "," in spec else int(spec)
        if isinstance(grid, int) and grid < 1:
            raise ValueError
    except ValueError:
        raise UserError(f"--grid {spec!r}: use 'epochs', a number of equal windows (e.g. 10), or step "
                        "boundaries like '0,100,200,480'") from None
    # the span: the log's steps (from 0, or the step a resumed fit started the log at), or those of --window
    where = "the log's steps" if (t1, t2) == (log.first_step, log.num_steps) else "the steps of --window"
    try:
        bounds = grid_bounds(log, grid, span).tolist()
    except ValueError:
        bounds = []
    if len(bounds) < 2:
        raise UserError(f"--grid {spec!r}: boundaries must lie in {t1}..{t2} ({where}) and be at least two")
    windows = list(zip(bounds[:-1], bounds[1:]))
    if epochs:
        return windows, [f"e{int(log.epochs_of_step[a - int(log.steps[0])])}" for a, _ in windows]
    return windows, [f"{a}-{b}" for a, b in windows]




# ------------------------------------------------------------------------------------ output
def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Aligned plain-text table (numbers right-aligned, text left-aligned)."""
    cells = [[str(c) for c in header]] + [[_cell(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    numeric = [all(_is_number(r[i]) for r in rows) if rows else False for i in range(len(header))]
    lines = []
    for r in cells:
        lines.append("  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric)).rstrip())
    return "\n".join(lines)


def _cell(c: Any) -> str:
    if isinstance(c, float):
        return f"{c:.4e}"
    return "" if c is None else str(c)


def _is_number(c: Any) -> bool:
    if isinstance(c, str):
        try:
            float(c)
            return True
        except ValueError:
            return c in ("", "?", "-")
    return isinstance(c, (int, float, np.integer, np.floating)) and not isinstance(c, bool)


def check_writable(path: str | None, flag: str, directory: bool = False) -> None:
    """Refuse, before any work, an output path that cannot be written (a file where a folder is wanted or the
    reverse, a file on the way, no write permission, a read-only disk): the answer, which may take hours, was lost at
    the very end."""
    if not path:
        return
    target = Path(path)
    if target.exists():
        if target.is_dir() != directory:
            raise UserError(f"{flag} {path}: is {'a file' if directory else 'a directory'}; give {flag} "
                            f"{'a directory' if directory else 'a file name'}")
        where, ok = target, os.access(target, os.W_OK | (os.X_OK if directory else 0))
    else:
        where = next(p for p in target.absolute().parents if p.exists())
        if not where.is_dir():
            raise UserError(f"{flag} {path}: {where} is a file, not a directory; choose another path")
        ok = os.access(where, os.W_OK | os.X_OK)
    if not ok:
        raise UserError(f"{flag} {path}: cannot write there ({where} is not writable); choose another path")


def emit(args: argparse.Namespace, text: str) -> None:
    if getattr(args, "out", None):
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text if text.endswith("\n") else text + "\n")
        status(args, f"wrote {args.out}")
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")


def output_format(args: argparse.Namespace) -> str:
    if args.format:
        return args.format
    suffix = Path(args.out).suffix.lower() if getattr(args, "out", None) else ""
    return {".csv": "csv", ".json": "json"}.get(suffix, "table")


def json_text(obj: Any) -> str:
    """Every command's ``--format json``: strict JSON, NaN and infinities as ``null`` (README, Output)."""
    return strict_json(obj, indent=2)


def sign_line(is_loss: bool, name: str) -> str:
    if name == "self":
        return ("positive = removing the sample raises its own loss (it is fitted only because it is trained on: "
                "look there for mislabelled samples)")
    if is_loss:
        return f"negative = harmful (removing the sample lowers {name}), positive = helpful"
    return f"negative = removing the sample lowers {name} (it pushed it up), positive = it pushed it down"


def drift_line(drift: dict[str, Any] | None, what: str = "replay drift") -> str | None:
    """One line for a replay's ``info["replay_drift"]`` (docs/replay.md), or ``None`` if it compared no checkpoint."""
    if not drift or not drift.get("checkpoints_compared"):
        return None
    return (f"{what}: at most {drift['max']:.2g} of a segment's movement (step {drift['at_step']}), over "
            f"{drift['checkpoints_compared']} checkpoints")


def flip_cell(ctx: RunContext | None, j: int) -> bool | None:
    """Whether sample ``j``'s label was flipped (JSON ``true``/``false``), ``None`` where the run does not know."""
    flipped = ctx.flipped if ctx else None
    return None if flipped is None else j in flipped


def flip_text(flipped: bool | None) -> str:
    """A :func:`flip_cell` in a text table: ``yes`` for a flipped label, blank otherwise."""
    return "yes" if flipped else ""




# ------------------------------------------------------------------------------------ parser
class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")




def once(hint: str) -> type[argparse.Action]:
    """An option's action that refuses a second occurrence (argparse would keep the last one silently: ``query -m dit
    -m tracin`` printed TracIn alone), saying ``hint``: what to do instead."""

    class Once(argparse.Action):
        def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                     option_string: str | None = None) -> None:
            earlier = getattr(namespace, self.dest, None)
            if earlier is not None and earlier != self.default:
                parser.error(f"{option_string} given twice ({earlier} and {values}): {parser.prog} takes one; {hint}")
            setattr(namespace, self.dest, values)

    return Once
