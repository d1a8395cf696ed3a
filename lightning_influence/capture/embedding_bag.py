"""The layer engine of ``nn.EmbeddingBag`` (modes ``sum`` and ``mean``; ``docs/per-sample-gradients.md``, the table
of layers).

Bag ``b``'s output is ``Σ_n c_n W[id_n]`` over its entries (``c_n`` the entry's ``per_sample_weights`` in ``sum`` mode,
``1 / |bag|`` in ``mean`` mode, 0 at ``padding_idx``), so with one bag per sample its per-sample gradient is
``(Σ_n c_n e_{id_n}) g_bᵀ``: a rank-1 matrix, projected as the outer product of ``Σ_n c_n P_r[id_n]`` and ``g_b P_c``.
The row side is the bag layer itself with ``P_r`` as its table (``F.embedding_bag`` on the same ids, offsets, weights and
mode: the same bags, the same coefficients), made in the forward hook; nothing of size ``num_embeddings`` per sample.
``max`` mode (a different row per output column) goes to vmap; so does a bag count other than the batch's (the block
is then not one row per sample: :meth:`HookGradientCapture.collect` hands the module to vmap).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import Blocks, LayerEngine, _wide
from .projection import Outer

__all__ = ["EmbeddingBagEngine"]


class EmbeddingBagEngine(LayerEngine):
    """``nn.EmbeddingBag`` (``sum``, ``mean``): ``(Σ_n c_n P_r[id_n]) ⊗ g_b P_c`` per bag (module doc)."""

    types = (nn.EmbeddingBag,)
    attrs = ("weight",)

    def __init__(self) -> None:
        self._call: tuple[Tensor | None, Tensor | None] | None = None  # one module's (attach): offsets, weights

    def supports(self, mod, attr):
        return attr == "weight" and mod.mode in ("sum", "mean") and mod.max_norm is None and not mod.scale_grad_by_freq

    def attach(self, mod, records, active, targets, projector, memo=None):
        own = EmbeddingBagEngine()  # this module's: the offsets and weights of the call in flight

        def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
            rest = list(args[1:]) + [None, None]
            own._call = (kwargs.get("offsets", rest[0]), kwargs.get("per_sample_weights", rest[1]))

        return [mod.register_forward_pre_hook(pre, with_kwargs=True),
                *LayerEngine.attach(own, mod, records, active, targets, projector)]

    def save(self, mod, inp, targets, projector, output=None):
        offsets, weights = self._call or (None, None)
        self._call = None
        name = targets["weight"]
        dtype = _wide(output).dtype if output is not None else torch.float32
        p_r = projector.side_matrices(name, dtype, inp.device)[0]
        if p_r is None:  # rows kept whole (a small table)
            p_r = torch.eye(mod.num_embeddings, dtype=dtype, device=inp.device)
        return F.embedding_bag(inp, p_r, offsets, mode=mod.mode, padding_idx=mod.padding_idx,
                               per_sample_weights=None if weights is None else _wide(weights.detach()).to(dtype),
                               include_last_offset=mod.include_last_offset)

    def blocks(self, mod, rows, g_out, targets, projector) -> Blocks:
        name = targets["weight"]
        return {name: Outer(rows, projector.project_cols(name, _wide(g_out)))}
