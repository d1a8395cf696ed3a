"""The layer engine of ``nn.EmbeddingBag`` (modes ``sum``, ``mean`` and ``max``; ``docs/per-sample-gradients.md``, the
table of layers).

Bag ``b``'s output is ``Σ_n c_n W[id_n]`` over its entries (``c_n`` the entry's ``per_sample_weights`` in ``sum`` mode,
``1 / |bag|`` in ``mean`` mode, 0 at ``padding_idx``), so with one bag per sample its per-sample gradient is
``(Σ_n c_n e_{id_n}) g_bᵀ``: a rank-1 matrix, projected as the outer product of ``Σ_n c_n P_r[id_n]`` and ``g_b P_c``.
The row side is the bag layer itself with ``P_r`` as its table (``F.embedding_bag`` on the same ids, offsets, weights and
mode: the same bags, the same coefficients), made in the forward hook; nothing of size ``num_embeddings`` per sample.
Rows kept whole (``P_r = I``) are the coefficients scattered at the ids (:func:`_whole_rows`), never an identity table.
In ``max`` mode column ``j`` of the output is ``W[m_j, j]`` at the row ``m_j`` where the bag's maximum is, so the
gradient is ``Σ_j g_j e_{m_j} e_jᵀ``, projected as ``Σ_j P_r[m_j] ⊗ g_j P_c[j]`` (one batched product over the columns
``j`` as tokens); ``m`` is the forward's own (the maximum's rows its autograd node keeps), an empty bag (no entry, or
only ``padding_idx``) has none. A bag count other than the batch's goes to vmap (the block is then not one row per
sample: :meth:`HookGradientCapture.collect` hands the module to vmap).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import Blocks, LayerEngine, _wide
from .projection import Outer, contract

__all__ = ["EmbeddingBagEngine"]


class EmbeddingBagEngine(LayerEngine):
    """``nn.EmbeddingBag``: ``(Σ_n c_n P_r[id_n]) ⊗ g_b P_c`` per bag (``sum``, ``mean``), ``Σ_j P_r[m_j] ⊗ g_j P_c[j]``
    (``max``; module doc)."""

    types = (nn.EmbeddingBag,)
    attrs = ("weight",)

    def __init__(self) -> None:
        self._call: tuple[Tensor | None, Tensor | None] | None = None  # one module's (attach): offsets, weights

    def supports(self, mod, attr):
        return attr == "weight" and mod.max_norm is None and not mod.scale_grad_by_freq

    def own(self, mod):
        own = EmbeddingBagEngine()  # this module's: the offsets and weights of the call in flight

        def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
            rest = list(args[1:]) + [None, None]
            own._call = (kwargs.get("offsets", rest[0]), kwargs.get("per_sample_weights", rest[1]))

        return own, [mod.register_forward_pre_hook(pre, with_kwargs=True)]

    def attach(self, mod, records, active, targets, projector, memo=None):
        own, handles = self.own(mod)
        return handles + LayerEngine.attach(own, mod, records, active, targets, projector)

    def save(self, mod, inp, targets, projector, output=None):
        offsets, weights = self._call or (None, None)
        self._call = None
        if mod.mode == "max":
            return _maxima(output)
        name = targets["weight"]
        dtype = _wide(output).dtype if output is not None else torch.float32
        p_r = projector.side_matrices(name, dtype, inp.device)[0]
        weights = None if weights is None else _wide(weights.detach()).to(dtype)
        if p_r is None:  # rows kept whole (a small table): scattered, never through an identity table
            return _whole_rows(mod, inp, offsets, weights, dtype)
        return F.embedding_bag(inp, p_r, offsets, mode=mod.mode, padding_idx=mod.padding_idx,
                               per_sample_weights=weights, include_last_offset=mod.include_last_offset)

    def blocks(self, mod, rows, g_out, targets, projector) -> Blocks:
        name = targets["weight"]
        g = _wide(g_out)
        if isinstance(rows, _Maxima):
            p_r, p_c = projector.side_matrices(name, g.dtype, g.device)
            side = (F.one_hot(rows.rows, mod.num_embeddings).to(g.dtype) if p_r is None  # (B, D, N), no (N, N)
                    else p_r[rows.rows])
            p_c = torch.eye(mod.embedding_dim, dtype=g.dtype, device=g.device) if p_c is None else p_c
            return {name: contract(side * rows.found[:, None, None], g[:, :, None] * p_c)}
        return {name: Outer(rows, projector.project_cols(name, g))}


def _whole_rows(mod: nn.EmbeddingBag, ids: Tensor, offsets: Tensor | None, weights: Tensor | None,
                dtype: torch.dtype) -> Tensor:
    """Each bag's ``Σ_n c_n e_{id_n}`` ``(B, num_embeddings)``, its coefficients scattered at its entries' ids: memory
    the rows' own plus the entries', never an identity table of ``num_embeddings²`` (the projected path's
    ``F.embedding_bag`` with ``P_r = I``: 40 GB at a 100k-row table). ``c_n`` as the layer's: the entry's weight in
    ``sum`` mode (1 without), ``1 / |bag|`` in ``mean`` mode counting the entries not at ``padding_idx``, 0 at it."""
    kept = torch.ones(ids.numel(), dtype=dtype, device=ids.device)
    if ids.dim() == 2:  # one bag a row, no offsets
        count, per = ids.shape
        bags = torch.arange(count, device=ids.device).repeat_interleave(per)
    else:
        starts = offsets[:-1] if mod.include_last_offset else offsets
        count = starts.numel()
        at = torch.arange(ids.numel(), device=ids.device)
        bags = torch.searchsorted(starts, at, right=True) - 1  # the last bag whose start is at or before the entry
        if mod.include_last_offset:
            kept = kept * (at < offsets[-1]).to(dtype)  # entries past the last offset are in no bag
    ids = ids.reshape(-1)
    if mod.padding_idx is not None:
        kept = kept * (ids != mod.padding_idx).to(dtype)
    coef = kept if weights is None else kept * weights.reshape(-1)
    rows = torch.zeros(count, mod.num_embeddings, dtype=dtype, device=ids.device)
    rows.index_put_((bags, ids), coef, accumulate=True)
    if mod.mode == "mean":
        sizes = torch.zeros(count, dtype=dtype, device=ids.device).index_add_(0, bags, kept)
        rows = rows / sizes.clamp(min=1)[:, None]  # an empty bag: zeros, as the layer's output
    return rows


class _Maxima(NamedTuple):
    """A ``max``-mode call's row of each bag's maximum, a column at a time ``(B, D)``, and which bags have one ``(B,)``."""

    rows: Tensor
    found: Tensor


def _maxima(output: Tensor) -> _Maxima:
    """The rows of the maxima the forward's autograd node keeps for its backward (PyTorch's ``max_indices``; ``bag_size``
    zero for an empty bag)."""
    node = output.grad_fn
    if type(node).__name__ != "EmbeddingBagBackward0":
        raise ValueError(f"an EmbeddingBag(mode='max') output made by {type(node).__name__}, not EmbeddingBagBackward0: "
                         "its maxima are unknown to the hook engine; exclude its weight (exclude_params) for vmap")
    return _Maxima(node._saved_result3, (node._saved_result2 > 0).to(_wide(output).dtype))
