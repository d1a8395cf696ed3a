"""Group influence (docs/influence-math.md §6): replayed group removal against a closed form, exact additivity where
the query is affine in the subset, group construction and the additivity report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lightning_influence.evaluation.groups import group_additivity, make_groups, replay_group_removal
from lightning_influence.log import InfluenceLog
from tests._linear import Lin, linear_problem
from tests._tinylog import epoch_batches, train_and_log

torch.set_num_threads(1)
N, KAPPA = 20, 0.05
P = linear_problem(N, torch.Generator().manual_seed(5))
X, Y, XQ, data, query = P.x, P.y, P.xq, P.data, P.prediction
PHI, PHIQ, YN = P.phi.numpy(), P.phiq.numpy()[0], Y.numpy()[:, 0]
LABELS = np.array([0] * 8 + [1] * 7 + [2] * 5)


def make_log(path, batches, lr) -> tuple[InfluenceLog, np.ndarray]:
    torch.manual_seed(0)
    model = Lin().double()
    theta0 = np.r_[model.lin.weight.detach().numpy().reshape(-1), model.lin.bias.detach().numpy()]
    train_and_log(str(path), model, lambda m, b: m.per_sample_loss(b), data, batches, [lr] * len(batches),
                  torch.optim.SGD(model.parameters(), lr=lr, weight_decay=KAPPA), checkpoint_every=None,
                  record_gradients=False, dataset_size=N)
    return InfluenceLog(path), theta0


def closed(groups, theta0, batches, lr) -> np.ndarray:
    """f(θ_T^{−S}) − f(θ_T) by the SGD recursion (removed: weight 0, denominator kept)."""
    masks = np.ones((len(groups) + 1, N))
    for k, g in enumerate(groups, start=1):
        masks[k, list(g)] = 0.0
    th = np.tile(theta0, (len(masks), 1))
    for b in batches:
        r = th @ PHI[b].T - YN[b]
        th = th - lr * ((masks[:, b] * r) @ PHI[b] / len(b) + KAPPA * th)
    f = th @ PHIQ
    return f[1:] - f[0]


@pytest.fixture(scope="module")
def sgd_run(tmp_path_factory):
    batches, _ = epoch_batches(N, 5, 3, seed=2)
    log, theta0 = make_log(tmp_path_factory.mktemp("groups"), batches, 0.4)
    return log, theta0, batches, 0.4


@pytest.fixture(scope="module")
def one_step_run(tmp_path_factory):
    """One full-batch step: f is affine in the kept set, so group effects add up exactly."""
    batches = [np.arange(N)]
    log, theta0 = make_log(tmp_path_factory.mktemp("onestep"), batches, 0.4)
    return log, theta0, batches, 0.4


def test_replayed_group_removal_is_the_closed_form(sgd_run):
    log, theta0, batches, lr = sgd_run
    groups = [[0], [3, 4, 5], list(range(0, N, 2)), list(range(N))]
    got = replay_group_removal(log, Lin().double(), data, query, groups)
    np.testing.assert_allclose(got[:, 0], closed(groups, theta0, batches, lr), rtol=0, atol=1e-13)


def test_affine_query_is_exactly_additive(one_step_run):
    log, theta0, batches, lr = one_step_run
    singles = closed([[i] for i in range(N)], theta0, batches, lr)
    res = group_additivity(log, Lin().double(), data, query, {"loo": singles, "double": 2 * singles},
                           fractions=(0.05, 0.25, 0.5), kinds=("random", "same_class", "top", "bottom"),
                           labels=LABELS, repeats=2, top_by=["loo"], threshold=0.2, residual={0.95: 4.0, 0.5: 0.0})
    for row in res.rows:
        assert row["ratio_loo"] == pytest.approx(1.0, abs=1e-9)
        assert row["ratio_double"] == pytest.approx(2.0, abs=1e-9)
    summary = {(r["kind"], r["fraction"]): r for r in res.summary()}
    assert all(r["interaction_rms"] < 1e-12 for r in summary.values())  # Δf − Σ loo = 0: no interactions
    assert summary[("random", 0.05)]["sqrt_residual"] == 2.0 and summary[("random", 0.5)]["sqrt_residual"] == 0.0
    assert "sqrt_residual" not in summary[("random", 0.25)] and "sqrt_residual" not in summary[("same_class", 0.05)]
    breaks = res.breaks()
    assert all(v["loo"] is None for v in breaks.values())
    assert all(v["double"] == 0.05 for v in breaks.values())  # a scale error breaks at the smallest size
    assert {r["kind"] for r in res.rows} == {"random", "same_class", "top", "bottom"}
    assert res.info["groups_replayed"] <= len(res.rows)
    json.dumps(res.to_dict())
    table = res.table()
    assert "Σloo/Δf" in table and "breaks at fraction" in table


def test_nonlinear_training_breaks_additivity_for_large_groups(sgd_run):
    """Several SGD steps with removal changing later gradients: single LOOs no longer add up for big groups."""
    log, theta0, batches, lr = sgd_run
    singles = closed([[i] for i in range(N)], theta0, batches, lr)
    res = group_additivity(log, Lin().double(), data, query, {"loo": singles}, fractions=(0.05, 0.5),
                           kinds=("random",), repeats=3, seed=1)
    err = {r["fraction"]: r["relerr_loo"] for r in res.summary()}
    assert err[0.05] < 1e-12  # one sample: the sum is the sample's own LOO
    assert err[0.5] > 0.05


def test_make_groups():
    rng = np.random.default_rng(0)
    ids = np.arange(N)
    g = make_groups("random", 6, ids, rng=rng)
    assert len(np.unique(g)) == 6
    g = make_groups("same_class", 5, ids, rng=rng, labels=LABELS)
    assert len(set(LABELS[g])) == 1  # fits in any class
    g = make_groups("same_class", 12, ids, rng=rng, labels=LABELS)
    assert len(g) == 12 and len(set(LABELS[g])) >= 2  # spills into the next class
    s = np.arange(N, dtype=float)
    assert make_groups("top", 3, ids, rng=rng, scores=s).tolist() == [17, 18, 19]
    assert make_groups("bottom", 3, ids, rng=rng, scores=s).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="labels"):
        make_groups("same_class", 3, ids, rng=rng)
    with pytest.raises(ValueError, match="group kind"):
        make_groups("odd", 3, ids, rng=rng)
    with pytest.raises(ValueError, match="group size"):
        make_groups("random", N + 1, ids, rng=rng)


def test_refusals(one_step_run):
    log, *_ = one_step_run
    with pytest.raises(ValueError, match="one entry per sample id"):
        group_additivity(log, Lin().double(), data, query, {"x": np.zeros(3)})
    with pytest.raises(ValueError, match="unknown group kinds"):
        group_additivity(log, Lin().double(), data, query, {"x": np.zeros(N)}, kinds=("clustered",))
    with pytest.raises(ValueError, match="at least one estimator"):
        group_additivity(log, Lin().double(), data, query, {})
