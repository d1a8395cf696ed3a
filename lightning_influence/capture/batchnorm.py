"""The layer engine of ``nn.BatchNorm1d/2d/3d``'s and ``nn.InstanceNorm1d/2d/3d``'s affine parameters
(``docs/per-sample-gradients.md``).

Its weight's gradient is ``Σ g ⊙ x̂`` and its bias's ``Σ g`` over the batch and every position of a channel; each
sample's row sums over its own positions only. ``x̂`` is normalised by the statistics the forward used: the batch's
(biased variance) in train mode or without running statistics, else the running ones, read in the forward hook (a
train-mode forward updates them right after using the batch's). In eval mode (a frozen BatchNorm) that is each
sample's exact gradient. In train mode (``allow_train_batchnorm=True``) a sample's output depends on the whole batch,
and every engine's row is then the same decomposition of the batch gradient: the output gradient ``g_b`` of the
sample's own row, which carries what the batch statistics pass on from the other samples' losses, times the
sample's own input; the rows still add up to the batch gradient. An InstanceNorm normalises each sample and channel by
its own statistics (over the positions) where it uses the input's (train mode, or without running statistics), else
by the running ones: each sample's exact gradient either way.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .layers import Blocks, LayerEngine, _wide
from .projection import KroneckerProjector

__all__ = ["BatchNormEngine"]


class BatchNormEngine(LayerEngine):
    """``nn.BatchNorm1d/2d/3d``, ``nn.InstanceNorm1d/2d/3d(affine=True)``: ``(Σ g ⊙ x̂, Σ g)`` per sample and channel."""

    types = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)

    def save(self, mod, inp, targets, projector, output=None):
        """``x̂`` (``None`` without a tracked weight), by the statistics this forward normalised with."""
        if "weight" not in targets:
            return None
        x = _wide(inp.detach())
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if isinstance(mod, nn.modules.instancenorm._InstanceNorm) and (mod.training or mod.running_mean is None):
            var, mean = torch.var_mean(x, list(range(2, x.dim())), correction=0, keepdim=True)  # per sample and channel
            return (x - mean).mul_((var + mod.eps).rsqrt())
        if mod.training or mod.running_mean is None:
            var, mean = torch.var_mean(x, [0, *range(2, x.dim())], correction=0)
        else:
            mean, var = mod.running_mean.to(x.dtype), mod.running_var.to(x.dtype)
        return (x - mean.reshape(shape)).mul_((var + mod.eps).rsqrt().reshape(shape))

    def blocks(self, mod: nn.Module, x_hat: Tensor | None, g_out: Tensor, targets, projector: KroneckerProjector
               ) -> Blocks:
        g = _wide(g_out)
        reduce = tuple(range(2, g.dim()))
        total = (lambda t: t.sum(reduce)) if reduce else (lambda t: t)  # (B, C): nothing to sum
        out: Blocks = {}
        if x_hat is not None:
            out[targets["weight"]] = projector.project_tensor(targets["weight"], total(g * x_hat))
        if "bias" in targets:
            out[targets["bias"]] = projector.project_tensor(targets["bias"], total(g))
        return out
