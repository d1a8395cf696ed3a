"""Data-centric tasks measured by retraining: data cleaning, data deletion, coreset selection.

Influence scores follow the project's sign (docs/influence-math.md §2): positive = removing the sample raises
the query ``f``. For a loss query a negative score marks a *harmful* sample, a positive one a
*helpful* sample; for self-influence (the query is the sample's own loss) a large positive
score marks a sample the model fits only because it is in the training set (mislabelled
samples score high).

- **Cleaning** (:func:`cleaning_experiment`): rank by harmfulness, then either remove the top
  ``k`` or *inspect* them and restore the true label of the corrupted ones among them
  (relabel), retrain from scratch and report test accuracy, against no cleaning and against
  the same budget spent on random samples; plus detection AUROC / precision of the ranking.
- **Deletion** (:func:`deletion_experiment`): predict the change of a query when a set is
  deleted as the sum of its scores; the truth is the replayed run without the set
  (:func:`~lightning_influence.evaluation.ground_truth.replay_loo` with ``groups``: same
  ``θ_0``, batches and learning rates, denominator kept, docs/influence-math.md §2). Correlation over random
  sets and over sets drawn from the top-scored samples.
- **Coreset** (:func:`coreset_experiment`): keep the top ``x%`` most helpful samples (of the whole
  ranking, or of each class: :func:`select_coreset`; or pruned in rounds, re-scoring the kept
  set each round: :func:`iterative_coreset`), retrain from scratch, compare with random subsets
  of the same size (and the same class quotas). docs/diffin.md has the measurements.

Retraining from scratch uses a plain torch loop (:func:`train_from_scratch`); no Lightning.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lightning_influence.evaluation.metrics import auroc, pearson, precision_at_k, spearman
from lightning_influence.queries import evaluation_mode

__all__ = [
    "Recipe",
    "ScoreFn",
    "class_quotas",
    "cleaning_experiment",
    "coreset_experiment",
    "deletion_experiment",
    "detection",
    "evaluate",
    "harmful_order",
    "helpful_order",
    "iterative_coreset",
    "random_coreset",
    "random_sets",
    "select_coreset",
    "top_scored_sets",
    "train_from_scratch",
]

KINDS = ("loss", "self")


@dataclass(frozen=True)
class Recipe:
    """How to retrain from scratch: SGD, ``StepLR(lr_step_epochs, lr_gamma)``, shuffled batches."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    lr_step_epochs: int | None = None
    lr_gamma: float = 1.0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"Recipe needs epochs >= 1, batch_size >= 1 and lr > 0, got {self}")


# ============================================================================== rankings
def harmful_order(scores: np.ndarray, kind: str = "loss") -> np.ndarray:
    """Sample ids, most harmful first: most negative for a loss query, largest self-influence for ``"self"``."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or infinite values")
    return np.argsort(s if kind == "loss" else -s, kind="stable")


def helpful_order(scores: np.ndarray) -> np.ndarray:
    """Sample ids, most helpful first (largest score for a loss query)."""
    return harmful_order(-np.asarray(scores, dtype=np.float64), "loss")


def detection(scores: np.ndarray, positives: np.ndarray, kind: str = "loss", k: int | None = None) -> dict[str, float]:
    """How well the harmfulness ranking finds the ``positives`` (e.g. flipped labels): AUROC and precision@k."""
    mask = np.zeros(len(scores), dtype=bool)
    mask[np.asarray(positives, dtype=np.int64)] = True
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    suspicion = -s if kind == "loss" else s
    k = int(mask.sum()) if k is None else k
    return {"auroc": auroc(suspicion, mask), f"precision@{k}": precision_at_k(suspicion, mask, k)}


def random_sets(n: int, size: int, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``count`` uniformly random subsets of ``size`` ids out of ``n``."""
    if not 1 <= size <= n:
        raise ValueError(f"set size {size} must be in [1, {n}]")
    return [np.sort(rng.choice(n, size=size, replace=False)) for _ in range(count)]


