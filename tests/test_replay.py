"""Replay (θ_t from the log, counterfactual runs) and replay leave-one-out ground truth."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence.data import WithIds
from lightning_influence.evaluation import replay_loo
from lightning_influence.log import InfluenceLog
from lightning_influence.replay import (
    DriftReport,
    ReplayMismatchError,
    UnsupportedOptimizerError,
    batch_from_ids,
    build_optimizer,
    checkpoint_params,
    parameters_at,
    replay,
)
from tests.test_dit import (
    QUERY,
    T,
    Scalar,
    TinyMLP,
    _meta_log,
    loss_fn,
    make_log,
    make_opt,
    model,
    scalar_log,
    train_data,
)

torch.set_num_threads(1)


# ------------------------------------------------------------------------------ helpers
def independent_run(log: InfluenceLog, kind: str, drop: set[int], t_from: int = 0, t_drop: tuple[int, int] | None = None,
                    until: int | None = None) -> nn.Module:
    """Plain torch training loop (no replay code): θ_0 from the log, the logged batches and lrs,
    samples in ``drop`` weighted 0 (denominator kept) at steps inside ``t_drop`` (default: all)."""
    m = model()
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.copy_(torch.from_numpy(log.checkpoint(0)[n]))
    opt = make_opt(kind, m)
    until = T if until is None else until
    lo, hi = t_drop or (0, T)
    for t in range(until):
        ids = log.batch_ids(t)
        for g in opt.param_groups:
            g["lr"] = float(log.lr(t)[0])
        x, y = train_data(ids)
        w = torch.tensor([0.0 if (int(i) in drop and lo <= t < hi) else 1.0 for i in ids], dtype=torch.float64)
        opt.zero_grad()
        ((w * F.cross_entropy(m(x), y, reduction="none")).sum() / len(ids)).backward()
        opt.step()
    return m


def query_value(m: nn.Module) -> float:
    with torch.no_grad():
        return float(QUERY(m))


# ------------------------------------------------------------------- Lightning, end to end
def _lightning_log(tmp_path, opt_name: str) -> tuple[InfluenceLog, WithIds, type]:
    import lightning.pytorch as pl

    from lightning_influence import InfluenceTracker

    class Lit(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3))

        def forward(self, x):
            return self.net(x)

        def per_sample_loss(self, batch):
            return F.cross_entropy(self(batch[0]), batch[1], reduction="none")

        def training_step(self, batch, batch_idx):
            return self.per_sample_loss(batch).mean()

        def configure_optimizers(self):
            if opt_name == "adamw":
                opt = torch.optim.AdamW(self.parameters(), lr=0.05, weight_decay=0.1)
            else:
                opt = torch.optim.SGD(self.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-3)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)}

    g = torch.Generator().manual_seed(0)
    ds = WithIds(TensorDataset(torch.randn(24, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (24,), generator=g)))
    torch.manual_seed(0)
    lit = Lit().double()
    tracker = InfluenceTracker(str(tmp_path / "log"), checkpoint_every_n_steps=4, record_gradients=True)
    trainer = pl.Trainer(max_epochs=3, callbacks=[tracker], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(lit, DataLoader(ds, batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(1)))
    return InfluenceLog(tmp_path / "log"), ds, Lit


@pytest.mark.parametrize("opt_name", ["momentum", "adamw"])
def test_replay_reproduces_lightning_run_bit_for_bit(tmp_path, opt_name):
    log, ds, Lit = _lightning_log(tmp_path, opt_name)
    assert log.num_steps == 15 and log.checkpoint_steps == [0, 4, 8, 12, 15]  # 5 batches per epoch, the last has 4 samples
    seen = []
    for rs in replay(log, Lit().double(), ds, 0, None, tolerance=0.0):  # verify: exact equality at every checkpoint
        seen.append(rs.step)
        if rs.step in log.checkpoint_steps:
            for n, v in log.checkpoint(rs.step).items():
                assert torch.equal(rs.params[n], torch.from_numpy(v)), (rs.step, n)
    assert seen == list(range(16))
    # from a mid-run checkpoint (optimizer state loaded), and a step between checkpoints
    last = list(replay(log, Lit().double(), ds, 9, None, tolerance=0.0))[-1]
    assert last.step == 15 and last.optimizer.state_dict()["state"]
    p10 = parameters_at(log, Lit().double(), ds, 10, tolerance=0.0)
    assert torch.equal(p10["net.0.weight"], [r for r in replay(log, Lit().double(), ds, 10, 11)][0].params["net.0.weight"])
    # DIT runs on the Lightning log, with progress reported
    from lightning_influence.estimators import dit

    calls = []
    val = (torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 0]))
    s = dit(log, lambda m: m.per_sample_loss(val).mean(), module=Lit().double(), train_data=ds, window=("epoch", 1, 3),
            loss_fn=lambda m, b: m.per_sample_loss(b), progress=lambda d, t: calls.append((d, t)))
    assert s.scores.shape == (24, 1) and np.isfinite(s.scores).all() and calls and calls[-1][0] == calls[-1][1]
    assert "approx." not in s.method  # the adjoint is exact for every optimizer (the frozen variant is opt-in)
    # replay LOO: its reference run reproduces the logged run
    loo = replay_loo(log, Lit().double(), ds, lambda m: m.per_sample_loss(val).mean(), sample_ids=[0, 5],
                     loss_fn=lambda m, b: m.per_sample_loss(b))
    assert loo.info["checkpoints_checked"] == [4, 8, 12, 15]
    assert loo.info["replay_drift"]["max"] <= 1e-12


# ------------------------------------------------------------------ replay, torch-only logs
def test_weighted_replay_is_the_removal_counterfactual(tmp_path_factory):
    log = make_log(tmp_path_factory, "momentum")
    ref = independent_run(log, "momentum", {3})
    w = lambda t, ids: torch.tensor([0.0 if i == 3 else 1.0 for i in ids], dtype=torch.float64)  # noqa: E731
    last = list(replay(log, model(), train_data, 0, None, loss_fn=loss_fn, weights=w))[-1]
    for n, p in ref.named_parameters():
        torch.testing.assert_close(last.params[n], p.detach(), rtol=1e-13, atol=1e-15)
    # the counterfactual is not compared with the logged checkpoints (it is meant to differ)
    assert not torch.equal(last.params["net.0.weight"], torch.from_numpy(log.checkpoint(T)["net.0.weight"]))


def test_replay_yields_params_before_each_step(tmp_path_factory):
    log = make_log(tmp_path_factory, "sgd", checkpoint_every=5)
    steps = list(replay(log, model(), train_data, 3, 7, loss_fn=loss_fn))
    assert [s.step for s in steps] == [3, 4, 5, 6, 7] and len(steps[-1].ids) == 0
    assert all(np.array_equal(s.ids, log.batch_ids(s.step)) for s in steps[:-1])
    dense = make_log(tmp_path_factory, "sgd")
    for s in steps:
        for n, v in dense.checkpoint(s.step).items():
            assert torch.equal(s.params[n], torch.from_numpy(v))


def test_replay_mismatch_message(tmp_path_factory):
    log = make_log(tmp_path_factory, "sgd", checkpoint_every=5)
    bad = lambda ids: (train_data(ids)[0] * 1.001, train_data(ids)[1])  # noqa: E731
    with pytest.raises(ReplayMismatchError) as err:  # tolerance 0: any difference at all
        list(replay(log, model(), bad, 0, 6, loss_fn=loss_fn, tolerance=0.0))
    msg = str(err.value)
    assert "step 5" in msg and "steps 0..4" in msg and "differs" in msg and "train_data" in msg and "store_inputs" in msg
    drift = float(re.search(r"by ([0-9.e+-]+) of how far training moved", msg).group(1))
    assert 0 < drift < 1e-2  # a 0.1% change of the inputs: below the default tolerance, so ...
    report = DriftReport()
    list(replay(log, model(), bad, 0, 6, loss_fn=loss_fn, report=report))  # ... the default replay goes on, re-anchored
    assert report.checkpoints[0][0] == 5 and report.checkpoints[0][1] == pytest.approx(drift, rel=1e-2)
    very_bad = lambda ids: (train_data(ids)[0] * 1.5, train_data(ids)[1])  # noqa: E731
    with pytest.raises(ReplayMismatchError, match=r"at step 5, .* by [0-9.e+-]+ of how far training moved .*tolerance 0\.01"):
        list(replay(log, model(), very_bad, 0, 6, loss_fn=loss_fn))
    # a float32 module cannot reproduce a float64 run
    with pytest.raises(ValueError, match="torch.float32 in the module but torch.float64 in the log"):
        replay(log, TinyMLP(), lambda ids: (train_data(ids)[0].float(), train_data(ids)[1]), 0, 6, loss_fn=loss_fn)


def test_replay_argument_checks(tmp_path_factory):
    log = make_log(tmp_path_factory, "sgd", checkpoint_every=5)
    with pytest.raises(ValueError, match="outside the run"):
        replay(log, model(), train_data, 4, 99)
    with pytest.raises(ValueError, match="must be a checkpoint step"):
        replay(log, model(), train_data, 4, 8, start=3)
    with pytest.raises(ValueError, match="module does not match"):
        replay(log, nn.Linear(3, 3).double(), train_data)


def test_build_optimizer(tmp_path_factory):
    log = make_log(tmp_path_factory, "adamw")
    params = {n: p.requires_grad_(True) for n, p in checkpoint_params(log, model(), 5).items()}
    opt = build_optimizer(log, params, state_step=5)
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["amsgrad"] is True
    st = opt.state[params["net.0.weight"]]
    assert float(st["step"]) == 5.0
    np.testing.assert_array_equal(st["exp_avg"].numpy(), log.optimizer_state(5)["net.0.weight"]["exp_avg"])
    lbfgs = _meta_log(tmp_path_factory, optimizer={**log.meta["optimizer"], "class": "torch.optim.lbfgs.LBFGS"})
    with pytest.raises(UnsupportedOptimizerError, match="LBFGS"):
        build_optimizer(lbfgs, params)
    maxi = _meta_log(tmp_path_factory, optimizer={**log.meta["optimizer"],
                                                  "param_groups": [{**log.meta["optimizer"]["param_groups"][0], "maximize": True}]})
    with pytest.raises(UnsupportedOptimizerError, match="maximize"):
        build_optimizer(maxi, params)
    with pytest.raises(ValueError, match="not among the parameters"):
        build_optimizer(log, {"net.0.weight": params["net.0.weight"]})


def test_batch_from_ids():
    ds = WithIds(TensorDataset(torch.arange(6.0).reshape(6, 1), torch.arange(6)))
    x, y, ids = batch_from_ids(ds, np.array([4, 1]))
    assert x.tolist() == [[4.0], [1.0]] and ids.tolist() == [4, 1]
    assert batch_from_ids(lambda ids: ids * 2, np.array([3])).tolist() == [6]
    with pytest.raises(TypeError):
        batch_from_ids(42, np.array([0]))


# -------------------------------------------------------------------------- replay LOO
def test_replay_loo_equals_independent_retraining(tmp_path_factory):
    log = make_log(tmp_path_factory, "momentum", checkpoint_every=4)
    loo = replay_loo(log, model(), train_data, QUERY, sample_ids=[0, 3, 7], grid=[0, 5, T], loss_fn=loss_fn, copies=2)
    assert loo.info["passes"] == 2 and loo.info["replay_drift"]["max"] <= 1e-12
    assert loo.grid.tolist() == [0, 5, T] and loo.values.shape == (3, 3, 1)
    base = query_value(independent_run(log, "momentum", set()))
    base5 = query_value(independent_run(log, "momentum", set(), until=5))
    for row, j in enumerate([0, 3, 7]):
        assert loo.at(0)[row, 0] == 0.0
        assert loo.at(T)[row, 0] == pytest.approx(query_value(independent_run(log, "momentum", {j})) - base, abs=1e-12)
        truth5 = query_value(independent_run(log, "momentum", {j}, until=5)) - base5
        assert loo.window(5, T)[row] == pytest.approx(loo.at(T)[row, 0] - truth5, abs=1e-12)
    scores = loo.as_scores(0, T, n_total=10)
    assert np.isnan(scores.column(0)[1]) and scores.column(0)[3] == loo.at(T)[1, 0]


def test_replay_loo_partial_removal_equals_weighted_replay(tmp_path_factory):
    """removal_weight scales the dropped sample's weight: the run of replay(weights=...) with that weight."""
    log = make_log(tmp_path_factory, "adamw")
    part = replay_loo(log, model(), train_data, QUERY, sample_ids=[3, 6], grid=[0, T], loss_fn=loss_fn,
                      removal_weight=0.25)

    def f_with(j: int, wj: float) -> float:
        w = lambda t, ids: torch.tensor([wj if i == j else 1.0 for i in ids], dtype=torch.float64)  # noqa: E731
        last = list(replay(log, model(), train_data, 0, None, loss_fn=loss_fn, weights=w))[-1]
        m = model()
        with torch.no_grad():
            for n, p in m.named_parameters():
                p.copy_(last.params[n])
        return query_value(m)

    base = f_with(-1, 1.0)
    for row, j in enumerate([3, 6]):
        assert part.at(T)[row, 0] == pytest.approx(f_with(j, 0.25) - base, abs=1e-12)
        assert abs(part.at(T)[row, 0] - (f_with(j, 0.0) - base)) > 1e-6  # not the full removal


