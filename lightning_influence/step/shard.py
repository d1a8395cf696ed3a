"""One process's part of a training step's batch, for a computation split over processes like DDP training.

A model sweep (the DIT adjoint, :mod:`lightning_influence.estimators.sweep`) can cut every step's
rows over ``world`` processes: each evaluates its rows with their recorded weights ``w_{i,t}``
(:mod:`.weights`; the parts' weighted losses sum exactly to the step's loss), so the step's gradient
and Hessian-vector products are the sums of the processes' parts (one all-reduce each) while the
per-sample terms stay with the process that holds the sample (docs/scaling.md, *batch split*).

A micro-batch whose forward drew random numbers (dropout) is evaluated whole by one process,
``(step + k) mod world`` for the ``k``-th micro-batch of the step: its masks were drawn for the whole
micro-batch from one generator state (:mod:`.rng`), so a part of it would draw others. Any other
micro-batch is cut into ``world`` contiguous parts of equal size (±1). Samples must not interact in
the forward: :func:`check_row_split` refuses train-mode BatchNorm. Pure torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from lightning_influence.step.modes import ModeSchedule, batchnorm_in_train

__all__ = ["BatchShard", "Share", "check_row_split", "positions", "split_range", "take_rows"]


def _same(x: Tensor) -> Tensor:
    return x


def _alone(obj: Any) -> list[Any]:
    return [obj]


def split_range(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ``[a, b)`` ranges covering ``[0, n)``, sizes differing by at most one (some empty when
    ``n < parts``)."""
    cuts = [n * p // parts for p in range(parts + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


@dataclass(frozen=True)
class Share:
    """Process ``rank`` of ``world`` and its collectives; the defaults are the whole computation in one process.

    Attributes:
        rank, world: this process and the number of processes.
        all_reduce: ``all_reduce(x)`` is the sum of ``x`` over the processes (same shape, dtype and device), the
            same on every process; every process calls it at the same points (a collective).
        all_gather: every process's object, in rank order, on every process (a collective).
    """

    rank: int = 0
    world: int = 1
    all_reduce: Callable[[Tensor], Tensor] = _same
    all_gather: Callable[[Any], list[Any]] = _alone

    def part(self, n: int) -> tuple[int, int]:
        """This process's contiguous block of ``n`` units (:func:`split_range`)."""
        return split_range(n, self.world)[self.rank]

    def sum(self, x: np.ndarray) -> np.ndarray:
        """The float64 sum of ``x`` over the processes."""
        if self.world == 1:
            return x
        return self.all_reduce(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))).cpu().numpy()

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj`` in rank order."""
        return self.all_gather(obj)


@dataclass(frozen=True)
class BatchShard(Share):
    """A :class:`Share` that splits each step's rows (:meth:`rows`)."""

    def rows(self, step: int, sizes: Sequence[int], drew: Sequence[bool]) -> list[slice]:
        """This process's rows of each micro-batch of step ``step`` (``sizes`` rows each; ``drew``: its forward drew
        random numbers, so it goes whole to process ``(step + k) mod world``)."""
        out = []
        for k, (n, d) in enumerate(zip(sizes, drew)):
            if d:
                out.append(slice(0, n) if (step + k) % self.world == self.rank else slice(0, 0))
            else:
                out.append(slice(*self.part(n)))
        return out


def positions(sizes: Sequence[int], rows: Sequence[slice]) -> np.ndarray:
    """The positions in the step (micro-batches concatenated) of the ``rows`` of each micro-batch."""
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) if len(sizes) else []
    parts = [np.arange(o + s.start, o + s.stop, dtype=np.int64) for o, s in zip(offsets, rows)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def take_rows(batch: Any, rows: slice, n: int) -> Any:
    """Rows ``rows`` of a stored batch of ``n`` samples: every tensor whose first dimension is ``n`` is sliced, other
    leaves (scalars, per-batch constants) are kept."""
    return pytree.tree_map(lambda x: x[rows] if isinstance(x, Tensor) and x.dim() and x.shape[0] == n else x, batch)


def check_row_split(module: nn.Module, meta: Mapping[str, Any] | None = None) -> None:
    """Refuse to cut a batch whose samples interact in the forward: train-mode BatchNorm normalises by the statistics of
    the rows evaluated together, so a part of the batch would see others (split by query column instead). With the
    log's ``meta`` recording the modes training ran (``eval_modules``, :mod:`.modes`), the steps run with those (a
    frozen BatchNorm of a fresh module splits), else with the module's own."""
    trained = None if meta is None or ModeSchedule.from_meta(meta) is None else set(batchnorm_in_train(module, meta))
    for name, mod in module.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and (mod.training if trained is None else name in trained):
            raise ValueError(f"BatchNorm layer '{name}' is in train mode: its statistics mix the samples of a batch, so a "
                             "step's rows cannot be split over processes. Split the query's outputs over the processes instead "
                             "(split='columns')")

