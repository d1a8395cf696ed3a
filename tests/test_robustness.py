"""The log survives crashes, resumes, bad files, bad inputs and full disks (issue #6).

Kills are real: ``crash_run.py`` SIGKILLs training processes and resumes them. Every other
failure is provoked in-process. References are uninterrupted runs or known orders, compared
exactly (bitwise), since the same deterministic computation must give the same numbers.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import h5py
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from conftest import TinyClassifier, make_data, tiny
from crash_run import BATCH, EPOCHS, N, EpochShuffle
from lightning_influence import InfluenceLog, InfluenceTracker, LogFormatError, WithIds
from lightning_influence.capture import KroneckerProjector
from lightning_influence.log import CheckpointRecord, LogWriter, StepRecord
from lightning_influence.log import segment as segment_mod
from lightning_influence.log.format import DIGEST_ATTR, FORMAT_NAME, attrs_digest
from lightning_influence.log.writer import LogWriteError, truncate_log, write_meta

HERE = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------ helpers
def records(log: InfluenceLog) -> dict[int, tuple]:
    fields = tuple(f for f, k in (("loss", "losses"), ("grad", "gradients")) if log.recorded[k])
    return {r.step: (r.ids, r.losses, r.grads, r.lrs, r.epoch) for r in log.iter_steps(fields=fields)}


def assert_same_records(got: InfluenceLog, ref: InfluenceLog, steps=None) -> None:
    """Bitwise equality of every step's ids, losses, gradients, lrs and epoch, and of every θ_t."""
    want = records(ref)
    have = records(got)
    steps = list(have) if steps is None else list(steps)
    assert set(steps) <= set(want)
    for t in steps:
        for a, b in zip(have[t], want[t]):
            assert np.array_equal(a, b), f"step {t} differs"
    for t in got.checkpoint_steps:
        assert all(np.array_equal(v, ref.checkpoint(t)[k]) for k, v in got.checkpoint(t).items()), f"θ_{t} differs"


def epoch_fit(log_dir, ckpt_dir=None, epochs=3, ckpt_path=None, sampler_seed=7, module=None, **tracker_kw) -> pl.Trainer:
    """24 samples, batches of 6 (4 steps per epoch), epoch-seeded order, a Lightning checkpoint every epoch."""
    tracker_kw = {"checkpoint_every_n_steps": 1, "flush_every_n_steps": 2, **tracker_kw}
    callbacks = [InfluenceTracker(str(log_dir), **tracker_kw)]
    if ckpt_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="{epoch}-{step}", save_top_k=-1, every_n_epochs=1))
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, deterministic=True, callbacks=callbacks,
                         enable_checkpointing=ckpt_dir is not None)
    loader = DataLoader(WithIds(make_data(24)), batch_size=6, sampler=EpochShuffle(24, sampler_seed))
    trainer.fit(module or tiny(momentum=0.9), loader, ckpt_path=ckpt_path)
    return trainer


def epoch_order(seed: int, epoch: int) -> list[list[int]]:
    perm = np.random.default_rng(seed + epoch).permutation(24).tolist()
    return [perm[i : i + 6] for i in range(0, 24, 6)]


def synthetic(path, world=1, steps=6, flush=2, seed=0, meta_extra=None, first=0) -> None:
    """A small log of random records written through LogWriter (rank 0 stores the checkpoints): steps
    ``first .. steps - 1`` (``first > 0``: a log started by a resumed fit)."""
    rng = np.random.default_rng(seed)
    write_meta(path, {"dataset_size": 30, "world_size": world, "run_id": "run-a", "tracked_params": ["w"],
                      "param_shapes": {"w": [2, 3], "b": []}, "every_n_steps": 1,
                      "recorded": {"losses": True, "gradients": True, "hvp": True, "checkpoints": True},
                      "projection": KroneckerProjector({"w": (2, 3)}, None).to_metadata(),
                      "optimizer": {"class": "torch.optim.sgd.SGD", "param_groups": [{"lr": 0.1, "params": ["w", "b"]}]},
                      "first_step": first, **(meta_extra or {})})
    for rank in range(world):
        w = LogWriter(path, rank=rank, flush_every_n_steps=flush)
        for t in range(first, steps):
            rec = StepRecord(step=t, epoch=t // 3, batch_idx=t % 3, micro_batches=1, lrs=[0.1], ids=rng.choice(30, 3, replace=False),
                             losses=rng.random(3), grads=rng.standard_normal((3, 6)), hvps=rng.standard_normal((3, 6)))
            ck = None
            if rank == 0 and (t % 2 == 0 or t == first):
                ck = CheckpointRecord(t, {"w": rng.standard_normal((2, 3)), "b": np.float64(rng.random())},
                                      {"w": {"momentum_buffer": rng.standard_normal((2, 3)), "step": np.float32(t)}},
                                      {"w": {"beta": 0.9}})
            w.add_step(rec, ck)
        if rank == 0:
            w.add_checkpoint(CheckpointRecord(steps, {"w": rng.standard_normal((2, 3)), "b": np.float64(1.0)}))
        w.close()


