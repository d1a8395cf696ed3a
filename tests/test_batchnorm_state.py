"""Train-mode BatchNorm: its running statistics stored with every checkpoint, carried by replay, used by queries in eval
mode; the replay leave-one-out with it, against a retraining by a plain torch.optim loop."""

from __future__ import annotations

import copy

import h5py
import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from conftest import loader, make_data, tiny
from lightning_influence import InfluenceLog, InfluenceTracker, WithIds
from lightning_influence.evaluation import replay_loo
from lightning_influence.log.format import list_segments
from lightning_influence.queries import evaluate_query, query_gradients
from lightning_influence.replay import batch_from_ids, checkpoint_params, replay

TRACKED = dict(record_gradients=True, params=["net.0.*", "net.4.*"], allow_train_batchnorm=True)


class Snapshots(pl.Callback):
    """The module's state before each step's first forward (``θ_t`` and running statistics), and at the end (``T``)."""

    def __init__(self) -> None:
        self.states: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.states.setdefault(trainer.global_step, copy.deepcopy(pl_module.state_dict()))

    def on_train_end(self, trainer, pl_module) -> None:
        self.states[trainer.global_step] = copy.deepcopy(pl_module.state_dict())


def _train(log_dir: str, every: int, ds, epochs: int = 2) -> Snapshots:
    snaps = Snapshots()
    pl.seed_everything(0, verbose=False)
    pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, deterministic=True,
               callbacks=[InfluenceTracker(log_dir, checkpoint_every_n_steps=every, **TRACKED), snaps]
               ).fit(tiny(batchnorm=True), loader(ds))
    return snaps


def _at(state: dict[str, torch.Tensor]):
    module = tiny(batchnorm=True)
    module.load_state_dict(state)
    return module.eval()


def test_checkpoints_hold_the_running_statistics_and_eval_queries_match_training(log_dir):
    """A query on ``model.eval()`` at every checkpoint gives exactly what the training module gave at that step (its
    running statistics, not the module's own: before, the fresh module's zeros and ones); replay carries the statistics
    from step to step as training did (bit for bit at the steps between checkpoints too)."""
    ds = make_data(12)
    snaps = _train(log_dir, 3, ds, epochs=3)
    log = InfluenceLog(log_dir)
    x = ds.tensors[0]
    query = lambda m: m(x[:4])[:, 0].sum()  # noqa: E731
    module = tiny(batchnorm=True).eval()
    assert log.checkpoint_steps == [0, 3, 6]
    for t in log.checkpoint_steps:
        params = checkpoint_params(log, module, t)
        expected = query(_at(snaps.states[t]))
        assert torch.equal(evaluate_query(module, query, params), expected)
        _, values = query_gradients(module, query, log.param_names, params)  # TracIn's, DIT's and Diff-In's path
        assert torch.equal(values, expected.reshape(1).detach())
        stored = log.checkpoint_buffers(t)
        assert set(stored) == {"net.1.running_mean", "net.1.running_var", "net.1.num_batches_tracked"}
        assert int(stored["net.1.num_batches_tracked"]) == t
    assert not torch.equal(query(module), query(_at(snaps.states[6])))  # the module's own statistics differ
    from lightning_influence.evaluation.pbrf.problem import Problem
    from lightning_influence.queries import default_loss_fn

    problem = Problem(log, module, WithIds(ds), query, output_loss="cross_entropy", damping=0.0, weight_decay=None,
                      step=None, loss_fn=default_loss_fn, inputs_fn=None, chunk_size=None, epsilon=None)
    assert torch.equal(problem.f0, query(_at(snaps.states[6])).reshape(1).detach())  # the PBRF's f(θ_T)
    seen = []
    for rs in replay(log, module, WithIds(ds), 0, None, tolerance=0.0):
        for n, b in rs.params.buffers.items():
            assert torch.equal(b, snaps.states[rs.step][n]), (rs.step, n)
        seen.append(rs.step)
    assert seen == list(range(7))
    assert torch.equal(module.net[1].running_mean, torch.zeros(7, dtype=torch.float64))  # the module is untouched


