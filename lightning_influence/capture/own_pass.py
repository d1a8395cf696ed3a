"""The tracker's own passes: per-sample losses, gradients and HVP products it computes itself.

When ``training_step`` does not route its loss through ``per_sample_loss`` (or a gradient
step is not captured by the hooks), the tracker evaluates a micro-batch again: under the
micro-batch's random state and autocast (:meth:`~lightning_influence.step.micro.MicroBatch.context`),
on parameter copies, every generator left as found, so training never notices. Also here:
which engine computes whose per-sample gradients (hooks for the layers
:mod:`~lightning_influence.capture.layers` covers, ``vmap`` or the step's dropout masks for the
rest), and the observer of ``per_sample_loss`` inside ``training_step`` that gets losses and
gradients from the step's own backward. Pure torch: no Lightning imports.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from lightning_influence.capture.hvp import KINK_GUARD, fd_directional_derivative, norm_of_norms
from lightning_influence.capture.per_sample import (HookGradientCapture, call_with_params, hooks_paused,
                                                    per_sample_grads, per_sample_grads_vmap)
from lightning_influence.capture.projection import KroneckerProjector
from lightning_influence.capture.raw_params import raw_candidates
from lightning_influence.step.buffers import with_buffers
from lightning_influence.step.micro import MicroBatch, per_sample_grads_masked
from lightning_influence.step.precision import FULL, Precision

__all__ = ["OwnPasses", "LossObserver", "choose_engine"]

LossFn = Callable[[nn.Module, Any], Tensor]


def choose_engine(module: nn.Module, names: Sequence[str], projector: KroneckerProjector,
                  gradient_engine: str) -> tuple[HookGradientCapture | None, list[str], str]:
    """``(hook capture or None, names no hook covers, engine name)`` for ``gradient_engine`` (auto, hooks, vmap).

    Raises:
        ValueError: ``gradient_engine='hooks'`` with tracked parameters no hook covers.
    """
    no_layer = HookGradientCapture.unsupported(module, list(names))
    raw = raw_candidates(module, no_layer)  # used by the model itself: the raw-parameter engine (capture/raw_params.py)
    unsupported = [n for n in no_layer if n not in raw]
    if gradient_engine == "hooks" and unsupported:
        raise ValueError(f"gradient_engine='hooks': no hook captures {unsupported[:5]} (hooks cover Linear, Bilinear, "
                         "Conv1d/2d/3d, ConvTranspose1d/2d/3d, RNN/GRU/LSTM and their cells, Embedding, EmbeddingBag, "
                         "LayerNorm, GroupNorm, RMSNorm, BatchNorm, InstanceNorm, PReLU and MultiheadAttention "
                         "parameters, the originals of their parametrizations (but attention's and recurrent layers'), "
                         "and parameters a model adds, multiplies or expands to the batch itself). "
                         "Use gradient_engine='auto' (vmap for just those) or exclude them with exclude_params")
    hooked = [] if gradient_engine == "vmap" else [n for n in names if n not in unsupported]
    rest = [n for n in names if n not in hooked]
    engine = "mixed" if hooked and rest else "hooks" if hooked else "vmap"
    capture = HookGradientCapture(module, hooked, projector, raw=[n for n in raw if n in hooked]) if hooked else None
    return capture, rest, engine


class LossObserver:
    """Replaces ``module.per_sample_loss`` by a wrapper that keeps, while :attr:`capturing`, what
    ``training_step`` computed with it and (``grads``) the gradient its backward sent into it (losses and
    hook-captured gradients for free; without ``grads`` no tensor hook runs in the step's backward)."""

    def __init__(self, module: nn.Module, grads: bool = True) -> None:
        self.original: Callable[..., Any] = module.per_sample_loss
        self.module = module
        self.capturing = False
        self.losses: list[Tensor] = []  # per_sample_loss outputs inside training_step
        self.grads: list[Tensor] = []  # the gradients the step's backward sent into them
        observer = self

        def per_sample_loss(batch: Any, *args: Any, **kwargs: Any) -> Tensor:
            out = observer.original(batch, *args, **kwargs)
            if observer.capturing and isinstance(out, Tensor) and torch.is_grad_enabled():
                observer.losses.append(out)
                if grads and out.requires_grad:
                    out.register_hook(lambda g: observer.grads.append(g.detach()))
            return out

        module.per_sample_loss = per_sample_loss

    def clear(self) -> None:
        self.losses, self.grads = [], []

    def remove(self) -> None:
        """Drop the instance attribute: the class method shows again."""
        del self.module.per_sample_loss


class OwnPasses:
    """Per-sample losses, (projected) gradients and HVP products of a micro-batch from the tracker's own passes.

    ``capture``: the hook capture of the parameters hooks cover (``None``: ``vmap`` for all); ``precision``:
    the run's autocast, under which every own pass runs, each with its micro-batch's random state.
    """

    def __init__(self, loss: LossFn, names: Sequence[str], projector: KroneckerProjector,
                 capture: HookGradientCapture | None, precision: Precision, hvp_eps: float, hvp_scheme: str) -> None:
        self.loss, self.names, self.projector, self.capture = loss, list(names), projector, capture
        self.precision, self.hvp_eps, self.hvp_scheme = precision, hvp_eps, hvp_scheme
        self.workspace: dict[str, Tensor] = {}  # the perturbed parameters of the HVP passes, reused step after step

    def replaying(self, micro: MicroBatch) -> Any:
        """The micro-batch's random state and autocast, for an own pass (every generator is left as found)."""
        return micro.context(self.precision)

    def grads(self, module: nn.Module, micro: MicroBatch, params: Mapping[str, Tensor] | None) -> tuple[Tensor, Tensor]:
        """Per-sample (projected) gradients and losses of one micro-batch from an own pass at ``params``."""
        params = with_buffers(params, micro.buffers)
        if not micro.drew:
            with self.replaying(micro):
                return per_sample_grads(module, self.loss, micro.batch, self.names, self.projector, self.capture, params)
        hooked = [] if self.capture is None else self.capture.param_names
        rest = [n for n in self.names if n not in hooked]
        with self.replaying(micro):
            if hooked:
                grads, losses = per_sample_grads(module, self.loss, micro.batch, hooked, self.projector, self.capture,
                                                 params)
            else:
                with torch.no_grad():
                    losses = call_with_params(module, self.loss, params, micro.batch).detach()
                grads = None
        if rest:
            masked = self.rest_grads(module, micro, rest, params)
            grads = masked if grads is None else grads + masked
        return grads, losses

    def rest_grads(self, module: nn.Module, micro: MicroBatch, names: list[str],
                   params: Mapping[str, Tensor] | None) -> Tensor:
        """Projected per-sample gradients of ``names`` no hook covers: ``vmap`` over samples, or, when the forward
        drew random numbers (dropout), one batched forward with the step's masks (``per_sample_grads_masked``)."""
        params = with_buffers(params, micro.buffers)
        # its passes must not feed the hooks (nor run the layer engines under vmap)
        with hooks_paused(self.capture):
            if micro.drew:
                return per_sample_grads_masked(module, self.loss, micro, self.precision, names, params, self.projector)
            with self.replaying(micro):
                return per_sample_grads_vmap(module, self.loss, micro.batch, names, self.projector, params=params)

    def losses(self, module: nn.Module, micro: MicroBatch) -> Tensor:
        with self.replaying(micro), torch.no_grad():
            return self.loss(module, micro.batch).detach()

    def hvp_products(self, module: nn.Module, micro: Sequence[MicroBatch], at: Tensor,
                     direction: dict[str, Tensor], norms: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``H_{z,t} Ĝ_t`` for every sample of the step, by finite differences along ``Ĝ_t``, and ``ε`` (on the device).

        ``at``: the step's own ``g_z(θ_t)`` of all its samples (the forward base, the central kink guard); ``norms``:
        the stacked norms of ``direction``'s tensors, if known (``‖Ĝ_t‖`` without another read of the gradient).
        """
        theta = {n: p.detach() for n, p in module.named_parameters() if n in direction}
        # under autocast the rounding of the half-precision gradients (~u/ε) would swamp the difference: the passes run
        # on float32 parameters without autocast, the unrounded function (as the offline products, estimators/fd.py),
        # and take their own base g_z(θ_t) instead of the step's rounded one
        unrounded = self.precision.autocast_dtype is not None and all(p.dtype == torch.float32 for p in theta.values())
        trained = self.precision

        def grads_at(params: dict[str, Tensor]) -> Tensor:
            rows = [self.grads(module, m, params)[0] for m in micro]
            return rows[0] if len(rows) == 1 else torch.cat(rows)

        memo = None if self.capture is None else self.capture.inputs
        if memo is not None:  # from now on the captured steps keep their batch's column sides for these passes
            memo.keep = memo.reuse = True
        try:
            self.precision = FULL if unrounded else trained
            hvps, eps = fd_directional_derivative(grads_at, theta, {n: g.detach() for n, g in direction.items()},
                                                  self.hvp_eps, self.hvp_scheme, None if unrounded else at,
                                                  KINK_GUARD if self.hvp_scheme == "central" else None,
                                                  direction_norm=None if norms is None else norm_of_norms(norms),
                                                  workspace=self.workspace)
        finally:
            self.precision = trained
            if memo is not None:
                memo.reuse = False
        return hvps.detach(), eps
