"""Datamodel quality from noise stability (docs/influence-math.md §6): replayed subsets against a closed-form
recursion, the estimate against exact Fourier masses by enumeration and against a fitted linear datamodel."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from lightning_influence.evaluation.datamodels import ReplaySubsets, datamodel_quality, datamodel_quality_of
from lightning_influence.evaluation.stability import fit_linear_datamodel
from lightning_influence.log import InfluenceLog
from tests._linear import D, Lin, linear_problem
from tests._tinylog import epoch_batches, train_and_log

torch.set_num_threads(1)
N, KAPPA, LR = 10, 0.05, 0.3
P = linear_problem(N, torch.Generator().manual_seed(0))
X, Y, XQ, data, query = P.x, P.y, P.xq, P.data, P.prediction
PHI, PHIQ, YN = P.phi.numpy(), P.phiq.numpy()[0], Y.numpy()[:, 0]


def gd(masks: np.ndarray, theta0: np.ndarray, batches, lrs) -> np.ndarray:
    """Closed form of the replayed counterfactual: SGD on ½(φθ − y)² with removed samples weighted 0,
    denominator |B_t| kept, coupled L2 κ; returns the query φ_q·θ_T for every mask."""
    m = np.atleast_2d(masks).astype(np.float64)
    th = np.tile(theta0, (len(m), 1))
    for b, lr in zip(batches, lrs):
        r = th @ PHI[b].T - YN[b]
        th = th - lr * ((m[:, b] * r) @ PHI[b] / len(b) + KAPPA * th)
    return th @ PHIQ


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.manual_seed(0)
    model = Lin().double()
    theta0 = np.r_[model.lin.weight.detach().numpy().reshape(-1), model.lin.bias.detach().numpy()]
    batches, epochs = epoch_batches(N, 3, 2, seed=1)
    lrs = [LR] * len(batches)
    path = tmp_path_factory.mktemp("dm")
    train_and_log(str(path), model, lambda m, b: m.per_sample_loss(b), data, batches, lrs,
                  torch.optim.SGD(model.parameters(), lr=LR, weight_decay=KAPPA), checkpoint_every=None,
                  record_gradients=False, dataset_size=N, epochs=epochs)
    full = gd(np.ones(N, bool), theta0, batches, lrs)[0]

    def f_closed(masks):
        return gd(np.stack(list(masks)), theta0, batches, lrs) - full

    return InfluenceLog(path), f_closed


def exact_mass(values: np.ndarray, masks: np.ndarray, p: float) -> tuple[float, float, float]:
    """(W0, W1, E f²) by enumeration of all masks under the p-biased measure."""
    w = np.prod(np.where(masks, p, 1 - p), axis=1)
    chi = (masks - p) / np.sqrt(p * (1 - p))
    return float((w @ values) ** 2), float(np.sum(((chi * (w * values)[:, None]).sum(0)) ** 2)), float(w @ values ** 2)


ALL = np.array(list(itertools.product([False, True], repeat=N)))


def test_replayed_subsets_are_the_closed_form_counterfactual(run):
    log, f_closed = run
    ev = ReplaySubsets(log, Lin().double(), data, query)
    masks = np.random.default_rng(0).random((6, N)) < 0.5
    np.testing.assert_allclose(ev.map(None, masks), f_closed(masks), rtol=0, atol=1e-13)
    assert ev(masks[0]) == pytest.approx(float(f_closed(masks[:1])[0]), abs=1e-13)
    assert ev(np.ones(N, bool)) == pytest.approx(0.0, abs=1e-14)
    with pytest.raises(ValueError, match=r"boolean array of shape \(10,\)"):
        ev(np.ones(N + 1, bool))


def test_replay_datamodel_quality_is_the_closed_form_estimate(run):
    """Same seed, same subsets: the replay-based report equals the one on the closed form, also over 2 processes."""
    log, f_closed = run
    scores = {"random": np.random.default_rng(1).normal(size=N)}
    kw = dict(p=0.5, rhos=(0.0, 0.5, 0.75, 1.0), pairs=40, scores=scores, bootstrap=20, seed=3)
    replayed = datamodel_quality(log, Lin().double(), data, query, **kw)
    closed = datamodel_quality_of(None, N, map_fn=lambda _f, ms: f_closed(ms), **kw)
    for a, b in zip((replayed.mass.W0, replayed.mass.W1, replayed.mass.residual),
                    (closed.mass.W0, closed.mass.W1, closed.mass.residual)):
        assert a == pytest.approx(b, rel=1e-9, abs=1e-15)
    assert replayed.lds["random"] == pytest.approx(closed.lds["random"], rel=1e-9)
    assert replayed.info["retraining_runs"] == 40 * 3
    forked = datamodel_quality(log, Lin().double(), data, query, workers=2, **kw)
    assert forked.mass.W1 == pytest.approx(replayed.mass.W1, rel=1e-12)
    json.dumps(replayed.to_dict())
    assert "ceiling" in replayed.table()


def test_noise_stability_matches_exact_fourier_mass_and_fitted_datamodel(run):
    """A nonlinear f (6 SGD steps): the estimate matches the exact split by enumeration within its
    bootstrap error, and the least-squares linear datamodel's residual is exactly the degree ≥ 2 mass."""
    _, f_closed = run
    values = f_closed(ALL)
    p = 0.5
    w0, w1, ef2 = exact_mass(values, ALL, p)
    var = ef2 - w0
    # the best linear datamodel (least squares over all masks, uniform = 1/2-biased) leaves exactly the degree ≥ 2 mass
    fit = fit_linear_datamodel(ALL, values)
    assert np.mean((values - fit.predict(ALL)) ** 2) == pytest.approx(var - w1, rel=1e-9)
    assert 0.02 < (var - w1) / var < 0.5  # a genuinely non-additive case
    est = datamodel_quality_of(None, N, p=p, pairs=20000, map_fn=lambda _f, ms: f_closed(ms), bootstrap=100, seed=0,
                               fit_masks=400, test_masks=2000)
    se = est.stderr
    assert se["residual_fraction"] < 0.03
    assert abs(est.residual_fraction - (var - w1) / var) <= 3 * se["residual_fraction"]
    assert abs(est.ceiling - np.sqrt(w1 / var)) <= 3 * se["ceiling"]
    # the directly fitted datamodel on fresh subsets agrees (its held-out residual adds estimation error)
    assert est.fitted is not None
    assert abs(est.fitted["residual_fraction"] - (var - w1) / var) < 0.05
    assert est.fitted["correlation"] <= np.sqrt(w1 / var) + 0.02


