"""Data that do not fit the model, said in one line before any sweep.

The CLI rebuilds the model and the data from the log's recipe, a ``--builder``, ``--config`` or ``--model``/``--data``;
a training set or a validation/test set that the model cannot take (another feature count, labels beyond its outputs,
another batch layout) would otherwise fail deep inside a sweep or a replay, as an "internal error". Each goes once
through the model here (one forward of a few samples, no gradient, the random state untouched), and a failure is a
:class:`~lightning_influence.cli.common.UserError` (exit code 2) naming the data and what to do.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from lightning_influence.cli.common import UserError

__all__ = ["check_query_data", "check_training_data"]

# what the model's own forward raises on data of the wrong shape, label range, layout or type
_DATA_ERRORS = (RuntimeError, IndexError, KeyError, TypeError)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0].rstrip('.') if text else ''}"


def _quietly(fn: Callable[[], Any]) -> None:
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        fn()


def check_training_data(log: Any, ctx: Any) -> None:
    """The run's per-sample loss on the first micro-batch of the log's first step, rebuilt from the training set as
    every replay rebuilds it (:func:`~lightning_influence.replay.load_step`); nothing to check where the log stores
    the inputs and the run gives no training set."""
    from lightning_influence.cli.methods import train_data_of
    from lightning_influence.queries import default_loss_fn
    from lightning_influence.replay import load_step

    if ctx.training_data_checked:
        return
    ctx.training_data_checked = True
    train = train_data_of(ctx, log)
    if train is None:
        return
    t = int(log.first_step)
    step = load_step(log, train, t)
    step = dataclasses.replace(step, micro=step.micro[:1])
    module = ctx.module
    params = {n: p.detach() for n, p in module.named_parameters()}
    try:
        _quietly(lambda: step.losses(module, ctx.loss_fn or default_loss_fn, params))
    except _DATA_ERRORS as err:
        ids = step.ids[:3]
        raise UserError(f"the run's per-sample loss fails on the training data rebuilt for step {t} (ids "
                        f"{', '.join(str(int(i)) for i in ids)}, ...): {_first_line(err)}; give the training set the "
                        "run was trained on, indexed by the ids it logged (its recipe, --builder's train_data, --config "
                        "or --data), and the model it trained (--model)") from err


def check_query_data(query: Callable[[Any], Any], module: Any) -> None:
    """The query once on the model (eval mode, as every estimator evaluates it)."""
    from lightning_influence.queries import evaluate_query

    try:
        _quietly(lambda: evaluate_query(module, query, {n: p.detach() for n, p in module.named_parameters()}))
    except _DATA_ERRORS as err:
        raise UserError(f"the query fails on the model: {_first_line(err)}; its data (the validation set of --query "
                        "val_loss, the test items of test:/pred:/margin:) must be what the model takes: the run's own "
                        "validation/test data (its recipe, --builder's val_data/test_data, --config or --data)") from err
