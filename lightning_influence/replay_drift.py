"""How far a replay drifts from the logged run, measured at every stored checkpoint (issue 11, item 7).

Float32 training is not bit-reproducible across kernels, thread counts or GPU atomics, so a
replay is re-anchored at every checkpoint it passes: it measures its drift there, then
continues from the stored ``θ_t`` and optimizer state. The drift of a segment is::

    drift_t = ‖θ^replay_t − θ_t‖ / ‖θ_t − θ_s‖        (s: the checkpoint the segment started from)

the error relative to how far training moved in that segment: it bounds the relative error
of every ``θ`` the estimators linearise around, and so of their scores, to first order. A
replay stops (:class:`ReplayMismatchError`) only when a drift exceeds ``tolerance``
(default :data:`DEFAULT_TOLERANCE`, 1%: enough to change scores visibly), saying how large,
where and what to do; otherwise the drifts are reported with the scores
(``info["replay_drift"]``). ``tolerance=0`` demands a bit-identical replay.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from lightning_influence.step.buffers import cloned

__all__ = ["DEFAULT_TOLERANCE", "DriftReport", "ReplayMismatchError", "check_checkpoint", "measure", "outside_changes",
           "report_outside_changes", "resolve_tolerance", "restore_buffers"]

DEFAULT_TOLERANCE = 1e-2


def resolve_tolerance(tolerance: float | None) -> float:
    """``tolerance`` as a float (``None``: :data:`DEFAULT_TOLERANCE`); a negative or NaN one is refused (it would stop
    every replay with a "mismatch" of drift 0); ``inf`` accepts any drift."""
    value = DEFAULT_TOLERANCE if tolerance is None else float(tolerance)
    if not value >= 0:
        raise ValueError(f"tolerance must be a number >= 0 (the drift accepted, relative to how far training moved; "
                         f"0 = bit-identical), got {tolerance!r}")
    return value


class ReplayMismatchError(RuntimeError):
    """A replayed trajectory does not match a checkpoint stored in the log (a user situation: see the message)."""


@dataclass
class DriftReport:
    """Drifts measured at the checkpoints a replay passed: ``(step, drift, max |Δθ|)`` each."""

    checkpoints: list[tuple[int, float, float]] = field(default_factory=list)
    buffers: list[tuple[int, float, float]] = field(default_factory=list)  # the floating buffers' (restore_buffers)

    @property
    def max(self) -> float:
        return max((d for _, d, _ in self.checkpoints), default=0.0)

    def summary(self) -> dict[str, Any]:
        """For ``info["replay_drift"]``: the largest drift, where, and how many checkpoints were compared."""
        if not self.checkpoints:
            return {"checkpoints_compared": 0, "max": 0.0, "at_step": None, "max_abs": 0.0}
        step, drift, diff = max(self.checkpoints, key=lambda c: c[1])
        out = {"checkpoints_compared": len(self.checkpoints), "max": drift, "at_step": step, "max_abs": diff}
        if self.buffers:
            bstep, bdrift, _ = max(self.buffers, key=lambda c: c[1])
            out.update(buffers_max=bdrift, buffers_at_step=bstep)
        return out


def measure(stored: Mapping[str, np.ndarray], params: Mapping[str, Tensor], anchor: Mapping[str, Tensor]) -> tuple[float, float]:
    """``(drift, max |Δθ|)`` of replayed ``params`` against the ``stored`` checkpoint, relative to the movement
    from ``anchor`` (the parameters the segment started from). Non-finite replayed values are infinite drift."""
    err = move = scale = 0.0
    biggest = 0.0
    for n, p in params.items():
        ref = torch.from_numpy(np.array(stored[n])).to(p.device, torch.float64)
        d = p.detach().double() - ref
        if not bool(torch.isfinite(d).all()):
            return math.inf, math.inf
        err += float((d * d).sum())
        move += float(((ref - anchor[n].detach().double()) ** 2).sum())
        scale += float((ref * ref).sum())
        biggest = max(biggest, float(d.abs().max()) if d.numel() else 0.0)
    if err == 0.0:
        return 0.0, 0.0
    denominator = math.sqrt(move) if move > 0 else math.sqrt(scale) or 1.0  # a segment that did not move: relative to θ
    return math.sqrt(err) / denominator, biggest


def restore_buffers(step: int, stored: Mapping[str, np.ndarray] | None, buffers: Mapping[str, Tensor],
                    anchor: dict[str, Any], tolerance: float, report: DriftReport | None = None) -> None:
    """At the checkpoint of ``step``: the replayed floating ``buffers`` (running statistics, ``step.buffers``) against
    the ``stored`` ones, relative to their movement since ``anchor["buffers"]`` (those the segment started from, as
    :func:`check_checkpoint`'s parameters); then
    every buffer is set to the stored one and becomes the anchor's. ``stored`` ``None``: a log without buffers.

    Raises:
        ReplayMismatchError: the drift exceeds ``tolerance``.
    """
    if stored is None:
        return
    floats = {n: b for n, b in buffers.items() if b.is_floating_point()}
    drift, diff = measure(stored, floats, anchor["buffers"])
    if report is not None:
        report.buffers.append((step, drift, diff))
    if not drift <= tolerance:
        raise ReplayMismatchError(
            f"replay does not reproduce the logged run's buffers (BatchNorm running statistics, or a buffer updated "
            f"outside the forward, e.g. an EMA in a hook: replay runs only the forwards and optimizer steps): at step {step} they "
            f"differ from the stored ones by {drift:.3g} of how far they moved since step {anchor['step']} (largest "
            f"entry difference {diff:.3g}; tolerance {tolerance:g}), so a query in eval mode between checkpoints would "
            "use other statistics than training did. What to do: loss_fn must run the module's forward once per "
            "micro-batch, on the batch training_step got (each forward updates a train-mode BatchNorm's statistics); "
            "SyncBatchNorm is not modelled; a buffer a hook updates cannot be replayed (estimators would hold it "
            "constant; docs/replay.md); or accept the drift with a larger tolerance.")
    with torch.no_grad():
        for n, value in stored.items():
            buffers[n].copy_(torch.from_numpy(np.array(value)))
    anchor["buffers"] = cloned(floats)


def mismatch(step: int, start: int, drift: float, diff: float, tolerance: float) -> ReplayMismatchError:
    """The error of a replay whose drift at ``step`` exceeds ``tolerance``: how large, where, what to do."""
    return ReplayMismatchError(
        f"replay does not reproduce the logged run: at step {step}, after replaying steps {start}..{step - 1} from the "
        f"checkpoint at step {start}, θ differs from the stored θ_{step} by {drift:.3g} of how far training moved in "
        f"that segment (largest entry difference {diff:.3g}; tolerance {tolerance:g}). Scores built on this replay "
        "would be off by about as much. What to do: make sure train_data returns the samples the run saw under these "
        "ids (order, preprocessing) and loss_fn is the training loss, in the run's dtype and device; store the exact "
        "inputs (InfluenceTracker(store_inputs=True)) if the data pipeline is random; checkpoint more often "
        "(checkpoint_every_n_steps) so float round-off cannot accumulate; train with deterministic algorithms "
        "(Trainer(deterministic=True)); or accept the drift with a larger tolerance (Python: tolerance=..., CLI: "
        "--replay-tolerance).")


def check_checkpoint(step: int, stored: Mapping[str, np.ndarray], params: Mapping[str, Tensor],
                     anchor: Mapping[str, Any], tolerance: float, report: DriftReport | None = None) -> float:
    """The drift of replayed ``params`` at the checkpoint ``stored`` of ``step`` (:func:`measure` from
    ``anchor = {"step", "params"}``, where the segment started), recorded in ``report``.

    Raises:
        ReplayMismatchError: the drift exceeds ``tolerance`` (:func:`mismatch`).
    """
    drift, diff = measure(stored, params, anchor["params"])
    if report is not None:
        report.checkpoints.append((step, drift, diff))
    if not drift <= tolerance:
        raise mismatch(step, anchor["step"], drift, diff, tolerance)
    return drift


def outside_changes(summary: Mapping[str, Any], dtype: torch.dtype) -> str | None:
    """What the drifts of a replay of the logged steps say the run changed other than by them, or ``None``.

    A deterministic replay drifts by rounding only (0 on the CPU, ~1e-15 in float64). A drift beyond ``√eps`` of the
    parameters' dtype (3.5e-4 in float32, 1.5e-8 in float64) that stayed within the tolerance is a change the logged
    optimizer step does not make: a weight clamped or renormalised in a hook, an EMA written into the parameters, a
    buffer (an EMA, a counter-driven statistic) updated outside the forward. Estimators that linearise the logged steps
    treat such changes as constants (docs/replay.md, *Changes outside the optimizer step*)."""
    floor = math.sqrt(torch.finfo(dtype).eps)
    parts = []
    if summary.get("max", 0.0) > floor:
        parts.append(f"θ at the checkpoint of step {summary.get('at_step')} differs from the replay of the logged "
                     f"steps by {summary['max']:.2g} of how far training moved")
    if summary.get("buffers_max", 0.0) > floor:
        parts.append(f"the buffers at the checkpoint of step {summary.get('buffers_at_step')} differ from the "
                     f"replay's by {summary['buffers_max']:.2g} of how far they moved")
    if not parts:
        return None
    return ("; ".join(parts) + f" (more than rounding, √eps = {floor:.1e}): something other than the logged steps, "
            "as replayed, changed them (a clamp or renormalisation in a hook, an EMA, a buffer updated outside the "
            "forward; or training data or loss_fn that differ from the run's)")


def report_outside_changes(info: dict[str, Any], method: str, dtype: torch.dtype, estimator: str,
                           stacklevel: int, fit_threads: int | None = None) -> str:
    """``method``, tagged where the drifts of ``info["replay_drift"]`` say the run changed θ or its buffers other than
    by its logged steps (:func:`outside_changes`), with ``info["changed_outside_optimizer"]`` set and a warning: an
    estimator that linearises the logged steps (DIT, Diff-In) holds such changes constant.

    ``fit_threads``: the CPU threads the fit ran torch with (meta ``cpu_threads``). Where this process runs another
    number, CPU kernels sum in another order and the replay rounds otherwise than training did, which the steps grow
    beyond ``√eps`` (6.3e-4 of a segment's movement on a small transformer trained with 1 thread, replayed with 2):
    no evidence of a change, so the drift is reported as that, with the number of threads that replays bit for bit."""
    outside = outside_changes(info["replay_drift"], dtype)
    if outside is None:
        return method
    now = torch.get_num_threads()
    if fit_threads and fit_threads != now:
        info["replay_threads"] = {"fit": int(fit_threads), "now": now}
        warnings.warn(f"{estimator}: {outside.split(' (more than rounding')[0]}, more than rounding, but this process "
                      f"runs torch with {now} CPU threads where the fit ran with {fit_threads}: CPU kernels then sum in "
                      "another order and the replay rounds otherwise than training did, which the steps grow. Run with "
                      f"torch.set_num_threads({fit_threads}) (OMP_NUM_THREADS={fit_threads}) to replay the run bit for "
                      "bit (a drift left then is a change outside the optimizer, which "
                      f"{estimator} would hold constant); docs/replay.md", RuntimeWarning, stacklevel=stacklevel + 1)
        return method + f" [replayed on {now} threads, trained on {fit_threads}]"
    info["changed_outside_optimizer"] = outside
    warnings.warn(f"{estimator}: {outside}. {estimator} treats those changes as constants: it leaves out how removing a "
                  "sample moves them. Check the scores with replay leave-one-out (evaluate), which replays the same "
                  "steps; docs/replay.md", RuntimeWarning, stacklevel=stacklevel + 1)
    return method + " [changed outside the optimizer]"
