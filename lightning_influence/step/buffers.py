"""The module's buffers at a step: BatchNorm running statistics and any other state a forward changes in place.

A checkpoint stores them with ``θ_t`` (``docs/log-format.md``, ``checkpoints/*/buffers``): a train-mode BatchNorm
updates its running mean and variance at every training forward, and whatever later runs in eval mode (a query on
``model.eval()``) normalises by them. :class:`ParamsWithBuffers` is ``θ_t`` (a ``{name: tensor}`` dict, as
everywhere) that also carries those buffers, so a query at ``θ_t`` (:func:`lightning_influence.queries.query_gradients`)
uses the statistics of step ``t`` and not the module's own; replay carries them from step to step as training did.
Pure torch.
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor, nn

__all__ = ["ParamsWithBuffers", "buffers_of", "changed_buffers", "cloned", "persistent_buffers", "run_buffers",
           "trainable_copies", "with_buffers"]


def persistent_buffers(module: nn.Module) -> dict[str, Tensor]:
    """The buffers of ``module`` its ``state_dict`` holds, by name (non-persistent ones are derived, not state)."""
    skip = {f"{prefix}.{b}" if prefix else b for prefix, m in module.named_modules() for b in m._non_persistent_buffers_set}
    return {n: b for n, b in module.named_buffers() if n not in skip}


class ParamsWithBuffers(dict):
    """``θ_t`` as ``{name: tensor}`` with the module's buffers at step ``t`` (``buffers``; ``None``: not known, the
    module's own are used)."""

    def __init__(self, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor] | None) -> None:
        super().__init__(params)
        self.buffers = None if buffers is None else dict(buffers)


def buffers_of(params: Any) -> dict[str, Tensor] | None:
    """The buffers ``params`` carries (:class:`ParamsWithBuffers`), else ``None``."""
    return getattr(params, "buffers", None)


def cloned(buffers: Mapping[str, Tensor] | None) -> dict[str, Tensor] | None:
    """Copies of ``buffers`` (``None`` stays ``None``): a forward's in-place updates do not reach the originals."""
    return None if buffers is None else {n: b.detach().clone() for n, b in buffers.items()}


def with_buffers(params: Mapping[str, Tensor] | None, buffers: Mapping[str, Tensor] | None) -> Any:
    """``params`` (``None``: the module's own) carrying ``buffers``; ``params`` as it is without them."""
    return params if buffers is None else ParamsWithBuffers(params or {}, buffers)


def changed_buffers(module: nn.Module, before: Mapping[str, Any], after: Mapping[str, Any],
                    statistics: bool = False) -> list[str]:
    """The buffers that differ between ``before`` and ``after`` (two snapshots around a training forward, or two
    checkpoints), BatchNorm's left out unless ``statistics``: its running statistics change in a train-mode forward
    without entering it. What is left is state the forward reads and writes itself (``spectral_norm``'s ``_u``, ``_v``)."""
    norms = set() if statistics else {f"{prefix}.{b}" if prefix else b for prefix, m in module.named_modules()
                                      if isinstance(m, nn.modules.batchnorm._BatchNorm) for b in m._buffers}
    return [n for n, b in before.items()
            if n not in norms and n in after and not (b.shape == after[n].shape and bool((b == after[n]).all()))]


def run_buffers(log: Any, module: nn.Module, statistics: bool = False) -> list[str]:
    """The buffers a run's forwards changed (:func:`changed_buffers` of the log's first and last checkpoints; none for a
    log whose checkpoints store no buffers)."""
    steps = log.checkpoint_steps
    first, last = (log.checkpoint_buffers(steps[0]), log.checkpoint_buffers(steps[-1])) if len(steps) > 1 else (None, None)
    return [] if first is None or last is None else changed_buffers(module, first, last, statistics)


def trainable_copies(module: nn.Module, clone: bool = True) -> dict[str, Tensor]:
    """The module's trainable parameters by name, detached (``clone``: copies a later in-place change does not reach)."""
    return {n: (p.detach().clone() if clone else p.detach()) for n, p in module.named_parameters() if p.requires_grad}
