"""Data that do not fit the model, said in one line before any sweep: one check for the estimators and the CLI.

A training set or a query's data that the model cannot take (another feature count, another dtype, labels beyond its
outputs, another batch layout) would otherwise fail deep inside a sweep or a replay with torch's own error; a training
set or model changed since the run (a stale log) would give wrong scores without failing at all. Each goes once through
the model here (a forward of one micro-batch, no gradient, the random state untouched), and a failure is a
:class:`DataMismatchError` (a ``ValueError``) naming the data, the batch it got, what the model said, and what to do.
The estimators (:func:`check_estimator_data`) and the CLI (:mod:`lightning_influence.cli.datacheck`, with its own
advice) call these. A command that has checked its model and data once runs its estimators inside
:func:`checked_by_caller`, so that ``evaluate -m dit -m tracin`` does not send them through the model again per method.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from lightning_influence.queries import LossFn, MissingLossError, default_loss_fn

__all__ = ["DataMismatchError", "caller_checked", "check_estimator_data", "check_query_data", "check_training_data",
           "checked_by_caller", "describe_batch"]

# what the model's own forward raises on data of the wrong shape, label range, layout or type
_DATA_ERRORS = (RuntimeError, IndexError, KeyError, TypeError)

TRAIN_ADVICE = ("pass train_data= the training set the run was trained on, indexed by the ids it logged (the same "
                "WithIds(dataset)), and module= the model it trained")
QUERY_ADVICE = ("build the query from data the model takes, as its training batches were (e.g. "
                "lightning_influence.queries.mean_loss(val_batch) with the run's own validation data)")
STALE_ADVICE = ("pass the model and training data the run trained (module=, train_data=), or re-train")


class DataMismatchError(ValueError):
    """Data the model cannot take, or a model and data that do not reproduce the run: the caller's to fix."""


def describe_batch(batch: Any) -> str:
    """A batch's layout in a few words: ``(float32[16, 32], int64[16])``, ``{x: float32[4, 64], ...}``."""
    if isinstance(batch, torch.Tensor):
        return f"{str(batch.dtype).removeprefix('torch.')}{list(batch.shape)}"
    if isinstance(batch, np.ndarray):
        return f"numpy {batch.dtype}{list(batch.shape)}"
    if isinstance(batch, dict):
        return "{" + ", ".join(f"{k}: {describe_batch(v)}" for k, v in batch.items()) + "}"
    if isinstance(batch, (list, tuple)):
        return "(" + ", ".join(describe_batch(v) for v in batch) + ")"
    return type(batch).__name__


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0].rstrip('.') if text else ''}"


def _quietly(fn: Callable[[], Any]) -> Any:
    """``fn()`` without gradients, the random state left as found."""
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        return fn()


def check_training_data(log: Any, module: nn.Module, train_data: Any, loss_fn: LossFn | None = None, *,
                        advice: str = TRAIN_ADVICE, stale_advice: str = STALE_ADVICE) -> None:
    """The run's per-sample loss on the first micro-batch of the step of the log's last checkpoint before ``T`` (the
    first step where it has none), rebuilt from ``train_data`` as every replay rebuilds it
    (:func:`~lightning_influence.replay.load_step`), at that checkpoint's ``θ_t``; where the log recorded the step's
    losses they must come out again: a model or data changed since the run (a stale log) would otherwise pass TracIn
    and Gauss-Newton DIT, which replay nothing; late in training such a change shows most. With ``train_data=None``
    the log's stored inputs are used (nothing to check where it has none). ``advice``/``stale_advice``: what to do,
    in the caller's terms (the CLI names its flags)."""
    from lightning_influence.replay import checkpoint_params, load_step

    if train_data is None and not log.meta.get("inputs_stored"):
        return
    loss_fn = loss_fn or default_loss_fn
    inside = [int(c) for c in log.checkpoint_steps if log.first_step <= c < log.num_steps]
    t = max(inside) if inside else int(log.first_step)
    params = checkpoint_params(log, module, t) if t in log.checkpoint_steps else \
        {n: p.detach() for n, p in module.named_parameters()}  # the module against the log first: its own message
    step = load_step(log, train_data, t)  # a train_data that cannot give samples by id: its own message
    step = dataclasses.replace(step, micro=step.micro[:1])
    try:
        losses = _quietly(lambda: step.losses(module, loss_fn, params))
    except MissingLossError:  # no per_sample_loss and no loss_fn: pass loss_fn= (the model's, not the data's)
        raise
    except _DATA_ERRORS as err:
        ids = ", ".join(str(int(i)) for i in step.ids[:3])
        raise DataMismatchError(f"the run's per-sample loss fails on the training data rebuilt for step {t} (ids {ids}, "
                                f"...; batch {describe_batch(step.micro[0].batch)}): {_first_line(err)}; "
                                f"{advice}") from err
    if t in log.checkpoint_steps and log.recorded.get("losses"):
        _compare_losses(log, t, step.ids, losses.detach().double().cpu().numpy(), stale_advice)


