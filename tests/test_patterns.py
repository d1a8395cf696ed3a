"""Temporal pattern classification on constructed timelines, statistics against scipy."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from lightning_influence.evaluation.patterns import (
    Pattern,
    PatternThresholds,
    classify_timeline,
    classify_windows,
)

W = 8
RAMP = np.linspace(1.0, 0.1, W)
NOISE = 0.02  # σ of the constructed increments: k·σ = 0.06 (every pattern's increments are above, the tiny pair's below)


def _population(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Three samples per pattern at random positive scales, each with its mirror image.

    Mirroring makes every window column exactly zero-mean, so ``|z| = |DIT| / std`` and
    the intended pattern is unambiguous: constant (stable), decaying (early), growing
    (late), alternating (fluctuating). A tiny alternating pair is added: it flips signs
    but stays within the noise (``NOISE``), so it is negligible, not fluctuating.
    """
    shapes = {
        Pattern.STABLE: np.ones(W),
        Pattern.EARLY: 2 * RAMP,
        Pattern.LATE: 2 * RAMP[::-1],
        Pattern.FLUCTUATING: 1.5 * (-1.0) ** np.arange(W),
    }
    rows, names = [], []
    for pattern, shape in shapes.items():
        for scale in rng.uniform(0.7, 1.4, size=3):
            rows += [scale * shape, -scale * shape]
            names += [pattern.value] * 2
    tiny = 0.05 * (-1.0) ** np.arange(W)
    rows += [tiny, -tiny]
    names += [Pattern.NEGLIGIBLE.value] * 2
    perm = rng.permutation(len(rows))
    return np.array(rows)[perm], np.array(names)[perm]


def test_constructed_patterns_are_recovered() -> None:
    x, expected = _population(np.random.default_rng(0))
    result = classify_windows(x, noise=NOISE)
    np.testing.assert_array_equal(result.labels, expected)
    assert result.counts() == {"negligible": 2, "stable": 6, "early": 6, "late": 6, "fluctuating": 6}
    np.testing.assert_array_equal(result.mask(Pattern.EARLY), expected == "early")
    np.testing.assert_array_equal(result.mask("late"), expected == "late")
    with pytest.raises(ValueError):
        result.mask("sideways")
    is_tiny = np.abs(x).max(axis=1) < 0.1
    assert np.all(result.flip_ratio[is_tiny] == 0.0) and np.all(result.magnitude[is_tiny] < 0.1)  # no significant pair
    assert not result.significant[is_tiny].any() and result.significant[~is_tiny].all()


def test_thresholds_drive_the_rules() -> None:
    x, expected = _population(np.random.default_rng(1))
    base = classify_windows(x, noise=NOISE)
    trend = np.isin(expected, ["early", "late"])
    t_abs = np.abs(base.slope_t[trend])
    assert np.all(np.isfinite(t_abs))  # |z| is not an exact line: the column spread bends it
    strict = classify_windows(x, PatternThresholds(slope_t=1.01 * t_abs.max()), noise=NOISE)
    assert np.all(strict.labels[trend] == "stable")
    np.testing.assert_array_equal(strict.labels[~trend], expected[~trend])
    # Fluctuating samples have flip ratio exactly 1 and magnitude ~1.
    assert np.all(classify_windows(x, PatternThresholds(flip_ratio=1.0), noise=NOISE).labels == expected)
    big = classify_windows(x, PatternThresholds(min_magnitude=10.0), noise=NOISE)
    assert np.all(big.labels[expected == "fluctuating"] == "fluctuating")  # rule 6: sign changes are never stable
    quiet = classify_windows(x, noise=0.0)  # no noise: the tiny pair's alternation is a pattern
    assert np.all(quiet.labels[np.abs(x).max(axis=1) < 0.1] == "fluctuating")
    loud = classify_windows(x, noise=10.0)  # everything within the noise
    assert np.all(loud.labels == "negligible")


def test_statistics_match_scipy() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(12, 6)) * rng.uniform(0.5, 3.0, size=6)
    result = classify_windows(x)
    np.testing.assert_allclose(result.zscores, stats.zscore(x, axis=0), rtol=1e-12, atol=1e-13)
    for i in range(x.shape[0]):
        fit = stats.linregress(np.arange(6), np.abs(result.zscores[i]))
        assert result.slope[i] == pytest.approx(fit.slope, rel=1e-10, abs=1e-13)
        assert result.slope_t[i] == pytest.approx(fit.slope / fit.stderr, rel=1e-9)
    rms = np.sqrt(np.mean(x**2))
    np.testing.assert_allclose(result.magnitude, np.sqrt(np.mean(x**2, axis=1)) / rms, rtol=1e-12)


def test_flip_ratio_ignores_near_zero_increments() -> None:
    x = np.array(
        [
            [1.0, -1.0, 0.0, -2.0, 3.0, 1e-9],  # signs + - . - + . -> 2 flips / 3 pairs
            [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],  # no flips
            [0.0, 0.0, 2.0, 0.0, 0.0, 0.0],  # a single non-zero increment: no pair
            [-1.0, 1.0, -1.0, 1.0, -1.0, 1.0],  # every pair flips
        ]
    )
    result = classify_windows(x, noise=1e-6)
    np.testing.assert_allclose(result.flip_ratio, [2 / 3, 0.0, 0.0, 1.0], rtol=1e-15)
    # With no noise the 1e-9 increment counts: + after + (no flip): 2 flips / 4 pairs.
    assert classify_windows(x, noise=0.0).flip_ratio[0] == pytest.approx(0.5)


