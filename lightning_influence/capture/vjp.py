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


_UNBATCHED: set[frozenset[str]] = set()
"""Graphs (the node types a backward reaches) whose vectorised backward failed in this process: not tried again."""


def batched_grad(output: Tensor, inputs: Sequence[Tensor], cotangents: Tensor, **kw: Any) -> tuple[Tensor | None, ...]:
    """``torch.autograd.grad`` of ``output`` for each row of ``cotangents`` (``(C, *output.shape)``), stacked ``(C, ...)``.

    One vectorised backward (``is_grads_batched``) where every backward formula of the graph has a batching
    rule; else one backward per row: GroupNorm's double backward has none (torch 2.13 fails with a size
    mismatch), so DIT and Diff-In on a GroupNorm CNN take this path, nor has an LSTM's backward. A graph of node types
    that failed once goes straight to the rows (the failed attempt cost Diff-In's self-influence on a GroupNorm CNN
    about a third of its time, at every call). The graph is retained.
    """
    graph = _node_types(output) if _UNBATCHED else None  # (looked at only once a failure was seen)
    if graph is None or graph not in _UNBATCHED:
        try:
            return torch.autograd.grad(output, inputs, grad_outputs=cotangents, is_grads_batched=True,
                                       retain_graph=True, **kw)
        except RuntimeError:  # a backward without a batching rule; a genuine error fails again below
            _UNBATCHED.add(_node_types(output) if graph is None else graph)
    rows = [torch.autograd.grad(output, inputs, grad_outputs=c, retain_graph=True, **kw) for c in cotangents]
    return tuple(None if rows[0][i] is None else torch.stack([r[i] for r in rows]) for i in range(len(inputs)))


def _node_types(output: Tensor) -> frozenset[str]:
    """The types of the backward nodes ``output``'s graph reaches (what decides whether each has a batching rule)."""
    seen, types, stack = set(), set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        types.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return frozenset(types)