# the largest difference from the logged losses taken as the same run: recomputation on another device or kernel
# differs by rounding (bf16 autocast: ~1e-2 relative); another model or data differ by far more
_LOSS_TOLERANCE = 5e-2


def _compare_losses(log: Any, t: int, ids: Any, got: np.ndarray, advice: str) -> None:
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
        raise DataMismatchError(f"the model and training data given do not reproduce the run's logged losses at step "
                                f"{t} (sample {int(np.asarray(ids)[keep][k])}: {got[keep][k]:.6g} now, "
                                f"{want[keep][k]:.6g} logged): the model's code, its hyperparameters or the data "
                                f"changed since the run (a stale log?); {advice}")


def check_query_data(query: Callable[[Any], Any], module: nn.Module, log: Any = None, *,
                     advice: str = QUERY_ADVICE) -> None:
    """The query once on the model (eval mode, as every estimator evaluates it), at the log's first checkpoint where a
    ``log`` is given (the module checked against it first: its own message), else at the module's parameters."""
    from lightning_influence.queries import evaluate_query
    from lightning_influence.replay import checkpoint_params

    params = checkpoint_params(log, module, log.checkpoint_steps[0]) if log is not None and log.checkpoint_steps \
        else {n: p.detach() for n, p in module.named_parameters()}
    try:
        _quietly(lambda: evaluate_query(module, query, params))
    except MissingLossError:  # no per_sample_loss and no loss_fn: pass loss_fn= (the model's, not the data's)
        raise
    except _DATA_ERRORS as err:
        raise DataMismatchError(f"the query fails on the model: {_first_line(err)}; {advice}") from err


# set inside checked_by_caller(): the caller has run the checks below on the model and data it passes the estimators
_CHECKED: contextvars.ContextVar[bool] = contextvars.ContextVar("lightning_influence_data_checked", default=False)


@contextlib.contextmanager
def checked_by_caller() -> Iterator[None]:
    """Within it, :func:`check_estimator_data` does nothing: the caller (a CLI command, once for all its methods) has
    checked the query and the training data it passes the estimators. Python code calling an estimator directly never
    enters it, and each estimator checks its own inputs."""
    token = _CHECKED.set(True)
    try:
        yield
    finally:
        _CHECKED.reset(token)


def caller_checked() -> bool:
    """Whether this runs inside :func:`checked_by_caller`: a context variable, which a process started from here does
    not inherit; :func:`~lightning_influence.distributed.launch` passes it to the processes it spawns."""
    return _CHECKED.get()


def check_estimator_data(log: Any, module: nn.Module | None, query: Any = None, train_data: Any = None,
                         loss_fn: LossFn | None = None, *, training: bool = True) -> None:
    """What an estimator called from Python checks before its sweep: the query (a callable of the model) and, with
    ``training`` (the estimators that replay), the training data (given, or the log's stored inputs) once through
    ``module``. Nothing inside :func:`checked_by_caller`."""
    if module is None or caller_checked():
        return
    if callable(query):
        check_query_data(query, module, log)
    if training:
        check_training_data(log, module, train_data, loss_fn)