def test_replay_loo_groups_and_in_window(tmp_path_factory):
    log = make_log(tmp_path_factory, "adamw")
    grp = replay_loo(log, model(), train_data, QUERY, groups=[[1, 2], [5]], loss_fn=loss_fn)
    base = query_value(independent_run(log, "adamw", set()))
    assert grp.window(0, T)[0] == pytest.approx(query_value(independent_run(log, "adamw", {1, 2})) - base, abs=1e-12)
    assert grp.groups[0].tolist() == [1, 2]
    win = replay_loo(log, model(), train_data, QUERY, sample_ids=[1, 5], window=(4, 9), in_window_only=True, loss_fn=loss_fn)
    assert win.grid.tolist() == [4, 8, 9] and win.removal_window == (4, 9)
    base9 = query_value(independent_run(log, "adamw", set(), until=9))
    for row, j in enumerate([1, 5]):
        cf = query_value(independent_run(log, "adamw", {j}, t_drop=(4, 9), until=9))
        assert win.window(4, 9)[row] == pytest.approx(cf - base9, abs=1e-12)
    with pytest.raises(ValueError, match="needs a window"):
        replay_loo(log, model(), train_data, QUERY, in_window_only=True, loss_fn=loss_fn)


def test_replay_loo_hand_oracles(tmp_path):
    lf = lambda mod, b: mod.per_sample_loss(b)  # noqa: E731
    log, data = scalar_log(tmp_path / "a", [1.0, 3.0], [[0, 1]], [0.1])
    loo = replay_loo(log, Scalar(), data, lambda m: m.theta, loss_fn=lf)
    assert loo.at(1)[0, 0] == pytest.approx(0.05, abs=1e-15)  # θ^{-0}_1 = 0.85 vs θ_1 = 0.8
    assert loo.base[:, 0].tolist() == pytest.approx([1.0, 0.8], abs=1e-15)
    log, data = scalar_log(tmp_path / "b", [1.0, 2.0], [[0], [1]], [0.1, 0.2])
    lin = replay_loo(log, Scalar(), data, lambda m: m.theta, sample_ids=[0], grid=[0, 1, 2], loss_fn=lf)
    quad = replay_loo(log, Scalar(), data, lambda m: 0.5 * m.theta**2, sample_ids=[0], grid=[0, 1, 2], loss_fn=lf)
    assert lin.window(1, 2)[0] == pytest.approx(-0.04, abs=1e-15)  # the dynamics are affine in θ: DIT is exact
    assert quad.window(1, 2)[0] == pytest.approx(0.5 * (0.36 - 0.2916) - 0.5 * (1 - 0.81), abs=1e-15)  # −0.0608 vs DIT −0.0576


