"""Queries: the scalar functions ``f(θ)`` whose change influence scores explain (docs/influence-math.md §1).

A query is any callable ``f(module) -> Tensor`` returning a scalar or a vector of ``Q``
scalars (several queries answered in one sweep). The helpers below build the common ones
on top of the module's per-sample loss; none of them knows about Lightning.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_influence.capture import call_with_params
from lightning_influence.step.buffers import buffers_of, cloned

Query = Callable[[nn.Module], torch.Tensor]
LossFn = Callable[[nn.Module, Any], torch.Tensor]


class MissingLossError(TypeError):
    """The module has no ``per_sample_loss`` and no ``loss_fn`` was given: the caller's to pass one (not a data error)."""


def default_loss_fn(module: nn.Module, batch: Any) -> torch.Tensor:
    """The module's ``per_sample_loss(batch)`` (the tracker's default per-sample loss)."""
    loss = getattr(module, "per_sample_loss", None)
    if loss is None:
        raise MissingLossError(f"{type(module).__name__} has no per_sample_loss(batch): pass loss_fn=, the per-sample loss the "
                               "run was tracked with (InfluenceTracker(loss_fn=...)), to the estimator or to the query "
                               "helper (mean_loss, sample_losses): one is enough")
    return loss(batch)


class Batches(list):
    """Batches one query covers together where they cannot be concatenated into one (a validation set whose
    batches are each padded to their own longest sequence): the per-sample losses are computed batch by batch and
    concatenated."""


def joined_batches(batches: list[Any]) -> Any:
    """The batches as one (concatenated along the first dimension), or as :class:`Batches` where their shapes differ
    beyond it (each padded to its own longest sequence)."""
    from lightning_influence.recipe import concat_batches

    try:
        return concat_batches(batches)
    except RuntimeError:
        return Batches(batches)


def _query_batch(batch: Any) -> Any:
    """``batch``; a DataLoader given in its place (the validation loader): all of its batches, in its order."""
    return joined_batches(list(batch)) if isinstance(batch, DataLoader) else batch


def _losses(loss_fn: LossFn, module: nn.Module, batch: Any) -> torch.Tensor:
    """``loss_fn(module, batch)``; of :class:`Batches`, every batch's losses in order."""
    if isinstance(batch, Batches):
        return torch.cat([loss_fn(module, b).reshape(-1) for b in batch])
    return loss_fn(module, batch)


class _Query:
    """A query built by the helpers below: a module-level class, so that it pickles (``ddp_spawn`` processes,
    ``replay_loo(processes=N)``, ``distributed.sweep``: docs/scaling.md); ``query_names`` names its outputs."""

    query_names: list[str]


class _MeanLoss(_Query):
    def __init__(self, batch: Any, loss_fn: LossFn, name: str) -> None:
        self.batch, self.loss_fn, self.query_names = batch, loss_fn, [name]

    def __call__(self, module: nn.Module) -> torch.Tensor:
        return _losses(self.loss_fn, module, self.batch).mean()


class _SampleLosses(_Query):
    def __init__(self, batch: Any, loss_fn: LossFn, names: Sequence[str] | None) -> None:
        self.batch, self.loss_fn = batch, loss_fn
        if names is not None:
            self.query_names = list(names)

    def __call__(self, module: nn.Module) -> torch.Tensor:
        return _losses(self.loss_fn, module, self.batch)


class _Prediction(_Query):
    def __init__(self, inputs: torch.Tensor, target_class: int, margin: bool, name: str | None) -> None:
        self.inputs, self.target_class, self.margin = inputs, target_class, margin
        self.query_names = [name or f"{'margin' if margin else 'logit'}[{target_class}]"]

    def __call__(self, module: nn.Module) -> torch.Tensor:
        logits = module(self.inputs).reshape(-1)
        c = self.target_class
        if not 0 <= c < len(logits):  # a negative class would index from the end
            raise ValueError(f"class {c} is not among the model's {len(logits)} outputs (classes 0.."
                             f"{len(logits) - 1})")
        if not self.margin:
            return logits[c]
        others = torch.cat([logits[:c], logits[c + 1 :]])
        return logits[c] - others.max()