def test_a_query_on_a_module_in_train_mode_normalises_as_lightning_validates(log_dir):
    """The CLI rebuilds the module in train mode: a query at a checkpoint normalised by the validation batch's own
    statistics (batch statistics), not as Lightning validates. With the step's running statistics known, the
    normalisation layers are in eval mode too: the same value as the training module's ``eval()`` at that step."""
    ds = make_data(12)
    snaps = _train(log_dir, 3, ds, epochs=3)
    log = InfluenceLog(log_dir)
    x = ds.tensors[0]
    query = lambda m: m(x[:4])[:, 0].sum()  # noqa: E731
    module = tiny(batchnorm=True)
    for t in log.checkpoint_steps:
        assert torch.equal(evaluate_query(module, query, checkpoint_params(log, module, t)), query(_at(snaps.states[t])))
    assert module.training and module.net[1].training  # its modes are restored


def test_a_log_without_buffers_still_reads_and_warns(log_dir):
    """A log written before buffers were stored (its checkpoints without ``buffers``): read as before, the module's
    own running statistics used, with the warning."""
    ds = make_data(12)
    _train(log_dir, 2, ds)
    for paths in list_segments(log_dir).values():
        for path in paths:
            with h5py.File(path, "a") as f:
                for g in f["checkpoints"].values():
                    del g["buffers"]
    log = InfluenceLog(log_dir)
    assert log.checkpoint_buffers(0) is None
    with pytest.warns(RuntimeWarning, match="stored no running statistics"):
        params = checkpoint_params(log, tiny(batchnorm=True), 2)
    assert params.buffers is None


def _retrain(log: InfluenceLog, ds, drop: int | None, start: dict[str, torch.Tensor] | None = None,
             t1: int = 0) -> torch.nn.Module:
    """A plain loop with torch.optim on the logged batches from step ``t1`` (the logged ``θ_0`` and statistics, or the
    state ``start``), sample ``drop`` out of every batch (its forward too), the others' weights ``1/|B_t|`` kept
    (docs/influence-math.md §2)."""
    module = tiny(batchnorm=True)
    state = start or {**{n: torch.from_numpy(np.array(v)) for n, v in log.checkpoint(0).items()},
                      **{n: torch.from_numpy(np.array(v)) for n, v in log.checkpoint_buffers(0).items()}}
    module.load_state_dict(state)
    module.train()
    opt = torch.optim.SGD(module.parameters(), lr=1.0)
    for t in log.steps[t1:]:
        ids = log.batch_ids(int(t))
        kept = ids[ids != drop]
        for g in opt.param_groups:
            g["lr"] = float(log.lr(int(t))[0])
        opt.zero_grad()
        (module.per_sample_loss(batch_from_ids(WithIds(ds), kept)).sum() / len(ids)).backward()
        opt.step()
    return module.eval()


def test_replay_loo_with_train_mode_batchnorm_matches_retraining(log_dir):
    """Replay leave-one-out of a train-mode BatchNorm run (it crashed under vmap: the running statistics are updated in
    place) equals retraining without the sample by a plain torch.optim loop, and its reference run the training."""
    ds = make_data(12)
    snaps = _train(log_dir, 2, ds)
    log = InfluenceLog(log_dir)
    x = ds.tensors[0]
    query = lambda m: m(x[:4])[:, 0].sum()  # noqa: E731
    T = log.num_steps
    result = replay_loo(log, tiny(batchnorm=True).eval(), WithIds(ds), query, sample_ids=[0, 5, 11], grid=[T], copies=2)
    reference = float(query(_retrain(log, ds, None)).detach())
    assert reference == pytest.approx(float(query(_at(snaps.states[T])).detach()), abs=1e-13)
    assert result.base[-1, 0] == pytest.approx(reference, abs=1e-13)
    for row, j in enumerate([0, 5, 11]):
        expected = float(query(_retrain(log, ds, j)).detach()) - reference
        assert abs(expected) > 1e-4  # the removal matters
        assert result.values[row, -1, 0] == pytest.approx(expected, rel=1e-9, abs=1e-13)
    # dropped only in [t1, T), from the training module's state at t1 (replayed: θ_t1 and its running statistics)
    window = replay_loo(log, tiny(batchnorm=True).eval(), WithIds(ds), query, sample_ids=[5], window=(1, T),
                        in_window_only=True, grid=[T])
    start = snaps.states[1]
    reference = float(query(_retrain(log, ds, None, start, 1)).detach())
    expected = float(query(_retrain(log, ds, 5, start, 1)).detach()) - reference
    assert abs(expected) > 1e-4 and window.window(1, T) == pytest.approx([expected], rel=1e-9, abs=1e-13)


