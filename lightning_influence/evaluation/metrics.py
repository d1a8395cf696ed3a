"""Agreement metrics between influence estimates and ground truth (docs/influence-math.md §6).

Pure numpy functions: 1-D array-likes in, Python floats out. Inputs are validated
(equal length, finite values, enough entries) and a ``ValueError`` names the problem.

Conventions:

* Correlations of a constant input are undefined and returned as ``nan`` (as
  ``scipy.stats`` does), so that one degenerate query does not abort a whole
  benchmark; aggregate with ``np.nanmean`` or filter.
* Top-k sets take the ``k`` largest values (``largest=False``: smallest); ties at
  the boundary go to the lower index, so results are deterministic.
* Detection metrics (precision/recall@k, AUROC) rank by ``scores``, larger meaning
  "more likely positive". With the project's sign (docs/influence-math.md §2: for a loss query, negative =
  harmful), pass ``-scores`` to detect harmful samples.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "auroc",
    "jaccard_at_k",
    "kendall_tau",
    "linear_datamodeling_score",
    "pearson",
    "precision_at_k",
    "rankdata",
    "recall_at_k",
    "spearman",
    "summarize",
]


def _vector(x: ArrayLike, name: str, min_len: int) -> np.ndarray:
    """Validate one input as a finite 1-D float64 array with at least ``min_len`` entries."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size < min_len:
        raise ValueError(f"{name} needs at least {min_len} entries, got {arr.size}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _pair(
    a: ArrayLike, b: ArrayLike, min_len: int = 2, names: tuple[str, str] = ("a", "b")
) -> tuple[np.ndarray, np.ndarray]:
    """Validate two inputs as finite 1-D arrays of equal length."""
    x, y = _vector(a, names[0], min_len), _vector(b, names[1], min_len)
    if x.size != y.size:
        raise ValueError(f"length mismatch: {names[0]} has {x.size} entries, {names[1]} has {y.size}")
    return x, y


def _mask(positives_mask: ArrayLike, n: int) -> np.ndarray:
    """Validate a 1-D boolean (or 0/1) mask of length ``n``."""
    m = np.asarray(positives_mask)
    if m.ndim != 1:
        raise ValueError(f"positives_mask must be 1-D, got shape {m.shape}")
    if m.size != n:
        raise ValueError(f"length mismatch: scores has {n} entries, positives_mask has {m.size}")
    if m.dtype != np.bool_:
        if not np.all(np.isin(m, (0, 1))):
            raise ValueError("positives_mask must be boolean or contain only 0 and 1")
        m = m.astype(bool)
    return m


