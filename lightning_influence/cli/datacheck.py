"""Data that do not fit the model, said in one line before any sweep (the CLI's side of
:mod:`lightning_influence.datacheck`).

The CLI rebuilds the model and the data from the log's recipe, a ``--builder``, ``--config`` or ``--model``/``--data``;
the checks of :mod:`lightning_influence.datacheck` (the same the estimators run when called from Python) send each once
through the model, and a failure is a :class:`~lightning_influence.cli.common.UserError` (exit code 2) naming the data
and what to do in the CLI's terms.
"""

from __future__ import annotations

from typing import Any, Callable

from lightning_influence import datacheck
from lightning_influence.cli.common import UserError

__all__ = ["check_query_data", "check_training_data"]

_TRAIN_ADVICE = ("give the training set the run was trained on, indexed by the ids it logged (its recipe, --builder's "
                 "train_data, --config or --data), and the model it trained (--model)")
_STALE_ADVICE = "pass the model and data the run trained (--model, --builder, --config), or re-train"
_QUERY_ADVICE = ("its data (the validation set of --query val_loss, the test items of test:/pred:/margin:) must be what "
                 "the model takes: the run's own validation/test data (its recipe, --builder's val_data/test_data, "
                 "--config or --data)")


def check_training_data(log: Any, ctx: Any, required: bool = True) -> None:
    """:func:`lightning_influence.datacheck.check_training_data` on the run's rebuilt model and training set, once per
    command (the estimators it runs skip theirs: :func:`~lightning_influence.datacheck.checked_by_caller`). Where the
    run gives no training set, the log's stored inputs; with ``required=False`` (a method that reads no training data)
    nothing where it has neither."""
    from lightning_influence.cli.methods import train_data_of

    if ctx.training_data_checked:
        return
    ctx.training_data_checked = True
    try:
        train = train_data_of(ctx, log)
    except UserError:
        if required:
            raise
        return
    try:
        datacheck.check_training_data(log, ctx.module, train, ctx.loss_fn, advice=_TRAIN_ADVICE,
                                      stale_advice=_STALE_ADVICE)
    except datacheck.DataMismatchError as err:
        raise UserError(str(err)) from err


def check_query_data(query: Callable[[Any], Any], module: Any) -> None:
    """:func:`lightning_influence.datacheck.check_query_data`, its failure a one-line error."""
    try:
        datacheck.check_query_data(query, module, advice=_QUERY_ADVICE)
    except datacheck.DataMismatchError as err:
        raise UserError(str(err)) from err
