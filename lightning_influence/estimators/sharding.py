"""One process's share of an estimator whose result is a sum over training steps (docs/scaling.md, *step split*).

Diff-In self-influence sums terms of steps that can be computed apart: each process takes one contiguous range
of the steps (:meth:`StepShard.steps`, cut at checkpoints where possible so that no two processes replay the same
steps), computes its partial result with the single-process code, and the partial results are combined with the
two collectives of :class:`StepShard` (a float64 sum and an all-gather). Pure numpy/torch: the Fabric processes and
their collectives come from :mod:`lightning_influence.distributed`, which builds one :class:`StepShard` per process;
:data:`ONE_PROCESS` is the whole computation in this process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from lightning_influence.log.reader import InfluenceLog

__all__ = ["ONE_PROCESS", "StepShard", "balanced_cuts", "split_range"]


def split_range(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ``[a, b)`` ranges covering ``[0, n)``, sizes differing by at most one (some empty when
    ``n < parts``)."""
    cuts = [n * p // parts for p in range(parts + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def balanced_cuts(t1: int, t2: int, costs: Sequence[float], parts: int, anchors: Sequence[int]
                  ) -> list[tuple[int, int]]:
    """``parts`` contiguous step ranges covering ``[t1, t2)`` with about equal sums of ``costs`` (one per step).

    Each cut is moved to the nearest of ``anchors`` (segment starts, checkpoints) when that keeps the ranges within
    25% of the ideal size. Some ranges are empty when the window has fewer steps than ``parts``.
    """
    cost = np.maximum(np.asarray(costs, dtype=float), 1e-9)  # steps without cost still count a little: contiguous
    cum = np.concatenate([[0.0], np.cumsum(cost)])
    starts = np.array([s for s in anchors if t1 < s < t2], dtype=np.int64)
    cuts = [t1]
    for p in range(1, parts):
        ideal = float(np.searchsorted(cum, cum[-1] * p / parts)) + t1
        cut = int(round(ideal))
        if len(starts):
            near = int(starts[np.argmin(np.abs(starts - ideal))])
            if abs(cum[near - t1] - cum[-1] * p / parts) <= 0.25 * cum[-1] / parts:
                cut = near
        cuts.append(min(max(cut, cuts[-1]), t2))
    cuts.append(t2)
    return list(zip(cuts[:-1], cuts[1:]))


def _same(x: Tensor) -> Tensor:
    return x


def _alone(obj: Any) -> list[Any]:
    return [obj]


@dataclass(frozen=True)
class StepShard:
    """Process ``rank`` of ``world`` and its collectives.

    Attributes:
        rank, world: this process and the number of processes.
        all_reduce: the sum of a tensor over the processes (the same on every process; a collective).
        all_gather: every process's object, in rank order, on every process (a collective).
    """

    rank: int = 0
    world: int = 1
    all_reduce: Callable[[Tensor], Tensor] = _same
    all_gather: Callable[[Any], list[Any]] = _alone

    def part(self, n: int) -> tuple[int, int]:
        """This process's contiguous block of ``n`` units (:func:`split_range`)."""
        return split_range(n, self.world)[self.rank]

    def steps(self, log: InfluenceLog, t1: int, t2: int) -> tuple[int, int]:
        """This process's steps of ``[t1, t2)``: about equal numbers of samples each, cut at checkpoints where that
        keeps the shares within 25% (a replay starts at the checkpoint before its first step)."""
        if self.world == 1:
            return t1, t2
        costs = [float(log.step_column(t, "sample_count")) for t in range(t1, t2)]
        return balanced_cuts(t1, t2, costs, self.world, log.checkpoint_steps)[self.rank]

    def sum(self, x: np.ndarray) -> np.ndarray:
        """The float64 sum of ``x`` over the processes."""
        if self.world == 1:
            return x
        return self.all_reduce(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))).cpu().numpy()

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj`` in rank order."""
        return self.all_gather(obj)


ONE_PROCESS = StepShard()
