"""How additive can any attribution be? Datamodel quality from noise stability (docs/influence-math.md §6).

Following Saunshi et al. (2022): draw training subsets by keeping each of the ``N``
samples independently with probability ``p`` (keep-indicator ``x ∈ {0,1}^N``) and
let ``f(x)`` be the query value of the model trained on the kept samples. In the
p-biased Fourier basis, with normalised coordinates ``χ_i = (x_i - p) / sqrt(p(1-p))``
(mean 0, variance 1),

    f = Σ_S f̂(S) Π_{i∈S} χ_i,      W_k = Σ_{|S|=k} f̂(S)²,      E[f²] = Σ_k W_k.

The best linear datamodel ``β_0 + Σ_i β_i x_i`` is the degree ≤ 1 part, so its mean
squared error is the degree ≥ 2 mass ``E[f²] - W_0 - W_1`` and ``sqrt(W_1 / Var f)``
bounds the correlation of any additive attribution with ``f``. Noise stability

    Stab_ρ(f) = E[f(x) f(y)] = Σ_k ρ^k W_k,

where ``y`` keeps each coordinate of ``x`` with probability ``ρ`` and else redraws it
from Bernoulli(p), gives ``W_0, W_1`` from a few ``ρ`` without fitting ``N`` weights.

Everything here is pure numpy over a user callable ``f(mask) -> float`` (e.g. retrain
on ``mask`` and evaluate a query); ``fit_linear_datamodel``/``datamodel_residual`` give
the direct (fitted) cross-check.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "FourierMass",
    "LinearDatamodel",
    "MapFn",
    "SubsetFn",
    "biased_coordinates",
    "datamodel_residual",
    "fit_linear_datamodel",
    "fourier_mass_from_stability",
    "noise_stability",
    "sample_correlated_pairs",
    "stability_estimates",
]

SubsetFn = Callable[[np.ndarray], float]
"""``f(mask)``: query value for the training subset marked by a boolean mask of length N."""

MapFn = Callable[[SubsetFn, Iterable[np.ndarray]], Iterable[float]]
"""Evaluates ``f`` on many masks, like ``map`` or ``concurrent.futures.Executor.map``."""


def _check_p(p: float) -> float:
    if not 0.0 < p < 1.0:
        raise ValueError(f"keep probability p must be in (0, 1), got {p}")
    return float(p)


def _check_rho(rho: float) -> float:
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must be in [0, 1], got {rho}")
    return float(rho)


def _check_count(value: int, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _masks(masks: ArrayLike) -> np.ndarray:
    arr = np.asarray(masks)
    if arr.ndim != 2 or arr.dtype != np.bool_:
        raise ValueError(f"masks must be a 2-D boolean array (M, N), got {arr.dtype} {arr.shape}")
    return arr


def biased_coordinates(mask: ArrayLike, p: float) -> np.ndarray:
    """Normalised p-biased coordinates ``χ = (x - p) / sqrt(p (1 - p))`` of keep-indicators.

    Under ``x_i ~ Bernoulli(p)`` each ``χ_i`` has mean 0 and variance 1 (the ±1 coordinates
    of the unbiased case when ``p = 1/2``).
    """
    p = _check_p(p)
    return (np.asarray(mask, dtype=np.float64) - p) / math.sqrt(p * (1.0 - p))


def _rerandomise(x: np.ndarray, p: float, rho: float, rng: np.random.Generator) -> np.ndarray:
    """Keep each entry of ``x`` with probability ``rho``, else redraw it from Bernoulli(p)."""
    keep = rng.random(x.shape) < rho
    fresh = rng.random(x.shape) < p
    return np.where(keep, x, fresh)


def sample_correlated_pairs(
    n: int, p: float, rho: float, m: int, rng: np.random.Generator | int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``m`` ρ-correlated pairs of p-biased keep-masks.

    ``x ~ Bernoulli(p)^N``; ``y`` keeps each coordinate of ``x`` with probability ``rho``,
    else redraws it, so ``y`` is p-biased too and ``E[χ(x_i) χ(y_i)] = rho``.

    Returns:
        ``(x, y)``, two ``(m, n)`` boolean arrays.
    """
    n, m = _check_count(n, "n", 1), _check_count(m, "m", 1)
    p, rho = _check_p(p), _check_rho(rho)
    gen = np.random.default_rng(rng)
    x = gen.random((m, n)) < p
    return x, _rerandomise(x, p, rho, gen)


