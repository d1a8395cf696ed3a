"""Data-centric tasks (lightning_influence/tasks.py): rankings, set sampling, retraining, experiments."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from lightning_influence.tasks import (
    Recipe,
    class_quotas,
    cleaning_experiment,
    coreset_experiment,
    deletion_experiment,
    detection,
    evaluate,
    harmful_order,
    helpful_order,
    iterative_coreset,
    random_coreset,
    random_sets,
    select_coreset,
    top_scored_sets,
    train_from_scratch,
)


def blobs(n: int = 60, flip: int = 9, seed: int = 0):
    """Three separable Gaussian blobs in 2-D; ``flip`` training labels shifted by one class."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]], dtype=torch.float64)
    y = torch.arange(n) % 3
    x = centers[y] + 0.6 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    flipped = np.sort(np.random.default_rng(seed).choice(n, size=flip, replace=False))
    y_noisy = y.clone()
    y_noisy[torch.from_numpy(flipped)] = (y[torch.from_numpy(flipped)] + 1) % 3
    return x, y_noisy, y, flipped


def make() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3)).double()


RECIPE = Recipe(epochs=4, batch_size=10, lr=0.3, weight_decay=1e-3, lr_step_epochs=2, lr_gamma=0.5)


def test_orders_follow_the_sign_convention():
    s = np.array([0.3, -2.0, 0.0, 5.0, -2.0])
    assert harmful_order(s).tolist() == [1, 4, 2, 0, 3]  # most negative first, ties by id
    assert harmful_order(s, "self").tolist() == [3, 0, 2, 1, 4]  # largest self-influence first
    assert helpful_order(s).tolist() == [3, 0, 2, 1, 4]
    with pytest.raises(ValueError, match="kind"):
        harmful_order(s, "val")
    with pytest.raises(ValueError, match="NaN"):
        harmful_order(np.array([0.0, np.nan]))


def test_detection_of_perfect_and_inverted_rankings():
    s = np.zeros(10)
    s[[2, 5]] = -1.0  # harmful for a loss query
    assert detection(s, [2, 5]) == {"auroc": 1.0, "precision@2": 1.0}
    assert detection(-s, [2, 5], kind="self")["auroc"] == 1.0
    assert detection(-s, [2, 5])["auroc"] == 0.0


def test_random_and_top_scored_sets():
    rng = np.random.default_rng(0)
    sets = random_sets(50, 5, 7, rng)
    assert len(sets) == 7 and all(len(np.unique(s)) == 5 and s.max() < 50 for s in sets)
    scores = np.arange(50, dtype=float) - 25  # 0..24 harmful, 25..49 helpful
    top = top_scored_sets(scores, 4, 6, rng, pool=2)
    helpful, harmful = set(range(42, 50)), set(range(8))
    assert all(set(s) <= (helpful if i % 2 == 0 else harmful) for i, s in enumerate(top))
    with pytest.raises(ValueError, match="set size"):
        random_sets(5, 6, 1, rng)


def test_train_from_scratch_is_one_sgd_step_per_batch():
    """One sample, batch 1, one epoch: θ_1 = θ_0 − η (∇ℓ + λ θ_0), from the seeded initialisation."""
    x, y, _, _ = blobs()
    recipe = Recipe(epochs=1, batch_size=1, lr=0.2, weight_decay=0.1)
    trained = train_from_scratch(make, x, y, recipe, ids=np.array([7]), seed=3)
    torch.manual_seed(3)
    ref = make()
    loss = F.cross_entropy(ref(x[7:8]), y[7:8])
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    for p, q, g in zip(trained.parameters(), ref.parameters(), grads):
        torch.testing.assert_close(p.detach(), q.detach() - 0.2 * (g + 0.1 * q.detach()), rtol=0, atol=1e-14)
    again = train_from_scratch(make, x, y, RECIPE, seed=3)
    other = train_from_scratch(make, x, y, RECIPE, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(again.parameters(), other.parameters()))
    with pytest.raises(ValueError, match="empty"):
        train_from_scratch(make, x, y, RECIPE, ids=np.array([], dtype=np.int64))


def test_evaluate():
    m = nn.Linear(2, 2, bias=False).double()
    with torch.no_grad():
        m.weight.copy_(torch.eye(2, dtype=torch.float64))
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    out = evaluate(m, x, torch.tensor([0, 0]))
    assert out["accuracy"] == 0.5
    assert out["loss"] == pytest.approx(float(F.cross_entropy(x, torch.tensor([0, 0]))))


