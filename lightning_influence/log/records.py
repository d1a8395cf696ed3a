"""What the writer stores for one step and one checkpoint (numpy, on the host), and the checks a step passes first."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lightning_influence.log.outer import SAFE_FACTOR, OuterColumns

__all__ = ["CheckpointRecord", "MicroRecord", "StepRecord"]


@dataclass(slots=True)
class MicroRecord:
    """One micro-batch of a step: its size, the random state at its forward, optionally its inputs."""

    size: int
    cpu_rng: np.ndarray | None = None  # uint8 CPU generator state (None: drew no CPU random number)
    cuda_rng: np.ndarray | None = None  # uint8 (n_devices, 16) CUDA generator states (None: drew on no GPU)
    inputs: bytes | None = None  # torch.save of the batch as fed to training_step


@dataclass(slots=True)
class StepRecord:
    """Everything recorded for one optimizer step on one rank (numpy arrays, already on CPU)."""

    step: int
    epoch: int
    batch_idx: int
    micro_batches: int
    lrs: list[float]
    ids: np.ndarray
    losses: np.ndarray | None = None  # in any float dtype (the tracker's: the losses' own); stored as float64
    grads: np.ndarray | None = None  # (n, K); with grad_outer, (n, grad_outer.stored_width)
    hvps: np.ndarray | None = None
    grad_outer: OuterColumns | None = None  # gradient rows stored with factored blocks (log/outer.py)
    batch_grad_norm: float = float("nan")
    hvp_eps: float = float("nan")
    tracker_seconds: float = 0.0
    recorded_at: float = float("nan")  # time.perf_counter() when the tracker recorded the step (live TensorBoard; not stored)
    micro: list[MicroRecord] | None = None  # None: one micro-batch of all ids, nothing else recorded
    grad_scale: float = float("nan")
    skipped: bool = False
    weights: np.ndarray | None = None  # w_{i,t}, the weight of each row's loss in the applied gradient (step.weights)
    accumulate: int = -1  # Lightning's divisor of each micro-batch loss
    clip_value: float = float("nan")  # step.clipping
    clip_coef: float = float("nan")
    # the update rule's scheduled hyperparameters (UpdateRule.scheduled) per param group, where they differ from
    # meta.h5's param groups: {key: [value of group 0, ...]} (betas: pairs); None: the logged groups' (step/hyper.py)
    hyper: dict[str, list[Any]] | None = None

    def validate(self) -> None:
        """Refuse a record that would store something wrong: bad shapes or non-finite values.

        Raises:
            ValueError: ids not a 1-D integer array, or rows not matching the ids.
            FloatingPointError: a non-finite loss, gradient or HVP product (naming step and sample ids).
        """
        ids = self.ids if type(self.ids) is np.ndarray else np.asarray(self.ids)  # (runs at every step: few calls)
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise ValueError(f"step {self.step}: sample ids must be a 1-D integer array, got shape {ids.shape} dtype {ids.dtype}")
        n = len(ids)
        for what, rows, ndim in (("per-sample loss", self.losses, 1), ("per-sample gradient", self.grads, 2),
                                 ("Hessian-gradient product", self.hvps, 2)):
            if rows is None:
                continue
            if len(rows) != n or (rows.ndim if type(rows) is np.ndarray else np.ndim(rows)) != ndim:
                raise ValueError(f"step {self.step}: {what} rows have shape {np.shape(rows)} for {n} sample ids")
            if rows is self.grads and self.grad_outer is not None:  # factors: finite, and small enough to multiply
                # the largest |factor| from the largest and the smallest: no array of |rows|, half the cost between two
                # training steps (a NaN fails the comparison; no rows: -inf)
                factors = rows if type(rows) is np.ndarray else np.asarray(rows)
                if max(float(factors.max(initial=-np.inf)), -float(factors.min(initial=np.inf))) < SAFE_FACTOR:
                    continue
                with np.errstate(over="ignore"):  # an overflow is what is looked for
                    rows = self.grad_outer.expand(np.asarray(rows))  # their products, as a reader expands them
            elif (self.skipped and ndim == 1) or _finite(rows):  # the common case: one check
                continue  # a skipped step's losses may overflow
            bad = ~np.isfinite(np.asarray(rows).reshape(n, -1)).all(axis=1)
            if bad.any():
                raise FloatingPointError(
                    f"step {self.step}: non-finite {what} for sample ids {ids[bad].tolist()[:10]}; nothing of this step "
                    "was stored. Lower the learning rate or check these samples.")
        if self.weights is not None and (self.weights.shape if type(self.weights) is np.ndarray
                                         else np.shape(self.weights)) != ids.shape:
            raise ValueError(f"step {self.step}: sample weight rows have shape {np.shape(self.weights)} for {n} sample ids")
        if self.grad_outer is not None and (self.grads is None or np.shape(self.grads)[1] != self.grad_outer.stored_width):
            raise ValueError(f"step {self.step}: gradient rows of shape {np.shape(self.grads)} do not hold the "
                             f"{self.grad_outer.stored_width} stored columns of their factored blocks")
        if self.hvps is not None and self.grads is None:
            raise ValueError(f"step {self.step}: HVP products need the gradient rows of the same step")
        if self.micro is not None and sum([m.size for m in self.micro]) != n:
            raise ValueError(f"step {self.step}: micro-batch sizes {[m.size for m in self.micro]} do not add up to "
                             f"{n} sample ids")
        for lr in self.lrs:
            if not math.isfinite(lr):
                raise FloatingPointError(f"step {self.step}: non-finite learning rate {self.lrs}; nothing of this step was stored")
        if self.hyper and not np.isfinite(np.concatenate([np.ravel(v) for v in self.hyper.values()]).astype(float)).all():
            raise FloatingPointError(f"step {self.step}: non-finite optimizer hyperparameters {self.hyper}; nothing of this "
                                     "step was stored")

    def check_storable(self, storage_dtype: np.dtype) -> None:
        """Refuse gradient or HVP rows that ``storage_dtype`` cannot hold: cast to it (``log/segment.py``), a value
        beyond its range (float16's: 65504) would be stored as ±inf, which the estimators would read as a score.

        Raises:
            FloatingPointError: naming the step, the sample ids and ``storage_dtype='float32'`` (nothing of the step
                is stored; the steps before it are kept).
        """
        if self.grads is None and self.hvps is None:  # (every step that records no gradient: no finfo look-up)
            return
        limit = np.finfo(storage_dtype)
        for what, rows in (("per-sample gradient", self.grads), ("Hessian-gradient product", self.hvps)):
            rows = None if rows is None else np.asarray(rows)
            if rows is None or rows.dtype.kind != "f" or np.finfo(rows.dtype).max <= limit.max or not rows.size:
                continue
            if what == "per-sample gradient" and self.grad_outer is not None:
                with np.errstate(over="ignore"):
                    rows = self.grad_outer.expand(rows)  # the values a reader gets: the factors' products
            peak = np.maximum(rows.max(axis=1), -rows.min(axis=1))  # |value| largest per row (no copy of the rows)
            with np.errstate(over="ignore"):
                bad = np.isinf(peak.astype(storage_dtype))  # exactly the rows the cast would overflow
            if bad.any():
                ids = np.asarray(self.ids)[bad].tolist()[:10]
                wider = "float32" if limit.bits < 32 else "float64"
                raise FloatingPointError(
                    f"step {self.step}: {what} values up to {float(peak.max()):.4g} for sample ids {ids} exceed "
                    f"storage_dtype='{limit.dtype}' (largest {float(limit.max):.6g}) and would be stored as inf; "
                    f"nothing of this step was stored. Record with storage_dtype='{wider}'.")


def _finite(rows: Any) -> bool:
    """Every value of ``rows`` is finite. A step's losses are when their sum as Python floats is (a NaN or an infinity
    makes any sum one): this runs at every step, between two training steps, where numpy's mask of the values and its
    reduction cost tens of µs and the Python sum a few. Other rows, and losses whose sum is not finite (or overflowed),
    are checked value by value."""
    if (type(rows) is np.ndarray and rows.ndim == 1 and rows.dtype.kind == "f" and len(rows) <= _SUMMED
            and math.isfinite(sum(rows.tolist()))):
        return True
    return bool(np.isfinite(rows).all())


_SUMMED = 4096  # 1-D rows up to this length take the Python sum


@dataclass
class CheckpointRecord:
    """Parameters ``θ_t`` (before step ``t``), the optimizer state and the module's buffers at that moment."""

    step: int
    params: dict[str, np.ndarray]
    optimizer_state: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    optimizer_scalars: dict[str, dict[str, float]] = field(default_factory=dict)
    buffers: dict[str, np.ndarray] = field(default_factory=dict)  # persistent buffers (step.buffers), e.g. running stats
