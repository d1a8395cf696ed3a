"""``lightning-influence``: ask a finished (or crashed) run's influence log questions after the fact.

    lightning-influence info LOG
    lightning-influence query LOG --window "epoch 14:" --top 10
    lightning-influence timeline LOG --grid epochs
    lightning-influence evaluate LOG --samples top:10
    lightning-influence tensorboard LOG --logdir runs/digits/tb

(``python -m lightning_influence ...`` is the same.) Presentation only: scores come from
``lightning_influence.estimators``, patterns and metrics from ``lightning_influence.evaluation``.

**Model and data.** Weights always come from the log's checkpoints. The architecture and the
data are rebuilt from what the log recorded (classes, saved hyperparameters, the training
script's directory; for plain DataLoaders the data themselves), from ``--builder
module:function``, or from the LightningCLI YAML the run was trained with (``--config``); see
:mod:`lightning_influence.cli.context`. Methods marked "log only" in ``--help`` need none of that.

**Datamodule conventions** (all optional): the training set is ``train_dataloader().dataset``
(items ``(x, y, id)`` as made by :class:`~lightning_influence.WithIds`); the ``val_loss`` query
is the mean ``per_sample_loss`` over every batch of ``val_dataloader()``; ``test:ID`` /
``pred:ID`` index ``test_dataloader().dataset`` (``val_dataloader().dataset`` when there is no
test set). Labels shown in tables are ``datamodule.train_labels[id]`` when that attribute
exists, else the second element of the training item when it is an integer; known corrupted
samples are ``datamodule.flipped`` (ids).

**Adding a method** is one entry in :data:`lightning_influence.cli.methods.METHODS`: where the function lives, what it needs,
which records the log must hold. The function is called as ``fn(log, query=..., **kwargs)``
with the keyword arguments it accepts among ``module``, ``train_data``, ``val_data``,
``window`` and ``progress`` (plus the entry's fixed ``options``) and returns an
:class:`~lightning_influence.InfluenceScores`; an optional ``timeline`` function (same
arguments, ``grid=`` instead of ``window=``) returns an object whose ``at(step)`` gives the
cumulative scores ``(N, Q)`` at each grid step.

Errors the user can fix print one line and exit with code 2 (``--debug`` shows the traceback); under several processes
(``--devices``, torchrun) the first prints it and every one exits with 2.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import traceback
from typing import Sequence

from lightning_influence.cli import evaluate, info, query, tensorboard, timeline
from lightning_influence.cli.common import (PROG, Parser, UserError, check_writable, drift_tolerance, first_process,
                                         join_negative_windows)
from lightning_influence.cli.methods import METHODS, methods_epilog
from lightning_influence.cli.queries import parse_query
from lightning_influence.replay_drift import ReplayMismatchError

__all__ = ["METHODS", "PROG", "UserError", "build_parser", "main"]

COMMANDS = (info, query, timeline, tensorboard, evaluate)  # each module's register() adds its sub-command


def build_parser() -> argparse.ArgumentParser:
    notes = ("Model and data: weights come from the log's checkpoints; the architecture and the data are rebuilt from "
             "what the log recorded (the classes, their saved hyperparameters, the training script's directory, and "
             "for plain DataLoaders the data themselves), or from --builder MODULE:FUNCTION, or from the LightningCLI "
             "config the run was trained with (--config); --model/--data replace the recorded classes. 'log only' "
             "methods and `info` read nothing but the log.")
    parser = Parser(prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
                    description="Ask an influence log (written by InfluenceTracker) which training samples shaped "
                                "the model, and when.",
                    epilog=f"methods (--method):\n{methods_epilog()}\n\n{textwrap.fill(notes, 100)}\n\n"
                           "Errors print one line and exit with code 2; --debug shows the traceback.")
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for command in COMMANDS:
        command.register(sub, _parents())
    return parser


def _parents() -> dict[str, argparse.ArgumentParser]:
    """Argument groups shared by the sub-commands: ``common``, ``model`` (model and data), ``query``."""
    common = Parser(add_help=False)
    common.add_argument("log", metavar="LOG", help="the influence log directory (InfluenceTracker's log_dir)")
    common.add_argument("--debug", action="store_true", help="show the traceback on errors")
    common.add_argument("--quiet", "-q", action="store_true", help="no progress or status lines on stderr")
    common.add_argument("--progress", action="store_true",
                        help="progress bars also when stderr is not a terminal (a log file); default: only on a terminal")
    common.add_argument("--out", "-o", metavar="FILE", help="write the result to FILE (format from its extension)")
    common.add_argument("--format", "-f", choices=("table", "csv", "json"), help="output format (default: table)")

    model = Parser(add_help=False)
    g = model.add_argument_group("model and data (default: rebuilt from what the log recorded)")
    g.add_argument("--config", "-c", metavar="YAML", help="the LightningCLI config the run was trained with")
    g.add_argument("--model", "--model-class", dest="model_class", metavar="CLASS",
                   help="LightningModule class (module.ClassName) instead of the recorded one")
    g.add_argument("--data", "--data-class", dest="data_class", metavar="CLASS",
                   help="LightningDataModule class instead of the recorded one")
    g.add_argument("--builder", "-b", metavar="MODULE:FUNCTION",
                   help="a function (module:function or file.py:function) returning the model, (model, datamodule) or "
                        "a dict with module, datamodule, train_data, val_data, test_data, flipped, train_labels, loss_fn")
    g.add_argument("--loss-fn", metavar="MODULE:FUNCTION",
                   help="the per-sample loss, loss_fn(module, batch) -> [B], instead of the recorded one (a run trained "
                        "with InfluenceTracker(loss_fn=...) on a model without per_sample_loss)")
    g.add_argument("--replay-tolerance", type=drift_tolerance, metavar="DRIFT",
                   help="largest replay drift accepted at a checkpoint, relative to how far training moved since the "
                        "previous one (default 0.01; 0 demands a bit-identical replay); the drift is reported")
    g.add_argument("--hvp", choices=("exact", "fd"),
                   help="Hessian-vector products of the methods that use them (DIT, Diff-In): exact (the default: "
                        "forward-over-reverse through the model) or fd (finite differences of gradients, checked for "
                        "blow-ups)")

    qparent = Parser(add_help=False)
    qg = qparent.add_argument_group("query")
    qg.add_argument("--query", action="append", type=parse_query, metavar="Q",
                    help="what the scores explain (repeatable): val_loss (mean validation loss, default), test:ID (loss "
                         "of test sample ID), pred:ID[:CLASS] (logit of CLASS, default its label), margin:ID[:CLASS]")
    qg.add_argument("--sort", choices=("negative", "positive", "abs"), default=None,
                    help="order of the rows: most negative first (for a loss query: most harmful), most positive, or "
                         "largest magnitude; default: negative, and positive for self-influence (the mislabelled "
                         "candidates first)")
    return {"common": common, "model": model, "query": qparent}


def _version() -> str:
    try:
        from lightning_influence import __version__

        return __version__
    except Exception:  # pragma: no cover
        return "?"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lightning-influence``; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(join_negative_windows(list(argv) if argv is not None else sys.argv[1:]))
    except SystemExit as exit_:  # --help, --version, or a usage error (already printed, one line)
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 2
    debug = getattr(args, "debug", False)
    try:
        check_writable(getattr(args, "out", None), "--out")  # before any work: the answer must not be lost at the end
        check_writable(getattr(args, "logdir", None), "--logdir", directory=True)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # one line unless --debug
        user = isinstance(err, (UserError, ValueError, OSError, ReplayMismatchError))  # a replay mismatch: the user's data
        if user and not debug and not first_process():
            return 2  # every process runs the same command: its error is the first's, or the echo of another's failure
        if debug:
            traceback.print_exc()
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if not user:
            message = f"internal error ({type(err).__name__}: {message}); rerun with --debug and report it"
        elif not debug:
            message += " (--debug for details)" if not isinstance(err, UserError) else ""
            if any(getattr(e, "peer", False) for e in (err, err.__context__)):
                message += "; --debug prints every process's own error"
        print(f"{PROG} {args.command}: error: {message}", file=sys.stderr)
        return 2 if user else 1


if __name__ == "__main__":
    sys.exit(main())