def test_cleaning_with_a_perfect_ranking_equals_the_oracles():
    """Relabelling the flipped samples gives exactly the clean-label training; removing them exactly the
    training on the clean subset (same seeds); a random budget finds about the base rate."""
    x, y, y_clean, flipped = blobs()
    test = blobs(n=30, flip=0, seed=1)[:2]
    perfect = np.zeros(len(x))
    perfect[flipped] = -1.0
    res = cleaning_experiment(make, (x, y), y_clean, flipped, test, {"perfect": (perfect, "loss")}, RECIPE, seeds=(0, 1))
    m = res["methods"]["perfect"]
    assert m["hit"] == 1.0 and m["detection"]["auroc"] == 1.0
    assert m["relabel"]["mean"] == res["baseline"]["all labels clean (oracle)"]["mean"]
    keep = np.setdiff1d(np.arange(len(x)), flipped)
    subset = np.mean([evaluate(train_from_scratch(make, x, y, RECIPE, ids=keep, seed=s), *test)["accuracy"] for s in (0, 1)])
    assert m["remove"]["mean"] == pytest.approx(subset, abs=1e-12)
    assert res["k"] == len(flipped) and 0.0 <= res["random"]["remove"]["hit"] <= 1.0
    with pytest.raises(ValueError, match="mode"):
        cleaning_experiment(make, (x, y), y_clean, flipped, test, {}, RECIPE, modes=("drop",))


def test_class_quotas_are_proportional_with_largest_remainder():
    labels = np.array([0] * 5 + [1] * 3 + [2] * 2)
    assert class_quotas(labels, 10) == {0: 5, 1: 3, 2: 2}
    # 0.4 · (5, 3, 2) = (2.0, 1.2, 0.8): floors (2, 1, 0), the one left goes to the largest remainder
    assert class_quotas(labels, 4) == {0: 2, 1: 1, 2: 1}
    # 0.5 · (5, 3, 2) = (2.5, 1.5, 1.0): floors (2, 1, 1), one left, the tied remainders go to the smaller label
    assert class_quotas(labels, 5) == {0: 3, 1: 1, 2: 1}
    # 0.7 · (5, 3, 2) = (3.5, 2.1, 1.4)
    assert class_quotas(labels, 7) == {0: 4, 1: 2, 2: 1}
    with pytest.raises(ValueError, match="size"):
        class_quotas(labels, 0)


def test_select_coreset_globally_and_per_class():
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0])
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    assert select_coreset(scores, 4).tolist() == [0, 1, 2, 3]  # one class only
    assert select_coreset(scores, 4, labels).tolist() == [0, 1, 4, 5]  # the two most helpful of each class
    assert select_coreset(scores, 3, labels).tolist() == [0, 1, 4]
    with pytest.raises(ValueError, match="labels"):
        select_coreset(scores, 3, labels[:5])
    rng = np.random.default_rng(0)
    draws = [random_coreset(8, 4, rng, labels) for _ in range(200)]
    assert all(np.bincount(labels[d]).tolist() == [2, 2] for d in draws)
    counts = np.bincount(np.concatenate(draws), minlength=8)
    assert counts.min() > 70 and counts.max() < 130  # each id kept in about half the draws (100)


def test_iterative_coreset_rescores_the_kept_set():
    calls = []

    def score_fn(ids: np.ndarray) -> np.ndarray:
        """Depends on the kept set: prefers large ids when 4 | len(ids), small ids otherwise."""
        calls.append(ids.tolist())
        return ids.astype(float) if len(ids) % 4 == 0 else -ids.astype(float)

    # step 0.2 of n = 10: sizes 8, 6, then the target 5; the first round uses the initial scores
    kept = iterative_coreset(score_fn, 10, (0.5,), step=0.2, initial_scores=np.arange(10.0))
    assert kept[0.5].tolist() == [4, 5, 6, 7, 8]  # 8 largest [2..9]; rescored (8) → 6 largest [4..9]; rescored (6) → 5 smallest
    assert calls == [list(range(2, 10)), list(range(4, 10))]
    calls.clear()
    # per class (labels = id mod 2): 8 kept = 4 + 4 largest, then 3 + 3 smallest of those
    kept = iterative_coreset(lambda ids: -ids.astype(float), 10, (0.6, 0.8), labels=np.arange(10) % 2, step=0.2,
                             initial_scores=np.arange(10.0))
    assert kept[0.8].tolist() == list(range(2, 10)) and kept[0.6].tolist() == [2, 3, 4, 5, 6, 7]
    assert iterative_coreset(score_fn, 10, (0.5,), step=0.5)[0.5].tolist() == [0, 1, 2, 3, 4]  # scores all 10 first
    assert calls[0] == list(range(10))
    with pytest.raises(ValueError, match="fractions"):
        iterative_coreset(score_fn, 10, (1.0,))
    with pytest.raises(ValueError, match="returned 3 scores"):
        iterative_coreset(lambda ids: np.zeros(3), 10, (0.5,), step=0.2, initial_scores=np.arange(10.0))


