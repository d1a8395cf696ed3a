"""Per-sample loss weights of a step, as Lightning applied them (docs/influence-math.md §3, *The step as Lightning
runs it*).

With automatic optimization Lightning divides the loss ``training_step`` returns for every
micro-batch by ``accumulate_grad_batches``, also for the micro-batches of an incomplete last
accumulation of an epoch, and sums the micro-batch gradients; DDP averages over ranks. For a
training loss that is the mean of per-sample losses the gradient the step applied is therefore::

    ĝ_t = Σ_{i ∈ B_t} w_{i,t} g_{i,t},    w_{i,t} = 1 / (A · |m(i)| · world_size)

with ``A`` the divisor and ``|m(i)|`` the size of the micro-batch that holds ``i``: an incomplete
accumulation of one micro-batch of size ``b`` has ``w = 1/(A b)``, not ``1/b``. The tracker
records ``w_{i,t}`` per row (and the micro-batch of every row, and ``A`` per step); replay, the
estimators and the ground truth read them here, so one description serves all of them.
Removing sample ``j`` sets ``w_{j,t} = 0`` and keeps the others (docs/influence-math.md §2).

Derivation, refusals and measurements: ``docs/step-semantics.md``. Pure numpy/torch: no Lightning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["LossReductionError", "StepWeights", "check_reduction", "lightning_weights", "step_summary", "step_weights"]

REDUCTION_RTOL = 1e-4
"""Relative agreement required between the loss ``training_step`` returned and the mean of the per-sample losses."""


class LossReductionError(ValueError):
    """The training loss is not the mean of the per-sample losses (a sum, a weighted mean, an extra term)."""


@dataclass(frozen=True)
class StepWeights:
    """The per-sample weights of one optimizer step.

    Attributes:
        weights: ``(|B_t|,)`` float64 ``w_{i,t}``, in the order of the step's ids.
        micro: ``(|B_t|,)`` int64 micro-batch of every row (contiguous runs ``0, 1, ...``).
        accumulate: the divisor Lightning applied to each micro-batch loss (``-1``: not recorded,
            a version-1 log whose step is one batch mean).
        world_size: the DDP processes whose gradients were averaged (their micro-batches are all in ``micro``).
    """

    weights: np.ndarray
    micro: np.ndarray
    accumulate: int = -1
    world_size: int = 1

    def micro_slices(self) -> Iterator[slice]:
        """The rows of each micro-batch, in training order."""
        if not len(self.micro):
            return
        cuts = np.flatnonzero(np.diff(self.micro)) + 1
        bounds = [0, *cuts.tolist(), len(self.micro)]
        for a, b in zip(bounds[:-1], bounds[1:]):
            yield slice(a, b)

    def micro_loss(self, losses: Tensor, rows: slice, multipliers: Tensor | None = None) -> Tensor:
        """The loss Lightning back-propagated for the micro-batch ``rows``, given its per-sample ``losses``.

        As trained (``multipliers=None``) this is the very expression Lightning evaluated,
        ``losses.mean() / A``, so a replay is bit-identical (under DDP also divided by the world
        size, the all-reduce's average); with per-sample ``multipliers`` (1 = as trained, 0 =
        removed) it is ``Σ m_i w_i ℓ_i``.
        """
        if multipliers is None:
            loss = losses.mean()
            loss = loss / self.accumulate if self.accumulate > 0 else loss
            return loss / self.world_size if self.world_size > 1 else loss
        w = torch.as_tensor(self.weights[rows], dtype=losses.dtype, device=losses.device)
        return (multipliers.to(losses) * w * losses).sum()

    def tensor(self, like: Tensor) -> Tensor:
        """``w_{i,t}`` as a tensor of ``like``'s dtype and device."""
        return torch.as_tensor(self.weights, dtype=like.dtype, device=like.device)


def lightning_weights(micro_sizes: Sequence[int], accumulate: int, world_size: int = 1) -> StepWeights:
    """The weights Lightning applies to a step made of micro-batches of ``micro_sizes`` (mean losses)."""
    sizes = [int(b) for b in micro_sizes]
    if any(b <= 0 for b in sizes) or accumulate < 1 or world_size < 1:
        raise ValueError(f"micro-batch sizes {sizes}, accumulate {accumulate}, world size {world_size}: all must be >= 1")
    weights = np.concatenate([np.full(b, 1.0 / (accumulate * b * world_size)) for b in sizes])
    micro = np.concatenate([np.full(b, k, np.int64) for k, b in enumerate(sizes)])
    return StepWeights(weights, micro, int(accumulate), int(world_size))


