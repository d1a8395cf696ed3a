"""Mixed precision as Lightning ran the step: the autocast dtype and the GradScaler.

``precision="bf16-mixed"`` and ``"16-mixed"`` run ``training_step`` under
``torch.autocast(device, dtype, cache_enabled=False)``; ``"16-mixed"`` also scales the loss by
a GradScaler factor ``S_t`` before the backward pass, unscales the gradients (``× 1/S_t``,
the reciprocal taken in float64 and rounded to float32, as ``GradScaler.unscale_`` does) and
skips the optimizer step when a gradient is not finite. The log records the autocast device
and dtype once (meta ``precision``) and ``S_t`` and the skip per step; every re-evaluation of
a step runs under the same autocast, replay applies the same scaling, and skipped steps are
skipped by replay and the estimators (``docs/log-format.md``). Pure torch.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, ContextManager, Mapping

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

__all__ = ["FULL", "Precision", "unscale_"]

_AUTOCAST_DTYPES = ("bfloat16", "float16")
# the "true" precisions, whose plugin casts the module and every floating tensor of a batch to one dtype before
# training_step (Lightning's DoublePrecision / HalfPrecision ``convert_input``)
_INPUT_DTYPES = {"64-true": torch.float64, "16-true": torch.float16, "bf16-true": torch.bfloat16}


@dataclass(frozen=True)
class Precision:
    """How the training step's forward ran.

    Attributes:
        name: Lightning's precision setting (``"32-true"``, ``"bf16-mixed"``, ``"16-mixed"``, ...).
        autocast_device: ``torch.autocast`` device type (``"cpu"``, ``"cuda"``) or ``None`` (no autocast).
        autocast_dtype: ``"bfloat16"`` or ``"float16"`` (``None`` without autocast).
        grad_scaler: a GradScaler scaled the loss (its per-step factor is in the step table).
    """

    name: str = "32-true"
    autocast_device: str | None = None
    autocast_dtype: str | None = None
    grad_scaler: bool = False

    def __post_init__(self) -> None:
        if (self.autocast_device is None) != (self.autocast_dtype is None):
            raise ValueError("autocast needs both a device type and a dtype")
        if self.autocast_dtype is not None and self.autocast_dtype not in _AUTOCAST_DTYPES:
            raise ValueError(f"autocast dtype must be one of {_AUTOCAST_DTYPES}, got {self.autocast_dtype!r}")

    def autocast(self) -> ContextManager[Any]:
        """The forward's autocast context (a no-op without mixed precision)."""
        if self.autocast_device is None:
            return contextlib.nullcontext()
        return torch.autocast(self.autocast_device, dtype=getattr(torch, self.autocast_dtype), cache_enabled=False)

    @property
    def input_dtype(self) -> torch.dtype | None:
        """The dtype the precision plugin cast each batch's floating tensors to (``"64-true"``: float64), else None."""
        return _INPUT_DTYPES.get(self.name)

    def convert_input(self, batch: Any) -> Any:
        """``batch`` as the precision plugin handed it to ``training_step`` (and a validation batch to
        ``validation_step``): under ``"64-true"``/``"16-true"`` every floating tensor in :attr:`input_dtype`, the rest
        unchanged; a batch rebuilt from a float32 training set is then the one training ran (``replay.load_step``)."""
        dtype = self.input_dtype
        if dtype is None:
            return batch
        return pytree.tree_map(lambda x: x.to(dtype) if isinstance(x, Tensor) and x.is_floating_point() else x, batch)

    def to_meta(self) -> dict[str, Any]:
        return {"name": self.name, "autocast_device": self.autocast_device, "autocast_dtype": self.autocast_dtype,
                "grad_scaler": self.grad_scaler}

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any] | None) -> "Precision":
        """The precision of a log's ``meta["precision"]`` (a version-1 log: full precision)."""
        if not meta:
            return FULL
        return cls(str(meta.get("name", "32-true")), meta.get("autocast_device"), meta.get("autocast_dtype"),
                   bool(meta.get("grad_scaler", False)))


FULL = Precision()


def unscale_(grads: list[Tensor | None], scale: float) -> None:
    """Unscale gradients in place as ``GradScaler.unscale_`` does: ``g × float32(1 / float64(S))``."""
    inv = torch.tensor(1.0 / float(scale), dtype=torch.float64).float()
    for g in grads:
        if g is not None:
            g.mul_(inv.to(g.device))


def scaled(loss: Tensor, scale: float | None) -> Tensor:
    """``loss × S`` as ``GradScaler.scale`` computes it (float32 factor); ``scale=None`` or NaN: unchanged."""
    if scale is None or math.isnan(scale):
        return loss
    return loss * torch.tensor(float(scale), dtype=torch.float32, device=loss.device)