def test_coreset_keeps_the_most_helpful():
    x, y, _, _ = blobs()
    test = blobs(n=30, flip=0, seed=1)[:2]
    scores = np.arange(len(x), dtype=float)

    def rescore(ids: np.ndarray) -> np.ndarray:
        return -ids.astype(float)

    res = coreset_experiment(make, (x, y), test, {"s": scores}, RECIPE, fractions=(0.5,), seeds=(0, 1),
                             rescore={"s": rescore})
    e = res["fractions"]["0.5"]
    assert e["size"] == 30 and set(e) == {"size", "global", "per class"}
    pruned = iterative_coreset(rescore, 60, (0.5,), labels=y.numpy(), initial_scores=scores)[0.5]
    for selection, name, keep in (("global", "s", np.arange(30, 60)),
                                  ("per class", "s", select_coreset(scores, 30, y.numpy())),
                                  ("per class", "s, iterative", pruned)):
        ref = np.mean([evaluate(train_from_scratch(make, x, y, RECIPE, ids=keep, seed=s), *test)["accuracy"] for s in (0, 1)])
        assert e[selection][name]["mean"] == pytest.approx(ref, abs=1e-12) and e[selection]["random"]["n"] == 2
    assert "s, iterative" not in e["global"]
    share = np.bincount(y.numpy()[select_coreset(scores, 30, y.numpy())], minlength=3) / 30
    assert e["per class"]["s"]["class_share"] == {"min": share.min(), "max": share.max()}
    with pytest.raises(ValueError, match="selection"):
        coreset_experiment(make, (x, y), test, {}, RECIPE, selections=("stratified",))
    with pytest.raises(ValueError, match="no initial scores"):
        coreset_experiment(make, (x, y), test, {}, RECIPE, rescore={"s": rescore})


def test_deletion_against_replayed_group_removal(tmp_path):
    """Scores = exact single-sample replay LOO: the sum over a random set tracks the replayed group removal."""
    from lightning_influence.evaluation.ground_truth import replay_loo
    from lightning_influence.log import InfluenceLog
    from lightning_influence.queries import mean_loss
    from tests._tinylog import epoch_batches, train_and_log

    x, y, _, _ = blobs(n=40, flip=0)
    ds = TensorDataset(x, y)

    def loss(m: nn.Module, batch) -> torch.Tensor:
        return F.cross_entropy(m(batch[0]), batch[1], reduction="none")

    batches, epochs = epoch_batches(40, 10, 2, seed=0)
    torch.manual_seed(0)
    m = make()
    train_and_log(str(tmp_path / "log"), m, loss, ds, batches, [0.2] * len(batches), torch.optim.SGD(m.parameters(), lr=0.2),
                  epochs=epochs, record_gradients=False)
    log = InfluenceLog(str(tmp_path / "log"))
    q = mean_loss(blobs(n=20, flip=0, seed=2)[:2], loss)
    loo = replay_loo(log, make(), ds, q, grid=[0, log.num_steps], loss_fn=loss).at(log.num_steps)[:, 0]
    res = deletion_experiment(log, make(), ds, q, {"loo": loo, "noise": np.random.default_rng(0).normal(size=40)},
                              fractions=(0.05, 0.25), n_random=8, n_top=6, loss_fn=loss)
    assert res["n_sets"] == 2 * (8 + 2 * 6)
    small = res["fractions"]["0.05"]
    assert small["size"] == 2 and small["random"]["loo"]["pearson"] > 0.99
    assert res["fractions"]["0.25"]["top"]["loo"]["pearson"] > 0.9
    log.close()