def top_scored_sets(scores: np.ndarray, size: int, count: int, rng: np.random.Generator, pool: int = 3) -> list[np.ndarray]:
    """Sets drawn from the top-scored samples: half of them ``size`` ids out of the ``pool·size`` most
    helpful (largest scores), half out of the ``pool·size`` most harmful (most negative)."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    width = min(len(s), pool * size)
    if size > width:
        raise ValueError(f"set size {size} exceeds the pool of {width} top-scored samples")
    order = np.argsort(-s, kind="stable")
    ends = [order[:width], order[::-1][:width]]
    return [np.sort(rng.choice(ends[i % 2], size=size, replace=False)) for i in range(count)]


# ============================================================================= retraining
def train_from_scratch(make_module: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor, recipe: Recipe, *,
                       ids: np.ndarray | None = None, seed: int = 0) -> nn.Module:
    """Train ``make_module()`` (seeded by ``seed``) on samples ``ids`` (default all) with ``recipe``.

    Cross-entropy of ``module(x)`` against ``y``, mean over each batch; batches shuffled by a
    generator seeded with ``seed``; the learning rate steps every ``lr_step_epochs`` epochs.
    """
    ids = np.arange(len(x)) if ids is None else np.asarray(ids, dtype=np.int64)
    if len(ids) == 0:
        raise ValueError("cannot train on an empty subset")
    torch.manual_seed(seed)
    module = make_module()
    dtype = next(module.parameters()).dtype
    xs, ys = x[torch.from_numpy(ids)].to(dtype), y[torch.from_numpy(ids)]
    opt = torch.optim.SGD(module.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(recipe.epochs):
        lr = recipe.lr * (recipe.lr_gamma ** (epoch // recipe.lr_step_epochs) if recipe.lr_step_epochs else 1.0)
        for g in opt.param_groups:
            g["lr"] = lr
        perm = torch.randperm(len(ids), generator=gen)
        for i in range(0, len(ids), recipe.batch_size):
            b = perm[i : i + recipe.batch_size]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(module(xs[b]), ys[b]).backward()
            opt.step()
    return module


def evaluate(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``module`` on ``(x, y)``, dropout off (:func:`~lightning_influence.queries.evaluation_mode`)."""
    with torch.no_grad(), evaluation_mode(module):
        logits = module(x.to(next(module.parameters()).dtype))
        return {"accuracy": float((logits.argmax(-1) == y).double().mean()), "loss": float(F.cross_entropy(logits, y))}


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std()), "n": int(len(arr))}