def dump(path) -> dict:
    """Everything a reader can get out of a log (to compare a mutated log with the original)."""
    with InfluenceLog(path) as log:
        # the block reader first: a damaged row must be refused by it, not only by iter_steps after it
        blocks = [(b.steps, b.lrs, b.row_step, b.ids, b.weights, b.grads.copy())
                  for b in log.iter_blocks(int(log.steps[0]), log.num_steps)] if len(log.steps) else []
        return {
            "blocks": blocks, "meta": log.meta, "steps": log.steps.tolist(), "finished": log.finished, "lrs": log.lrs.copy(),
            "epochs": log.epochs_of_step.copy(), "ckpts": log.checkpoint_steps, "ids": log.all_ids(),
            "tables": [(s.path.name, s.rank, s.checkpoints, dict(s.table)) for s in log._segs],
            "recs": [(r.step, r.epoch, r.lrs, r.ids, r.losses, r.grads, r.hvps) for r in log.iter_steps(fields=("loss", "grad", "hvp"))],
            "params": {t: (log.checkpoint(t), log.optimizer_state(t)) for t in log.checkpoint_steps},
        }


def same(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, (np.ndarray, np.generic)) or isinstance(b, (np.ndarray, np.generic)):
        a, b = np.asarray(a), np.asarray(b)
        return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
    return a == b


def reseal(path: Path, **attrs) -> None:
    """Change root attributes of a file and store a matching checksum (a well-formed file with other content)."""
    with h5py.File(path, "r+") as f:
        for k, v in attrs.items():
            f.attrs[k] = v
        f.attrs[DIGEST_ATTR] = attrs_digest(f.attrs)


