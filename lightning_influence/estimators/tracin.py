"""TracIn (math reference §5): the first-order baseline, streamed over the log.

    TracIn_j[t1, t2] = Σ_{t ∈ [t1, t2), j ∈ B_t} η_t w_{j,t} · ⟨q_t, J_{C,t} g_{j,t}⟩

``w_{j,t}`` is the weight the step gave the sample (:mod:`lightning_influence.step.weights`:
``1/|B_t|`` for a plain batch mean, Lightning's accumulation scaling otherwise) and ``J_{C,t}``
the Jacobian of the step's gradient clipping (identity without; :func:`~lightning_influence.step.clipping.step_clip_adjoint`),
so each term is the first-order change of the update the step actually applied.

``q_t`` is the query gradient at the latest checkpoint ``≤ t`` (exact when checkpoints are
taken every step; the TracInCP approximation otherwise), projected like the logged gradients.
With gradients recorded every ``n`` steps, each recorded step stands for ``n`` steps.
"""

from __future__ import annotations

import bisect
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from lightning_influence.estimators.scores import InfluenceScores
from lightning_influence.estimators.signature import estimator_api
from lightning_influence.log.reader import InfluenceLog, StepBatch
from lightning_influence.step.clipping import step_clip_adjoint
from lightning_influence.queries import Query, query_gradients, query_names

QueryGradients = Mapping[int, np.ndarray]  # checkpoint step -> (Q, K) projected query gradients


def checkpoint_query_gradients(log: InfluenceLog, module: nn.Module, query: Query,
                               steps: list[int] | None = None) -> tuple[dict[int, np.ndarray], list[str]]:
    """Projected query gradients ``(Q, K)`` at each checkpoint (``module`` supplies the architecture)."""
    projector = log.projector()
    names = log.param_names
    device = next(module.parameters()).device  # the query runs where the module is (e.g. a GPU)
    out: dict[int, np.ndarray] = {}
    qnames: list[str] = []
    for t in steps if steps is not None else log.checkpoint_steps:
        params = {n: torch.from_numpy(v).to(device) for n, v in log.checkpoint(t).items()}
        grads, values = query_gradients(module, query, names, params)
        out[t] = projector.project(grads).double().cpu().numpy()
        qnames = query_names(query, len(values))
    return out, qnames


@estimator_api
def tracin(log: InfluenceLog, query: Query | QueryGradients, *, module: nn.Module | None = None, window: Any = None,
           query_names_: list[str] | None = None, progress: Callable[[int, int], None] | None = None) -> InfluenceScores:
    """TracIn scores of every sample id over ``window`` (see :meth:`InfluenceLog.window`).

    Args:
        log: the influence log (must hold gradients).
        query: a query callable (needs ``module``), or precomputed projected query gradients
            ``{checkpoint_step: (Q, K)}``.
        module: the model architecture (weights are taken from the log's checkpoints).
        window: the window; ``None`` is the whole run.
        query_names_: names for precomputed query gradients.
        progress: called as ``progress(done, total)`` after each step.
    """
    t1, t2 = log.window(window)
    if callable(query):
        if module is None:
            raise ValueError("tracin needs `module` (the architecture) to take query gradients from the checkpoints")
        ckpts = [t for t in log.checkpoint_steps if t < t2]
        needed = sorted({ckpts[bisect.bisect_right(ckpts, t) - 1] for t in range(t1, t2) if bisect.bisect_right(ckpts, t)})
        qgrads, names = checkpoint_query_gradients(log, module, query, needed)
    else:
        qgrads, names = dict(query), query_names_ or []
    ckpt_steps = sorted(qgrads)
    if not ckpt_steps or ckpt_steps[0] > t1:
        raise ValueError(f"no query gradient at or before step {t1} (checkpoints: {ckpt_steps})")
    n_queries = next(iter(qgrads.values())).shape[0]
    names = names or [f"q{i}" for i in range(n_queries)]
    scores = np.zeros((log.dataset_size, n_queries))
    n_steps = 0
    for rec, G, eta, adjoint in _applied_steps(log, t1, t2, progress):
        q = qgrads[ckpt_steps[bisect.bisect_right(ckpt_steps, rec.step) - 1]]
        eta_q = adjoint(torch.from_numpy(np.ascontiguousarray((q * eta).T)))  # (K, Q): η_t per column, J_Cᵀ applied
        np.add.at(scores, rec.ids, rec.weights[:, None] * (G @ eta_q.numpy()))
        n_steps += 1
    every = int(log.meta.get("every_n_steps", 1))
    return InfluenceScores(scores, "tracin" if every == 1 else f"tracin (every {every} steps)", (t1, t2), names,
                           info={"steps_with_gradients": n_steps, "checkpoints_used": ckpt_steps})


@estimator_api
def tracin_self_influence(log: InfluenceLog, query: None = None, *, window: Any = None,
                          progress: Callable[[int, int], None] | None = None) -> InfluenceScores:
    """TracIn self-influence ``Σ_t η_t w_{j,t} ⟨g_{j,t}, J_{C,t} g_{j,t}⟩`` of every sample, from the log alone.

    The query is each sample's own loss at the step (``q_t = g_{j,t}``, so no checkpoint and no model are
    needed): the first-order rise of its own loss if it were removed. Larger = the model fits the sample
    only because it trains on it (mislabelled samples score high: Pruthi et al. 2020); ``≥ 0`` without
    clipping. Computed over the projected rows when the log holds projected gradients.
    """
    if query is not None:
        raise TypeError("tracin_self_influence() answers each sample's own loss and takes no query; pass query=None")
    t1, t2 = log.window(window)
    scores = np.zeros((log.dataset_size, 1))
    n_steps = 0
    for rec, G, eta, adjoint in _applied_steps(log, t1, t2, progress):
        own = adjoint(torch.from_numpy(np.ascontiguousarray((G * eta).T))).numpy()  # (K, B): J_Cᵀ η g_j per sample
        np.add.at(scores[:, 0], rec.ids, rec.weights * np.einsum("bk,kb->b", G, own))
        n_steps += 1
    return InfluenceScores(scores, "tracin-self", (t1, t2), ["self"], info={"steps_with_gradients": n_steps})


def _applied_steps(log: InfluenceLog, t1: int, t2: int, progress: Callable[[int, int], None] | None
                   ) -> Iterator[tuple[StepBatch, np.ndarray, np.ndarray, Callable[[Tensor], Tensor]]]:
    """Each step of ``[t1, t2)`` with gradient rows: its records, the rows in float64 ``(B, K)``, ``η_t`` of each
    column (times ``every_n_steps``) and ``R ↦ J_{C,t}ᵀ R``, the step's clipping adjoint (identity without)."""
    lr_columns = log.column_groups()
    every = int(log.meta.get("every_n_steps", 1))
    for rec in log.iter_steps(t1, t2, fields=("grad",)):
        G = rec.grads.astype(np.float64)
        adjoint = step_clip_adjoint(log, rec.step, rec.weights, G)
        yield rec, G, rec.lrs[lr_columns] * every, adjoint
        if progress is not None:
            progress(rec.step - t1 + 1, t2 - t1)