def test_replay_loo_detects_a_wrong_reference(tmp_path_factory):
    log = make_log(tmp_path_factory, "sgd", checkpoint_every=4)
    bad = lambda ids: (train_data(ids)[0] + 0.5, train_data(ids)[1])  # noqa: E731
    with pytest.raises(ReplayMismatchError, match="does not reproduce the logged run: at step 4"):
        replay_loo(log, model(), bad, QUERY, sample_ids=[0], loss_fn=loss_fn)


def test_frozen_parameters_in_the_optimizer_replay_bit_for_bit(tmp_path):
    """A frozen layer whose parameters the optimizer still holds (``torch.optim.X(self.parameters())`` with
    ``requires_grad_(False)``: fine-tuning's usual pattern). They have no gradient, so the optimizer never updates them,
    and the log has no checkpoint of them; its optimizer groups listed them, and replay (every DIT/Diff-In call)
    refused the matching module ("the module does not match the log"). The groups now hold the trainable parameters."""
    from lightning_influence import InfluenceTracker
    from lightning_influence.estimators import dit
    from lightning_influence.queries import mean_loss
    from tests.conftest import fit, loader, make_data, tiny

    def model():
        m = tiny(momentum=0.9, weight_decay=0.01)
        m.net[0].requires_grad_(False)
        return m

    ds = make_data(16)
    fit(model(), loader(ds, batch_size=4), InfluenceTracker(str(tmp_path), checkpoint_every_n_steps=2), epochs=1)
    log = InfluenceLog(tmp_path)
    assert [g["params"] for g in log.meta["optimizer"]["param_groups"]] == [["net.3.weight", "net.3.bias"]]
    steps = [rs.step for rs in replay(log, model(), WithIds(ds), 0, None, tolerance=0.0)]
    assert steps[-1] == log.num_steps
    assert np.isfinite(dit(log, mean_loss(ds.tensors), module=model(), train_data=ds).column(0)).all()