class _EvalMode(_Query):
    def __init__(self, query: Query) -> None:
        self.query = query
        if hasattr(query, "query_names"):
            self.query_names = list(query.query_names)  # type: ignore[attr-defined]

    def __call__(self, module: nn.Module) -> torch.Tensor:
        with evaluation_mode(module):
            return self.query(module)


def mean_loss(batch: Any, loss_fn: LossFn = default_loss_fn, name: str = "mean_loss") -> Query:
    """Mean per-sample loss over ``batch`` (e.g. the whole validation set; :class:`Batches` or a DataLoader: over all
    of their batches): one query."""
    return _MeanLoss(_query_batch(batch), loss_fn, name)


def sample_losses(batch: Any, loss_fn: LossFn = default_loss_fn, names: Sequence[str] | None = None) -> Query:
    """The loss of each sample of ``batch`` (or of :class:`Batches`, or of a DataLoader's batches in its order): ``B``
    queries swept together."""
    return _SampleLosses(_query_batch(batch), loss_fn, names)


def prediction(inputs: torch.Tensor, target_class: int, margin: bool = False, name: str | None = None) -> Query:
    """Logit of ``target_class`` for ``inputs`` (one input, batch dim 1), or its margin over the best other class."""
    return _Prediction(inputs, target_class, margin, name)


def eval_mode(query: Query) -> Query:
    """``query`` evaluated in :func:`evaluation_mode` wherever it is called.

    The estimators and the ground truth already evaluate every query that way (:func:`evaluate_query`);
    wrap a query to get the same value when calling it yourself on a module in train mode.
    """
    return _EvalMode(query)


def shared_loss(module: nn.Module | None, query: Any, loss_fn: LossFn) -> tuple[LossFn, Any]:
    """The training loss and the query of an estimator, the per-sample loss given once: to the estimator or to the
    query helper (:func:`mean_loss`, :func:`sample_losses`, under :func:`eval_mode` too). Where the module has no
    ``per_sample_loss``, the one left at :func:`default_loss_fn` takes the other's; a loss given to both is kept in
    both, and a module with ``per_sample_loss`` keeps it as the default of both."""
    if module is None or hasattr(module, "per_sample_loss"):
        return loss_fn, query
    own = _loss_of(query)
    if loss_fn is default_loss_fn and own is not None and own is not default_loss_fn:
        return own, query
    if loss_fn is not default_loss_fn and own is default_loss_fn:
        return loss_fn, _with_loss(query, loss_fn)
    return loss_fn, query


def _loss_of(query: Any) -> LossFn | None:
    """The per-sample loss a helper-built query evaluates (``None`` for any other query)."""
    if isinstance(query, _EvalMode):
        return _loss_of(query.query)
    return query.loss_fn if isinstance(query, (_MeanLoss, _SampleLosses)) else None


def _with_loss(query: Any, loss_fn: LossFn) -> Any:
    """A copy of a helper-built query evaluating ``loss_fn`` (the caller's query unchanged)."""
    out = copy.copy(query)
    if isinstance(out, _EvalMode):
        out.query = _with_loss(out.query, loss_fn)
    else:
        out.loss_fn = loss_fn
    return out


def query_names(query: Query, n: int) -> list[str]:
    """Names of the ``n`` outputs of a query (``query_names`` attribute, else ``q0, q1, ...``)."""
    names = getattr(query, "query_names", None)
    if names is not None and len(names) == n:
        return list(names)
    return ["query"] if n == 1 else [f"q{i}" for i in range(n)]


def query_column(names: Sequence[str], query: int | str) -> int:
    """The column of ``query``, a name or an index, among a result's query columns ``names``: every result's per-query
    accessor takes either. An unknown name is refused naming the queries there are."""
    if isinstance(query, str):
        if query not in names:
            raise ValueError(f"no query named {query!r}: the queries are {list(names)}")
        return list(names).index(query)
    return int(query)