# ------------------------------------------------------------------------------ kills, resumes
def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_log(tmp_path):
    """6 SIGKILLs of real training processes (3 aimed inside a segment write), each followed by a resume.

    After every kill the log reads back as a prefix of the uninterrupted run, bit for bit, says it
    did not finish and loses at most the steps not yet in closed segments; after the last resume
    it equals the uninterrupted log. A reader opening the log while it is written sees only
    finished steps, equal to the reference.
    """
    flush = 2
    out = subprocess.run([sys.executable, str(HERE / "crash_run.py"), str(tmp_path), "--seeds", "0", "1", "2",
                          "--flush", str(flush)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ref"]["exit"] == 0
    ref = InfluenceLog(tmp_path / "ref" / "log")
    total = ref.num_steps
    assert ref.finished and total == N // BATCH * EPOCHS
    late = [r for r in report["runs"] if r["exit"] == "killed" and InfluenceLog(r["snapshot"]).finished]
    for run in late:  # the kill came after the fit had finished its log: the whole run, as the reference
        assert_same_records(InfluenceLog(run["snapshot"]), ref, steps=range(total))
    kills = [r for r in report["runs"] if r["exit"] == "killed" and r not in late]
    assert len(kills) >= 5, report["runs"]  # a resumed run can finish before its kill step comes
    assert sum(bool(r["tmp_at_kill"]) for r in kills) >= 2  # kills that landed inside a segment write
    for run in report["runs"]:
        assert not run["read_mismatches"], run
        if run in kills:
            log = InfluenceLog(run["snapshot"])
            assert not log.finished and list(log.steps) == list(range(log.num_steps))
            assert_same_records(log, ref)
            assert run["completed_steps"] - log.num_steps <= 4 * flush, (run, log.end_note)
            assert f"steps 0..{log.num_steps - 1} are complete" in log.end_note or log.num_steps == 0
            if list(Path(run["snapshot"]).glob("rank-0/*.tmp")):
                assert "unfinished segment file(s) ignored" in log.end_note
        elif run["round"] == 2:  # the last resume ran to the end
            assert run["exit"] == 0
            log = InfluenceLog(tmp_path / f"seed{run['seed']}" / "log")
            assert log.finished and list(log.steps) == list(range(total))
            assert log.checkpoint_steps == ref.checkpoint_steps == list(range(total + 1))
            assert_same_records(log, ref, steps=range(total))
    partial = [n for r in report["runs"] for n in r["reads"] if 0 < n < total]
    assert partial, "the live reader never saw a log in progress"


def test_resume_replaces_the_steps_after_the_checkpoint(tmp_path):
    """Steps logged after the resumed checkpoint are re-recorded by the resumed fit, never duplicated."""
    epoch_fit(tmp_path / "log", tmp_path / "ckpt", epochs=3)
    first = InfluenceLog(tmp_path / "log")
    before = records(first)
    first.close()
    ckpt = tmp_path / "ckpt" / "epoch=0-step=4.ckpt"
    state = torch.load(ckpt, weights_only=False)["callbacks"]
    (tracker_state,) = [v for k, v in state.items() if "InfluenceTracker" in k]
    assert tracker_state["next_step"] == 4 and tracker_state["run_id"] == first.meta["run_id"]
    assert tracker_state["log_dir"] == str(tmp_path / "log")
    # resume with another data order: steps 4.. must be the new run's, steps 0..3 the first run's
    epoch_fit(tmp_path / "log", None, epochs=3, ckpt_path=str(ckpt), sampler_seed=50)
    log = InfluenceLog(tmp_path / "log")
    assert log.finished and list(log.steps) == list(range(12))
    for t in range(12):
        epoch, i = divmod(t, 4)
        want = epoch_order(7, 0)[i] if t < 4 else epoch_order(50, epoch)[i]
        assert log.batch_ids(t).tolist() == want
    assert all(np.array_equal(a, b) for t in range(4) for a, b in zip(records(log)[t], before[t]))
    assert not np.array_equal(records(log)[4][1], before[4][1])  # re-recorded: other samples, other losses
    assert log.checkpoint_steps == list(range(13))


def test_resume_from_the_last_checkpoint_of_a_run_killed_before_its_end_completes_the_log(tmp_path):
    """Lightning runs no training hook when resuming from the final checkpoint; θ_T must still be stored."""
    epoch_fit(tmp_path / "log", tmp_path / "ckpt", epochs=2)
    final = sorted((tmp_path / "log" / "rank-0").iterdir())[-1]
    theta_T = InfluenceLog(tmp_path / "log").checkpoint(8)
    final.unlink()  # the kill landed after the last Lightning checkpoint, before on_train_end wrote θ_8
    assert not InfluenceLog(tmp_path / "log").finished
    epoch_fit(tmp_path / "log", None, epochs=2, ckpt_path=str(tmp_path / "ckpt" / "epoch=1-step=8.ckpt"))
    log = InfluenceLog(tmp_path / "log")
    assert log.finished and log.num_steps == 8
    assert all(np.array_equal(v, theta_T[k]) for k, v in log.checkpoint(8).items())


def test_resume_refuses_a_log_it_cannot_continue(tmp_path):
    epoch_fit(tmp_path / "a", tmp_path / "ckpt", epochs=2)
    epoch_fit(tmp_path / "b", None, epochs=1)
    ckpt = str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt")
    with pytest.raises(ValueError, match=r"holds the log of another run .* overwrite=True"):
        epoch_fit(tmp_path / "b", None, epochs=2, ckpt_path=ckpt)
    with pytest.raises(FileNotFoundError, match=r"holds no influence log. Point log_dir at that log"):
        epoch_fit(tmp_path / "missing", None, epochs=2, ckpt_path=ckpt)
    shutil.copytree(tmp_path / "a", tmp_path / "a-short")
    for seg in sorted((tmp_path / "a-short" / "rank-0").iterdir())[1:]:  # keep steps 0..1 only
        seg.unlink()
    with pytest.raises(RuntimeError, match=r"resumes at step 4 but the log of rank 0 .* holds steps 0\.\.1, so it cannot"):
        epoch_fit(tmp_path / "a-short", None, epochs=2, ckpt_path=ckpt)
    meta = InfluenceLog(tmp_path / "a").meta
    write_meta(tmp_path / "a", {**meta, "world_size": 2})
    with pytest.raises(ValueError, match=r"written by 2 process\(es\) but this fit runs 1"):
        epoch_fit(tmp_path / "a", None, epochs=2, ckpt_path=ckpt)
    assert len(list((tmp_path / "a" / "rank-0").iterdir())) == 5  # refused before truncating anything
    # overwrite=True starts a new log at the checkpoint's step, with θ_4 stored
    epoch_fit(tmp_path / "missing", None, epochs=2, ckpt_path=ckpt, overwrite=True)
    log = InfluenceLog(tmp_path / "missing")
    assert log.steps.tolist() == list(range(4, 8)) and log.checkpoint_steps[0] == 4 and log.finished
    assert log.window(None) == (4, 8) and log.window((0.5, 1.0)) == (6, 8)


def test_checkpoint_is_not_written_when_the_log_cannot_be_flushed(tmp_path, monkeypatch):
    """A Lightning checkpoint never points past the log: a failing flush in on_save_checkpoint stops the save."""
    def no_space(f, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(segment_mod, "fill_segment", no_space)
    with pytest.raises(LogWriteError, match="The disk is full"):
        epoch_fit(tmp_path / "log", tmp_path / "ckpt", epochs=2, flush_every_n_steps=100)
    assert not list((tmp_path / "ckpt").glob("*.ckpt"))


# ----------------------------------------------------------------------------- full disks
def test_disk_full_surfaces_on_the_training_thread_and_keeps_earlier_segments(tmp_path, monkeypatch):
    real = segment_mod.fill_segment
    calls = []

    def fill_then_fail(f, *args, **kwargs):  # the third segment runs out of space half-way through
        calls.append(f.filename)
        if len(calls) == 3:
            f.create_dataset("partial", data=np.zeros(1000))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(f, *args, **kwargs)

    monkeypatch.setattr(segment_mod, "fill_segment", fill_then_fail)
    with pytest.raises(LogWriteError) as info:
        epoch_fit(tmp_path / "log", None, epochs=2, flush_every_n_steps=2)
    err = info.value
    message = str(err)
    assert err.errno == errno.ENOSPC and isinstance(err, OSError)
    for part in [str(tmp_path / "log"), "rank-0/seg-00000002.h5", "steps 4..5", "steps up to 3 are safe",
                 "The disk is full", "Trainer.fit(ckpt_path=...)", "Nothing more is written"]:
        assert part in message, (part, message)
    assert len(calls) == 3  # nothing written after the failure, even by the teardown's final flush
    assert not list((tmp_path / "log").rglob("*.tmp"))
    log = InfluenceLog(tmp_path / "log")
    assert log.steps.tolist() == [0, 1, 2, 3] and not log.finished


def test_segments_queued_behind_a_failed_one_are_never_written(tmp_path, monkeypatch):
    """A gap would make every later step unreachable: after a failure the writer writes nothing more."""
    import threading

    synthetic(tmp_path, steps=2)
    release = threading.Event()
    real = segment_mod.fill_segment
    calls = []

    def first_fails(f, *args, **kwargs):
        calls.append(f.filename)
        if len(calls) == 1:
            release.wait(10)  # until the other segments are queued
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(f, *args, **kwargs)

    monkeypatch.setattr(segment_mod, "fill_segment", first_fails)
    writer = LogWriter(tmp_path, flush_every_n_steps=1, max_pending=4)
    for t in range(2, 6):  # four segments: the first blocks, then fails; three wait in the queue
        writer.add_step(StepRecord(step=t, epoch=0, batch_idx=t, micro_batches=1, lrs=[0.1], ids=np.arange(3)))
    release.set()
    with pytest.raises(LogWriteError, match=r"seg-00000002\.h5 \(steps 2\.\.2\).*steps up to 1 are safe"):
        writer.close()
    assert len(calls) == 1
    assert sorted(p.name for p in (tmp_path / "rank-0").iterdir()) == ["seg-00000000.h5", "seg-00000001.h5"]
    assert InfluenceLog(tmp_path).num_steps == 2


def test_a_real_write_error_is_reported_and_leaves_a_healthy_process(tmp_path):
    """RLIMIT_FSIZE makes the kernel refuse the write (EFBIG), on the writer's background thread.

    (When HDF5 itself wrote to disk, such a failure left half-closed HDF5 objects behind that
    crashed the process later, in unrelated h5py calls; HDF5 now never sees an I/O error.)
    """
    synthetic(tmp_path, steps=4)
    writer = LogWriter(tmp_path, flush_every_n_steps=1)
    before = sorted(p.name for p in (tmp_path / "rank-0").iterdir())
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, hard))
    try:
        big = np.ones((2000, 64))
        writer.add_step(StepRecord(step=4, epoch=1, batch_idx=0, micro_batches=1, lrs=[0.1], ids=np.arange(2000),
                                   losses=np.ones(2000), grads=big, hvps=big))
        with pytest.raises(LogWriteError, match=r"(?s)failed at rank-0/seg-00000003\.h5 \(steps 4\.\.4\).*File too large.*A file may not be that large there.*make segments smaller"):
            writer.flush()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    with pytest.raises(LogWriteError, match="stopped after an earlier failure"):
        writer.add_step(StepRecord(step=5, epoch=1, batch_idx=1, micro_batches=1, lrs=[0.1], ids=np.arange(2)))
    writer.close()
    assert sorted(p.name for p in (tmp_path / "rank-0").iterdir()) == before
    gc.collect()
    assert same(dump(tmp_path)["steps"], list(range(4)))  # h5py still works in this process


# ------------------------------------------------------------------------ non-finite, refusals
class NaNForSample(TinyClassifier):
    """Loss (or only its gradient) is non-finite for one sample id."""

    def __init__(self, bad_id: int, grad_only: bool = False) -> None:
        super().__init__()
        self.bad_id, self.grad_only = bad_id, grad_only

    def per_sample_loss(self, batch):
        loss = F.cross_entropy(self(batch[0]), batch[1], reduction="none")
        bad = (batch[2] == self.bad_id).to(loss.dtype)
        if not self.grad_only:
            return loss * torch.where(bad > 0, torch.nan, 1.0)
        w = self.net[0].weight.sum()
        return loss + 0 * torch.sqrt((w - w.detach()) + (1 - bad))  # finite value, d sqrt(0) = inf -> NaN gradient


@pytest.mark.parametrize("grad_only", [False, True])
def test_non_finite_values_are_refused_naming_step_and_sample(tmp_path, grad_only):
    bad_id = 13
    step = [i for i, b in enumerate(epoch_order(7, 0)) if bad_id in b][0]
    kw = {"record_losses": False, "record_gradients": True, "gradient_engine": "vmap"} if grad_only else {}
    what = "per-sample gradient" if grad_only else "per-sample loss"
    with pytest.raises(FloatingPointError, match=rf"step {step}: non-finite {what} for sample ids \[{bad_id}\]; nothing of this step"):
        epoch_fit(tmp_path / "log", None, epochs=1, module=NaNForSample(bad_id, grad_only).double(), **kw)
    log = InfluenceLog(tmp_path / "log")
    assert log.steps.tolist() == list(range(step))  # the steps before are kept, the bad one is not stored
    assert step not in log.checkpoint_steps


def test_writer_refuses_duplicate_skipped_and_malformed_steps(tmp_path):
    synthetic(tmp_path, steps=4)
    writer = LogWriter(tmp_path, background=False)

    def rec(t, **kw):
        return StepRecord(step=t, epoch=0, batch_idx=0, micro_batches=1, lrs=[0.1], ids=np.arange(3), **kw)

    with pytest.raises(ValueError, match="would record step 3 but its log continues at step 4"):
        writer.add_step(rec(3))
    with pytest.raises(ValueError, match="would record step 6 but its log continues at step 4"):
        writer.add_step(rec(6))
    with pytest.raises(ValueError, match=r"per-sample gradient rows have shape \(2, 4\) for 3 sample ids"):
        writer.add_step(rec(4, grads=np.zeros((2, 4))))
    with pytest.raises(FloatingPointError, match=r"step 4: non-finite Hessian-gradient product for sample ids \[1\]"):
        writer.add_step(rec(4, grads=np.zeros((3, 4)), hvps=np.array([[0.0] * 4, [np.inf] * 4, [0.0] * 4])))
    with pytest.raises(FloatingPointError, match="non-finite learning rate"):
        writer.add_step(StepRecord(step=4, epoch=0, batch_idx=0, micro_batches=1, lrs=[float("nan")], ids=np.arange(3)))
    writer.add_step(rec(4))
    writer.close()
    assert InfluenceLog(tmp_path).num_steps == 5


def test_unsupported_strategy_and_manual_optimization_are_refused(tmp_path):
    from lightning.pytorch.strategies import FSDPStrategy

    tracker = InfluenceTracker(str(tmp_path / "log"))
    with pytest.raises(RuntimeError, match="supports single-device and DDP training, not FSDPStrategy"):
        tracker.on_fit_start(SimpleNamespace(strategy=FSDPStrategy()), tiny())

    class Manual(TinyClassifier):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(RuntimeError, match="needs automatic optimization"):
        epoch_fit(tmp_path / "log", None, epochs=1, module=Manual().double())


@pytest.mark.parametrize("how", ["bf16-true", "bf16 module"])
def test_bfloat16_parameters_are_refused_before_the_first_step(tmp_path, how):
    """numpy (and HDF5) have no bfloat16: a bf16 model's checkpoint failed deep in the first step's host copy
    ("Got unsupported ScalarType BFloat16"); it is refused at the fit's start, before any training step."""
    from conftest import fit, loader

    steps = []

    class Counted(TinyClassifier):
        def training_step(self, batch, batch_idx):
            steps.append(batch_idx)
            return super().training_step(batch, batch_idx)

    module = Counted().float() if how == "bf16-true" else Counted().to(torch.bfloat16)
    ds = make_data(12, dtype=torch.float32 if how == "bf16-true" else torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"bfloat16.*\['net.0.weight', .*precision='bf16-mixed'"):
        fit(module, loader(ds), InfluenceTracker(str(tmp_path / "log"), record_losses=True), epochs=1,
            precision="bf16-true" if how == "bf16-true" else "32-true")
    assert steps == []


class DictBatches(torch.utils.data.Dataset):
    """Dict samples without an ``ids`` key: the tracker cannot know which samples a step used."""

    def __init__(self) -> None:
        self.x, self.y = make_data(12).tensors

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


def test_missing_ids_are_refused_at_the_first_step_with_a_fix(tmp_path):
    class DictModule(TinyClassifier):
        def per_sample_loss(self, batch):
            return F.cross_entropy(self(batch["x"]), batch["y"], reduction="none")

    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[InfluenceTracker(str(tmp_path / "log"))])
    with pytest.raises(ValueError, match=r"batch dict has no 'ids' key \(keys: \['x', 'y'\]\).*WithIds\(dataset\)"):
        trainer.fit(DictModule().double(), DataLoader(DictBatches(), batch_size=4))
    assert InfluenceLog(tmp_path / "log").num_steps == 0  # nothing recorded