def test_exactly_additive_query(run):
    """One full-batch step: f is affine in the keep-mask, so residual 0, ceiling 1, exact scores reach LDS 1."""
    rng = np.random.default_rng(4)
    theta0 = rng.normal(size=D + 1)
    one_step = (lambda ms: gd(np.stack(list(ms)), theta0, [np.arange(N)], [LR]) - gd(np.ones(N, bool), theta0,
                                                                                     [np.arange(N)], [LR])[0])
    values = one_step(ALL)
    fit = fit_linear_datamodel(ALL, values)
    np.testing.assert_allclose(fit.predict(ALL), values, rtol=0, atol=1e-13)
    b = -LR / N * (PHI @ PHIQ) * (PHI @ theta0 - YN)  # d f / d x_i
    np.testing.assert_allclose(fit.weights, b, rtol=1e-10)
    p = 0.7
    w0, w1, ef2 = exact_mass(values, ALL, p)
    assert w1 == pytest.approx(p * (1 - p) * np.sum(b ** 2), rel=1e-10)
    assert ef2 - w0 == pytest.approx(w1, rel=1e-10)  # no degree ≥ 2 mass
    loo = one_step(~np.eye(N, dtype=bool))  # removal scores F_i = f(without i) − f(all) = −b_i
    est = datamodel_quality_of(None, N, p=p, pairs=5000, map_fn=lambda _f, ms: one_step(ms), scores={"loo": loo},
                               bootstrap=50, seed=1)
    assert abs(est.residual_fraction) <= 3 * est.stderr["residual_fraction"] + 1e-12
    assert est.lds["loo"]["pearson"] == pytest.approx(1.0, abs=1e-12)
    assert est.lds["loo"]["spearman"] == pytest.approx(1.0, abs=1e-12)


def test_refusals(run):
    log, f_closed = run
    with pytest.raises(ValueError, match="fit_masks must be >= n \\+ 1"):
        datamodel_quality_of(None, N, pairs=10, map_fn=lambda _f, ms: f_closed(ms), fit_masks=5, bootstrap=0)
    with pytest.raises(ValueError, match="one entry per sample id"):
        datamodel_quality_of(None, N, pairs=10, map_fn=lambda _f, ms: f_closed(ms), scores={"x": np.zeros(3)},
                             bootstrap=0)
    with pytest.raises(ValueError, match="workers"):
        ReplaySubsets(log, Lin().double(), data, query, workers=0)
    with pytest.raises(ValueError, match="keep probability"):
        datamodel_quality_of(None, N, p=1.0, pairs=10, map_fn=lambda _f, ms: f_closed(ms))
