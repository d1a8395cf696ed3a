"""The processes of a DDP fit agree on which tensors the hook engine hands to vmap (docs/per-sample-gradients.md).

A demotion is a process's own finding: the first step's check against autograd runs on that process's first sample, the
shape check on its batch. One process may demote a tensor another keeps on the hooks (a loss that mixes the samples of
only some batches): that process's rows would then come from another engine than meta.h5 (written by rank 0) says,
and the other's hooked rows may be wrong at a later step. At the fit's first step with gradients every process takes
the union (one ``all_gather`` of a flag per tensor, once per fit), so every process uses one engine per tensor.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from lightning_influence.capture import HookGradientCapture, KroneckerProjector

__all__ = ["agree_on_demotions", "refill_columns"]


def agree_on_demotions(strategy: Any, capture: HookGradientCapture, names: Sequence[str]) -> list[str]:
    """Demote in ``capture`` every tensor of ``names`` some process of ``strategy`` demoted; returns those demoted
    here now (with a folded weight's bias). A collective: every process calls it at the same step."""
    flags = torch.tensor([n in capture.demoted for n in names], dtype=torch.int32, device=strategy.root_device)
    union = strategy.all_gather(flags).reshape(-1, len(names)).amax(0).tolist()
    others = {n for n, f in zip(names, union) if f and n in capture.param_names}
    if not others:
        return []
    before = list(capture.param_names)
    capture.demote(others, "another process's hooked per-sample gradients differed from autograd or had no batch "
                   "dimension (every process computes a tensor with the same engine)")
    return [n for n in before if n not in capture.param_names]


def refill_columns(micro_batches: Sequence[Any], names: Sequence[str], projector: KroneckerProjector,
                   rest_grads: Callable[[Any], torch.Tensor]) -> None:
    """The columns of ``names`` in each micro-batch's rows (``.grads``, in place) from ``rest_grads(micro_batch)``
    (the other engine: full-width rows, zeros outside ``names``'s blocks) instead of the hooks."""
    blocks = [projector.slices[b] for b in dict.fromkeys(projector.block_of[n] for n in names)]
    for micro in micro_batches:
        if micro.grads is None:
            continue
        for cols in blocks:
            micro.grads[:, cols] = 0
        micro.grads += rest_grads(micro)