@contextlib.contextmanager
def evaluation_mode(module: nn.Module, norms: bool = False) -> Iterator[None]:
    """Evaluate a query as Lightning validates: dropout and other train-only randomness off (``eval()``), attention
    through the path its gradients take (:class:`_FastPathOff`).

    A query is a function of θ (docs/influence-math.md §1); evaluated in train mode, dropout would draw new masks at
    each call and every score, and the ground truth, would be noise. ``norms``: the running statistics of the
    step are known (a checkpoint's or a replayed step's, ``step.buffers``), so normalisation layers with
    running statistics are put in eval mode too, as Lightning's validation runs them; otherwise they keep
    their mode (a log without stored statistics: a rebuilt module's own would be its initial ones). Every
    module's mode is restored.
    """
    modes = [(m, m.training) for m in module.modules()]
    for m, _ in modes:
        if norms or not isinstance(m, nn.modules.batchnorm._NormBase):
            m.training = False
    _FAST_PATH.enter()
    try:
        yield
    finally:
        _FAST_PATH.exit()
        for m, training in modes:
            m.training = training


class _FastPathOff:
    """``torch.backends.mha`` fast path off while any thread is inside :func:`evaluation_mode` (a process-wide flag: the
    first entry clears it, the last exit restores it). In eval mode without gradients ``nn.TransformerEncoder(Layer)``
    and ``nn.MultiheadAttention`` take a fused path whose outputs at ``src_key_padding_mask``'s padded positions are
    zeros (nested tensors), where the path gradients go through computes values: a query reading them (a mean over
    every position) had values of another function than its gradients (2.48 apart at a padded position), so DIT,
    TracIn and the ground truth disagreed by construction. Off, every query evaluation is the one function its
    gradients are of (``tests/test_module_variants.py``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._saved = True

    def enter(self) -> None:
        with self._lock:
            if self._depth == 0:
                self._saved = torch.backends.mha.get_fastpath_enabled()
                torch.backends.mha.set_fastpath_enabled(False)
            self._depth += 1

    def exit(self) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                torch.backends.mha.set_fastpath_enabled(self._saved)


_FAST_PATH = _FastPathOff()


def evaluate_query(module: nn.Module, query: Query, params: Mapping[str, torch.Tensor] | None = None,
                   buffers: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """``query(module)`` at ``params`` (:func:`call_with_params`) in :func:`evaluation_mode`, with ``buffers``
    (default: those ``params`` carries, ``step.buffers.ParamsWithBuffers``; else the module's own), never changed."""
    buffers = buffers_of(params) if buffers is None else buffers
    with evaluation_mode(module, norms=buffers is not None):
        return call_with_params(module, query, params, buffers=cloned(buffers))


def query_gradients(module: nn.Module, query: Query, names: Sequence[str],
                    params: Mapping[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Gradients ``∇f_q`` of every query output w.r.t. the named parameters of ``module``.

    Returns ``({name: (Q, *shape)}, values (Q,))``. ``params`` evaluates at other parameter
    values without touching ``module`` (``torch.func.functional_call``), with the buffers it carries
    (a checkpoint's BatchNorm running statistics, ``step.buffers``).
    """
    live = dict(module.named_parameters())
    leaves = {n: (params[n] if params is not None and n in params else live[n]).detach().clone().requires_grad_(True)
              for n in live}
    out = evaluate_query(module, query, leaves, buffers_of(params))
    _check_query_value(out)
    values = out.reshape(-1)
    grads: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for q in range(len(values)):
        g = torch.autograd.grad(values[q], [leaves[n] for n in names], retain_graph=q + 1 < len(values), allow_unused=True)
        for n, gi in zip(names, g):
            grads[n].append(torch.zeros_like(leaves[n]) if gi is None else gi)
    stacked = {n: torch.stack(v) for n, v in grads.items()}
    if not all(bool(torch.isfinite(g).all()) for g in stacked.values()):
        raise ValueError("the query's gradient is not finite (NaN or inf) at these parameters: every score would be NaN")
    return stacked, values.detach()


def _check_query_value(out: Any) -> None:
    """A query's value: a tensor (scalar or ``(Q,)``) that depends on the parameters and is finite."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the query returned a {type(out).__name__}; a query is f(module) -> a tensor (scalar or (Q,)) "
                        "computed from the module's outputs")
    if not out.requires_grad:
        raise ValueError("the query does not depend on the model's parameters (its value is detached or computed under "
                         "torch.no_grad()): compute it from module(...) with gradients enabled")
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"the query's value is not finite ({out.detach().reshape(-1)[:4].tolist()}) at these "
                         "parameters: every score would be NaN")