# ================================================================================ cleaning
def cleaning_experiment(make_module: Callable[[], nn.Module], train: tuple[torch.Tensor, torch.Tensor],
                        clean_labels: torch.Tensor, flipped: np.ndarray, test: tuple[torch.Tensor, torch.Tensor],
                        rankings: Mapping[str, tuple[np.ndarray, str]], recipe: Recipe, *, k: int | None = None,
                        seeds: Sequence[int] = (0, 1, 2), modes: Sequence[str] = ("remove", "relabel"),
                        progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Clean the top-``k`` most harmful samples of each ranking, retrain, measure test accuracy.

    Args:
        make_module: a fresh (untrained) model.
        train: ``(x, y)`` with the corrupted labels the run trained on.
        clean_labels: the true labels (used by ``relabel`` only for the inspected samples).
        flipped: ids whose label is corrupted.
        test: held-out ``(x, y)``.
        rankings: ``{name: (scores, kind)}``, ``kind`` ``"loss"`` or ``"self"`` (see :func:`harmful_order`).
        recipe: the retraining recipe.
        k: the inspection budget (default: the number of flipped labels).
        seeds: retraining seeds (initialisation and batch order); random selection uses the same
            seeds for its draws.
        modes: ``"remove"`` drops the top-``k``; ``"relabel"`` restores the true label of the
            flipped samples among them.

    Returns:
        ``{"k", "baseline": {...}, "methods": {name: {"detection", mode: {"accuracy": mean/std,
        "hit": fraction of flipped in the top-k}}}, "random": {mode: ...}}``.
    """
    x, y = train
    n = len(x)
    k = len(flipped) if k is None else int(k)
    flipped_set = np.zeros(n, dtype=bool)
    flipped_set[np.asarray(flipped, dtype=np.int64)] = True
    for mode in modes:
        if mode not in ("remove", "relabel"):
            raise ValueError(f"mode must be 'remove' or 'relabel', got {mode!r}")

    def retrain(selected: np.ndarray, mode: str, seed: int) -> float:
        if mode == "remove":
            keep = np.setdiff1d(np.arange(n), selected)
            return evaluate(train_from_scratch(make_module, x, y, recipe, ids=keep, seed=seed), *test)["accuracy"]
        y_fixed = y.clone()
        fix = selected[flipped_set[selected]]
        y_fixed[torch.from_numpy(fix)] = clean_labels[torch.from_numpy(fix)]
        return evaluate(train_from_scratch(make_module, x, y_fixed, recipe, seed=seed), *test)["accuracy"]

    t0 = time.perf_counter()
    out: dict[str, Any] = {"k": k, "n": n, "n_flipped": int(flipped_set.sum()), "recipe": asdict(recipe), "seeds": list(seeds)}
    base = [evaluate(train_from_scratch(make_module, x, y, recipe, seed=s), *test)["accuracy"] for s in seeds]
    oracle = [evaluate(train_from_scratch(make_module, x, clean_labels, recipe, seed=s), *test)["accuracy"] for s in seeds]
    out["baseline"] = {"no cleaning": _mean_std(base), "all labels clean (oracle)": _mean_std(oracle)}
    out["methods"] = {}
    for name, (scores, kind) in rankings.items():
        top = harmful_order(scores, kind)[:k]
        res: dict[str, Any] = {"kind": kind, "detection": detection(scores, flipped, kind, k),
                               "hit": float(flipped_set[top].mean())}
        for mode in modes:
            res[mode] = _mean_std([retrain(top, mode, s) for s in seeds])
        out["methods"][name] = res
        if progress is not None:
            progress(f"cleaning {name}")
    out["random"] = {}
    for mode in modes:
        accs, hits = [], []
        for s in seeds:
            sel = np.random.default_rng(1000 + s).choice(n, size=k, replace=False)
            hits.append(float(flipped_set[sel].mean()))
            accs.append(retrain(sel, mode, s))
        out["random"][mode] = {**_mean_std(accs), "hit": float(np.mean(hits))}
    out["seconds"] = time.perf_counter() - t0
    return out


# ================================================================================ deletion
def deletion_experiment(log: Any, module: nn.Module, train_data: Any, query: Callable[[nn.Module], torch.Tensor],
                        scores: Mapping[str, np.ndarray], fractions: Sequence[float] = (0.01, 0.05, 0.1), *,
                        n_random: int = 30, n_top: int = 30, loss_fn: Callable[..., torch.Tensor] | None = None,
                        seed: int = 0, copies: int = 256, progress: Any = None) -> dict[str, Any]:
    """Predicted (sum of scores) against replayed change of ``query`` when deleting sets of samples.

    For each fraction: ``n_random`` random sets (shared by all methods) and, per method,
    ``n_top`` sets drawn from its top-scored samples (:func:`top_scored_sets`). The truth of a
    set ``S`` is ``f(θ^{−S}_T) − f(θ_T)`` from one replay of the whole run without ``S``.

    Returns:
        ``{fraction: {"size", "random": {method: {"pearson", "spearman"}}, "top": {method: ...},
        "truth_std": {...}}}`` plus timings.
    """
    from lightning_influence.evaluation.ground_truth import replay_loo
    from lightning_influence.queries import default_loss_fn

    loss_fn = default_loss_fn if loss_fn is None else loss_fn
    n = log.dataset_size
    rng = np.random.default_rng(seed)
    plan: list[tuple[float, str, str, np.ndarray]] = []  # (fraction, family, method or "", set)
    for frac in fractions:
        size = max(1, int(round(frac * n)))
        plan += [(frac, "random", "", s) for s in random_sets(n, size, n_random, rng)]
        for name, sc in scores.items():
            plan += [(frac, "top", name, s) for s in top_scored_sets(sc, size, n_top, rng)]
    t0 = time.perf_counter()
    res = replay_loo(log, module, train_data, query, groups=[p[3] for p in plan], grid=[0, log.num_steps],
                     loss_fn=loss_fn, copies=copies, progress=progress)
    truth = res.at(log.num_steps)[:, 0]
    out: dict[str, Any] = {"replay_seconds": time.perf_counter() - t0, "n_sets": len(plan), "fractions": {}}
    for frac in fractions:
        size = max(1, int(round(frac * n)))
        entry: dict[str, Any] = {"size": size, "random": {}, "top": {}, "truth_std": {}}
        rand = [i for i, p in enumerate(plan) if p[0] == frac and p[1] == "random"]
        entry["truth_std"]["random"] = float(np.std(truth[rand]))
        for name, sc in scores.items():
            sc = np.asarray(sc, dtype=np.float64).reshape(-1)
            pred = np.array([sc[plan[i][3]].sum() for i in rand])
            entry["random"][name] = {"pearson": pearson(pred, truth[rand]), "spearman": spearman(pred, truth[rand])}
            top = [i for i, p in enumerate(plan) if p[0] == frac and p[1] == "top" and p[2] == name]
            pred = np.array([sc[plan[i][3]].sum() for i in top])
            entry["top"][name] = {"pearson": pearson(pred, truth[top]), "spearman": spearman(pred, truth[top])}
            entry["truth_std"][f"top {name}"] = float(np.std(truth[top]))
        out["fractions"][str(frac)] = entry
    return out


# ================================================================================= coreset
SELECTIONS = ("global", "per class")


def class_quotas(labels: np.ndarray, size: int) -> dict[int, int]:
    """How many of ``size`` kept samples each class gets: proportional to its count, largest remainder
    (ties to the smaller label), so the kept set has the label shares of the full set."""
    labels = np.asarray(labels).reshape(-1)
    if not 1 <= size <= len(labels):
        raise ValueError(f"coreset size {size} must be in [1, {len(labels)}]")
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * (size / len(labels))
    quota = np.floor(exact).astype(np.int64)
    extra = np.argsort(-(exact - quota), kind="stable")[: size - int(quota.sum())]
    quota[extra] += 1
    return {int(c): int(q) for c, q in zip(classes, quota)}


def select_coreset(scores: np.ndarray, size: int, labels: np.ndarray | None = None) -> np.ndarray:
    """The ``size`` most helpful sample ids (sorted). With ``labels``, the most helpful of each class,
    with :func:`class_quotas` per class: a ranking on one query scores whole easy classes near zero
    (each sample is redundant given its classmates), and a global top-x drops them entirely."""
    order = helpful_order(scores)
    if labels is None:
        if not 1 <= size <= len(order):
            raise ValueError(f"coreset size {size} must be in [1, {len(order)}]")
        return np.sort(order[:size])
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != len(order):
        raise ValueError(f"{len(labels)} labels for {len(order)} scores")
    ranked = labels[order]
    return np.sort(np.concatenate([order[ranked == c][:q] for c, q in class_quotas(labels, size).items()]))


def random_coreset(n: int, size: int, rng: np.random.Generator, labels: np.ndarray | None = None) -> np.ndarray:
    """A uniformly random subset of ``size`` ids; with ``labels``, uniformly random within each class
    with :func:`class_quotas` (the baseline matching :func:`select_coreset` with labels)."""
    return select_coreset(rng.permutation(n).astype(np.float64), size, labels)


ScoreFn = Callable[[np.ndarray], np.ndarray]
"""``score_fn(ids) -> scores``: influence scores of the samples ``ids`` (in that order) for the
query, from a run trained on ``ids`` alone."""


def iterative_coreset(score_fn: ScoreFn, n: int, fractions: Sequence[float], *, labels: np.ndarray | None = None,
                      step: float = 0.1, initial_scores: np.ndarray | None = None,
                      progress: Callable[[str], None] | None = None) -> dict[float, np.ndarray]:
    """Prune in rounds, re-scoring the kept set after each: ``{fraction: kept ids}``.

    Influence is a marginal quantity: a sample's score is its value *given all the others*. A
    one-shot top-``x`` removes many samples at once, and samples that were redundant with each
    other (each scored low because the others cover it) go together. Here each round keeps
    the most helpful down to the next size (:func:`select_coreset`, per class with ``labels``),
    trains on the kept set and scores it again (``score_fn``). Sizes go down by ``step · n`` per
    round and pass through every requested fraction; ``initial_scores`` (the scores of all ``n``
    samples) saves the first call of ``score_fn``.
    """
    if not 0 < step < 1:
        raise ValueError(f"step must be in (0, 1), got {step}")
    targets: dict[int, list[float]] = {}
    for f in fractions:
        targets.setdefault(int(round(f * n)), []).append(float(f))
    if not targets or not all(1 <= size < n for size in targets):
        raise ValueError(f"fractions must keep between 1 and {n - 1} of {n} samples, got {list(fractions)}")
    grid = sorted(set(targets) | {s for s in (int(round(n * (1 - k * step))) for k in range(1, int(1 / step) + 1))
                                  if min(targets) < s < n}, reverse=True)
    labels = None if labels is None else np.asarray(labels).reshape(-1)
    kept = np.arange(n)
    scores = score_fn(kept) if initial_scores is None else np.asarray(initial_scores, dtype=np.float64).reshape(-1)
    out: dict[float, np.ndarray] = {}
    for i, size in enumerate(grid):
        if len(scores) != len(kept):
            raise ValueError(f"score_fn returned {len(scores)} scores for {len(kept)} samples")
        kept = kept[select_coreset(scores, size, None if labels is None else labels[kept])]
        out.update(dict.fromkeys(targets.get(size, ()), kept))
        if i + 1 < len(grid):
            if progress is not None:
                progress(f"iterative coreset: scoring {size} kept samples")
            scores = np.asarray(score_fn(kept), dtype=np.float64).reshape(-1)
    return out


def coreset_experiment(make_module: Callable[[], nn.Module], train: tuple[torch.Tensor, torch.Tensor],
                       test: tuple[torch.Tensor, torch.Tensor], scores: Mapping[str, np.ndarray], recipe: Recipe, *,
                       fractions: Sequence[float] = (0.3, 0.5, 0.7), seeds: Sequence[int] = (0, 1, 2),
                       selections: Sequence[str] = SELECTIONS, rescore: Mapping[str, ScoreFn] | None = None,
                       rescore_selections: Sequence[str] = ("per class",), rescore_step: float = 0.1,
                       progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Keep the top ``x`` most helpful samples of each ranking, retrain from scratch, measure test accuracy.

    Each ``selection`` is measured against its own random baseline (one draw per seed): ``"global"``
    keeps the top ``x`` of the whole ranking against uniform random subsets; ``"per class"`` keeps
    the top ``x`` of each class (by the training labels, see :func:`select_coreset`) against random
    subsets with the same class quotas. For each ``name`` in ``rescore`` the experiment also
    prunes in rounds (:func:`iterative_coreset`, first round from ``scores[name]``) and reports
    it as ``"<name>, iterative"`` under each of ``rescore_selections``.

    Returns:
        ``{"n", "seeds", "full data", "fractions": {x: {"size", selection: {"random" | name:
        {"mean", "std", "n", "class_share": {"min", "max"}}}}}}``.
    """
    rescore = dict(rescore or {})
    iter_sels = tuple(rescore_selections) if rescore else ()
    for sel in (*selections, *iter_sels):
        if sel not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {sel!r}")
    missing = set(rescore) - set(scores)
    if missing:
        raise ValueError(f"rescore names {sorted(missing)} have no initial scores in `scores`")
    x, y = train
    n = len(x)
    labels = y.numpy()
    n_classes = int(labels.max()) + 1
    t0 = time.perf_counter()

    def measure(keep_per_seed: Sequence[np.ndarray]) -> dict[str, Any]:
        accs = [evaluate(train_from_scratch(make_module, x, y, recipe, ids=keep, seed=s), *test)["accuracy"]
                for keep, s in zip(keep_per_seed, seeds)]
        share = np.bincount(labels[keep_per_seed[0]], minlength=n_classes) / len(keep_per_seed[0])
        return {**_mean_std(accs), "class_share": {"min": float(share.min()), "max": float(share.max())}}

    pruned = {(sel, name): iterative_coreset(fn, n, fractions, labels=labels if sel == "per class" else None,
                                             step=rescore_step, initial_scores=scores[name], progress=progress)
              for sel in iter_sels for name, fn in rescore.items()}
    full = [evaluate(train_from_scratch(make_module, x, y, recipe, seed=s), *test)["accuracy"] for s in seeds]
    out: dict[str, Any] = {"n": n, "seeds": list(seeds), "full data": _mean_std(full), "fractions": {}}
    for frac in fractions:
        size = max(1, int(round(frac * n)))
        entry: dict[str, Any] = {"size": size}
        for sel in dict.fromkeys((*selections, *iter_sels)):
            by = labels if sel == "per class" else None
            res = {"random": measure([random_coreset(n, size, np.random.default_rng(2000 + s), by) for s in seeds])}
            if sel in selections:
                for name, sc in scores.items():
                    res[name] = measure([select_coreset(sc, size, by)] * len(seeds))
            for (psel, name), kept in pruned.items():
                if psel == sel:
                    res[f"{name}, iterative"] = measure([kept[float(frac)]] * len(seeds))
            entry[sel] = res
        out["fractions"][str(frac)] = entry
        if progress is not None:
            progress(f"coreset {frac:.0%}")
    out["seconds"] = time.perf_counter() - t0
    return out
