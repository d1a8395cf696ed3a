"""How far the ground truth can judge, and a one-line verdict on the methods (docs/trust.md §4).

Pure numpy: ``evaluate`` (CLI) passes the replay leave-one-out result's numbers and the metrics.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from lightning_influence.evaluation.metrics import pearson, spearman

__all__ = ["DETECTS_AUROC", "LINEAR_PEARSON", "truth_linearity", "truth_noise_floor", "verdict"]

DETECTS_AUROC = 0.6
"""Below this flipped-label AUROC (0.5: chance) the verdict does not call a method a detector of flipped labels."""

LINEAR_PEARSON = 0.8
"""Below this Pearson correlation between half a removal (doubled) and a whole one, leave-one-out is called
nonlinear in the removed sample's weight (:func:`truth_linearity`)."""


def truth_noise_floor(base_t1: float, base_t2: float, drift: float, eps: float, t2: int) -> float:
    """The size below which a replay leave-one-out value cannot be told from replay error.

    ``max(drift, eps·√t2) · |f(θ_t2) − f(θ_t1)|``: the query change over the window times the relative
    error of the replayed parameters (the measured drift at the checkpoints, at least the round-off
    ``eps`` of the parameters' dtype accumulated over ``t2`` steps).
    """
    rel = max(float(drift), float(eps) * math.sqrt(max(int(t2), 1)))
    return rel * abs(float(base_t2) - float(base_t1))


def truth_linearity(full: np.ndarray, half: np.ndarray) -> dict[str, float]:
    """How linear leave-one-out is in the removed sample's weight, over the evaluated samples.

    ``full``: the truth of removing each sample (weight 0); ``half``: of halving its weight (replay leave-one-out with
    ``removal_weight=0.5``). Where training responds linearly, ``2·half = full`` (Pearson 1); every first-order
    estimator (DIT, TracIn, Diff-In) assumes it. Far from it (ReLU kinks crossed, chaotic training: a GroupNorm CNN
    trained 200 steps with Nesterov SGD, docs/trust.md §4), no first-order score can follow the truth, whatever its
    quality. Returns ``pearson`` and ``spearman`` of ``2·half`` against ``full`` (NaN below 3 samples).
    """
    full, doubled = np.asarray(full, dtype=np.float64), 2.0 * np.asarray(half, dtype=np.float64)
    if len(full) < 3:
        return {"pearson": math.nan, "spearman": math.nan}
    return {"pearson": pearson(doubled, full), "spearman": spearman(doubled, full)}


def verdict(metrics: Mapping[str, Mapping[str, float]], truth: np.ndarray | None, floor: float | None,
            linearity: Mapping[str, float] | None = None, in_window: bool = False) -> str:
    """One line: which method agrees with the truth, whether the methods disagree, or why nothing can be judged.

    Args:
        metrics: per method, its agreement metrics (``spearman``, ``pearson``, ``flipped_auroc`` when known).
        truth: the truth values of the evaluated samples, or ``None`` (no ground truth).
        floor: the truth's noise floor (:func:`truth_noise_floor`), or ``None``.
        linearity: the truth's :func:`truth_linearity`, or ``None`` (not measured).
        in_window: the truth removed the samples only inside the window (``--in-window``): the advice is a shorter one.
    """
    known = {m: row["flipped_auroc"] for m, row in metrics.items() if np.isfinite(row.get("flipped_auroc", np.nan))}
    best_flip = max(known, key=known.get) if known else None
    if best_flip is not None and known[best_flip] < DETECTS_AUROC:  # chance level: no detector to name
        flip_text, best_flip = f"no method detects flipped labels (best AUROC {known[best_flip]:.2f})", None
    else:
        flip_text = f"{best_flip} detects flipped labels best (AUROC {known[best_flip]:.2f})" if best_flip else ""
    if truth is None or not len(truth):
        return f"no ground truth; {flip_text}" if flip_text else "no ground truth and no known flipped labels: nothing to judge"
    above = int(np.count_nonzero(np.abs(truth) > (floor or 0.0)))
    if above < max(2, len(truth) / 2):
        return (f"the ground truth is within its noise floor ({floor:.2e}) for {len(truth) - above} of {len(truth)} "
                "samples: this window cannot rank the methods" + (f"; {flip_text}" if flip_text else ""))
    ranked = {m: row["spearman"] for m, row in metrics.items() if np.isfinite(row.get("spearman", np.nan))}
    if not ranked:
        return "too few samples to compare with the ground truth" + (f"; {flip_text}" if flip_text else "")
    best = max(ranked, key=ranked.get)
    lin = (linearity or {}).get("pearson", math.nan)
    if math.isfinite(lin) and lin < LINEAR_PEARSON:
        line = ("leave-one-out is not linear in the removal on this window (half a removal, doubled, against a whole "
                f"one: Pearson {lin:.2f}): no first-order method (DIT, TracIn, Diff-In) can follow it, and the agreement "
                f"measures training's nonlinearity more than the methods (best: {best}, Spearman {ranked[best]:.2f}); "
                f"judge them on a shorter window{'' if in_window else ' with --in-window'}")
    elif ranked[best] < 0.3:
        line = f"no method agrees with leave-one-out on this window (best: {best}, Spearman {ranked[best]:.2f})"
    else:
        others = [f"{m} {s:.2f}" for m, s in ranked.items() if m != best]
        line = (f"{best} agrees best with leave-one-out (Spearman {ranked[best]:.2f}"
                + (f"; {', '.join(others)}" if others else "") + ")")
    if best_flip and best_flip != best:
        line += (f"; but {flip_text}: it answers 'does the sample look mislabelled', leave-one-out 'what does removing "
                 "it change in this window'")
    return line