def noise_stability(
    f: SubsetFn,
    n: int,
    p: float,
    rhos: Sequence[float],
    m: int,
    rng: np.random.Generator | int | None = None,
    map_fn: MapFn | None = None,
) -> dict[float, float]:
    """Monte-Carlo estimates of ``Stab_ρ(f) = E[f(x) f(y)]`` for several ``ρ``.

    One sample ``x_1..x_m`` is shared by all ``ρ``, so ``f(x)`` is evaluated once; each
    ``ρ`` in ``(0, 1)`` adds ``m`` evaluations on its ``y``. Two values need none:
    ``ρ = 1`` (``y = x``: the mean of ``f(x)²``, i.e. ``E[f²]``) and ``ρ = 0`` (``y``
    independent: the unbiased pair average ``Σ_{a≠b} f(x_a) f(x_b) / (m (m-1))``).
    All masks go to ``map_fn`` in one call, so a process pool can run the retrainings.

    Each estimate is ``μ̂² + mean((f(x) - μ̂)(f(y) - μ̂))`` with the same ``μ̂ = mean f(x)``
    for every ``ρ`` (exactly the two formulas above for ``ρ ∈ {0, 1}``). The noise a
    large ``E f`` brings is then common to all ``ρ``, so it lands in the fitted ``W0``
    and cancels from ``W1`` and the residual of :func:`fourier_mass_from_stability`;
    the price is a bias ``O(Var f / m)`` for ``ρ ∈ (0, 1)``, far below the noise.

    Args:
        f: query value of the model trained on a keep-mask (boolean, length ``n``).
        n: number of training samples ``N``.
        p: keep probability.
        rhos: correlations in ``[0, 1]``, distinct.
        m: number of pairs per ``ρ`` (``>= 2``).
        rng: generator or seed.
        map_fn: ``map``-like evaluator (default: the builtin ``map``), e.g.
            ``executor.map``; must return one value per mask, in order.

    Returns:
        ``{ρ: estimate}`` in the order of ``rhos``.
    """
    n, m, p = _check_count(n, "n", 1), _check_count(m, "m", 2), _check_p(p)
    rho_list = [_check_rho(r) for r in rhos]
    if not rho_list or len(set(rho_list)) != len(rho_list):
        raise ValueError(f"rhos must be a non-empty sequence of distinct values, got {list(rhos)}")
    gen = np.random.default_rng(rng)
    x = gen.random((m, n)) < p
    noisy = [r for r in rho_list if 0.0 < r < 1.0]
    masks = np.concatenate([x] + [_rerandomise(x, p, r, gen) for r in noisy])
    masks.setflags(write=False)  # f receives read-only views
    values = np.asarray(list((map_fn or map)(f, iter(masks))), dtype=np.float64)
    if values.shape != (masks.shape[0],):
        raise ValueError(f"map_fn returned {values.size} values for {masks.shape[0]} masks")
    if not np.all(np.isfinite(values)):
        raise ValueError("f returned NaN or infinite values")
    return stability_estimates(values[:m], dict(zip(noisy, values[m:].reshape(len(noisy), m), strict=True)), rho_list)


def stability_estimates(fx: np.ndarray, fy: dict[float, np.ndarray], rhos: Sequence[float]) -> dict[float, float]:
    """:func:`noise_stability`'s estimates from values already evaluated: ``fx`` the ``m`` values ``f(x)``, ``fy[ρ]``
    their partners ``f(y)`` for each ``ρ`` in ``(0, 1)`` (``ρ ∈ {0, 1}`` need none). Separate so that a bootstrap can
    resample the pairs (:func:`~lightning_influence.evaluation.datamodels.datamodel_quality_of`)."""
    m = len(fx)
    mu = float(fx.mean())
    dx = fx - mu
    out: dict[float, float] = {}
    for r in rhos:
        if r == 1.0:
            cov = np.mean(dx * dx)
        elif r == 0.0:
            cov = -np.sum(dx * dx) / (m * (m - 1))
        else:
            cov = np.mean(dx * (fy[r] - mu))
        out[r] = float(mu * mu + cov)
    return out


@dataclass(frozen=True)
class FourierMass:
    """Fourier mass split of ``f`` under the p-biased distribution.

    Attributes:
        W0: ``(E f)²``, the degree-0 mass.
        W1: degree-1 mass, captured by the best linear datamodel.
        residual: ``E[f²] - W0 - W1``, the degree ≥ 2 mass: mean squared error of the
            best linear datamodel.
        variance: ``Var f = E[f²] - W0``.
        correlation_ceiling: ``sqrt(W1 / Var f)`` clipped to ``[0, 1]`` (Monte-Carlo
            noise can push the ratio outside): the best correlation any additive
            attribution can reach; ``nan`` if ``Var f <= 0``.
    """

    W0: float
    W1: float
    residual: float
    variance: float
    correlation_ceiling: float


