"""The tracker's own checks under DDP (2 gloo processes on the CPU, ``ddp_matrix_run.py``) and under autocast: the
first step's check that the applied gradient is ``Σ w_i g_i`` of the logged rows runs there too (it was skipped for
any world size but 1 and under autocast), and ``meta.h5`` says what it compared or why it could not."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from lightning_influence import InfluenceLog
from test_ddp_matrix import matrix_fit, ok_fit


def _refused(run) -> None:
    assert run.returncode != 0
    assert "GradientMismatchError" in run.stderr and "at step 0 the gradient the optimizer receives" in run.stderr, \
        run.stderr[-3000:]


@pytest.mark.slow
def test_a_clip_before_the_tracker_is_refused_on_two_processes(tmp_path):
    """A callback listed before the tracker clips the gradients: on one process refused at step 0; on two it was
    trained and logged as if unclipped (replay and every estimator then wrong). Now the processes sum their
    ``Σ w_i g_i`` (one all-reduce at the first step) and both refuse; the untampered run's meta.h5 holds the
    comparison, float64 exact to round-off."""
    run = matrix_fit(log_dir=str(tmp_path / "clip"), tamper="clip")
    _refused(run)
    with InfluenceLog(tmp_path / "clip") as log:
        assert log.num_steps == 0
    ok_fit(log_dir=str(tmp_path / "plain"), accumulate=2)
    with InfluenceLog(tmp_path / "plain") as log:
        entry = log.meta["applied_gradient_check"]
        assert entry["checked"] and entry["step"] == 0 and entry["relative_difference"] < 1e-12, entry


@pytest.mark.slow
def test_bf16_autocast_on_two_processes_is_checked_and_replays_bit_for_bit(tmp_path):
    """precision='bf16-mixed' on 2 processes: the check runs (it was skipped under autocast) with a tolerance of 4
    bfloat16 ulps, the rows' sum is within it (0.17% measured), a clip before the tracker is refused, and the log
    replays bit for bit (each micro-batch under its autocast, rank 0's first)."""
    from conftest import TinyClassifier, make_data
    from ddp_matrix_run import FLAGGED
    from ddp_run import N
    from lightning_influence.replay import replay

    cfg = dict(precision="bf16-mixed", float32=True)
    _refused(matrix_fit(log_dir=str(tmp_path / "clip"), tamper="clip", **cfg))
    ok_fit(log_dir=str(tmp_path / "log"), **cfg)
    log = InfluenceLog(tmp_path / "log")
    entry = log.meta["applied_gradient_check"]
    assert log.meta["precision"]["autocast_dtype"] == "bfloat16" and log.ranks == [0, 1]
    assert entry["checked"] and entry["tolerance"] == 4 * torch.finfo(torch.bfloat16).eps
    assert 1e-5 < entry["relative_difference"] < entry["tolerance"] / 4, entry  # rounded in bf16, well inside
    data = make_data(N, dtype=torch.float32)
    data.tensors[0][:, -1] = 0.0
    data.tensors[0][list(FLAGGED), -1] = 1.0
    torch.manual_seed(0)
    steps = [rs.step for rs in replay(log, TinyClassifier(), data, loss_fn=lambda m, b: m.per_sample_loss(b),
                                      tolerance=0.0)]
    assert steps == list(range(log.num_steps + 1)) and log.num_steps == 8
    assert all(np.isfinite(r.grads).all() for r in log.iter_steps(fields=("grad",)))
    info = subprocess.run([sys.executable, "-m", "lightning_influence", "info", "--verify", str(tmp_path / "log")],
                          capture_output=True, text=True, timeout=120)
    assert info.returncode == 0 and "ranks [0, 1]" in info.stdout, info.stdout + info.stderr
    assert "applied gradient = the rows' weighted sum over the 2 processes at step 0" in info.stdout, info.stdout


def test_bf16_autocast_on_one_process_is_checked(tmp_path):
    """One process under bf16 autocast: the check ran nowhere before (meta.h5 said nothing); now a clip before the
    tracker is refused and a plain run records the comparison."""
    import lightning.pytorch as pl

    from conftest import TinyClassifier, loader, make_data
    from lightning_influence import InfluenceTracker
    from lightning_influence.tracker_checks import GradientMismatchError
    from test_step_weights import _ClipFirst

    def run(log_dir, callbacks=()):
        torch.manual_seed(0)
        tracker = InfluenceTracker(str(log_dir), record_gradients=True, projection_dim=8)
        pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, callbacks=[*callbacks, tracker], precision="bf16-mixed").fit(
            TinyClassifier(hidden=32, lr=0.5), loader(make_data(24, dtype=torch.float32), 6))

    with pytest.raises(GradientMismatchError, match="tolerance 3.1e-02"):
        run(tmp_path / "clip", [_ClipFirst()])
    run(tmp_path / "plain")
    entry = InfluenceLog(tmp_path / "plain").meta["applied_gradient_check"]
    assert entry["checked"] and 1e-5 < entry["relative_difference"] < 1e-2, entry


def test_train_batchnorm_says_the_check_did_not_run(tmp_path):
    """With train-mode BatchNorm (opted in) the rows are not parts of the applied gradient: meta.h5 says the check did
    not run and why, instead of nothing."""
    import lightning.pytorch as pl

    from conftest import TinyClassifier, loader, make_data
    from lightning_influence import InfluenceTracker

    torch.manual_seed(0)
    tracker = InfluenceTracker(str(tmp_path / "log"), record_gradients=True, allow_train_batchnorm=True)
    pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, callbacks=[tracker]).fit(TinyClassifier(batchnorm=True).double(),
                                                                    loader(make_data(24), 6))
    entry = InfluenceLog(tmp_path / "log").meta["applied_gradient_check"]
    assert entry == {"step": 0, "checked": False, "why": entry["why"]} and "net.1" in entry["why"], entry


