"""The layer engine of ``nn.Bilinear`` (``docs/per-sample-gradients.md``, the table of layers).

``y_k = x1ᵀ W_k x2 + b_k`` with ``W`` ``(out, in1, in2)``, whose matrix view has the ``out`` rows and the ``in1·in2``
columns of the outer product ``x1 ⊗ x2``: a sample's gradient is ``Σ_l g_l (x1_l ⊗ x2_l)ᵀ``, a Linear's on the input
``x1 ⊗ x2``. Its column side ``(x1 ⊗ x2) P_c`` is made without the outer product: ``x1 (P_c as in1 × in2·k_cols)``,
then each of its ``in2`` slices weighted by ``x2`` and summed (``B · L · in1 · in2 · k_cols`` multiply-adds, no
``in1 · in2`` values a token); then the Linear engine's product. The bias is ``Σ_l g_l``, projected apart (not folded).
The forward's second input comes from a pre-hook (the default hooks see the first).
"""

from __future__ import annotations

from torch import nn

from .layers import Blocks, SecondInputEngine, _linear_blocks, _tokens

__all__ = ["BilinearEngine"]


class BilinearEngine(SecondInputEngine):
    """``nn.Bilinear``: a Linear on ``x1 ⊗ x2``, its column side factored (module doc)."""

    types = (nn.Bilinear,)
    second_kwarg = "input2"

    def save(self, mod, inp, targets, projector, output=None):
        second = self.second()
        if "weight" not in targets:
            return None
        x1, x2 = _tokens(inp.detach()), _tokens(second.detach())  # (B, L, in1), (B, L, in2)
        name = targets["weight"]
        p_c = projector.side_matrices(name, x1.dtype, x1.device)[1]
        if p_c is None:  # columns kept whole (small): the outer product itself
            return (x1[:, :, :, None] * x2[:, :, None, :]).flatten(2)
        k_cols = p_c.shape[1]
        left = (x1 @ p_c.reshape(x1.shape[2], -1)).reshape(*x1.shape[:2], x2.shape[2], k_cols)
        return (left * x2[:, :, :, None]).sum(2)  # (B, L, k_cols)

    def blocks(self, mod, cols, g_out, targets, projector) -> Blocks:
        return _linear_blocks(projector, targets.get("weight"), targets.get("bias"), _tokens(g_out), cols)
