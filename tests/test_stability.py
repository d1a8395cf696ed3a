"""Noise stability and Fourier mass against brute-force enumeration and analytic values.

Oracles: for N <= 8 the p-biased cube is enumerated exactly. ``Stab_ρ`` is summed
directly over pairs with the transition kernel of the ρ-correlated draw (no Fourier
theory involved), and the Fourier weights ``W_k`` come from projecting ``f`` on every
character ``χ_S``. Monte-Carlo estimates are compared with exact values within
5 standard errors (exact variances from the same enumeration; two-sided normal tail
probability < 6e-7 per comparison); the runs are seeded.
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


def _exact_stability(f: Fn, n: int, p: float, rho: float) -> tuple[float, float]:
    """Exact ``E[f(x) f(y)]`` and ``Var[f(x) f(y)]`` by enumeration of all pairs."""
    x, prob = _cube(n, p)
    fx = np.array([f(row) for row in x])
    joint = prob[:, None] * _kernel(x, p, rho)
    prod = fx[:, None] * fx[None, :]
    mean = float(np.sum(joint * prod))
    return mean, float(np.sum(joint * prod**2) - mean**2)


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
    stabs = {r: _exact_stability(f, N_EXACT, P, r)[0] for r in (0.0, 0.3, 0.6, 1.0)}
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

    stabs = {r: _exact_stability(cubic, 5, P, r)[0] for r in (0.0, 0.25, 0.5, 0.75)}
    mean_f2 = 1 + 1 + 1 + 4
    exact = fourier_mass_from_stability(stabs, mean_f2, max_degree=3)
    assert (exact.W0, exact.W1, exact.residual) == pytest.approx((1.0, 1.0, 5.0), rel=1e-10)
    truncated = fourier_mass_from_stability(stabs, mean_f2, max_degree=2)
    assert abs(truncated.W1 - 1.0) > 0.05  # degree-3 mass leaks into the degree ≤ 2 fit


def test_correlation_ceiling_edge_cases() -> None:
    constant = fourier_mass_from_stability({0.0: 4.0, 0.5: 4.0, 1.0: 4.0}, mean_f2=4.0)
    assert constant.variance == pytest.approx(0.0, abs=1e-12) or constant.variance <= 0
    assert math.isnan(constant.correlation_ceiling) or constant.variance > 0
    # Noisy estimates with W1 > Var f: the ceiling is clipped to 1.
    noisy = fourier_mass_from_stability({0.0: 0.0, 0.5: 0.6, 1.0: 1.2}, mean_f2=1.0)
    assert noisy.W1 == pytest.approx(1.2) and noisy.correlation_ceiling == 1.0


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


def _u_statistic_variance(f: Fn, n: int, p: float, m: int) -> float:
    """Exact variance of the pair average Σ_{a≠b} f_a f_b / (m(m-1)) (Hoeffding)."""
    x, prob = _cube(n, p)
    fx = np.array([f(row) for row in x])
    mu, var = prob @ fx, prob @ fx**2 - (prob @ fx) ** 2
    zeta1, zeta2 = mu**2 * var, (prob @ fx**2) ** 2 - mu**4
    return float((4 * (m - 2) * zeta1 + 2 * zeta2) / (m * (m - 1)))


def _mixed(mask: np.ndarray) -> float:
    chi = _chi(mask, P)
    return float(W_LIN @ mask + B_LIN + 1.5 * chi[0] * chi[1] - chi[2] * chi[5])


@pytest.mark.parametrize("f", [_linear, _mixed])
def test_noise_stability_matches_exact(f: Fn) -> None:
    m = 4000
    rhos = (0.0, 0.25, 0.5, 1.0)
    est = noise_stability(f, N_EXACT, P, rhos, m, rng=7)
    assert list(est) == list(rhos)
    for rho in rhos:
        mean, var = _exact_stability(f, N_EXACT, P, rho)
        se = math.sqrt(_u_statistic_variance(f, N_EXACT, P, m) if rho == 0.0 else var / m)
        assert abs(est[rho] - mean) < 5 * se, (rho, est[rho], mean, se)


def test_noise_stability_batches_and_reuses_evaluations() -> None:
    calls: list[int] = []

    def recording_map(fn: Fn, masks):  # type: ignore[no-untyped-def]
        batch = list(masks)
        calls.append(len(batch))
        assert all(not mk.flags.writeable and mk.dtype == np.bool_ and mk.shape == (N_EXACT,) for mk in batch)
        return [fn(mk) for mk in batch]

    m = 50
    rhos = (1.0, 0.2, 0.0, 0.7)
    batched = noise_stability(_mixed, N_EXACT, P, rhos, m, rng=3, map_fn=recording_map)
    # f(x) once, plus one draw per rho in (0, 1); rho in {0, 1} reuse f(x).
    assert calls == [m * 3]
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
    """Mixed f (W1 = σ²‖w‖² ≈ 1.24, degree-2 mass 1.5² + 1 = 3.25) on N = 12 samples.

    Stability side: the residual is linear in the estimates,
    ``mean_f2 − Σ_r a_r Stab_r`` with ``a`` the least-squares weights of ``c0 + c1``, so
    its error is bounded by ``Σ_r |coefficient_r| · 5 SE_r`` (union of 5-SE events).
    Datamodel side: 5 SE of the mean squared residual on fresh masks, plus the OLS
    estimation excess ``≈ residual · (N + 1) / M_train`` (allowed twice).
    """
    n, p, m = 12, 0.4, 6000
    rng = np.random.default_rng(2024)
    w = rng.normal(size=n)
    sigma2 = p * (1 - p)

    def f(mask: np.ndarray) -> float:
        chi = _chi(mask, p)
        return float(w @ mask + 1.5 * chi[0] * chi[1] - chi[3] * chi[7])

    true_residual, true_w1 = 1.5**2 + 1.0, sigma2 * w @ w

    rhos = (0.0, 0.2, 0.4, 1.0)
    stabs = noise_stability(f, n, p, rhos, m, rng=rng)
    mass = fourier_mass_from_stability(stabs, mean_f2=stabs[1.0])

    # Error propagation with exact standard errors (N = 12: enumeration is 4096 states).
    vander = np.array(rhos)[:, None] ** np.arange(3)
    a = np.linalg.pinv(vander)[:2].sum(axis=0)  # weights of c0 + c1
    a[rhos.index(1.0)] -= 1.0  # residual = Stab_1 - (c0 + c1)
    x, prob = _cube(n, p)
    fx = np.array([f(row) for row in x])
    se = []
    for rho in rhos:
        if rho == 0.0:
            mu, var = prob @ fx, prob @ fx**2 - (prob @ fx) ** 2
            zeta1, zeta2 = mu**2 * var, (prob @ fx**2) ** 2 - mu**4
            se.append(math.sqrt((4 * (m - 2) * zeta1 + 2 * zeta2) / (m * (m - 1))))
        elif rho == 1.0:
            se.append(math.sqrt((prob @ fx**4 - (prob @ fx**2) ** 2) / m))
        else:  # product of f over rho-correlated pairs; kernel on 4096 states is too big,
            # so bound Var[f(x)f(y)] <= E[f(x)^2 f(y)^2] <= E[f^4] (Cauchy-Schwarz).
            se.append(math.sqrt(prob @ fx**4 / m))
    tol_stab = 5 * float(np.abs(a) @ np.array(se))
    assert abs(mass.residual - true_residual) < tol_stab
    assert abs(mass.W1 - true_w1) < tol_stab

    m_train = m_test = 6000
    train = rng.random((m_train, n)) < p
    test = rng.random((m_test, n)) < p
    fit = fit_linear_datamodel(train, [f(mk) for mk in train])
    y_test = np.array([f(mk) for mk in test])
    dm_residual = datamodel_residual(test, y_test, fit)
    sq = (y_test - fit.predict(test)) ** 2
    tol_dm = 5 * sq.std() / math.sqrt(m_test) + 2 * true_residual * (n + 1) / m_train
    assert abs(dm_residual - true_residual) < tol_dm

    assert abs(mass.residual - dm_residual) < tol_stab + tol_dm
    # The tolerances are meaningful: far below the quantities compared.
    assert tol_stab + tol_dm < 0.25 * true_residual


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
