"""The layer engine of ``nn.LayerNorm``, ``nn.GroupNorm`` and ``nn.RMSNorm`` (``docs/per-sample-gradients.md``, the
table of layers): per-sample ``sum g * x_hat`` and ``sum g`` over all but the parameter's dims, ``x_hat`` from the
statistics the forward saved for autograd where the node holds them."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import Blocks, LayerEngine, _wide

__all__ = ["NormEngine"]


class NormEngine(LayerEngine):
    """LayerNorm, GroupNorm, RMSNorm affine parameters: ``sum g * x_hat`` and ``sum g``.

    LayerNorm and GroupNorm reuse the statistics their forward saved for autograd (``mean``, ``rstd``;
    ``_normalised`` recomputes them where the node does not hold them, and always for RMSNorm), so that no
    normalisation is recomputed: a GroupNorm's per-sample sums are one fused pass of PyTorch's own GroupNorm
    backward over the batch laid out as one sample of ``B·C`` channels, a LayerNorm's ``x_hat`` is
    ``(x − mean) rstd`` (``docs/per-sample-gradients.md``, the table of layers).
    """

    types = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
    _nodes = {nn.LayerNorm: "NativeLayerNormBackward0", nn.GroupNorm: "NativeGroupNormBackward0"}

    @staticmethod
    def _normalised(mod: nn.Module, x: Tensor) -> Tensor:
        if isinstance(mod, nn.LayerNorm):
            return F.layer_norm(x, mod.normalized_shape, None, None, mod.eps)
        if isinstance(mod, nn.GroupNorm):
            return F.group_norm(x, mod.num_groups, None, None, mod.eps)
        return F.rms_norm(x, mod.normalized_shape, None, mod.eps)

    def save(self, mod, inp, targets, projector, output=None):
        """``(input, (mean, rstd) of the forward or None)``."""
        node = getattr(output, "grad_fn", None)
        stats = None
        if "weight" in targets and type(node).__name__ == self._nodes.get(type(mod)):
            mean, rstd = getattr(node, "_saved_result1", None), getattr(node, "_saved_result2", None)
            if isinstance(mean, Tensor) and isinstance(rstd, Tensor):
                stats = (mean.detach(), rstd.detach())
        return inp.detach(), stats

    def blocks(self, mod, saved, g_out, targets, projector):
        x, stats = saved
        g = _wide(g_out)
        weight, bias = targets.get("weight"), targets.get("bias")
        sums = None
        if stats is not None and isinstance(mod, nn.GroupNorm):
            sums = _group_norm_sums(mod, g, _wide(x), stats, weight is not None, bias is not None)
        elif stats is not None:
            sums = _layer_norm_sums(mod, g, _wide(x), stats, weight is not None, bias is not None)
        if sums is None:
            sums = self._recomputed_sums(mod, g, x, weight is not None, bias is not None)
        out: Blocks = {}
        if weight is not None:
            out[weight] = projector.project_tensor(weight, sums[0])
        if bias is not None:
            out[bias] = projector.project_tensor(bias, sums[1])
        return out

    def _recomputed_sums(self, mod: nn.Module, g: Tensor, x: Tensor, weight: bool, bias: bool
                         ) -> tuple[Tensor | None, Tensor | None]:
        """``(sum g * x_hat, sum g)`` with ``x_hat`` recomputed by the module's own normalisation."""
        if isinstance(mod, nn.GroupNorm):  # (B, C, *): parameters per channel
            reduce = tuple(range(2, g.ndim))
        else:  # (B, *, *normalized_shape)
            reduce = tuple(range(1, g.ndim - len(mod.normalized_shape)))
        total = (lambda t: t.sum(reduce)) if reduce else (lambda t: t)  # sum(()) would sum everything
        return (total(g * self._normalised(mod, _wide(x))) if weight else None), (total(g) if bias else None)