def test_same_sample_in_two_micro_batches_of_one_step_is_refused(tmp_path):
    ds = make_data(12)
    ids = torch.arange(12) % 6  # unique within each batch of 6, repeated across the two accumulated batches
    loader = DataLoader(TensorDataset(*ds.tensors, ids), batch_size=6)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accumulate_grad_batches=2,
                         callbacks=[InfluenceTracker(str(tmp_path / "log"))])
    with pytest.raises(ValueError, match="step 0: the same sample id appears in two micro-batches"):
        trainer.fit(tiny(), loader)


# ---------------------------------------------------------------- truncation, layout, ranks
def test_truncation_killed_half_way_leaves_a_log_without_gaps(tmp_path, monkeypatch):
    synthetic(tmp_path, steps=10, flush=2)  # segments 0..4 hold steps 0-1, ..., 8-9; segment 5 holds θ_10
    before = dump(tmp_path)
    real_unlink = Path.unlink
    deleted = []

    def unlink_once(self, missing_ok=False):
        if len(deleted) == 2 and self.suffix == ".h5":
            raise KeyboardInterrupt("killed during truncation")
        deleted.append(self.name)
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink_once)
    with pytest.raises(KeyboardInterrupt):
        truncate_log(tmp_path, 0, 5)
    monkeypatch.setattr(Path, "unlink", real_unlink)
    assert deleted == ["seg-00000005.h5", "seg-00000004.h5"]  # newest first
    log = InfluenceLog(tmp_path)
    assert log.steps.tolist() == list(range(8)) and not log.finished  # a prefix, no gap
    truncate_log(tmp_path, 0, 5)  # the next resume finishes the job
    after = dump(tmp_path)
    assert after["steps"] == list(range(5)) and after["ckpts"] == [0, 2, 4]
    assert same(after["recs"], before["recs"][:5]) and same(after["params"], {t: before["params"][t] for t in (0, 2, 4)})


