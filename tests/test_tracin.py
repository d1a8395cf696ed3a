"""TracIn (docs/influence-math.md §5) against a brute-force float64 recomputation from checkpoints and raw data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TinyClassifier, fit, loader, make_data, tiny
from lightning_influence import InfluenceLog, InfluenceTracker, tracin
from lightning_influence.queries import mean_loss, sample_losses


def _set(params, log, step):
    """Copy the log's checkpoint ``θ_step`` into the module's parameters."""
    with torch.no_grad():
        for n, v in log.checkpoint(step).items():
            params[n].copy_(torch.from_numpy(v))


def _sample_grad(module, params, ds, j):
    x, y = ds[int(j)]
    return torch.autograd.grad(F.cross_entropy(module(x[None]), y[None]), list(params.values()))


def brute_force_tracin(log, ds, val, t1, t2, ckpt_of=lambda t: t, project=None):
    """Σ_{t∈[t1,t2)} Σ_{j∈B_t} η_t/|B_t| ⟨q_t, g_{j,t}⟩ with per-sample autograd, float64, no log gradients."""
    module = tiny()
    params = dict(module.named_parameters())
    scores = np.zeros(log.dataset_size)
    for t in range(t1, t2):
        _set(params, log, ckpt_of(t))
        q = torch.autograd.grad(F.cross_entropy(module(val[0]), val[1]), list(params.values()))
        _set(params, log, t)
        ids = log.batch_ids(t)
        for j in ids:
            g = _sample_grad(module, params, ds, j)
            if project is None:
                dot = sum((a * b).sum() for a, b in zip(q, g))
            else:
                names = list(params)
                pq = project({n: a[None] for n, a in zip(names, q)})
                pg = project({n: b[None] for n, b in zip(names, g)})
                dot = (pq * pg).sum()
            scores[j] += log.lr(t)[0] / len(ids) * float(dot)
    return scores


@pytest.mark.parametrize("projection_dim", [None, 6])
def test_tracin_equals_brute_force(tmp_path, projection_dim):
    ds, val = make_data(16, seed=1), make_data(8, seed=2).tensors
    tracker = InfluenceTracker(str(tmp_path), record_gradients=True, checkpoint_every_n_steps=1,
                               projection_dim=projection_dim, storage_dtype="float64")
    fit(tiny(weight_decay=0.01), loader(ds, batch_size=4), tracker, epochs=3)
    log = InfluenceLog(tmp_path)
    query = mean_loss(val, name="val_loss")
    project = None if projection_dim is None else log.projector().project
    for window in [None, (3, 9), ("epoch", 2, 3)]:
        t1, t2 = log.window(window)
        got = tracin(log, query, module=tiny(), window=window)
        assert got.window == (t1, t2) and got.query_names == ["val_loss"]
        expected = brute_force_tracin(log, ds, val, t1, t2, project=project)
        np.testing.assert_allclose(got.column(0), expected, rtol=1e-10, atol=1e-14)
    whole = tracin(log, query, module=tiny()).column(0)
    parts = sum(tracin(log, query, module=tiny(), window=w).column(0) for w in [(0, 5), (5, 12)])
    np.testing.assert_allclose(whole, parts, rtol=1e-12)  # additive over windows


def test_tracincp_uses_latest_checkpoint_and_scales_sparse_gradient_steps(tmp_path):
    ds, val = make_data(16, seed=1), make_data(8, seed=2).tensors
    tracker = InfluenceTracker(str(tmp_path), record_gradients=True, every_n_steps=2, checkpoint_every_n_steps=2,
                               storage_dtype="float64")
    fit(tiny(), loader(ds, batch_size=4), tracker, epochs=2)
    log = InfluenceLog(tmp_path)
    got = tracin(log, mean_loss(val), module=tiny())
    assert "every 2 steps" in got.method
    expected = sum(2 * brute_force_tracin(log, ds, val, t, t + 1) for t in range(0, 8, 2))
    np.testing.assert_allclose(got.column(0), expected, rtol=1e-10, atol=1e-14)


def test_several_queries_in_one_pass(tmp_path):
    ds, val = make_data(16, seed=1), make_data(3, seed=2).tensors
    fit(tiny(), loader(ds, batch_size=4),
        InfluenceTracker(str(tmp_path), record_gradients=True, checkpoint_every_n_steps=1, storage_dtype="float64"), epochs=1)
    log = InfluenceLog(tmp_path)
    multi = tracin(log, sample_losses(val), module=tiny())
    assert multi.scores.shape == (16, 3)
    for q in range(3):
        single = tracin(log, mean_loss((val[0][q : q + 1], val[1][q : q + 1])), module=tiny())
        np.testing.assert_allclose(multi.column(q), single.column(0), rtol=1e-10, atol=1e-15)


def test_tracin_needs_module_for_a_callable_query(tmp_path):
    synthetic = make_data(8)
    fit(tiny(), loader(synthetic, batch_size=4), InfluenceTracker(str(tmp_path), record_gradients=True), epochs=1)
    with pytest.raises(ValueError, match="needs `module`"):
        tracin(InfluenceLog(tmp_path), mean_loss(synthetic.tensors))


def test_tracin_self_influence_equals_brute_force(tmp_path):
    """Σ_t η_t/|B_t| ‖g_{j,t}‖² with per-sample autograd at the checkpoints, float64; ≥ 0; additive over windows."""
    from lightning_influence.estimators import tracin_self_influence

    ds = make_data(16, seed=1)
    tracker = InfluenceTracker(str(tmp_path), record_gradients=True, checkpoint_every_n_steps=1, storage_dtype="float64")
    fit(tiny(), loader(ds, batch_size=4), tracker, epochs=2)
    log = InfluenceLog(tmp_path)
    module = tiny()
    params = dict(module.named_parameters())
    expected = np.zeros(log.dataset_size)
    for t in range(log.num_steps):
        _set(params, log, t)
        ids = log.batch_ids(t)
        for j in ids:
            g = _sample_grad(module, params, ds, j)
            expected[j] += log.lr(t)[0] / len(ids) * float(sum((a * a).sum() for a in g))
    got = tracin_self_influence(log)
    assert got.query_names == ["self"] and got.method == "tracin-self"
    np.testing.assert_allclose(got.column(0), expected, rtol=1e-10, atol=1e-14)
    assert (got.column(0) >= 0).all() and (got.column(0) > 0).sum() == 16
    parts = sum(tracin_self_influence(log, window=w).column(0) for w in [(0, 3), (3, 8)])
    np.testing.assert_allclose(parts, got.column(0), rtol=1e-12)
    with pytest.raises(TypeError, match="takes no query"):
        tracin_self_influence(log, mean_loss(make_data(4).tensors))


@pytest.mark.parametrize("precision", ["16-true", "32-true"])
def test_tracin_module_in_another_dtype_than_the_log_is_refused_with_what_to_do(tmp_path, precision):
    """A float32 module against a float16 log (precision='16-true') failed deep in torch ("mat1 and mat2 must have the
    same dtype"); tracin checks the module against the checkpoint as replay, DIT and Diff-In do (also where the
    log's dtype would have carried the computation: a float64 log, whose float32 module's buffers would not follow)."""
    half = precision == "16-true"
    ds = make_data(8, dtype=torch.float32 if half else torch.float64)
    module = TinyClassifier().float() if half else tiny()
    fit(module, loader(ds, batch_size=4), InfluenceTracker(str(tmp_path), record_gradients=True), epochs=1,
        precision=precision)
    logged = "torch.float16" if half else "torch.float64"
    with pytest.raises(ValueError, match=rf"is torch.float32 in the module but {logged} in the log: convert the module"):
        tracin(InfluenceLog(tmp_path), mean_loss(ds.tensors), module=TinyClassifier().float())