def step_weights(log: Any, step: int) -> StepWeights:
    """The weights of ``step`` from an influence log (``1/|B_t|`` and one micro-batch for a version-1 log)."""
    return StepWeights(log.weights(step), log.micro_index(step), int(log.step_column(step, "accumulate")),
                       int(log.meta.get("world_size") or 1))


def step_summary(log: Any) -> dict[str, Any]:
    """How a log's steps differ from a plain batch mean (for ``info`` and the benchmarks): the steps the GradScaler
    skipped and the sample ids whose losses were not finite there, the accumulation divisors, the steps whose
    micro-batches do not fill an accumulation, the clipping and where it bound."""
    steps = [int(t) for t in log.steps]  # from the log's first step (> 0 for a log started by a resumed fit)
    accumulate = sorted({int(log.step_column(t, "accumulate")) for t in steps})
    incomplete = [t for t in steps if len(np.unique(log.micro_index(t))) < int(log.step_column(t, "accumulate"))]
    clipping = (log.meta.get("gradient_clipping") or {})
    coefs = np.array([float(log.step_column(t, "clip_coef")) for t in steps])
    clipped = np.isfinite(coefs)
    skipped = [t for t in steps if log.skipped(t)]
    return {"skipped_steps": skipped, "non_finite_loss_ids": _non_finite_loss_ids(log, skipped),
            "accumulate": accumulate, "incomplete_accumulation_steps": incomplete,
            "not_a_plain_mean": int(sum(not np.allclose(log.weights(t), 1.0 / len(log.batch_ids(t))) for t in steps)),
            "clipping": clipping.get("algorithm"), "clip_value": clipping.get("value"),
            "clip_bound_fraction": float((coefs[clipped] < 1).mean()) if clipped.any() else 0.0,
            "clip_coef_median": float(np.median(coefs[clipped])) if clipped.any() else None}


def _non_finite_loss_ids(log: Any, skipped: list[int], most: int = 100) -> list[int]:
    """The sample ids with a non-finite loss at the first ``most`` skipped steps (the writer stores a skipped step's
    losses as they were: a NaN or an overflow there made the GradScaler skip it)."""
    if not skipped or not log.recorded.get("losses"):
        return []
    bad: set[int] = set()
    for t in skipped[:most]:
        for rec in log.iter_steps(t, t + 1, fields=("loss",)):
            bad.update(int(i) for i in rec.ids[~np.isfinite(rec.losses)])
    return sorted(bad)


def check_reduction(returned: float, losses: Tensor, accumulate: int, step: int,
                    dtype: torch.dtype | None = None) -> None:
    """Refuse a training loss that is not ``mean(per-sample losses)``, at the step it is seen.

    ``returned`` is the loss Lightning back-propagated for the micro-batch (already divided by
    ``accumulate``); ``losses`` the per-sample losses of the same micro-batch; ``dtype`` the
    returned loss's dtype (a half-precision mean is only that precise: the tolerance follows it).

    Raises:
        LossReductionError: with what was returned, what the mean is, and what to do.
    """
    per_sample = losses.detach().to(torch.float64)
    mean = float(per_sample.mean())
    got = float(returned) * accumulate
    scale = max(float(per_sample.abs().mean()), 1e-12)
    coarsest = max(torch.finfo(d).eps for d in (losses.dtype, dtype or losses.dtype) if d.is_floating_point)
    rtol = max(REDUCTION_RTOL, 16 * coarsest)
    if not (np.isfinite(got) and np.isfinite(mean)) or abs(got - mean) <= rtol * scale:
        return  # (non-finite losses are refused by the log writer, naming the samples)
    n = per_sample.numel()
    total = float(per_sample.sum())
    what = (f"the sum of the per-sample losses ({total:.6g})" if abs(got - total) <= rtol * scale * n
            else "neither their mean nor their sum")
    raise LossReductionError(
        f"InfluenceTracker: at step {step} training_step returned a loss of {got:.6g} for a micro-batch of {n} samples, "
        f"{what}; the mean of the per-sample losses is {mean:.6g}. The tracker records each sample's weight as "
        f"1/(accumulate_grad_batches x micro-batch size), which holds only when the training loss is the mean of "
        f"per_sample_loss(batch) (or of loss_fn). Return per_sample_loss(batch).mean() from training_step (put any "
        f"weighting or regulariser inside the per-sample loss).")