def test_overlapping_missing_and_foreign_segments_are_named(tmp_path):
    synthetic(tmp_path / "a", steps=6, flush=2)
    rank0 = tmp_path / "a" / "rank-0"
    shutil.copytree(tmp_path / "a", tmp_path / "dup")
    shutil.copy(tmp_path / "dup" / "rank-0" / "seg-00000001.h5", tmp_path / "dup" / "rank-0" / "seg-00000005.h5")
    with pytest.raises(LogFormatError, match=r"seg-00000005\.h5: holds steps 2\.\.3, but steps 2\.\.3 are already in seg-00000002\.h5 "
                                             r"\(steps 4\.\.5\): two files record the same steps"):
        InfluenceLog(tmp_path / "dup")
    shutil.copytree(tmp_path / "a", tmp_path / "gap")
    (tmp_path / "gap" / "rank-0" / "seg-00000001.h5").unlink()
    with pytest.raises(LogFormatError, match=r"seg-00000002\.h5: starts at step 4 but seg-00000000\.h5 ends at step 1"):
        InfluenceLog(tmp_path / "gap")
    synthetic(tmp_path / "b", steps=6, flush=2, meta_extra={"run_id": "run-b"})
    shutil.copytree(tmp_path / "a", tmp_path / "mixed")
    shutil.copy(tmp_path / "b" / "rank-0" / "seg-00000001.h5", tmp_path / "mixed" / "rank-0" / "seg-00000001.h5")
    with pytest.raises(LogFormatError, match=r"seg-00000001\.h5: belongs to another run \(run id run-b"):
        InfluenceLog(tmp_path / "mixed")
    shutil.copytree(rank0, tmp_path / "a" / "rank-1")
    with pytest.raises(LogFormatError, match=r"segment folders of ranks \[1\] but the run had world_size 1"):
        InfluenceLog(tmp_path / "a")


