"""Metrics against hand-computed values, brute force, and scipy/sklearn as oracles."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from lightning_influence.evaluation.metrics import (
    auroc,
    jaccard_at_k,
    kendall_tau,
    linear_datamodeling_score,
    pearson,
    precision_at_k,
    rankdata,
    recall_at_k,
    spearman,
    summarize,
)

RTOL = 1e-12


def _random_pair(rng: np.random.Generator, n: int, levels: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Correlated pair; with ``levels`` the values are rounded to force ties."""
    a = rng.normal(size=n)
    b = 0.6 * a + rng.normal(size=n)
    if levels is not None:
        a, b = np.round(a * levels / 3), np.round(b * levels / 3)
    return a, b


def _kendall_brute(a: np.ndarray, b: np.ndarray) -> float:
    """Tau-b straight from its definition over all pairs."""
    c = d = ta = tb = 0
    for i, j in itertools.combinations(range(a.size), 2):
        sa, sb = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
        ta += sa == 0
        tb += sb == 0
        c += sa * sb > 0
        d += sa * sb < 0
    n0 = a.size * (a.size - 1) // 2
    return (c - d) / np.sqrt((n0 - ta) * (n0 - tb))


# --- hand-computed values ---------------------------------------------------------


def test_hand_values() -> None:
    a, b = [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0]
    # centred: (-1.5,-.5,.5,1.5) and (-1.5,.5,-.5,1.5): dot 4, norms 5 -> 0.8
    assert pearson(a, b) == pytest.approx(0.8, rel=RTOL)
    assert spearman(a, b) == pytest.approx(0.8, rel=RTOL)
    # 6 pairs, one discordant (2,3): (5 - 1) / 6
    assert kendall_tau(a, b) == pytest.approx(4 / 6, rel=RTOL)
    assert pearson(a, [-v for v in a]) == pytest.approx(-1.0, rel=RTOL)


def test_rankdata_ties_average() -> None:
    np.testing.assert_array_equal(rankdata([10, 20, 10, 30, 20, 20]), [1.5, 4, 1.5, 6, 4, 4])
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, size=200).astype(float)
    np.testing.assert_array_equal(rankdata(x), stats.rankdata(x))


# --- oracles ------------------------------------------------------------------------


