"""Temporal patterns of influence timelines: when did a sample matter?

A timeline holds the cumulative influence ``F_j(t)`` of every sample on a grid of
times (docs/influence-math.md §3); the difference of consecutive columns is the windowed influence
``DIT_j`` of each window. This module sorts samples into five patterns from those
per-window increments, calibrated against the noise of the scores:

* ``negligible``: no window's increment stands out of the noise (``|DIT| <= k·σ_w`` in every
  window ``w``) and neither does their sum (``|Σ_w DIT| <= k·(Σ_w σ_w²)^½``): indistinguishable
  from zero;
* ``fluctuating``: its significant increments change sign (mostly alternating, or at least once
  without a trend in prominence);
* ``early``: the sample stands out in the first windows and fades (or stands out only in the
  first half of the windows),
* ``late``: it gains prominence towards the end (or stands out only in the second half),
* ``stable``: one sign throughout and steady: significant in at least half of the windows, or
  small same-sign increments whose sum is significant.

**Noise.** ``σ_w`` is the noise scale of one increment in window ``w``: given by the caller
(``noise=``, e.g. an estimator's measured error), else estimated robustly from the window itself
as ``1.4826 · median_i |DIT_iw|`` (the spread of the bulk of samples around zero, a normal
scale; influence is heavy-tailed, so the few samples that matter barely move it). An increment
is *significant* when ``|DIT_iw| > k·σ_w`` (``k = 3`` by default: about 0.3% of pure-noise
increments). Measured on the demo (digits MLP, 1000 samples, 10 per-epoch windows, DIT): see
``docs/trust.md``.

Prominence is measured *relative to the other samples*: each window column is
standardised across samples (z-scores), so a global trend shared by all samples
(e.g. larger updates under a decaying learning rate) does not make everyone "early".
Pure numpy: arrays in, arrays out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "noise_scale",
    "Pattern",
    "PatternResult",
    "PatternThresholds",
    "classify_timeline",
    "classify_windows",
]


class Pattern(str, Enum):
    """Temporal influence pattern of one sample; values are the labels' strings."""

    NEGLIGIBLE = "negligible"
    STABLE = "stable"
    EARLY = "early"
    LATE = "late"
    FLUCTUATING = "fluctuating"


