"""Batched vector-Jacobian products: one backward for many cotangents, with a fallback where a backward has no
batching rule. Shared by the per-sample backward passes (:mod:`.per_sample`, :mod:`lightning_influence.step.micro`),
the raw-parameter engine (:mod:`.raw_params`: a derived tensor's gradient back to its parameters, per sample) and the
parametrized layers' engine (:mod:`.parametrized`: an effective weight's gradient back to its originals)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["batched_grad"]


def batched_grad(output: Tensor, inputs: Sequence[Tensor], cotangents: Tensor, **kw: Any) -> tuple[Tensor | None, ...]:
    """``torch.autograd.grad`` of ``output`` for each row of ``cotangents`` (``(C, *output.shape)``), stacked ``(C, ...)``.

    One vectorised backward (``is_grads_batched``) where every backward formula of the graph has a batching
    rule; else one backward per row: GroupNorm's double backward has none (torch 2.13 fails with a size
    mismatch), so DIT and Diff-In on a GroupNorm CNN take this path, nor has an LSTM's backward. The graph is retained.
    """
    try:
        return torch.autograd.grad(output, inputs, grad_outputs=cotangents, is_grads_batched=True, retain_graph=True, **kw)
    except RuntimeError:  # a backward without a batching rule; a genuine error fails again below
        rows = [torch.autograd.grad(output, inputs, grad_outputs=c, retain_graph=True, **kw) for c in cotangents]
        return tuple(None if rows[0][i] is None else torch.stack([r[i] for r in rows]) for i in range(len(inputs)))