@pytest.mark.parametrize("levels", [None, 2, 5])
def test_correlations_match_scipy(levels: int | None) -> None:
    rng = np.random.default_rng(1)
    for n in (2, 3, 17, 500):
        a, b = _random_pair(rng, n, levels)
        if np.ptp(a) == 0 or np.ptp(b) == 0:
            continue
        assert pearson(a, b) == pytest.approx(stats.pearsonr(a, b)[0], rel=1e-10, abs=1e-12)
        assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b)[0], rel=1e-10, abs=1e-12)
        assert kendall_tau(a, b) == pytest.approx(stats.kendalltau(a, b, variant="b")[0], rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("n", [2, 3, 7, 8, 9, 31, 64])
def test_kendall_brute_force(n: int) -> None:
    rng = np.random.default_rng(n)
    for levels in (None, 2, 4):
        a, b = _random_pair(rng, n, levels)
        if np.ptp(a) == 0 or np.ptp(b) == 0:
            continue
        assert kendall_tau(a, b) == pytest.approx(_kendall_brute(a, b), rel=1e-12, abs=1e-14)


def test_kendall_large_is_fast_and_exact() -> None:
    rng = np.random.default_rng(2)
    a, b = _random_pair(rng, 50_000, 40)
    assert kendall_tau(a, b) == pytest.approx(stats.kendalltau(a, b)[0], rel=1e-10)


def test_constant_input_gives_nan() -> None:
    a, c = [1.0, 2.0, 3.0], [5.0, 5.0, 5.0]
    for fn in (pearson, spearman, kendall_tau):
        assert np.isnan(fn(a, c)) and np.isnan(fn(c, a))


def test_auroc_matches_sklearn_with_ties() -> None:
    rng = np.random.default_rng(3)
    for levels in (None, 3):
        scores = rng.normal(size=300)
        mask = rng.random(300) < 0.2
        scores[mask] += 1.0
        if levels is not None:
            scores = np.round(scores * levels)
        assert auroc(scores, mask) == pytest.approx(roc_auc_score(mask, scores), rel=1e-12)
    # hand: pos {2, 1}, neg {1, 0}: pairs (2>1, 2>0, 1=1 -> 1/2, 1>0) = 3.5 / 4
    assert auroc([2, 1, 1, 0], [1, 1, 0, 0]) == pytest.approx(0.875, rel=RTOL)


def test_precision_recall_at_k() -> None:
    scores = np.array([0.9, 0.1, 0.8, 0.7, 0.2, 0.6])
    mask = np.array([True, True, False, True, False, False])
    # top-3: indices 0, 2, 3 -> positives 0, 3
    assert precision_at_k(scores, mask, 3) == pytest.approx(2 / 3, rel=RTOL)
    assert recall_at_k(scores, mask, 3) == pytest.approx(2 / 3, rel=RTOL)
    assert recall_at_k(scores, mask, 6) == 1.0
    assert precision_at_k(scores, mask.astype(int), 1) == 1.0
    # ties at the boundary go to the lower index
    assert precision_at_k([1.0, 1.0, 0.0], [False, True, True], 1) == 0.0


def test_precision_recall_brute_force() -> None:
    rng = np.random.default_rng(4)
    scores = rng.permutation(100).astype(float)  # no ties: top-k unambiguous
    mask = rng.random(100) < 0.3
    for k in (1, 5, 30, 100):
        top = set(np.argsort(scores)[::-1][:k])
        hits = sum(mask[i] for i in top)
        assert precision_at_k(scores, mask, k) == pytest.approx(hits / k, rel=RTOL)
        assert recall_at_k(scores, mask, k) == pytest.approx(hits / mask.sum(), rel=RTOL)


def test_jaccard_at_k() -> None:
    a = [5.0, 4.0, 3.0, 2.0, 1.0]
    b = [5.0, 1.0, 4.0, 2.0, 3.0]
    # top-2: {0,1} vs {0,2} -> 1/3; bottom-2: {3,4} vs {1,3} -> 1/3; top-3: {0,1,2} vs {0,2,4} -> 2/4
    assert jaccard_at_k(a, b, 2) == pytest.approx(1 / 3, rel=RTOL)
    assert jaccard_at_k(a, b, 2, largest=False) == pytest.approx(1 / 3, rel=RTOL)
    assert jaccard_at_k(a, b, 3) == pytest.approx(0.5, rel=RTOL)
    assert jaccard_at_k(a, b, 5) == 1.0
    assert jaccard_at_k([1.0, 1.0, 0.0], [0.0, 1.0, 1.0], 1) == 0.0  # ties: lower index


def test_lds_matches_definition() -> None:
    rng = np.random.default_rng(5)
    n, m = 30, 50
    tau = rng.normal(size=n)
    subsets = rng.random((m, n)) < 0.5
    outcomes = subsets @ tau + 0.5 * rng.normal(size=m)
    expected = stats.spearmanr([tau[s].sum() for s in subsets], outcomes)[0]
    assert linear_datamodeling_score(tau, subsets, outcomes) == pytest.approx(expected, rel=1e-12)
    # exact additive model: perfect score; negated attributions: -1
    exact = subsets @ tau
    assert linear_datamodeling_score(tau, subsets, exact) == pytest.approx(1.0, rel=RTOL)
    assert linear_datamodeling_score(-tau, subsets, exact) == pytest.approx(-1.0, rel=RTOL)


def test_summarize() -> None:
    rng = np.random.default_rng(6)
    est, truth = _random_pair(rng, 45, None)
    out = summarize(est, truth)
    assert out == {
        "pearson": pytest.approx(stats.pearsonr(est, truth)[0], rel=1e-10),
        "spearman": pytest.approx(stats.spearmanr(est, truth)[0], rel=1e-10),
        "kendall": pytest.approx(stats.kendalltau(est, truth)[0], rel=1e-10),
        "jaccard@4": jaccard_at_k(est, truth, 4),
    }
    assert set(summarize(est[:5], truth[:5])) >= {"jaccard@1"}
    assert set(summarize(est, truth, k=10)) >= {"jaccard@10"}


# --- validation ---------------------------------------------------------------------


@pytest.mark.parametrize("fn", [pearson, spearman, kendall_tau, summarize])
def test_pair_validation(fn) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="length mismatch"):
        fn([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="NaN"):
        fn([1.0, np.nan, 3.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="at least 2"):
        fn([1.0], [2.0])
    with pytest.raises(ValueError, match="1-D"):
        fn(np.ones((2, 2)), np.ones((2, 2)))


def test_k_and_mask_validation() -> None:
    with pytest.raises(ValueError, match="k must be in"):
        jaccard_at_k([1.0, 2.0], [2.0, 1.0], 3)
    with pytest.raises(ValueError, match="k must be in"):
        precision_at_k([1.0, 2.0], [True, False], 0)
    with pytest.raises(ValueError, match="k must be an integer"):
        summarize([1.0, 2.0], [2.0, 1.0], k=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="length mismatch"):
        auroc([1.0, 2.0], [True])
    with pytest.raises(ValueError, match="only 0 and 1"):
        auroc([1.0, 2.0], [0, 2])
    with pytest.raises(ValueError, match="positives and negatives"):
        auroc([1.0, 2.0], [True, True])
    with pytest.raises(ValueError, match="at least one positive"):
        recall_at_k([1.0, 2.0], [False, False], 1)
    with pytest.raises(ValueError, match=r"shape \(M, 3\)"):
        linear_datamodeling_score([1.0, 2.0, 3.0], np.ones((4, 2), bool), np.ones(4))
    with pytest.raises(ValueError, match="boolean"):
        linear_datamodeling_score([1.0, 2.0], np.ones((4, 2)), np.ones(4))
    with pytest.raises(ValueError, match="4 subsets but 3 outcomes"):
        linear_datamodeling_score([1.0, 2.0], np.ones((4, 2), bool), np.ones(3))