@dataclass(frozen=True)
class PatternThresholds:
    """Decision thresholds of :func:`classify_windows`.

    Attributes:
        slope_t: minimum ``|slope / stderr|`` of the ``|z|``-over-window regression for
            ``early``/``late`` (a t statistic with ``W - 2`` degrees of freedom; 2.0 is a
            heuristic, about 5% two-sided only for large ``W``).
        flip_ratio: minimum fraction of sign changes between consecutive non-zero
            increments for ``fluctuating``, in ``(0, 1]``.
        min_magnitude: minimum RMS increment of a sample, relative to the RMS increment
            of all samples, for ``fluctuating`` (sign noise on a negligible sample is
            not a pattern).
        rel_tol: increments with ``|DIT| <= rel_tol * RMS(all increments)`` count as
            zero for sign flips, and window columns whose spread across samples is
            below that level get z-score 0 (no information to standardise), in ``[0, 1)``.
        noise_k: an increment is significant when ``|DIT| > noise_k · σ_w`` (see the module doc).
    """

    slope_t: float = 2.0
    flip_ratio: float = 0.5
    min_magnitude: float = 0.1
    rel_tol: float = 1e-3
    noise_k: float = 3.0

    def __post_init__(self) -> None:
        for name in ("slope_t", "flip_ratio", "min_magnitude", "rel_tol", "noise_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.slope_t <= 0:
            raise ValueError(f"slope_t must be > 0, got {self.slope_t}")
        if not 0 < self.flip_ratio <= 1:
            raise ValueError(f"flip_ratio must be in (0, 1], got {self.flip_ratio}")
        if self.min_magnitude < 0:
            raise ValueError(f"min_magnitude must be >= 0, got {self.min_magnitude}")
        if not 0 <= self.rel_tol < 1:
            raise ValueError(f"rel_tol must be in [0, 1), got {self.rel_tol}")
        if self.noise_k < 0:
            raise ValueError(f"noise_k must be >= 0, got {self.noise_k}")


@dataclass(frozen=True)
class PatternResult:
    """Per-sample pattern labels and the statistics they were derived from.

    Attributes:
        labels: ``(N,)`` strings, values of :class:`Pattern` (numpy does not compare
            them with enum members: use :meth:`mask` or the strings).
        slope: ``(N,)`` least-squares slope of ``|z|`` over the window index.
        slope_t: ``(N,)`` ``slope / stderr`` (``±inf`` for an exact non-flat line, 0 if flat).
        flip_ratio: ``(N,)`` sign changes / consecutive pairs of non-zero increments.
        magnitude: ``(N,)`` RMS increment relative to the RMS over all samples.
        zscores: ``(N, W)`` per-window z-scores across samples.
        noise: ``(W,)`` the noise scale ``σ_w`` of each window's increments.
        significant: ``(N, W)`` ``|DIT| > k·σ_w``.
    """

    labels: np.ndarray
    slope: np.ndarray
    slope_t: np.ndarray
    flip_ratio: np.ndarray
    magnitude: np.ndarray
    zscores: np.ndarray
    noise: np.ndarray | None = None
    significant: np.ndarray | None = None

    def mask(self, pattern: Pattern | str) -> np.ndarray:
        """Boolean ``(N,)`` mask of the samples labelled ``pattern``."""
        return np.asarray(self.labels == Pattern(pattern).value)

    def counts(self) -> dict[str, int]:
        """Number of samples per pattern, every pattern listed (zero included)."""
        return {p.value: int(np.count_nonzero(self.mask(p))) for p in Pattern}


def _window_zscores(x: np.ndarray, tol: float) -> np.ndarray:
    """Standardise each column across samples; near-constant columns map to 0."""
    std = x.std(axis=0)
    informative = std > tol
    z = np.zeros_like(x)
    z[:, informative] = (x[:, informative] - x[:, informative].mean(axis=0)) / std[informative]
    return z


def _slope_t(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise least-squares slope of ``y`` over ``0..W-1`` and its t statistic."""
    w = y.shape[1]
    xc = np.arange(w) - (w - 1) / 2
    sxx = float(xc @ xc)
    yc = y - y.mean(axis=1, keepdims=True)
    slope = yc @ xc / sxx
    resid = yc - slope[:, None] * xc
    stderr = np.sqrt(np.sum(resid**2, axis=1) / (w - 2) / sxx)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(stderr > 0, slope / stderr, np.sign(slope) * np.inf)
    t[slope == 0] = 0.0
    return slope, t


def _flip_ratio(x: np.ndarray, tol: float) -> np.ndarray:
    """Fraction of consecutive non-zero increments (|x| > tol) whose signs differ."""
    n, w = x.shape
    nonzero = np.abs(x) > tol
    # Index of the previous non-zero increment in the same row (-1: none yet).
    last = np.maximum.accumulate(np.where(nonzero, np.arange(w), -1), axis=1)
    prev = np.concatenate([np.full((n, 1), -1), last[:, :-1]], axis=1)
    has_prev = nonzero & (prev >= 0)
    prev_sign = np.sign(np.take_along_axis(x, np.maximum(prev, 0), axis=1))
    flips = np.sum(has_prev & (np.sign(x) != prev_sign), axis=1)
    pairs = np.sum(has_prev, axis=1)
    return np.divide(flips, pairs, out=np.zeros(n), where=pairs > 0)


def noise_scale(window_scores: np.ndarray) -> np.ndarray:
    """``σ_w = 1.4826 · median_i |DIT_iw|`` per window: the robust (normal-consistent) spread around zero."""
    return 1.4826 * np.median(np.abs(window_scores), axis=0)


def classify_windows(window_scores: ArrayLike, thresholds: PatternThresholds | None = None,
                     noise: ArrayLike | None = None) -> PatternResult:
    """Classify each sample's per-window influence increments into a :class:`Pattern`.

    Statistics, per sample i over windows w = 0..W-1:

    * ``z[i, w]``: window column w standardised across samples;
    * ``slope``, ``slope_t``: least-squares slope of ``|z[i, :]|`` against w, and
      slope / its standard error;
    * ``flip_ratio``: sign changes between consecutive increments, ignoring those with
      ``|DIT| <= rel_tol * RMS`` (RMS over all samples and windows);
    * ``magnitude``: RMS of the sample's increments / RMS over all samples.

    Rules, first match wins (``significant``: ``|DIT_iw| > noise_k·σ_w``, module doc):

    1. ``negligible`` if no increment is significant and neither is their sum
       (``|Σ_w DIT_iw| <= noise_k·(Σ_w σ_w²)^½``);
    2. ``stable`` if no increment is significant but the sum is (a steady same-sign accumulation);
    3. ``fluctuating`` if ``flip_ratio >= thresholds.flip_ratio`` and
       ``magnitude >= thresholds.min_magnitude`` (sign changes counted between significant
       increments only);
    4. ``early`` if ``slope_t <= -thresholds.slope_t`` (prominence decreases with time);
    5. ``late`` if ``slope_t >= thresholds.slope_t`` (prominence increases);
    6. one sign, significant in fewer than half of the windows: ``early`` if the significant
       windows lie in the first half on average, ``late`` if in the second, ``stable`` if centred
       (standing out once is not steady);
    7. ``stable`` if the significant increments all have one sign;
    8. ``fluctuating`` otherwise (a sign change without a trend is not stable).

    Args:
        window_scores: ``(N, W)`` increments ``DIT_j`` per window, ``N >= 2``, ``W >= 3``
            (the slope's standard error needs ``W - 2 >= 1`` degrees of freedom).
        thresholds: decision thresholds; defaults of :class:`PatternThresholds`.
        noise: ``σ_w``, a scalar or ``(W,)`` (default: :func:`noise_scale` of the increments).

    Returns:
        The labels and per-sample statistics.
    """
    thresholds = PatternThresholds() if thresholds is None else thresholds
    x = np.asarray(window_scores, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"window_scores must be 2-D (samples, windows), got shape {x.shape}")
    n, w = x.shape
    if w < 3:
        raise ValueError(f"need at least 3 windows for a slope t statistic, got {w}")
    if n < 2:
        raise ValueError(f"need at least 2 samples to standardise windows, got {n}")
    if not np.all(np.isfinite(x)):
        raise ValueError("window_scores contains NaN or infinite values")

    sigma = noise_scale(x) if noise is None else np.broadcast_to(np.asarray(noise, dtype=np.float64), (w,)).copy()
    if not np.all(np.isfinite(sigma)) or np.any(sigma < 0):
        raise ValueError("noise must be finite and >= 0")
    significant = np.abs(x) > thresholds.noise_k * sigma[None, :]
    scale = float(np.sqrt(np.mean(x**2)))
    tol = thresholds.rel_tol * scale
    z = _window_zscores(x, tol)
    slope, slope_t = _slope_t(np.abs(z))
    flips = _flip_ratio(np.where(significant, x, 0.0), 0.0)
    rms = np.sqrt(np.mean(x**2, axis=1))
    magnitude = rms / scale if scale > 0 else np.zeros(n)
    signs = np.sign(np.where(significant, x, 0.0))
    one_sign = ~((signs > 0).any(axis=1) & (signs < 0).any(axis=1))

    n_sig = significant.sum(axis=1)
    centre = (significant * np.arange(w)).sum(axis=1) / np.maximum(n_sig, 1) - (w - 1) / 2  # < 0: first half
    total_significant = np.abs(x.sum(axis=1)) > thresholds.noise_k * float(np.sqrt(np.sum(sigma**2)))

    labels = np.full(n, Pattern.FLUCTUATING.value, dtype=object)  # rule 8; rules applied last to first
    labels[one_sign] = Pattern.STABLE.value
    sparse = one_sign & (2 * n_sig < w)
    labels[sparse & (centre < 0)] = Pattern.EARLY.value
    labels[sparse & (centre > 0)] = Pattern.LATE.value
    labels[slope_t >= thresholds.slope_t] = Pattern.LATE.value
    labels[slope_t <= -thresholds.slope_t] = Pattern.EARLY.value
    fluctuating = (flips >= thresholds.flip_ratio) & (magnitude >= thresholds.min_magnitude)
    labels[fluctuating] = Pattern.FLUCTUATING.value
    quiet = n_sig == 0
    labels[quiet] = np.where(total_significant[quiet], Pattern.STABLE.value, Pattern.NEGLIGIBLE.value)
    return PatternResult(
        labels=labels.astype(str),
        slope=slope,
        slope_t=slope_t,
        flip_ratio=flips,
        magnitude=magnitude,
        zscores=z,
        noise=sigma,
        significant=significant,
    )


def classify_timeline(timeline: ArrayLike, thresholds: PatternThresholds | None = None,
                      noise: ArrayLike | None = None) -> PatternResult:
    """Classify cumulative timelines ``F_j(t)`` (``(N, G)``, G >= 4 grid times).

    Equivalent to :func:`classify_windows` on the ``G - 1`` consecutive differences.
    """
    f = np.asarray(timeline, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"timeline must be 2-D (samples, grid times), got shape {f.shape}")
    if f.shape[1] < 4:
        raise ValueError(f"need at least 4 grid times (3 windows), got {f.shape[1]}")
    return classify_windows(np.diff(f, axis=1), thresholds, noise)