def fourier_mass_from_stability(stabs: dict[float, float], mean_f2: float, max_degree: int = 2) -> FourierMass:
    """Recover ``W0``, ``W1`` and the degree ≥ 2 residual from noise stabilities.

    Fits ``Stab_ρ ≈ Σ_{k=0}^{K} c_k ρ^k`` (``K = max_degree``) by least squares over the
    given ``ρ``; ``W0 = c_0``, ``W1 = c_1``. Degrees above ``K`` are absorbed into the
    fitted terms, so use ``ρ`` small enough that ``ρ^{K+1} W_{>K}`` is negligible, or a
    larger ``K`` with more ``ρ``. Exact when ``f`` has degree ``<= K``.

    Args:
        stabs: ``{ρ: Stab_ρ}``, at least ``max_degree + 1`` distinct ``ρ`` in ``[0, 1]``.
        mean_f2: ``E[f²]`` (``Stab_1``; :func:`noise_stability` returns it for ``ρ = 1``
            at no extra cost).
        max_degree: degree ``K >= 1`` of the fitted polynomial in ``ρ``.
    """
    max_degree = _check_count(max_degree, "max_degree", 1)
    if len(stabs) < max_degree + 1:
        raise ValueError(f"need at least {max_degree + 1} values of rho for max_degree={max_degree}, got {len(stabs)}")
    rho = np.array([_check_rho(r) for r in stabs], dtype=np.float64)
    s = np.array(list(stabs.values()), dtype=np.float64)
    if not np.all(np.isfinite(s)) or not math.isfinite(mean_f2):
        raise ValueError("stabilities and mean_f2 must be finite")
    if mean_f2 < 0:
        raise ValueError(f"mean_f2 = E[f^2] must be >= 0, got {mean_f2}")
    vandermonde = rho[:, None] ** np.arange(max_degree + 1)
    coef = np.linalg.lstsq(vandermonde, s, rcond=None)[0]
    w0, w1 = float(coef[0]), float(coef[1])
    variance = mean_f2 - w0
    ceiling = math.sqrt(min(max(w1 / variance, 0.0), 1.0)) if variance > 0 else float("nan")
    return FourierMass(W0=w0, W1=w1, residual=variance - w1, variance=variance, correlation_ceiling=ceiling)


@dataclass(frozen=True)
class LinearDatamodel:
    """Additive model ``f(mask) ≈ intercept + weights · mask``."""

    intercept: float
    weights: np.ndarray

    def predict(self, masks: ArrayLike) -> np.ndarray:
        """Predictions for ``(M, N)`` boolean masks."""
        arr = _masks(masks)
        if arr.shape[1] != self.weights.size:
            raise ValueError(f"masks have {arr.shape[1]} columns, the datamodel {self.weights.size} weights")
        return self.intercept + arr.astype(np.float64) @ self.weights


def _outcomes(outcomes: ArrayLike, m: int) -> np.ndarray:
    y = np.asarray(outcomes, dtype=np.float64)
    if y.shape != (m,):
        raise ValueError(f"outcomes must have shape ({m},) to match the masks, got {y.shape}")
    if not np.all(np.isfinite(y)):
        raise ValueError("outcomes contain NaN or infinite values")
    return y


def fit_linear_datamodel(masks: ArrayLike, outcomes: ArrayLike) -> LinearDatamodel:
    """Ordinary least-squares linear datamodel (the direct cross-check of the residual).

    Args:
        masks: ``(M, N)`` boolean keep-masks, ``M >= N + 1``.
        outcomes: ``(M,)`` values ``f(mask)``.
    """
    arr = _masks(masks)
    m, n = arr.shape
    if m < n + 1:
        raise ValueError(f"need at least N + 1 = {n + 1} masks to fit {n} weights and an intercept, got {m}")
    y = _outcomes(outcomes, m)
    design = np.concatenate([np.ones((m, 1)), arr.astype(np.float64)], axis=1)
    coef = np.linalg.lstsq(design, y, rcond=None)[0]
    return LinearDatamodel(intercept=float(coef[0]), weights=coef[1:])


def datamodel_residual(masks: ArrayLike, outcomes: ArrayLike, fit: LinearDatamodel) -> float:
    """Mean squared residual ``mean((f(mask) - fit(mask))²)``; on fresh p-biased masks it
    estimates the degree ≥ 2 mass (plus the fit's own estimation error)."""
    arr = _masks(masks)
    y = _outcomes(outcomes, arr.shape[0])
    return float(np.mean((y - fit.predict(arr)) ** 2))
