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
from typing import TYPE_CHECKING, Sequence

import numpy as np

from lightning_influence.step.shard import Share, split_range

if TYPE_CHECKING:
    from lightning_influence.log.reader import InfluenceLog

__all__ = ["ONE_PROCESS", "StepShard", "balanced_cuts", "split_range"]


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


@dataclass(frozen=True)
class StepShard(Share):
    """A :class:`~lightning_influence.step.shard.Share` that splits a sum over steps (:meth:`steps`)."""

    def steps(self, log: InfluenceLog, t1: int, t2: int) -> tuple[int, int]:
        """This process's steps of ``[t1, t2)``: about equal numbers of samples each, cut at checkpoints where that
        keeps the shares within 25% (a replay starts at the checkpoint before its first step)."""
        if self.world == 1:
            return t1, t2
        costs = [float(log.step_column(t, "sample_count")) for t in range(t1, t2)]
        return balanced_cuts(t1, t2, costs, self.world, log.checkpoint_steps)[self.rank]


ONE_PROCESS = StepShard()