def test_constant_columns_get_zero_zscore() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(10, 5))
    x[:, 2] = 5.0
    x[:, 4] = 0.0
    result = classify_windows(x)
    assert np.all(np.isfinite(result.zscores)) and np.all(np.isfinite(result.slope))
    assert np.all(result.zscores[:, [2, 4]] == 0.0)
    np.testing.assert_allclose(result.zscores[:, [0, 1, 3]], stats.zscore(x[:, [0, 1, 3]], axis=0), rtol=1e-12)


def test_all_zero_input_is_negligible() -> None:
    result = classify_windows(np.zeros((4, 5)))
    assert np.all(result.labels == "negligible")
    for arr in (result.slope_t, result.flip_ratio, result.magnitude, result.zscores):
        assert np.all(arr == 0.0)


def test_timeline_equals_windows_of_differences() -> None:
    x, expected = _population(np.random.default_rng(4))
    offset = np.random.default_rng(5).normal(size=(x.shape[0], 1))  # F(t0) need not be 0
    timeline = np.concatenate([offset, offset + np.cumsum(x, axis=1)], axis=1)
    from_timeline = classify_timeline(timeline, noise=NOISE)
    np.testing.assert_array_equal(from_timeline.labels, expected)
    np.testing.assert_allclose(from_timeline.slope_t, classify_windows(x).slope_t, rtol=1e-9)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (np.ones((4, 2)), "at least 3 windows"),
        (np.ones((1, 5)), "at least 2 samples"),
        (np.ones(5), "2-D"),
        (np.array([[1.0, np.nan, 2.0], [1.0, 2.0, 3.0]]), "NaN"),
    ],
)
def test_window_validation(data: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        classify_windows(data)


def test_timeline_validation() -> None:
    with pytest.raises(ValueError, match="at least 4 grid times"):
        classify_timeline(np.ones((4, 3)))
    with pytest.raises(ValueError, match="2-D"):
        classify_timeline(np.ones(6))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"slope_t": 0.0},
        {"slope_t": float("nan")},
        {"flip_ratio": 0.0},
        {"flip_ratio": 1.5},
        {"min_magnitude": -0.1},
        {"rel_tol": 1.0},
        {"rel_tol": True},
    ],
)
def test_threshold_validation(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        PatternThresholds(**kwargs)


def test_noise_calibration_negligible_and_stable_means_stable() -> None:
    """A heavy-tailed population: a noise bulk, one steady sample, one whose increments go from +1.6e-2 to
    -1.1e-2 (the issue's "stable" sample), one early. The default σ_w is the bulk's robust spread."""
    rng = np.random.default_rng(4)
    bulk = rng.normal(scale=1e-4, size=(200, 10))
    steady = np.full(10, 5e-3)
    swing = np.array([1.6e-2, 1.2e-2, 8e-3, 4e-3, 1e-3, -2e-3, -5e-3, -8e-3, -1.0e-2, -1.1e-2])
    early = np.array([2e-2, 1e-2, 5e-3, 1e-3, 0, 0, 0, 0, 0, 0]) + 1e-5
    result = classify_windows(np.vstack([bulk, steady, swing, early]))
    np.testing.assert_allclose(result.noise, 1.4826 * np.median(np.abs(np.vstack([bulk, steady, swing, early])), axis=0))
    assert abs(result.noise.mean() / 1e-4 - 1) < 0.15  # the bulk's σ, barely moved by the three signals
    assert result.labels[200] == "stable" and result.labels[201] != "stable" and result.labels[202] == "early"
    assert result.counts()["negligible"] >= 190  # pure noise: at k = 3, 10 windows, ~97% of the bulk


def test_sums_and_sparse_windows_are_judged_against_the_noise():
    """A steady same-sign sample whose every window is below k·σ but whose sum is not is ``stable``, an
    alternating one of the same size ``negligible``; a sample standing out in one late (early) window only
    is ``late`` (``early``), not ``stable`` (found on a real run: increments 7e-5, -7.6e-4, -1.1e-3, -1.8e-2
    were called stable). σ = 1 given, k = 3: the sum's threshold is 3·√9 = 9."""
    from lightning_influence.evaluation.patterns import classify_windows

    rng = np.random.default_rng(0)
    w = 9
    bulk = 0.3 * rng.standard_normal((50, w))
    steady = np.full(w, 1.8)  # every window below 3, sum 16.2 > 9
    alternating = 2.9 * np.resize([1.0, -1.0], w)  # |sum| = 2.9 < 9
    late = np.array([7e-5, -7.6e-4, -1.1e-3, 0, 0, 0, 0, 0, -18.0])
    early = np.array([10.0, 0, 0, 0, 0, 0, 0, 0, 0])
    res = classify_windows(np.vstack([bulk, steady, alternating, late, early]), noise=1.0)
    assert not res.significant[-4].any() and not res.significant[-3].any()
    assert res.significant[-2].sum() == 1 and res.significant[-1].sum() == 1
    assert list(res.labels[-4:]) == ["stable", "negligible", "late", "early"]
