"""A loss evaluated at substituted parameters: ``functional_call`` of ``loss_fn(model, batch)`` with some parameters
(and buffers) overridden and the live model left as it is; what the tracker's own passes, ``vmap`` and the replays run."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn
from torch.func import functional_call
from torch.utils import _pytree as pytree

from .dtypes import dtype_mismatch
from .recompute import plain_checkpoints

__all__ = ["call_with_params"]


class _LossModule(nn.Module):
    """Lets ``functional_call`` run ``fn(m, *args)`` with overridden parameters of ``m``."""

    def __init__(self, model: nn.Module, fn: Callable[..., Tensor]):
        super().__init__()
        self.m = model
        self.fn = fn

    def forward(self, *args: Any) -> Tensor:
        with plain_checkpoints():  # a recomputation in the backward would read the live parameters (.recompute)
            return self.fn(self.m, *args)


def call_with_params(model: nn.Module, fn: Callable[..., Tensor], params: Mapping[str, Tensor] | None,
                     *args: Any, buffers: Mapping[str, Tensor] | None = None) -> Tensor:
    """``fn(model, *args)`` evaluated with ``params`` overriding (some of) the model's parameters.

    The live model is not changed: parameters are swapped only for the call and buffers
    are cloned. ``params=None`` calls ``fn`` on the model as it is. Tensors in ``args`` are moved
    to the parameters' device (a dataset gives CPU tensors, the parameters may live on a GPU).
    ``buffers`` (some of the model's, by name) are used instead of the model's, as they are: the forward's in-place
    updates (a train-mode BatchNorm's running statistics) land in them; without, copies of those ``params`` carries
    (a checkpoint's, ``step.buffers.ParamsWithBuffers``), else of the model's.
    """
    buffers = _carried(params) if buffers is None else buffers
    if params is None and buffers is None:
        return fn(model, *args)
    params = {} if params is None else params
    device = next(iter(params.values())).device if params else None
    if device is not None:
        args = pytree.tree_map(lambda x: x.to(device) if isinstance(x, Tensor) and x.device != device else x, args)
    try:
        return functional_call(_LossModule(model, fn), _override_dict(model, params, buffers), args)
    except RuntimeError as err:  # float32 data into a float64 model: said so (capture/dtypes.py)
        mismatch = dtype_mismatch(err, list(params.values()) or list(model.parameters()), args)
        if mismatch is None:
            raise
        raise mismatch from err


def _carried(params: Any) -> dict[str, Tensor] | None:
    """Copies of the buffers ``params`` carries (``step.buffers.ParamsWithBuffers``: a checkpoint's, or the module's
    before a training forward that changes them), else ``None`` (the model's own, cloned)."""
    buffers = getattr(params, "buffers", None)
    return None if buffers is None else {n: b.clone() for n, b in buffers.items()}


def _override_dict(model: nn.Module, params: Mapping[str, Tensor],
                   buffers: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """``functional_call`` dict for a :class:`_LossModule`: ``params`` plus cloned buffers (``buffers`` instead of the
    model's where given, not cloned).

    Buffers are cloned so that in-place updates (BatchNorm running stats) do not reach
    the live model.
    """
    known = {n for n, _ in model.named_parameters()}
    unknown = set(params) - known
    if unknown:
        raise KeyError(f"unknown parameter names: {sorted(unknown)}")
    out = {"m." + n: b.clone() for n, b in model.named_buffers() if buffers is None or n not in buffers}
    out.update({"m." + n: t for n, t in (buffers or {}).items()})
    out.update({"m." + n: t for n, t in params.items()})
    return out
