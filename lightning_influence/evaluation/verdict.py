"""How far the ground truth can judge, and a one-line verdict on the methods (docs/trust.md §4).

Pure numpy: ``evaluate`` (CLI) passes the replay leave-one-out result's numbers and the metrics.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

__all__ = ["truth_noise_floor", "verdict"]


def truth_noise_floor(base_t1: float, base_t2: float, drift: float, eps: float, t2: int) -> float:
    """The size below which a replay leave-one-out value cannot be told from replay error.

    ``max(drift, eps·√t2) · |f(θ_t2) − f(θ_t1)|``: the query change over the window times the relative
    error of the replayed parameters (the measured drift at the checkpoints, at least the round-off
    ``eps`` of the parameters' dtype accumulated over ``t2`` steps).
    """
    rel = max(float(drift), float(eps) * math.sqrt(max(int(t2), 1)))
    return rel * abs(float(base_t2) - float(base_t1))


def verdict(metrics: Mapping[str, Mapping[str, float]], truth: np.ndarray | None, floor: float | None) -> str:
    """One line: which method agrees with the truth, whether the methods disagree, or why nothing can be judged.

    Args:
        metrics: per method, its agreement metrics (``spearman``, ``pearson``, ``flipped_auroc`` when known).
        truth: the truth values of the evaluated samples, or ``None`` (no ground truth).
        floor: the truth's noise floor (:func:`truth_noise_floor`), or ``None``.
    """
    flips = {m: row["flipped_auroc"] for m, row in metrics.items() if np.isfinite(row.get("flipped_auroc", np.nan))}
    best_flip = max(flips, key=flips.get) if flips else None
    flip_text = f"{best_flip} detects flipped labels best (AUROC {flips[best_flip]:.2f})" if best_flip else ""
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
    if ranked[best] < 0.3:
        line = f"no method agrees with leave-one-out on this window (best: {best}, Spearman {ranked[best]:.2f})"
    else:
        others = [f"{m} {s:.2f}" for m, s in ranked.items() if m != best]
        line = (f"{best} agrees best with leave-one-out (Spearman {ranked[best]:.2f}"
                + (f"; {', '.join(others)}" if others else "") + ")")
    if best_flip and best_flip != best:
        line += (f"; but {flip_text}: it answers 'does the sample look mislabelled', leave-one-out 'what does removing "
                 "it change in this window'")
    return line
