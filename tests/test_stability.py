"""Noise stability and Fourier mass against brute-force enumeration and analytic values.

Oracles: for N <= 8 the p-biased cube is enumerated exactly. ``Stab_ρ`` is summed
directly over pairs with the transition kernel of the ρ-correlated draw (no Fourier
theory involved), and the Fourier weights ``W_k`` come from projecting ``f`` on every
character ``χ_S``. Monte-Carlo estimates are checked as the mean of R independent
seeded replicates against the exact value, within 5 replicate standard errors
(Student t with R - 1 >= 9 degrees of freedom: two-sided tail < 1e-3 per comparison).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

from lightning_influence.evaluation.stability import (
    LinearDatamodel,
    biased_coordinates,
    datamodel_residual,
    fit_linear_datamodel,
    fourier_mass_from_stability,
    noise_stability,
    sample_correlated_pairs,
)

Fn = Callable[[np.ndarray], float]


def _cube(n: int, p: float) -> tuple[np.ndarray, np.ndarray]:
    """All 2^n keep-masks and their p-biased probabilities."""
    x = ((np.arange(2**n)[:, None] >> np.arange(n)) & 1).astype(bool)
    k = x.sum(axis=1)
    return x, p**k * (1 - p) ** (n - k)


def _kernel(x: np.ndarray, p: float, rho: float) -> np.ndarray:
    """``K[a, b] = P(y = x_b | x = x_a)`` for the ρ-correlated redraw."""
    same = x[:, None, :] == x[None, :, :]
    fresh = np.where(x[None, :, :], p, 1 - p)
    return np.prod(rho * same + (1 - rho) * fresh, axis=2)


def _exact_stability(f: Fn, n: int, p: float, rho: float) -> float:
    """Exact ``E[f(x) f(y)]`` by enumeration of all pairs."""
    x, prob = _cube(n, p)
    fx = np.array([f(row) for row in x])
    joint = prob[:, None] * _kernel(x, p, rho)
    return float(np.sum(joint * fx[:, None] * fx[None, :]))


def _fourier_weights(f: Fn, n: int, p: float) -> np.ndarray:
    """``W_k`` for k = 0..n by projecting f on every p-biased character."""
    x, prob = _cube(n, p)
    fx = np.array([f(row) for row in x])
    chi = (x - p) / math.sqrt(p * (1 - p))
    subsets = x  # the same bit patterns index the characters
    phi = np.ones((x.shape[0], subsets.shape[0]))
    for i in range(n):
        phi *= np.where(subsets[None, :, i], chi[:, i : i + 1], 1.0)
    coef = (prob * fx) @ phi
    return np.bincount(subsets.sum(axis=1), weights=coef**2, minlength=n + 1)


def _chi(mask: np.ndarray, p: float) -> np.ndarray:
    return (mask - p) / math.sqrt(p * (1 - p))


# --- coordinates and sampling ---------------------------------------------------------


def test_biased_coordinates_are_standardised() -> None:
    p = 0.3
    chi = biased_coordinates(np.array([False, True]), p)
    np.testing.assert_allclose(chi, [-p / math.sqrt(p * (1 - p)), (1 - p) / math.sqrt(p * (1 - p))], rtol=1e-15)
    probs = np.array([1 - p, p])
    assert probs @ chi == pytest.approx(0.0, abs=1e-15)
    assert probs @ chi**2 == pytest.approx(1.0, rel=1e-14)


def test_correlated_pairs_statistics() -> None:
    n, p, rho, m = 10, 0.3, 0.6, 20_000
    x, y = sample_correlated_pairs(n, p, rho, m, rng=0)
    assert x.shape == y.shape == (m, n) and x.dtype == y.dtype == np.bool_
    se_mean = math.sqrt(p * (1 - p) / (m * n))
    assert abs(x.mean() - p) < 5 * se_mean and abs(y.mean() - p) < 5 * se_mean
    cx, cy = biased_coordinates(x, p), biased_coordinates(y, p)
    prod = cx * cy
    assert abs(prod.mean() - rho) < 5 * prod.std() / math.sqrt(m * n)
    x1, y1 = sample_correlated_pairs(n, p, 1.0, 100, rng=1)
    np.testing.assert_array_equal(x1, y1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"p": 0.0}, "p must be in"),
        ({"p": 1.0}, "p must be in"),
        ({"rho": 1.5}, "rho must be in"),
        ({"m": 0}, "m must be an integer"),
        ({"n": 2.5}, "n must be an integer"),
    ],
)
def test_correlated_pairs_validation(kwargs: dict[str, float], match: str) -> None:
    args = {"n": 3, "p": 0.5, "rho": 0.5, "m": 4} | kwargs
    with pytest.raises(ValueError, match=match):
        sample_correlated_pairs(**args)  # type: ignore[arg-type]


# --- exact stabilities -> Fourier mass --------------------------------------------------

P = 0.3
N_EXACT = 6
W_LIN = np.array([0.5, -1.0, 2.0, 0.0, 0.3, -0.7])
B_LIN = 0.4
SIGMA2 = P * (1 - P)


def _linear(mask: np.ndarray) -> float:
    return float(W_LIN @ mask + B_LIN)


def _pure_degree2(mask: np.ndarray) -> float:
    chi = _chi(mask, P)
    return float(chi[0] * chi[1])


def _product(mask: np.ndarray) -> float:
    return float(mask[0] * mask[1])


# Analytic (W0, W1, residual): with x = p + σχ,
#   w·x + b = (b + pΣw) + σ Σ w_i χ_i;   x0 x1 = p² + pσ(χ0 + χ1) + σ² χ0 χ1.
ANALYTIC = {
    "linear": (_linear, ((B_LIN + P * W_LIN.sum()) ** 2, SIGMA2 * W_LIN @ W_LIN, 0.0)),
    "chi0_chi1": (_pure_degree2, (0.0, 0.0, 1.0)),
    "x0_x1": (_product, (P**4, 2 * P**2 * SIGMA2, SIGMA2**2)),
}


@pytest.mark.parametrize("case", list(ANALYTIC))
def test_fourier_mass_from_exact_stability(case: str) -> None:
    f, (w0, w1, residual) = ANALYTIC[case]
    weights = _fourier_weights(f, N_EXACT, P)  # independent brute-force oracle
    np.testing.assert_allclose(weights[:2], [w0, w1], rtol=1e-12, atol=1e-14)
    assert weights[2:].sum() == pytest.approx(residual, rel=1e-12, abs=1e-14)
    stabs = {r: _exact_stability(f, N_EXACT, P, r) for r in (0.0, 0.3, 0.6, 1.0)}
    mass = fourier_mass_from_stability(stabs, mean_f2=stabs[1.0])
    assert mass.W0 == pytest.approx(w0, rel=1e-10, abs=1e-12)
    assert mass.W1 == pytest.approx(w1, rel=1e-10, abs=1e-12)
    assert mass.residual == pytest.approx(residual, rel=1e-10, abs=1e-12)
    assert mass.variance == pytest.approx(w1 + residual, rel=1e-10, abs=1e-12)
    assert mass.correlation_ceiling == pytest.approx(math.sqrt(w1 / (w1 + residual)), rel=1e-6, abs=1e-6)


def test_fourier_mass_higher_degree_needs_higher_fit() -> None:
    def cubic(mask: np.ndarray) -> float:
        chi = _chi(mask, P)
        return float(1.0 + chi[0] + chi[1] * chi[2] + 2.0 * chi[0] * chi[3] * chi[4])

    stabs = {r: _exact_stability(cubic, 5, P, r) for r in (0.0, 0.25, 0.5, 0.75)}
    mean_f2 = 1 + 1 + 1 + 4
    exact = fourier_mass_from_stability(stabs, mean_f2, max_degree=3)
    assert (exact.W0, exact.W1, exact.residual) == pytest.approx((1.0, 1.0, 5.0), rel=1e-10)
    truncated = fourier_mass_from_stability(stabs, mean_f2, max_degree=2)
    assert abs(truncated.W1 - 1.0) > 0.05  # degree-3 mass leaks into the degree ≤ 2 fit


def test_correlation_ceiling_edge_cases() -> None:
    # Noisy estimates can leave the valid range; the ceiling is clipped, W1 is not.
    above = fourier_mass_from_stability({0.0: 0.0, 0.5: 0.6, 1.0: 1.2}, mean_f2=1.0)
    assert above.W1 == pytest.approx(1.2, rel=1e-12) and above.correlation_ceiling == 1.0
    below = fourier_mass_from_stability({0.0: 1.0, 0.5: 0.9, 1.0: 0.8}, mean_f2=2.0)
    assert below.W1 == pytest.approx(-0.2, rel=1e-12) and below.correlation_ceiling == 0.0
    no_variance = fourier_mass_from_stability({0.0: 1.0, 0.5: 1.0, 1.0: 1.0}, mean_f2=0.5)
    assert no_variance.variance == pytest.approx(-0.5, rel=1e-12)
    assert math.isnan(no_variance.correlation_ceiling)


@pytest.mark.parametrize(
    ("stabs", "kwargs", "match"),
    [
        ({0.0: 1.0, 0.5: 1.0}, {}, "at least 3 values of rho"),
        ({0.0: 1.0, 0.5: 1.0, 2.0: 1.0}, {}, "rho must be in"),
        ({0.0: 1.0, 0.5: float("nan"), 1.0: 1.0}, {}, "finite"),
        ({0.0: 1.0, 0.5: 1.0, 1.0: 1.0}, {"max_degree": 0}, "max_degree must be"),
        ({0.0: 1.0, 0.5: 1.0, 1.0: 1.0}, {"mean_f2": -1.0}, "mean_f2"),
    ],
)
def test_fourier_mass_validation(stabs: dict[float, float], kwargs: dict[str, float], match: str) -> None:
    args = {"mean_f2": 1.0} | kwargs
    with pytest.raises(ValueError, match=match):
        fourier_mass_from_stability(stabs, **args)  # type: ignore[arg-type]


# --- Monte-Carlo estimates --------------------------------------------------------------


def _mixed(mask: np.ndarray) -> float:
    chi = _chi(mask, P)
    return float(W_LIN @ mask + B_LIN + 1.5 * chi[0] * chi[1] - chi[2] * chi[5])


@pytest.mark.parametrize("f", [_linear, _mixed])
def test_noise_stability_matches_exact(f: Fn) -> None:
    """Mean of R seeded replicates within 5 replicate standard errors of the exact value."""
    reps, m, rhos = 16, 500, (0.0, 0.25, 0.6, 1.0)
    runs = [noise_stability(f, N_EXACT, P, rhos, m, rng=seed) for seed in range(reps)]
    assert all(list(run) == list(rhos) for run in runs)
    for rho in rhos:
        values = np.array([run[rho] for run in runs])
        exact = _exact_stability(f, N_EXACT, P, rho)
        assert abs(values.mean() - exact) < 5 * values.std(ddof=1) / math.sqrt(reps), (rho, values.mean(), exact)


def test_noise_stability_batches_and_reuses_evaluations() -> None:
    calls: list[list[float]] = []

    def recording_map(fn: Fn, masks):  # type: ignore[no-untyped-def]
        batch = list(masks)
        assert all(not mk.flags.writeable and mk.dtype == np.bool_ and mk.shape == (N_EXACT,) for mk in batch)
        calls.append([fn(mk) for mk in batch])
        return calls[-1]

    m = 50
    rhos = (1.0, 0.2, 0.0, 0.7)
    batched = noise_stability(_mixed, N_EXACT, P, rhos, m, rng=3, map_fn=recording_map)
    # One batch: f(x) once plus one draw per rho in (0, 1); rho in {0, 1} reuse f(x).
    assert len(calls) == 1 and len(calls[0]) == m * 3
    fx = np.array(calls[0][:m])
    assert batched[1.0] == pytest.approx(np.mean(fx**2), rel=1e-12)
    pair_sum = sum(fx[a] * fx[b] for a in range(m) for b in range(m) if a != b)
    assert batched[0.0] == pytest.approx(pair_sum / (m * (m - 1)), rel=1e-10)
    assert batched == noise_stability(_mixed, N_EXACT, P, rhos, m, rng=3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rhos": (0.5, 0.5)}, "distinct"),
        ({"rhos": ()}, "non-empty"),
        ({"rhos": (1.2,)}, "rho must be in"),
        ({"m": 1}, "m must be an integer >= 2"),
        ({"p": 1.0}, "p must be in"),
        ({"f": lambda mask: float("nan")}, "NaN"),
        ({"map_fn": lambda fn, masks: [0.0]}, "returned 1 values"),
    ],
)
def test_noise_stability_validation(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"f": _linear, "n": 3, "p": 0.5, "rhos": (0.0, 0.5), "m": 4} | kwargs
    with pytest.raises(ValueError, match=match):
        noise_stability(**args)  # type: ignore[arg-type]


# --- linear datamodel cross-check -------------------------------------------------------


def test_linear_datamodel_recovers_linear_f() -> None:
    rng = np.random.default_rng(11)
    masks = rng.random((40, N_EXACT)) < P
    outcomes = np.array([_linear(mk) for mk in masks])
    fit = fit_linear_datamodel(masks, outcomes)
    np.testing.assert_allclose(fit.weights, W_LIN, rtol=1e-10, atol=1e-12)
    assert fit.intercept == pytest.approx(B_LIN, rel=1e-10)
    assert datamodel_residual(masks, outcomes, fit) == pytest.approx(0.0, abs=1e-20)
    # hand check of the residual: errors (1, -2) -> mean square 2.5
    model = LinearDatamodel(intercept=1.0, weights=np.array([2.0, 0.0]))
    assert datamodel_residual(np.array([[True, False], [False, True]]), [4.0, -1.0], model) == 2.5


def test_stability_residual_agrees_with_fitted_datamodel() -> None:
    """Mixed f on N = 12 samples: analytic W1 = σ²‖w‖², degree-2 mass 1.5² + 1 = 3.25.

    Noise stability: mean of R seeded replicates, error bar 5 replicate standard errors.
    Fitted datamodel (fresh train and test masks): 5 standard errors of the mean squared
    test residual, plus the OLS estimation excess ``≈ residual · (N + 1) / M_train``
    (allowed three times).
    """
    n, p, m, reps = 12, 0.4, 3000, 10
    rng = np.random.default_rng(2024)
    w = rng.normal(size=n)

    def f(mask: np.ndarray) -> float:
        chi = _chi(mask, p)
        return float(w @ mask + 1.5 * chi[0] * chi[1] - chi[3] * chi[7])

    true_w1, true_residual = p * (1 - p) * w @ w, 1.5**2 + 1.0

    rhos = (0.0, 0.25, 0.5, 0.75, 1.0)
    masses = []
    for seed in range(reps):
        stabs = noise_stability(f, n, p, rhos, m, rng=seed)
        masses.append(fourier_mass_from_stability(stabs, mean_f2=stabs[1.0]))
    residuals = np.array([fm.residual for fm in masses])
    w1s = np.array([fm.W1 for fm in masses])
    se_stab = residuals.std(ddof=1) / math.sqrt(reps)
    assert abs(residuals.mean() - true_residual) < 5 * se_stab
    assert abs(w1s.mean() - true_w1) < 5 * w1s.std(ddof=1) / math.sqrt(reps)
    ceiling = math.sqrt(true_w1 / (true_w1 + true_residual))
    ceilings = np.array([fm.correlation_ceiling for fm in masses])
    assert abs(ceilings.mean() - ceiling) < 5 * ceilings.std(ddof=1) / math.sqrt(reps)

    train = rng.random((m, n)) < p
    test = rng.random((m, n)) < p
    fit = fit_linear_datamodel(train, [f(mk) for mk in train])
    y_test = np.array([f(mk) for mk in test])
    dm_residual = datamodel_residual(test, y_test, fit)
    se_dm = ((y_test - fit.predict(test)) ** 2).std(ddof=1) / math.sqrt(m)
    excess = 3 * true_residual * (n + 1) / m
    assert abs(dm_residual - true_residual) < 5 * se_dm + excess

    tol = 5 * math.hypot(se_stab, se_dm) + excess
    assert abs(residuals.mean() - dm_residual) < tol
    assert tol < 0.25 * true_residual  # the check is sharp enough to catch a wrong estimator


def test_datamodel_validation() -> None:
    masks = np.zeros((5, 3), dtype=bool)
    with pytest.raises(ValueError, match="at least N \\+ 1 = 4 masks"):
        fit_linear_datamodel(masks[:3], np.zeros(3))
    with pytest.raises(ValueError, match="boolean"):
        fit_linear_datamodel(masks.astype(int), np.zeros(5))
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        fit_linear_datamodel(masks, np.zeros(4))
    with pytest.raises(ValueError, match="NaN"):
        fit_linear_datamodel(masks, [0.0, 1.0, np.nan, 0.0, 0.0])
    with pytest.raises(ValueError, match="3 columns, the datamodel 2 weights"):
        LinearDatamodel(0.0, np.zeros(2)).predict(masks)
