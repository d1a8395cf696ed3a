"""The layer engine of ``nn.PReLU`` (``docs/per-sample-gradients.md``, the table of layers).

``y = max(0, x) + a · min(0, x)`` with ``a`` one weight or one per channel (dimension 1), so a sample's weight
gradient is ``Σ g ⊙ min(0, x)`` over its positions (and its channels, for a single weight); PyTorch's own backward
gives ``x · g`` where ``x ≤ 0``, the same numbers (``min(0, 0) = 0``). The forward keeps the input, which autograd
keeps anyway.
"""

from __future__ import annotations

from torch import nn

from .layers import Blocks, LayerEngine, _wide

__all__ = ["PReLUEngine"]


class PReLUEngine(LayerEngine):
    """``nn.PReLU``: ``Σ g ⊙ min(0, x)`` per sample (and channel)."""

    types = (nn.PReLU,)
    attrs = ("weight",)

    def blocks(self, mod, x, g_out, targets, projector) -> Blocks:
        g = _wide(g_out)
        products = g * _wide(x).clamp(max=0)
        if mod.num_parameters == 1:
            sums = products.reshape(g.shape[0], 1, -1).sum(2)
        else:
            sums = products.flatten(2).sum(2) if products.dim() > 2 else products  # (B, C): nothing to sum
        name = targets["weight"]
        return {name: projector.project_tensor(name, sums)}
