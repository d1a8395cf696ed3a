"""The layer engine of ``nn.ConvTranspose1d/2d/3d`` (``docs/per-sample-gradients.md``, the table of layers).

A transposed convolution ``y = conv_Wᵀ(x)`` is the adjoint of the convolution ``conv_W`` (weight ``(in, out/groups,
*kernel)``: ``out`` channels to ``in``, the same stride, padding, dilation and groups), so ``⟨g, y⟩ = ⟨conv_W(g), x⟩``
and its weight gradient is that convolution's, with the input and the output gradient in swapped roles:
``G_b = Σ_l x_{b,l} unfold(g_b)_lᵀ`` per group (rows: the ``in`` channels, columns: ``out/groups · kernel``, the
order of the weight's matrix view). The column side ``unfold(g) P_c`` is the convolution of the output gradient with
``P_c`` as its kernel (:func:`.layers.conv_columns`, never the unfolded tensor), cropped to ``x``'s positions (an
``output_padding`` of at least the stride, allowed with a dilation, gives more); the product with the input is the
convolution engine's (:func:`.layers._conv_block`). Its bias (``out``,) is ``Σ_l g_l``, projected on its own (its
rows are not the weight's: never folded).
"""

from __future__ import annotations

from torch import nn

from .layers import Blocks, LayerEngine, _conv_block, _own_precision, _wide, conv_columns

__all__ = ["ConvTransposeEngine"]


class ConvTransposeEngine(LayerEngine):
    """``nn.ConvTranspose1d/2d/3d``: the forward keeps the input (the row side), the gradient hook makes the columns
    from the output gradient and their product (module doc)."""

    types = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

    def save(self, mod, inp, targets, projector, output=None):
        return inp.detach() if "weight" in targets else None

    def blocks(self, mod, x, g_out, targets, projector) -> Blocks:
        g = _wide(g_out)
        out: Blocks = {}
        if x is not None and "weight" in targets:
            name, batch = targets["weight"], g.shape[0]
            spec = projector.spec(name)
            with _own_precision(g):
                cols = conv_columns(g, projector, name, mod.out_channels // mod.groups, mod.kernel_size, mod.stride,
                                    mod.padding, mod.dilation, mod.groups, size=x.shape[2:])
            p_r = projector.side_matrices(name, g.dtype, g.device)[0]
            out[name] = _conv_block(_wide(x).flatten(2), cols, p_r, spec.rows, spec.k_cols).reshape(batch, -1)
        if "bias" in targets:
            out[targets["bias"]] = projector.project_tensor(targets["bias"], g.flatten(2).sum(2))
        return out
