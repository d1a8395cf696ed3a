"""One calling convention for every estimator: ``f(log, query, *, module=None, train_data=None, window=None, ...)``.

:func:`estimator_api` guards the convention: a call in an earlier positional form
(``dit(log, module, train_data, query)``, ``tracin(log, query, module)``) fails with a
``TypeError`` that shows the keyword form, instead of binding a model to ``query``.
:func:`positional_limit` is the same guard for other public functions whose optional arguments are keyword-only
(``replay_loo(log, module, train_data, query, *, sample_ids=..., ...)``, ``pbrf``, ``linear_pbrf`` and
``gap_decomposition`` with ``samples=...``). An estimator that takes ``loss_fn`` shares it
with a helper-built query (:func:`~lightning_influence.queries.shared_loss`): given to either, it serves both.
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import Any, Callable, Mapping, TypeVar

import numpy as np
from torch import nn

from lightning_influence.queries import default_loss_fn, shared_loss

F = TypeVar("F", bound=Callable[..., Any])


def estimator_api(fn: F) -> F:
    """Wrap ``fn(log, query, *, ...)`` so that extra positional arguments or a model passed as the query fail clearly."""
    name = fn.__name__
    takes_loss = "loss_fn" in inspect.signature(fn).parameters
    where = "grid" if name == "timeline" else "window"
    usage = f"{name}(log, query, *, module=..., train_data=..., {where}=..., ...)"

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _check_positional(name, args, 2, "the log and the query", usage,
                          "the model, the training data and the window are keyword arguments")
        query = args[1] if len(args) == 2 else kwargs.get("query")
        if isinstance(query, nn.Module):
            raise TypeError(f"{name}(): the second argument is the query, got the model {type(query).__name__}; "
                            f"call {usage}")
        if query is not None and not callable(query) and not _query_gradients(query):  # a batch where its query belongs
            raise TypeError(f"{name}(): the query is a function of the model, f(module) -> Tensor, got a "
                            f"{type(query).__name__}; for a batch's mean loss pass "
                            "lightning_influence.queries.mean_loss(batch) (or sample_losses, prediction)")
        check_log_and_module(name, args[0] if args else kwargs.get("log"), kwargs.get("module"))
        if takes_loss and kwargs.get("module") is not None:  # loss_fn= given once: to the estimator or the query
            kwargs["loss_fn"], shared = shared_loss(kwargs["module"], query, kwargs.get("loss_fn", default_loss_fn))
            if shared is not query:
                args, kwargs = (args[:1] + (shared,), kwargs) if len(args) == 2 else (args, {**kwargs, "query": shared})
        return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def positional_limit(limit: int, firsts: str, usage: str) -> Callable[[F], F]:
    """Wrap ``fn`` whose first ``limit`` parameters (``firsts``, in words) are its only positional ones, so that a call
    in an earlier form, with optional arguments by position, fails with a ``TypeError`` showing ``usage``."""

    def wrap(fn: F) -> F:
        names = list(inspect.signature(fn).parameters)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            _check_positional(fn.__name__, args, limit, firsts, usage, "the others are keyword arguments")
            given = {**dict(zip(names, args)), **kwargs}
            check_log_and_module(fn.__name__, given.get("log"), given.get("module"))
            return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return wrap


def check_log_and_module(name: str, log: Any, module: Any) -> None:
    """Refuse, naming what to pass, a log given as its path and a model given as its class (or anything not an
    ``nn.Module``): both failed deep inside with an ``AttributeError``/``TypeError`` about ``self`` or ``window``."""
    if isinstance(log, (str, os.PathLike)):
        raise TypeError(f"{name}(): the first argument is the opened log, got the path {str(log)!r}; pass "
                        f"lightning_influence.InfluenceLog({str(log)!r})")
    if module is not None and not isinstance(module, nn.Module):
        what = f"the class {module.__name__}" if isinstance(module, type) else f"a {type(module).__name__}"
        build = f"{module.__name__}(...)" if isinstance(module, type) else "the model"
        raise TypeError(f"{name}(): module= is the model (an instance: its architecture; the weights come from the "
                        f"log), got {what}; pass {build} built as for training")


def _check_positional(name: str, args: tuple[Any, ...], limit: int, firsts: str, usage: str, rest: str) -> None:
    if len(args) > limit:
        raise TypeError(f"{name}() takes {firsts} as its only positional arguments, got {len(args)}; call {usage} "
                        f"({rest})")


def _query_gradients(query: Any) -> bool:
    """``query`` is precomputed query gradients by checkpoint step (``tracin``'s and ``dit_gauss_newton``'s
    ``Mapping[int, ndarray]``, what ``distributed.run`` passes), not a batch (a dict batch has string keys)."""
    return isinstance(query, Mapping) and len(query) > 0 and all(isinstance(k, (int, np.integer)) for k in query)