def test_ranks_present_only_the_steps_all_have_closed(tmp_path):
    synthetic(tmp_path, world=2, steps=6, flush=2)
    (tmp_path / "rank-1" / "seg-00000002.h5").unlink()  # rank 1 lags: steps 0..3
    with pytest.raises(LogFormatError, match=r"finished at step 5 but the log of rank\(s\) \[1\] ends earlier \(\[3\]\)"):
        InfluenceLog(tmp_path)
    last = sorted((tmp_path / "rank-0").iterdir())[-1]
    last.unlink()  # rank 0 not finished either (θ_6 and steps 4..5 gone): a run still being written
    log = InfluenceLog(tmp_path)
    assert log.steps.tolist() == [0, 1, 2, 3] and not log.finished
    assert "hidden until every rank has closed them (rank 0 has steps up to 5)" in log.end_note
    assert log.checkpoint_steps == [0, 2, 4]  # θ_4, taken before the hidden step 4, is valid
    (tmp_path / "rank-0" / "seg-00000003.h5.tmp").write_bytes(b"half a segment")
    assert "1 unfinished segment file(s) ignored" in InfluenceLog(tmp_path).end_note
    LogWriter(tmp_path, rank=0).close()  # a new writer of rank 0 removes its stale temporary file
    assert not list(tmp_path.rglob("*.tmp"))