def test_sync_batchnorm_is_refused_with_what_to_do(tmp_path):
    """A model converted with nn.SyncBatchNorm.convert_sync_batchnorm, in train mode: refused at the first step with a
    message naming SyncBatchNorm and the ways out (it got BatchNorm's, whose opt-in alone says nothing about the
    statistics being taken across processes)."""
    import lightning.pytorch as pl

    from conftest import TinyClassifier, loader, make_data
    from lightning_influence import InfluenceTracker

    torch.manual_seed(0)
    module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(TinyClassifier(batchnorm=True).double())
    tracker = InfluenceTracker(str(tmp_path / "log"), record_gradients=True)
    with pytest.raises(RuntimeError, match=r"SyncBatchNorm layer 'net.1' is in train mode .*sync_batchnorm=False"):
        pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, callbacks=[tracker]).fit(module, loader(make_data(24), 6))


def test_sync_batchnorm_opted_in_is_recorded_and_replay_refuses(tmp_path):
    """allow_train_batchnorm=True with SyncBatchNorm: on several processes the tracker records which layers normalised
    across how many (``synced_batchnorm``; on one, SyncBatchNorm normalises as BatchNorm: nothing). Such a log (DDP
    refuses SyncBatchNorm on the CPU, so its meta.h5 is written here as a GPU run's would be) is refused by replay (so
    DIT, Diff-In) saying why, where it replayed each process's micro-batch with its own statistics, not the run's;
    the CLI lists those methods as not usable; TracIn (logged rows only) still runs."""
    from conftest import TinyClassifier, fit, loader, make_data
    from lightning_influence import InfluenceTracker, tracin
    from lightning_influence.cli.methods import unmet_needs
    from lightning_influence.log.format import read_meta
    from lightning_influence.log.writer import write_meta
    from lightning_influence.queries import mean_loss
    from lightning_influence.replay import replay
    from lightning_influence.tracker_checks import synced_batchnorm

    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(TinyClassifier(batchnorm=True))
    synced.extra = torch.nn.BatchNorm1d(3)  # a plain one beside it
    assert synced_batchnorm(synced, ["net.1", "extra"], 2) == {"layers": ["net.1"], "world_size": 2}
    assert synced_batchnorm(synced, ["net.1", "extra"], 1) is None
    torch.manual_seed(0)
    fit(TinyClassifier(batchnorm=True).double(), loader(make_data(24), 6), epochs=1,
        tracker=InfluenceTracker(str(tmp_path / "log"), record_gradients=True, allow_train_batchnorm=True,
                                 checkpoint_every_n_steps=1))
    module = TinyClassifier(batchnorm=True).double()
    with InfluenceLog(tmp_path / "log") as log:  # as trained on one process: replays
        assert "sync_batchnorm" not in log.meta and not unmet_needs("dit", log)
        assert len(list(replay(log, module, make_data(24), loss_fn=lambda m, b: m.per_sample_loss(b)))) == 5
    write_meta(tmp_path / "log", {**read_meta(tmp_path / "log"), "sync_batchnorm": {"layers": ["net.1"], "world_size": 2}})
    log = InfluenceLog(tmp_path / "log")
    with pytest.raises(ValueError, match=r"SyncBatchNorm in train mode \(net.1\) over its 2 processes"):
        list(replay(log, module, make_data(24), loss_fn=lambda m, b: m.per_sample_loss(b)))
    assert any("SyncBatchNorm" in need for need in unmet_needs("dit", log)) and not unmet_needs("tracin", log)
    scores = tracin(log, mean_loss(make_data(8, seed=5).tensors), module=module).column(0)
    assert np.isfinite(scores).all() and np.abs(scores).max() > 0


@pytest.mark.slow
def test_a_resume_on_another_number_of_processes_is_refused_and_leaves_the_log(tmp_path):
    """A 2-process fit's checkpoint resumed on 1 process: refused before anything is written, saying why and what to do
    (its rank-1 rows would otherwise be mixed with a 1-process continuation); the log reads as before."""
    ok_fit(log_dir=str(tmp_path / "log"), ckpt_dir=str(tmp_path / "ck"), ckpt_every=4)
    before = InfluenceLog(tmp_path / "log")
    ref = [(r.step, r.ids.tolist()) for r in before.iter_steps()]
    before.close()
    run = matrix_fit(log_dir=str(tmp_path / "log"), mode="single", resume_from=str(tmp_path / "ck" / "step=4.ckpt"))
    assert run.returncode != 0
    assert "was written by 2 process(es) but this fit runs 1; resume with the same number of processes" in run.stderr, \
        run.stderr[-3000:]
    with InfluenceLog(tmp_path / "log") as log:
        assert log.finished and log.ranks == [0, 1] and [(r.step, r.ids.tolist()) for r in log.iter_steps()] == ref


@pytest.mark.slow
def test_processes_training_on_the_same_samples_are_refused(tmp_path):
    """A batch sampler that does not split the data by rank: both processes train on every global batch, each sample
    counted twice in the averaged gradient. It was logged with every id twice a step (the log counts a sample once a
    step, and the tracker refuses a sample twice within one process's step); now refused at the first step, nothing
    stored, naming the samples and what to do."""
    run = matrix_fit(log_dir=str(tmp_path / "log"), unsharded=True)
    assert run.returncode != 0
    assert "at step 0 the samples" in run.stderr and "are in the batches of more than one process (6 of 6)" in run.stderr, \
        run.stderr[-3000:]
    with InfluenceLog(tmp_path / "log") as log:
        assert log.num_steps == 0