def _check_k(k: int, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"k must be an integer, got {k!r}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    return int(k)


def _top_k(x: np.ndarray, k: int, largest: bool = True) -> np.ndarray:
    """Indices of the k largest (or smallest) entries; ties go to the lower index."""
    order = np.argsort(-x if largest else x, kind="stable")
    return order[:k]


def rankdata(x: ArrayLike) -> np.ndarray:
    """Ranks 1..n of a 1-D array, tied values sharing their average rank.

    Args:
        x: 1-D finite values.

    Returns:
        float64 ranks, same length as ``x``.
    """
    arr = _vector(x, "x", 1)
    order = np.argsort(arr, kind="stable")
    sorted_x = arr[order]
    new_group = np.r_[True, sorted_x[1:] != sorted_x[:-1]]
    group_of_sorted = np.cumsum(new_group) - 1
    starts = np.flatnonzero(new_group)  # 0-based first position of each tie group
    ends = np.r_[starts[1:], arr.size]  # one past its last position
    avg = 0.5 * (starts + 1 + ends)  # mean of 1-based positions starts+1 .. ends
    ranks = np.empty(arr.size, dtype=np.float64)
    ranks[order] = avg[group_of_sorted]
    return ranks


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    xc, yc = x - x.mean(), y - y.mean()
    denom = np.sqrt(np.dot(xc, xc) * np.dot(yc, yc))
    if denom == 0.0:
        return float("nan")
    return float(np.clip(np.dot(xc, yc) / denom, -1.0, 1.0))


def pearson(a: ArrayLike, b: ArrayLike) -> float:
    """Pearson correlation of ``a`` and ``b`` (``nan`` if either is constant)."""
    return _pearson(*_pair(a, b))


def spearman(a: ArrayLike, b: ArrayLike) -> float:
    """Spearman rank correlation: Pearson of the average ranks (ties share their rank)."""
    x, y = _pair(a, b)
    return _pearson(rankdata(x), rankdata(y))


def _tie_pairs(sorted_vals: np.ndarray) -> int:
    """Number of tied pairs in an already sorted array."""
    new_group = np.r_[True, sorted_vals[1:] != sorted_vals[:-1]]
    counts = np.diff(np.r_[np.flatnonzero(new_group), sorted_vals.size])
    return int(np.sum(counts * (counts - 1) // 2))


def _count_inversions(v: np.ndarray) -> int:
    """Pairs i < j with v[i] > v[j], for integer values in [0, n), in O(n log^2 n).

    Bottom-up merge sort, vectorised over all block pairs of a level: offsetting each
    value by ``pair_id * n`` makes one global ``searchsorted``/``sort`` act on every
    block pair independently.
    """
    n = v.size
    vals = v.astype(np.int64)
    idx = np.arange(n, dtype=np.int64)
    inversions = 0
    width = 1
    while width < n:
        pair_offset = (idx // (2 * width)) * n
        keys = vals + pair_offset
        is_left = (idx // width) % 2 == 0
        left_keys = keys[is_left]  # globally sorted: pairs ascend, each block is sorted
        right_keys, right_offset = keys[~is_left], pair_offset[~is_left]
        # Left elements of the same pair that are strictly greater than each right one.
        end_of_left = np.searchsorted(left_keys, right_offset + n, side="left")
        not_greater = np.searchsorted(left_keys, right_keys, side="right")
        inversions += int(np.sum(end_of_left - not_greater))
        vals = np.sort(keys) - pair_offset  # merge every block pair
        width *= 2
    return inversions


def kendall_tau(a: ArrayLike, b: ArrayLike) -> float:
    """Kendall's tau-b (tie-corrected), in O(n log^2 n) (Knight's algorithm).

    ``tau_b = (C - D) / sqrt((n0 - n1) (n0 - n2))`` with C/D the concordant/discordant
    pairs, ``n0 = n(n-1)/2`` and n1/n2 the pairs tied in ``a``/``b``. ``nan`` if either
    input is constant.
    """
    x, y = _pair(a, b)
    n = x.size
    order = np.lexsort((y, x))  # by x, then y
    xs, ys = x[order], y[order]
    total = n * (n - 1) // 2
    x_ties = _tie_pairs(xs)
    joint_new = np.r_[True, (xs[1:] != xs[:-1]) | (ys[1:] != ys[:-1])]
    joint_counts = np.diff(np.r_[np.flatnonzero(joint_new), n])
    xy_ties = int(np.sum(joint_counts * (joint_counts - 1) // 2))
    y_ties = _tie_pairs(np.sort(y))
    # Dense ranks of y, in x-order: discordant pairs are the strict inversions.
    y_dense = np.unique(ys, return_inverse=True)[1].reshape(-1)
    discordant = _count_inversions(y_dense)
    concordant = total - x_ties - y_ties + xy_ties - discordant
    denom = np.sqrt(float(total - x_ties) * float(total - y_ties))
    if denom == 0.0:
        return float("nan")
    return float(np.clip((concordant - discordant) / denom, -1.0, 1.0))


def jaccard_at_k(a: ArrayLike, b: ArrayLike, k: int, largest: bool = True) -> float:
    """Jaccard similarity ``|A ∩ B| / |A ∪ B|`` of the top-k index sets of ``a`` and ``b``.

    Args:
        a: first score vector.
        b: second score vector, same length.
        k: set size, ``1 <= k <= len(a)``.
        largest: take the k largest values (``False``: the k smallest).
    """
    x, y = _pair(a, b, min_len=1)
    k = _check_k(k, x.size)
    top_a, top_b = set(_top_k(x, k, largest).tolist()), set(_top_k(y, k, largest).tolist())
    return len(top_a & top_b) / len(top_a | top_b)


def _detection_inputs(scores: ArrayLike, positives_mask: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    s = _vector(scores, "scores", 1)
    return s, _mask(positives_mask, s.size)


def precision_at_k(scores: ArrayLike, positives_mask: ArrayLike, k: int) -> float:
    """Fraction of the k highest-scoring samples that are positives."""
    s, m = _detection_inputs(scores, positives_mask)
    k = _check_k(k, s.size)
    return float(np.count_nonzero(m[_top_k(s, k)]) / k)


def recall_at_k(scores: ArrayLike, positives_mask: ArrayLike, k: int) -> float:
    """Fraction of all positives found among the k highest-scoring samples."""
    s, m = _detection_inputs(scores, positives_mask)
    k = _check_k(k, s.size)
    n_pos = np.count_nonzero(m)
    if n_pos == 0:
        raise ValueError("recall_at_k needs at least one positive")
    return float(np.count_nonzero(m[_top_k(s, k)]) / n_pos)


def auroc(scores: ArrayLike, positives_mask: ArrayLike) -> float:
    """Area under the ROC curve, Mann-Whitney form: P(score_pos > score_neg) + ½ P(tie).

    Computed from average ranks: ``(R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg)``.
    Needs at least one positive and one negative.
    """
    s, m = _detection_inputs(scores, positives_mask)
    n_pos = int(np.count_nonzero(m))
    n_neg = s.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"auroc needs positives and negatives, got {n_pos} and {n_neg}")
    rank_sum = float(np.sum(rankdata(s)[m]))
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def linear_datamodeling_score(scores: ArrayLike, subsets: ArrayLike, outcomes: ArrayLike) -> float:
    """Linear Datamodeling Score (docs/influence-math.md §6): Spearman between ``Σ_{i∈S_k} τ_i`` and outcomes.

    ``scores`` must be attributions in the *inclusion* sense (effect on ``f`` of having
    sample i in the training set). Removal scores with the sign of docs/influence-math.md §2
    (``F_j = f(θ^{-j}) - f(θ)``) point the other way: pass ``-F``.

    Args:
        scores: ``(N,)`` attributions ``τ``.
        subsets: ``(M, N)`` boolean masks, row k marks the training subset ``S_k``.
        outcomes: ``(M,)`` query value ``f(θ(S_k))`` of the model retrained on ``S_k``.
    """
    tau = _vector(scores, "scores", 1)
    masks = np.asarray(subsets)
    if masks.ndim != 2 or masks.shape[1] != tau.size:
        raise ValueError(f"subsets must have shape (M, {tau.size}), got {masks.shape}")
    if masks.dtype != np.bool_:
        raise ValueError(f"subsets must be a boolean mask array, got dtype {masks.dtype}")
    y = _vector(outcomes, "outcomes", 2)
    if y.size != masks.shape[0]:
        raise ValueError(f"length mismatch: {masks.shape[0]} subsets but {y.size} outcomes")
    return spearman(masks.astype(np.float64) @ tau, y)


def summarize(estimate: ArrayLike, truth: ArrayLike, k: int | None = None) -> dict[str, float]:
    """Standard agreement report of an estimate against the ground truth.

    Args:
        estimate: estimated scores, ``(N,)``.
        truth: ground-truth scores (e.g. replay LOO), ``(N,)``.
        k: top-k size for the Jaccard term; default ``max(1, N // 10)``.

    Returns:
        ``{"pearson", "spearman", "kendall", f"jaccard@{k}"}`` -> value.
    """
    x, y = _pair(estimate, truth, names=("estimate", "truth"))
    k = max(1, x.size // 10) if k is None else _check_k(k, x.size)
    return {
        "pearson": pearson(x, y),
        "spearman": spearman(x, y),
        "kendall": kendall_tau(x, y),
        f"jaccard@{k}": jaccard_at_k(x, y, k),
    }
