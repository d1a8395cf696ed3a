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


def _quietly(fn: Callable[[], Any]) -> Any:
    """``fn()`` without gradients, the random state left as found."""
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        return fn()


def check_training_data(log: Any, ctx: Any, required: bool = True) -> None:
    """The run's per-sample loss on the first micro-batch of the step of the log's last checkpoint before ``T`` (the
    first step where it has none), rebuilt from the training set as every replay rebuilds it
    (:func:`~lightning_influence.replay.load_step`), at that checkpoint's ``θ_t``; where the log recorded the step's
    losses they must come out again: a model or data changed since the run (a stale log) would otherwise pass
    TracIn and Gauss-Newton DIT, which replay nothing; late in training such a change shows most. Nothing to check where
    the log stores the inputs and the run gives no training set; with ``required=False`` (a method that reads no
    training data) nor where the run gives none."""
    from lightning_influence.cli.methods import train_data_of
    from lightning_influence.queries import default_loss_fn
    from lightning_influence.replay import checkpoint_params, load_step

    if ctx.training_data_checked:
        return
    ctx.training_data_checked = True
    try:
        train = train_data_of(ctx, log)
    except UserError:
        if required:
            raise
        return
    if train is None:
        return
    inside = [int(c) for c in log.checkpoint_steps if log.first_step <= c < log.num_steps]
    t = max(inside) if inside else int(log.first_step)
    step = load_step(log, train, t)
    step = dataclasses.replace(step, micro=step.micro[:1])
    module = ctx.module
    params = checkpoint_params(log, module, t) if t in log.checkpoint_steps else \
        {n: p.detach() for n, p in module.named_parameters()}
    try:
        losses = _quietly(lambda: step.losses(module, ctx.loss_fn or default_loss_fn, params))
    except _DATA_ERRORS as err:
        ids = step.ids[:3]
        raise UserError(f"the run's per-sample loss fails on the training data rebuilt for step {t} (ids "
                        f"{', '.join(str(int(i)) for i in ids)}, ...): {_first_line(err)}; give the training set the "
                        "run was trained on, indexed by the ids it logged (its recipe, --builder's train_data, --config "
                        "or --data), and the model it trained (--model)") from err
    if t in log.checkpoint_steps and log.recorded.get("losses"):
        _compare_losses(log, t, step.ids, losses.detach().double().cpu().numpy())


# the largest difference from the logged losses taken as the same run: recomputation on another device or kernel
# differs by rounding (bf16 autocast: ~1e-2 relative); another model or data differ by far more
_LOSS_TOLERANCE = 5e-2


def _compare_losses(log: Any, t: int, ids: Any, got: Any) -> None:
    import numpy as np

    rec = next(log.iter_steps(t, t + 1, fields=("loss",)), None)
    if rec is None or rec.losses is None or rec.step != t:
        return
    logged = dict(zip(rec.ids.tolist(), rec.losses.astype(np.float64).tolist()))
    want = np.array([logged.get(int(i), np.nan) for i in ids])
    keep = np.isfinite(want) & np.isfinite(got)
    if not keep.any():
        return
    gap = np.abs(got[keep] - want[keep]) / (1.0 + np.abs(want[keep]))
    if gap.max() > _LOSS_TOLERANCE:
        k = int(np.argmax(gap))
        raise UserError(f"the model and training data rebuilt do not reproduce the run's logged losses at step {t} "
                        f"(sample {int(np.asarray(ids)[keep][k])}: {got[keep][k]:.6g} now, {want[keep][k]:.6g} logged): "
                        "the model's code, its hyperparameters or the data changed since the run (a stale log?); "
                        "pass the model and data the run trained (--model, --builder, --config), or re-train")


def check_query_data(query: Callable[[Any], Any], module: Any) -> None:
    """The query once on the model (eval mode, as every estimator evaluates it)."""
    from lightning_influence.queries import evaluate_query

    try:
        _quietly(lambda: evaluate_query(module, query, {n: p.detach() for n, p in module.named_parameters()}))
    except _DATA_ERRORS as err:
        raise UserError(f"the query fails on the model: {_first_line(err)}; its data (the validation set of --query "
                        "val_loss, the test items of test:/pred:/margin:) must be what the model takes: the run's own "
                        "validation/test data (its recipe, --builder's val_data/test_data, --config or --data)") from err