# -------------------------------------------------------------------------------- bad files
def test_bad_files_give_a_clear_error_naming_the_file(tmp_path):
    def fresh(name):
        synthetic(tmp_path / name, steps=4)
        return tmp_path / name, tmp_path / name / "rank-0" / "seg-00000001.h5"

    log, seg = fresh("truncated")
    seg.write_bytes(seg.read_bytes()[: seg.stat().st_size // 2])
    with pytest.raises(LogFormatError, match=rf"{seg}: cannot be opened as HDF5 \(truncated or corrupted\?\).*truncated file"):
        InfluenceLog(log)

    log, seg = fresh("flipped-data")
    with h5py.File(seg, "r") as f:
        chunk = f["grads/grad"].id.get_chunk_info(0)
    data = bytearray(seg.read_bytes())
    data[chunk.byte_offset + 5] ^= 0x10  # one bit of one stored gradient
    seg.write_bytes(bytes(data))
    opened = InfluenceLog(log)  # row checksums are checked when the rows are read
    with pytest.raises(LogFormatError, match=rf"{seg}: the 'grad' rows of step 2 fail their CRC-32: the file is corrupted"):
        list(opened.iter_steps(fields=("grad",)))

    log, seg = fresh("zeroed-chunk")  # HDF5's fletcher32 would accept this: zero data, zero stored checksum
    with h5py.File(seg, "r") as f:
        assert f["steps/epoch"][()].tolist() == [0, 1]
        chunk = f["steps/epoch"].id.get_chunk_info(0)
    data = bytearray(seg.read_bytes())
    data[chunk.byte_offset : chunk.byte_offset + chunk.size] = bytes(chunk.size)
    seg.write_bytes(bytes(data))
    with pytest.raises(LogFormatError, match=rf"{seg}: /steps/epoch fails its CRC-32: the file is corrupted"):
        InfluenceLog(log)

    log, seg = fresh("version")
    reseal(seg, format_version=5)
    with pytest.raises(LogFormatError, match=rf"{seg}: format version 5 is not supported \(this reader reads versions 1, 2, 3, 4\)"):
        InfluenceLog(log)
    reseal(log / "meta.h5", format_version=0)
    with pytest.raises(LogFormatError, match=r"meta\.h5: format version 0 is not supported"):
        InfluenceLog(log)

    log, seg = fresh("string-attribute")  # as a variable-length string (global heap), this made HDF5 loop forever
    data = bytearray(seg.read_bytes())
    at = data.find(FORMAT_NAME.encode())
    data[at - 16 : at + 33] = bytes(49)
    seg.write_bytes(bytes(data))
    with pytest.raises(LogFormatError, match=rf"{seg}: (cannot read the segment index|cannot be opened as HDF5)"):
        InfluenceLog(log)

    log, seg = fresh("foreign")
    seg.unlink()
    with h5py.File(seg, "w") as f:
        f["steps/step"] = np.arange(2)
    with pytest.raises(LogFormatError, match=rf"{seg}: not a lightning-influence file \(format attribute is None\)"):
        InfluenceLog(log)
    seg.write_text("not even HDF5\n")
    with pytest.raises(LogFormatError, match=rf"{seg}: cannot be opened as HDF5"):
        InfluenceLog(log)

    log, _ = fresh("tampered")
    with h5py.File(log / "meta.h5", "r+") as f:
        f.attrs["dataset_size"] = "31"  # valid JSON, wrong value: only the checksum can tell
    with pytest.raises(LogFormatError, match=r"meta\.h5: its attributes fail their checksum"):
        InfluenceLog(log)
    with h5py.File(log / "meta.h5", "r+") as f:
        del f.attrs[DIGEST_ATTR]
    with pytest.raises(LogFormatError, match=r"meta\.h5: has no attrs_crc32 attribute"):
        InfluenceLog(log)

    log, seg = fresh("inconsistent")
    with h5py.File(seg, "r+") as f:  # a writer bug, not a bit flip: well-formed but contradictory
        f["samples/id"].resize((4,))
        f.attrs[DIGEST_ATTR] = attrs_digest(f.attrs)
    with pytest.raises(LogFormatError, match=rf"{seg}: segment is inconsistent: sample datasets do not hold n_samples = 6"):
        InfluenceLog(log)


MUTATIONS = ("flip", "byte", "truncate", "zero", "append")


def mutate(path: Path, kind: str, offset: int, value: int) -> None:
    data = bytearray(path.read_bytes())
    o = offset % len(data)
    if kind == "flip":
        data[o] ^= 1 << (value % 8)
    elif kind == "byte":
        data[o] = (data[o] + 1 + value % 255) % 256
    elif kind == "truncate":
        del data[o:]
    elif kind == "zero":
        data[o : o + 1 + value % 64] = bytes(len(data[o : o + 1 + value % 64]))
    else:
        data += bytes([value % 256]) * (1 + value % 100)
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def fuzz_base(tmp_path_factory):
    base = tmp_path_factory.mktemp("fuzz") / "log"
    synthetic(base, world=2, steps=5, flush=2)
    return base, dump(base), sorted(p.relative_to(base) for p in base.rglob("*.h5"))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(file=st.integers(0, 100), kind=st.sampled_from(MUTATIONS), offset=st.integers(0, 1 << 20), value=st.integers(0, 1 << 16))
@example(file=0, kind="truncate", offset=0, value=0)  # meta.h5 emptied
@example(file=1, kind="flip", offset=0, value=0)  # HDF5 signature of a segment
@example(file=1, kind="zero", offset=(1 << 20) - 1, value=63)  # the tail of a segment
def test_fuzzed_logs_read_identically_or_fail_naming_the_file(tmp_path, fuzz_base, file, kind, offset, value):
    """A mutated file (bit flip, byte change, truncation, zeroed run, appended bytes) either reads back
    exactly as before (the bytes were unused) or raises LogFormatError naming it; nothing else."""
    base, reference, files = fuzz_base
    work = tmp_path / f"case-{os.getpid()}-{file}-{kind}-{offset}-{value}"
    shutil.copytree(base, work, copy_function=os.link)  # hard links: only the mutated file is copied
    target = work / files[file % len(files)]
    target.unlink()
    shutil.copy(base / files[file % len(files)], target)
    mutate(target, kind, offset, value)
    try:
        got = dump(work)
    except LogFormatError as err:
        assert str(files[file % len(files)].name) in str(err), str(err)
        return
    finally:
        shutil.rmtree(work)
    assert same(got, reference), f"{files[file % len(files)]} mutated ({kind} at {offset}) reads back different data"


def optimizer_regions(path: Path) -> list[tuple[int, int]]:
    """Byte ranges ``(start, length)`` of a segment's optimizer state: every optimizer group's and dataset's object
    header (names, shapes, the scalar attributes) and every optimizer dataset's data."""
    out = []
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if "/optimizer" not in "/" + name:
                return
            info = h5py.h5o.get_info(obj.id)
            out.append((info.addr, max(1, info.hdr.space.total)))
            if isinstance(obj, h5py.Dataset):
                chunk = obj.id.get_chunk_info(0)
                out.append((chunk.byte_offset, chunk.size))
        f["checkpoints"].visititems(visit)
    return out


@pytest.fixture(scope="module")
def optimizer_targets(fuzz_base):
    base, _, files = fuzz_base
    return [(f, start, length) for f in files if f.name != "meta.h5" for start, length in optimizer_regions(base / f)]


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(target=st.integers(0, 1000), at=st.integers(0, 1 << 16), kind=st.sampled_from(("flip", "byte", "zero")),
       value=st.integers(0, 1 << 16))
def test_fuzzed_optimizer_state_reads_identically_or_fails_naming_the_file(tmp_path, fuzz_base, optimizer_targets,
                                                                          target, at, kind, value):
    """Bytes of the optimizer state (its datasets' data and the object headers holding names, shapes and scalar
    attributes such as Adam's step) mutated: the log reads back exactly as before or raises LogFormatError
    naming the file; never another optimizer state."""
    base, reference, _ = fuzz_base
    assert optimizer_targets, "the fuzz base has no optimizer state"
    rel, start, length = optimizer_targets[target % len(optimizer_targets)]
    work = tmp_path / f"opt-{os.getpid()}-{target}-{at}-{kind}-{value}"
    shutil.copytree(base, work, copy_function=os.link)
    (work / rel).unlink()
    shutil.copy(base / rel, work / rel)
    mutate(work / rel, kind, start + at % length, value)
    try:
        got = dump(work)
    except LogFormatError as err:
        assert rel.name in str(err), str(err)
        return
    finally:
        shutil.rmtree(work)
    assert same(got, reference), f"{rel} mutated ({kind} at {start + at % length}) reads back different data"


def correct_prefix(got: dict, ref: dict) -> bool:
    """``got`` reads the first steps of ``ref`` exactly: same metadata, records, learning rates and checkpoints."""
    n = len(got["steps"])
    return (got["steps"] == ref["steps"][:n] and same(got["meta"], ref["meta"])
            and (not got["finished"] or (ref["finished"] and n == len(ref["steps"])))
            and same(got["recs"], ref["recs"][:n]) and same(got["lrs"], ref["lrs"][:n])
            and same(got["epochs"], ref["epochs"][:n])
            and all(t in ref["params"] and same(v, ref["params"][t]) for t, v in got["params"].items()))


SEGMENT_OPS = st.lists(st.tuples(st.sampled_from(("delete", "swap", "copy", "rename")), st.integers(0, 100),
                                 st.integers(0, 100)), min_size=1, max_size=3)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=SEGMENT_OPS)
@example(ops=[("delete", 0, 0)])  # the first segment of rank 0
@example(ops=[("delete", 2, 0)])  # the last segment of rank 0 (θ_T with it): a correct prefix
@example(ops=[("swap", 0, 1)])
@example(ops=[("swap", 0, 3)])  # across ranks
@example(ops=[("copy", 0, 1)])
def test_deleted_swapped_copied_or_renamed_segments_read_a_correct_prefix_or_fail_clearly(tmp_path, fuzz_base, ops):
    """Whole segment files deleted, swapped (within or across ranks), copied over each other or renamed: the log
    reads a correct prefix of the original (every step, row and checkpoint it presents equals the original's)
    or raises LogFormatError; never a wrong number."""
    base, reference, _ = fuzz_base
    work = tmp_path / f"segs-{os.getpid()}-{abs(hash(tuple(ops)))}"
    shutil.copytree(base, work, copy_function=os.link)  # files are only moved or replaced whole, never changed
    for op, i, j in ops:
        present = sorted(work.glob("rank-*/seg-*.h5"))
        if not present:
            break
        a, b = present[i % len(present)], present[j % len(present)]
        if op == "delete":
            a.unlink()
        elif op == "swap" and a != b:
            tmp = a.with_suffix(".swap")
            a.rename(tmp)
            b.rename(a)
            tmp.rename(b)
        elif op == "copy" and a != b:
            b.unlink()
            shutil.copy(a, b)
        elif op == "rename":
            a.rename(a.with_name(f"seg-{j:08d}.h5"))
    try:
        got = dump(work)
    except LogFormatError:
        return
    finally:
        shutil.rmtree(work)
    assert correct_prefix(got, reference), f"{ops}: the log reads something other than a prefix of the original"