@pytest.mark.slow
def test_ddp_replay_carries_rank_0s_running_statistics(tmp_path):
    """2 DDP processes: the log's running statistics are rank 0's, whose forwards alone update them (DDP broadcasts
    rank 0's buffers before every forward); replay carries them through rank 0's micro-batches only (through both
    ranks' it drifted at every step between two checkpoints)."""
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    log_dir, snapshots = tmp_path / "log", tmp_path / "states.pt"
    run = subprocess.run([sys.executable, str(here / "ddp_bn_run.py"), str(log_dir), str(snapshots)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    states = torch.load(snapshots, weights_only=True)
    log = InfluenceLog(log_dir)
    assert log.meta["world_size"] == 2 and log.checkpoint_steps[:2] == [0, 2]
    from ddp_bn_run import N

    seen = []
    for rs in replay(log, tiny(batchnorm=True).eval(), WithIds(make_data(N)), 0, None, tolerance=1e-9):
        for n, b in rs.params.buffers.items():
            torch.testing.assert_close(b, states[rs.step][n], rtol=1e-12, atol=1e-14)
        seen.append(rs.step)
    assert seen == list(range(log.num_steps + 1)) and len(seen) > 4


def test_info_verify_reads_the_buffers_back(log_dir, capsys):
    """``info --verify`` checks the buffers' CRC-32 too: one flipped bit of a running mean is a user error naming it."""
    from lightning_influence.cli import main

    _train(log_dir, 2, make_data(12))
    assert main(["info", log_dir, "--verify", "-q"]) == 0
    seg = sorted(list_segments(log_dir)[0])[0]
    with h5py.File(seg, "r") as f:
        ds = f["checkpoints/step_00000000/buffers/net.1.running_mean"]
        offset, name = ds.id.get_chunk_info(0).byte_offset, ds.name
    data = bytearray(seg.read_bytes())
    data[offset] ^= 0x10
    seg.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["info", log_dir, "--verify", "-q"]) == 2
    err = capsys.readouterr().err
    assert "fails its CRC-32" in err and "running_mean" in err, err


@pytest.mark.parametrize("method", ["tracin", "dit", "diffin"])
def test_estimators_query_with_the_steps_running_statistics(log_dir, monkeypatch, method):
    """TracIn (at its checkpoints), DIT and Diff-In (at the window's end, a replayed step) take the query's gradient
    with the running statistics of the step they evaluate it at, the training module's then."""
    import importlib

    from lightning_influence.estimators import diffin, dit, tracin

    ds = make_data(12)
    snaps = _train(log_dir, 3, ds)
    log = InfluenceLog(log_dir)
    seen = []
    where = importlib.import_module(f"lightning_influence.estimators.{ {'dit': 'sweep', 'diffin': 'diffin_context'}.get(method, method)}")
    real = where.query_gradients
    monkeypatch.setattr(where, "query_gradients", lambda *a, **k: seen.append(a[3].buffers) or real(*a, **k))
    query = lambda m: m(ds.tensors[0][:4])[:, 0].sum()  # noqa: E731
    module = tiny(batchnorm=True).eval()
    if method == "tracin":
        tracin(log, query, module=module)
        steps = [0, 3]  # the checkpoints the window's steps use
    else:
        {"dit": dit, "diffin": diffin}[method](log, query, module=module, train_data=WithIds(ds), window=(0, 4))
        steps = {"dit": [4], "diffin": [0, 1, 2, 3]}[method]  # DIT at the window's end, Diff-In at each step's
    assert [int(b["net.1.num_batches_tracked"]) for b in seen] == steps  # one forward a step: the step
    for buffers, t in zip(seen, steps):
        for n, b in buffers.items():
            assert torch.equal(b, snaps.states[t][n]), (t, n)


def test_replay_checks_the_running_statistics_at_checkpoints(log_dir):
    """A loss_fn running the forward twice a micro-batch leaves θ as trained but updates the statistics twice: replay
    stops at the next checkpoint saying so (it went on with other statistics than training's between checkpoints)."""
    from lightning_influence.replay_drift import ReplayMismatchError

    ds = make_data(12)
    _train(log_dir, 2, ds)
    log = InfluenceLog(log_dir)
    twice = lambda m, b: m.per_sample_loss(b) + 0.0 * m(b[0]).sum()  # noqa: E731
    with pytest.raises(ReplayMismatchError, match="running statistics.*at step 2.*once per micro-batch"):
        list(replay(log, tiny(batchnorm=True), WithIds(ds), loss_fn=twice, tolerance=1e-6))