def _group_norm_sums(mod: nn.GroupNorm, g: Tensor, x: Tensor, stats: tuple[Tensor, Tensor], weight: bool, bias: bool
                     ) -> tuple[Tensor | None, Tensor | None] | None:
    """Per-sample ``(Σ_s g x_hat, Σ_s g)`` ``(B, C)`` of a GroupNorm: PyTorch's GroupNorm backward, whose parameter
    gradients sum over the batch, run on the batch as one sample of ``B·C`` channels in ``B·G`` groups (with the
    forward's mean and rstd), so that its sums are per sample. ``None`` if the statistics do not fit."""
    batch, channels, groups = x.shape[0], x.shape[1], mod.num_groups
    mean, rstd = stats
    if mean.numel() != batch * groups or rstd.numel() != batch * groups or x.dim() < 2:
        return None
    spatial = x[0, 0].numel()
    ones = torch.ones(batch * channels, dtype=g.dtype, device=g.device)
    _, dw, db = torch.ops.aten.native_group_norm_backward(
        g.reshape(1, batch * channels, spatial), x.reshape(1, batch * channels, spatial),
        mean.to(g.dtype).reshape(1, -1), rstd.to(g.dtype).reshape(1, -1), ones, 1, batch * channels, spatial,
        batch * groups, [False, weight, bias])
    return (dw.reshape(batch, channels) if weight else None), (db.reshape(batch, channels) if bias else None)


_NORM_CHUNK_BYTES = 1 << 19  # a chunk of samples: its x̂·g products and its rows of x and g fit in L2 together


def _layer_norm_sums(mod: nn.LayerNorm, g: Tensor, x: Tensor, stats: tuple[Tensor, Tensor], weight: bool, bias: bool
                     ) -> tuple[Tensor | None, Tensor | None] | None:
    """Per-sample ``(Σ g x_hat, Σ g)`` of a LayerNorm, ``x_hat = (x − mean) rstd`` from the forward's statistics
    (not recomputed: two passes over the input fewer). ``None`` if the statistics do not fit.

    With tokens, a few samples at a time (:data:`_NORM_CHUNK_BYTES`) into one reused buffer: each sample's ``x`` and
    ``g`` come from memory once and its products and sums are made in cache (the benchmark GPT's five LayerNorms,
    which read 4 MB each: 5.8 → 4.9 ms a step; the same numbers, each sum over the same tokens in the same order)."""
    dims = len(mod.normalized_shape)
    mean, rstd = stats
    lead = x.shape[:x.dim() - dims]
    if mean.numel() != math.prod(lead) or rstd.numel() != math.prod(lead) or len(lead) < 1:
        return None
    shape = (*lead, *([1] * dims))
    mean, rstd = mean.to(g.dtype).reshape(shape), rstd.to(g.dtype).reshape(shape)
    if len(lead) == 1:  # a row per sample: nothing to sum
        return ((x - mean).mul_(rstd).mul_(g) if weight else None), (g if bias else None)
    reduce, batch, per_sample = tuple(range(1, len(lead))), lead[0], x[0].numel()
    dtype = torch.promote_types(x.dtype, g.dtype)
    n = max(1, min(batch, _NORM_CHUNK_BYTES // (per_sample * dtype.itemsize)))
    w = torch.empty(batch, *x.shape[len(lead):], dtype=dtype, device=g.device) if weight else None
    b = g.new_empty(batch, *x.shape[len(lead):]) if bias else None
    products = torch.empty(n, *x.shape[1:], dtype=dtype, device=g.device) if weight else None
    for i in range(0, batch, n):
        j = min(batch, i + n)
        if w is not None:
            x_hat = torch.sub(x[i:j], mean[i:j], out=products[:j - i]).mul_(rstd[i:j])
            torch.sum(x_hat.mul_(g[i:j]), reduce, out=w[i:j])
        if b is not None:
            torch.sum(g[i:j], reduce, out=b[i:j])
    return w, b
