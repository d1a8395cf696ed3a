"""TracIn (docs/influence-math.md §5): the first-order baseline, streamed over the log.

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
from lightning_influence.log.blocks import RowBlock
from lightning_influence.log.reader import InfluenceLog
from lightning_influence.step.clipping import logged_clip_spec, step_clip_adjoint
from lightning_influence.queries import Query, query_gradients, query_names
from lightning_influence.datacheck import check_estimator_data
from lightning_influence.replay import checkpoint_params

QueryGradients = Mapping[int, np.ndarray]  # checkpoint step -> (Q, K) projected query gradients


def checkpoint_query_gradients(log: InfluenceLog, module: nn.Module, query: Query,
                               steps: list[int] | None = None) -> tuple[dict[int, np.ndarray], list[str]]:
    """Projected query gradients ``(Q, K)`` at each checkpoint (``module`` supplies the architecture)."""
    projector = log.projector()
    names = log.param_names
    out: dict[int, np.ndarray] = {}
    qnames: list[str] = []
    for t in steps if steps is not None else log.checkpoint_steps:
        params = checkpoint_params(log, module, t)  # checked against the module; where the module is (e.g. a GPU)
        grads, values = query_gradients(module, query, names, params)
        out[t] = projector.project(grads).double().cpu().numpy()
        qnames = query_names(query, len(values))
    return out, qnames


@estimator_api
def tracin(log: InfluenceLog, query: Query | QueryGradients, *, module: nn.Module | None = None, window: Any = None,
           query_names_: list[str] | None = None, progress: Callable[[int, int], None] | None = None,
           products: str = "float64") -> InfluenceScores:
    """TracIn scores of every sample id over ``window`` (see :meth:`InfluenceLog.window`).

    Args:
        log: the influence log (must hold gradients).
        query: a query callable (needs ``module``), or precomputed projected query gradients
            ``{checkpoint_step: (Q, K)}``.
        module: the model architecture (weights are taken from the log's checkpoints).
        window: the window; ``None`` is the whole run.
        query_names_: names for precomputed query gradients.
        progress: called as ``progress(done, total)`` (steps) after each block of steps.
        products: ``"float64"`` (default: each ⟨q, g⟩ to float64 rounding), or ``"float32"``: each row's
            product in float32 (a quarter of the CPU of the float64 product on float32 rows), within the
            bound of :func:`_row_products`; sums over rows and steps stay float64.
    """
    _check_products(products)
    t1, t2 = log.window(window)
    if callable(query):
        if module is None:
            raise ValueError("tracin needs `module` (the architecture) to take query gradients from the checkpoints")
        check_estimator_data(log, module, query, training=False)  # data the model cannot take: now, not later
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
    groups = _group_columns(log)
    scores = np.zeros((n_queries, log.dataset_size))  # (Q, N): each query's scores contiguous for np.add.at
    n_steps = 0
    for block, eta in _blocks(log, t1, t2, progress, breaks=ckpt_steps):
        q = qgrads[ckpt_steps[bisect.bisect_right(ckpt_steps, int(block.steps[0])) - 1]]  # one checkpoint per block
        # ⟨q, g⟩ per param group (K, Q·n_groups), so each step's η per group scales the partial dots afterwards
        dots = _row_products(block.grads, (q.T[:, :, None] * groups[:, None, :]).reshape(len(groups), -1),
                             dtype=np.dtype(products))
        vals = np.einsum("rqg,rg->rq", dots.reshape(len(dots), n_queries, -1), eta[block.row_step])
        for i, rows, G, adjoint in _clipped_steps(log, block):  # J_Cᵀ applied: that step's rows the direct way
            eta_q = adjoint(torch.from_numpy(np.ascontiguousarray((q * eta[i][log.column_groups()]).T)))
            vals[rows] = G @ eta_q.numpy()
        vals *= block.weights[:, None]
        for j in range(n_queries):
            np.add.at(scores[j], block.ids, vals[:, j])
        n_steps += len(block.steps)
    scores = np.ascontiguousarray(scores.T)
    every = int(log.meta.get("every_n_steps", 1))
    return InfluenceScores(scores, "tracin" if every == 1 else f"tracin (every {every} steps)", (t1, t2), names,
                           info={"steps_with_gradients": n_steps, "checkpoints_used": ckpt_steps, "products": products})


@estimator_api
def tracin_self_influence(log: InfluenceLog, query: None = None, *, window: Any = None,
                          progress: Callable[[int, int], None] | None = None, products: str = "float64") -> InfluenceScores:
    """TracIn self-influence ``Σ_t η_t w_{j,t} ⟨g_{j,t}, J_{C,t} g_{j,t}⟩`` of every sample, from the log alone.

    The query is each sample's own loss at the step (``q_t = g_{j,t}``, so no checkpoint and no model are
    needed): the first-order rise of its own loss if it were removed. Larger = the model fits the sample
    only because it trains on it (mislabelled samples score high: Pruthi et al. 2020); ``≥ 0`` without
    clipping. Computed over the projected rows when the log holds projected gradients. ``products``: as for
    :func:`tracin` (``"float32"``: each ‖g‖²-term within the bound of :func:`_row_products`).
    """
    _check_products(products)
    if query is not None:
        raise TypeError("tracin_self_influence() answers each sample's own loss and takes no query; pass query=None")
    t1, t2 = log.window(window)
    groups = _group_columns(log)
    scores = np.zeros((log.dataset_size, 1))
    n_steps = 0
    for block, eta in _blocks(log, t1, t2, progress):
        vals = np.einsum("rg,rg->r", _row_products(block.grads, groups, square=True, dtype=np.dtype(products)),
                         eta[block.row_step])
        for i, rows, G, adjoint in _clipped_steps(log, block):
            own = adjoint(torch.from_numpy(np.ascontiguousarray((G * eta[i][log.column_groups()]).T))).numpy()
            vals[rows] = np.einsum("bk,kb->b", G, own)  # ⟨g_j, J_Cᵀ η g_j⟩ per sample
        np.add.at(scores[:, 0], block.ids, block.weights * vals)
        n_steps += len(block.steps)
    return InfluenceScores(scores, "tracin-self", (t1, t2), ["self"],
                           info={"steps_with_gradients": n_steps, "products": products})


def _group_columns(log: InfluenceLog) -> np.ndarray:
    """``(K, n_groups)`` float64 one-hot: the param group of each gradient column."""
    columns = log.column_groups()
    return np.eye(int(columns.max()) + 1 if len(columns) else 1)[columns]


def _blocks(log: InfluenceLog, t1: int, t2: int, progress: Callable[[int, int], None] | None,
            breaks: list[int] | tuple[int, ...] = ()) -> Iterator[tuple[RowBlock, np.ndarray]]:
    """The gradient rows of ``[t1, t2)`` in blocks (:func:`~lightning_influence.log.blocks.iter_row_blocks`), with
    ``η_t`` of each param group (times ``every_n_steps``) of each step of the block ``(S, n_groups)``."""
    every = int(log.meta.get("every_n_steps", 1))
    n_groups = int(log.column_groups().max()) + 1
    for block in log.iter_blocks(t1, t2, breaks=breaks):
        yield block, block.lrs[:, :n_groups] * every
        if progress is not None:
            progress(int(block.steps[-1]) - t1 + 1, t2 - t1)


def _clipped_steps(log: InfluenceLog, block: RowBlock) -> Iterator[tuple[int, np.ndarray, np.ndarray,
                                                                        Callable[[Tensor], Tensor]]]:
    """The steps of ``block`` whose clipping bound (``J_C ≠ I``): their index in the block, their rows, the rows in
    float64 (rank order, like :meth:`InfluenceLog.iter_steps`) and ``R ↦ J_{C,t}ᵀ R``."""
    if not (log.meta.get("gradient_clipping") or {}).get("algorithm"):
        return
    for i, t in enumerate(block.steps.tolist()):
        coef = float(log.step_column(t, "clip_coef"))
        if logged_clip_spec(log, t) is None or not np.isfinite(coef) or coef >= 1.0:
            continue  # the identity (logged_clip_adjoint returns R unchanged)
        rows = np.flatnonzero(block.row_step == i)
        G = block.grads[rows].astype(np.float64)
        yield i, rows, G, step_clip_adjoint(log, t, block.weights[rows], G)


def _check_products(products: str) -> None:
    if products not in ("float64", "float32"):
        raise ValueError(f"products must be 'float64' or 'float32', got {products!r}")


def _row_products(G: np.ndarray, M: np.ndarray, square: bool = False, dtype: np.dtype = np.dtype(np.float64)
                  ) -> np.ndarray:
    """``G @ M`` (or ``(G ⊙ G) @ M`` with ``square``) for rows ``G`` of any storage dtype, as float64.

    ``dtype`` float64: the rows are widened to float64 a few at a time into a buffer that stays in the CPU cache,
    instead of widening the whole block first: the float64 products at the cost of reading the stored rows once.
    ``dtype`` float32: ``M`` (and rows stored wider) rounded to float32 and each row's sum taken in float32; with
    ``u = 2⁻²⁴`` every entry is then within ``(K + 3)·u·Σ_k |G_rk|·|M_kc|`` (``|G_rk|²`` with ``square``) of the
    float64 product (Higham, Accuracy and Stability of Numerical Algorithms, sec. 3.1: ``K·u`` for the sum, ``u`` each
    for rounding ``M``, ``G`` and the square); tests/test_blocks.py checks the bound.
    """
    Mc = M.astype(dtype, copy=False)
    if dtype == G.dtype and not square and G.flags.aligned:  # (rows read at an odd file offset are not aligned)
        return np.dot(G, Mc).astype(np.float64, copy=False)
    out = np.empty((len(G), M.shape[1]), dtype)
    chunk = max(1, (256 << 10) // max(1, dtype.itemsize * G.shape[1]))
    buf = np.empty((min(chunk, len(G)), G.shape[1]), dtype)
    for a in range(0, len(G), chunk):
        b = buf[: min(chunk, len(G) - a)]
        np.copyto(b, G[a:a + len(b)], casting="unsafe")
        if square:
            np.multiply(b, b, out=b)
        np.dot(b, Mc, out=out[a:a + len(b)])
    return out.astype(np.float64, copy=False)
