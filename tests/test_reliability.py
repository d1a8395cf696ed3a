"""The log survives its users' mistakes (issue #14): one writer, one configuration, ids that are ids.

Concurrent writers and dead lock holders are real processes; resumes are real Lightning fits
from real checkpoints; references are uninterrupted runs compared bitwise.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset, TensorDataset

from conftest import TinyClassifier, make_data, tiny
from test_robustness import assert_same_records, dump, epoch_fit, same, synthetic
from lightning_influence import InfluenceLog, InfluenceTracker, LogFormatError, WithIds
from lightning_influence.log import LogWriter, StepRecord
from lightning_influence.log import writer as writer_mod
from lightning_influence.log.lock import LogLockedError, WriterLock
from lightning_influence.log.writer import LogWriteError

HERE = Path(__file__).resolve().parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)]), "OMP_NUM_THREADS": "1"}


# ------------------------------------------------------------------------------- 1. one writer
@pytest.mark.slow
def test_a_second_writer_is_refused_at_once_and_the_first_log_stays_intact(tmp_path):
    """Real processes: while fit ``a`` is paused mid-run, a new fit with overwrite=True and a fit resumed from
    ``a``'s checkpoint, both into ``a``'s log_dir, fail at once naming ``a``; ``a`` then finishes with a log equal,
    bit for bit, to an uninterrupted run's."""
    work = tmp_path / "work"
    subprocess.run([sys.executable, str(HERE / "lock_run.py"), str(work)], env=ENV, check=True, timeout=600,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    report = json.loads((work / "report.json").read_text())
    holder = rf"another process \(pid {report['a_pid']} on host {socket.gethostname()}, started \d{{4}}-\d\d-\d\d "
    for name in ("fresh", "resume"):
        r = report[name]
        assert r["exit"] == 1 and r["error_type"] == "LogLockedError", r
        assert r["a_still_paused"]  # refused while a was writing
        assert r["seconds"] < 5, r  # at once: before any training step (the whole fit set-up included)
        import re
        assert re.search(holder, r["error"]), r["error"]
    assert report["a"]["exit"] == 0 and report["ref"]["exit"] == 0
    got, ref = InfluenceLog(work / "a" / "log"), InfluenceLog(work / "ref" / "log")
    assert got.finished and got.steps.tolist() == list(range(32)) and got.meta["run_id"] != ref.meta["run_id"]
    assert_same_records(got, ref)
    assert not list((work / "a" / "log").rglob("writer.lock"))  # released at the end of the fit


def test_a_stale_lock_of_a_killed_process_is_taken_over_with_a_message(tmp_path):
    code = ("import sys, time; from lightning_influence.log.lock import WriterLock; "
            "lock = WriterLock(sys.argv[1], 0).acquire(); print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(LogLockedError, match=rf"another process \(pid {proc.pid} on host"):
            WriterLock(tmp_path, 0).acquire()
    finally:
        proc.kill()  # SIGKILL: no release, the lock file still names the dead holder
        proc.wait()
    lock = WriterLock(tmp_path, 0)
    with pytest.warns(RuntimeWarning, match=rf"taking over a stale writer lock of pid {proc.pid} on host .*\(killed or crashed\)"):
        lock.acquire()
    assert lock.took_over["pid"] == proc.pid
    assert json.loads((tmp_path / "rank-0" / "writer.lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / "rank-0" / "writer.lock").exists()


def test_the_lock_is_released_on_every_exit_path(tmp_path):
    """A finished fit, a fit refused at its first step and a fit that raises mid-run all leave the log unlocked."""
    epoch_fit(tmp_path / "ok", None, epochs=1)
    with pytest.raises(ValueError):
        epoch_fit(tmp_path / "refused", None, epochs=1, ids_fn=lambda batch: batch[1])  # labels as ids: duplicates

    class Boom(TinyClassifier):
        def training_step(self, batch, batch_idx):
            if self.global_step == 5:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    with pytest.raises(RuntimeError, match="boom"):
        epoch_fit(tmp_path / "raised", None, epochs=2, module=Boom().double())
    for name in ("ok", "refused", "raised"):
        assert not list((tmp_path / name).rglob("writer.lock")), name
        WriterLock(tmp_path / name, 0).acquire().release()  # free
    assert InfluenceLog(tmp_path / "raised").steps.tolist() == list(range(5))
    # the same process cannot hold a rank twice either (two trackers on one log_dir)
    with WriterLock(tmp_path / "ok", 0):
        with pytest.raises(LogLockedError, match="another writer in this process"):
            epoch_fit(tmp_path / "ok", None, epochs=1, overwrite=True)
    assert InfluenceLog(tmp_path / "ok").finished  # the refused overwrite deleted nothing


# -------------------------------------------------------------------------- 2. one configuration
BASE = {"record_gradients": True, "record_hvp": True, "projection_dim": 3}
MEANINGFUL = [  # (setting changed on resume, regex of the refusal)
    ({"projection_seed": 1}, r"projection_seed: the log has 0, this fit has 1"),
    ({"projection_dim": 2}, r"projection_dim: the log has 3, this fit has 2"),
    ({"projection_dim": None}, r"projection_dim: the log has 3, this fit has None"),
    ({"exclude_params": ["net.3.*"]}, r"params / exclude_params \(tracked parameters\)"),
    ({"params": ["net.0.*"]}, r"params / exclude_params \(tracked parameters\)"),
    ({"storage_dtype": "float64"}, r"storage_dtype: the log has 'float32', this fit has 'float64'"),
    ({"hvp_scheme": "forward"}, r"hvp_scheme: the log has 'central', this fit has 'forward'"),
    ({"hvp_eps": 1e-2}, r"hvp_eps: the log has 0\.001, this fit has 0\.01"),
    ({"record_losses": False}, r"record_losses: the log has True, this fit has False"),
    ({"record_hvp": False}, r"record_hvp: the log has True, this fit has False"),
    ({"record_gradients": False, "record_hvp": False}, r"record_gradients: the log has True, this fit has False"),
    ({"every_n_steps": 2}, r"every_n_steps: the log has 1, this fit has 2"),
]


def file_bytes(log: Path) -> dict[str, bytes]:
    """Every file of a log directory, by relative path: a refused fit must leave them byte for byte."""
    return {str(p.relative_to(log)): p.read_bytes() for p in sorted(log.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def resumable(tmp_path_factory):
    """A 2-epoch tracked run with a checkpoint per epoch, and its uninterrupted log."""
    root = tmp_path_factory.mktemp("resumable")
    epoch_fit(root / "log", root / "ckpt", epochs=2, **BASE)
    return root, dump(root / "log")


@pytest.mark.parametrize("change,match", MEANINGFUL, ids=[next(iter(c)) + ("" if i not in (2, 4) else "-2")
                                                         for i, (c, _) in enumerate(MEANINGFUL)])
def test_a_resume_that_changes_what_rows_mean_is_refused_and_loses_nothing(tmp_path, resumable, change, match):
    root, before = resumable
    log = tmp_path / "log"
    shutil.copytree(root / "log", log)
    files = file_bytes(log)
    with pytest.raises(ValueError, match=rf"cannot continue the log in .* at step 4: .*{match}.*Nothing was changed"):
        epoch_fit(log, None, epochs=2, ckpt_path=str(root / "ckpt" / "epoch=0-step=4.ckpt"), **{**BASE, **change})
    assert same(dump(log), before)  # the refusal touched nothing
    assert file_bytes(log) == files  # meta.h5 included: no `resumes` entry for a refused resume
    assert sorted(p.name for p in (log / "rank-0").iterdir()) == sorted(p.name for p in (root / "log" / "rank-0").iterdir())


def test_a_resume_refused_at_its_first_step_leaves_the_log_as_it_was(tmp_path, resumable):
    """The log is truncated only when the resumed fit writes its first segment: a fit refused at its first step
    (here: labels given as ids) loses none of the steps it was about to record again."""
    root, before = resumable
    log = tmp_path / "log"
    shutil.copytree(root / "log", log)
    files = file_bytes(log)
    with pytest.raises(ValueError, match=r"appear more than once in one batch"):
        epoch_fit(log, None, epochs=2, ckpt_path=str(root / "ckpt" / "epoch=0-step=4.ckpt"), ids_fn=lambda b: b[1],
                  **BASE)
    after = dump(log)
    assert same(after, before) and "resumes" not in after["meta"]  # the resume is recorded only once it writes
    assert after["steps"] == list(range(8)) and after["finished"]
    assert file_bytes(log) == files


def test_a_resume_past_a_lost_segment_is_refused_and_loses_nothing(tmp_path, resumable):
    """A segment lost in the middle of the log (deleted by hand, a bad disk): the resume used to check only the log's
    last step, so it trained on and wrote after the gap, into a log no reader opens. Now refused before anything is
    touched, naming the missing steps; overwrite=True starts a new log instead."""
    root, before = resumable
    log = tmp_path / "log"
    shutil.copytree(root / "log", log)
    (log / "rank-0" / "seg-00000001.h5").unlink()  # steps 2..3
    files = file_bytes(log)
    with pytest.raises(RuntimeError, match=r"cannot continue the log of rank 0 in .* at step 8, it is damaged: .*"
                                           r"seg-00000002.h5: starts at step 4 but seg-00000000.h5 ends at step 1: the "
                                           r"segment\(s\) holding steps 2..3 are missing.*Nothing was changed in the log"):
        epoch_fit(log, None, epochs=3, ckpt_path=str(root / "ckpt" / "epoch=1-step=8.ckpt"), **BASE)
    assert file_bytes(log) == files
    epoch_fit(log, None, epochs=3, ckpt_path=str(root / "ckpt" / "epoch=1-step=8.ckpt"), overwrite=True, **BASE)
    fresh = InfluenceLog(log)
    assert fresh.finished and fresh.steps.tolist() == list(range(8, 12))


@pytest.mark.parametrize("overwrite", [False, True])
def test_fit_called_again_to_train_longer_is_refused_and_keeps_the_first_fits_log(tmp_path, overwrite):
    """``trainer.fit_loop.max_epochs = 2; trainer.fit(model)`` after a first fit (a notebook's "train more"): Lightning
    starts a new optimizer, which the log cannot express. It was refused as "a checkpoint that holds no tracker state"
    and, with overwrite=True (the README's script), the first fit's log was deleted for one of the later steps only."""
    import lightning.pytorch as pl

    log = tmp_path / "log"
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, callbacks=[InfluenceTracker(str(log), overwrite=overwrite)])
    module, loader = tiny(momentum=0.9), DataLoader(WithIds(make_data(24)), batch_size=6)
    trainer.fit(module, loader)
    files = file_bytes(log)
    trainer.fit_loop.max_epochs = 2
    with pytest.raises(RuntimeError, match=r"Trainer.fit was called again to continue at step 4, .* new optimizer .*"
                                           r"earlier fit's log is kept as it is"):
        trainer.fit(module, loader)
    assert file_bytes(log) == files and InfluenceLog(log).steps.tolist() == [0, 1, 2, 3]


def test_same_tracker_in_a_new_trainer_warns_that_it_replaces_its_earlier_log(tmp_path):
    """``pl.Trainer(callbacks=[tracker]).fit(...)`` twice with the same tracker (overwrite=True), to train more: the
    second fit started at step 0 with a new optimizer and silently deleted the first fit's log (the same Trainer is
    refused, above). It now warns, naming the run it replaces; a fast_dev_run before a real fit, which writes no log
    in log_dir, does not."""
    import lightning.pytorch as pl

    log = tmp_path / "log"
    tracker = InfluenceTracker(str(log), overwrite=True)
    module, loader = tiny(momentum=0.9), DataLoader(WithIds(make_data(24)), batch_size=6)

    def fit(**kw):
        pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                   enable_checkpointing=False, callbacks=[tracker], **kw).fit(module, loader)

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # none of ours: a smoke test, then the first real fit
        warnings.filterwarnings("ignore", message=".*(does not have many workers|num_workers|smaller than the logging).*")
        fit(fast_dev_run=True)
        fit()
    first = InfluenceLog(log).meta["run_id"]
    with pytest.warns(UserWarning, match=rf"replacing the log of this tracker's earlier fit \(run {first}\)"):
        fit()
    assert InfluenceLog(log).meta["run_id"] != first


def test_fast_dev_run_runs_the_checks_but_leaves_log_dir_as_it_was(tmp_path, resumable, monkeypatch):
    """Lightning's smoke test (``fast_dev_run``) wrote a 1-step log into log_dir: with overwrite=True it replaced the
    real run's log, without it the real fit that followed was refused as "already holds an influence log". Now the log
    goes to a temporary folder, deleted at the end; the tracker's refusals still run."""
    import tempfile

    import lightning.pytorch as pl

    root, _ = resumable
    log = tmp_path / "log"
    shutil.copytree(root / "log", log)
    files = file_bytes(log)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()

    def smoke(ids: bool) -> None:
        trainer = pl.Trainer(fast_dev_run=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[InfluenceTracker(str(log), overwrite=True)])
        trainer.fit(tiny(), DataLoader(WithIds(make_data(24)) if ids else make_data(24), batch_size=6))

    smoke(ids=True)
    with pytest.raises(ValueError, match="sample ids"):  # the first step's refusals run as in a real fit
        smoke(ids=False)
    assert file_bytes(log) == files and not list((tmp_path / "tmp").iterdir())


def test_a_resume_with_harmless_changes_continues_and_records_them(tmp_path, resumable):
    root, before = resumable
    log = tmp_path / "log"
    shutil.copytree(root / "log", log)
    epoch_fit(log, None, epochs=2, ckpt_path=str(root / "ckpt" / "epoch=0-step=4.ckpt"),
              **{**BASE, "compression": "gzip", "flush_every_n_steps": 3, "checkpoint_every_n_steps": 2})
    after = InfluenceLog(log)
    assert after.finished and after.steps.tolist() == list(range(8))
    assert same([r[:7] for r in dump(log)["recs"]], [r[:7] for r in before["recs"]])  # every row bit for bit
    (resume,) = after.meta["resumes"]
    assert resume["step"] == 4
    assert resume["changed"] == {"compression": [None, "gzip"], "flush_every_n_steps": [2, 3],
                                 "checkpoint_every_n_steps": [1, 2]}
    assert after.meta["run_id"] == before["meta"]["run_id"] and after.meta["compression"] is None


def test_a_resume_keeps_its_logs_bias_layout_unless_told_otherwise(tmp_path):
    """A log written unfolded (``fold_bias=False``, the layout of logs from before folding) resumed with the
    default ``fold_bias=None``: it continues in the log's layout, every row as the uninterrupted unfolded run wrote
    it; an explicit ``fold_bias=True`` is refused and changes nothing."""
    unfolded = {**BASE, "fold_bias": False}
    epoch_fit(tmp_path / "log", tmp_path / "ckpt", epochs=2, **unfolded)
    reference = dump(tmp_path / "log")
    assert not any(s.get("bias") for s in reference["meta"]["projection"]["specs"])
    ckpt = str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt")
    files = file_bytes(tmp_path / "log")
    with pytest.raises(ValueError, match=r"fold_bias \(biases folded into their weight's projection\): the log has \[\]"):
        epoch_fit(tmp_path / "log", None, epochs=2, ckpt_path=ckpt, **{**BASE, "fold_bias": True})
    assert file_bytes(tmp_path / "log") == files
    for overwrite in (False, True):  # fold_bias=None: the log's layout (overwrite=True continues it too)
        epoch_fit(tmp_path / "log", None, epochs=2, ckpt_path=ckpt, overwrite=overwrite, **BASE)
        after = InfluenceLog(tmp_path / "log")
        assert after.finished and after.steps.tolist() == list(range(8))
        assert same([r[:7] for r in dump(tmp_path / "log")["recs"]], [r[:7] for r in reference["recs"]])
    # a fresh log under the default folds (the test model's projected Linear layers have biases)
    epoch_fit(tmp_path / "fresh", None, epochs=1, **BASE)
    assert any(s.get("bias") for s in InfluenceLog(tmp_path / "fresh").meta["projection"]["specs"])


def test_a_resume_keeps_its_logs_split_written_under_another_rule(tmp_path, monkeypatch):
    """A log whose blocks were split by another rule (every log written before the least-variance split: here a rule
    keeping the rows of every projected block, (3, 1) for net.0.weight where the rule gives (1, 3)) resumed by this version: it
    continues with the log's own sizes, hence its own matrices, every row as the uninterrupted run under that rule
    wrote it, and reads back with them."""
    from lightning_influence.capture import projection

    rule = projection._split
    monkeypatch.setattr(projection, "_split", lambda rows, cols, dim, kernel=False: (
        (rows, cols) if dim is None or rows * cols <= dim else (min(rows, dim), 1)))
    epoch_fit(tmp_path / "log", tmp_path / "ckpt", epochs=2, **BASE)
    reference = dump(tmp_path / "log")
    old = [(s["name"], s["k_rows"], s["k_cols"]) for s in reference["meta"]["projection"]["specs"]]
    assert old[:2] == [("net.0.weight", 3, 1), ("net.3.weight", 3, 1)]
    monkeypatch.setattr(projection, "_split", rule)
    assert rule(7, 6, 3) == (1, 3)  # what a new log would get for net.0.weight
    epoch_fit(tmp_path / "log", None, epochs=2, ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt"), **BASE)
    after = InfluenceLog(tmp_path / "log")
    assert after.finished and after.steps.tolist() == list(range(8))
    assert [(s.name, s.k_rows, s.k_cols) for s in after.projector().specs] == old
    assert same([r[:7] for r in dump(tmp_path / "log")["recs"]], [r[:7] for r in reference["recs"]])


# ------------------------------------------------------------------------ 3. the first segment
def test_a_deleted_first_segment_is_detected(tmp_path):
    synthetic(tmp_path, steps=6, flush=2)
    (tmp_path / "rank-0" / "seg-00000000.h5").unlink()
    with pytest.raises(LogFormatError, match=r"seg-00000001\.h5: the log starts at step 0 \(meta\.h5\) but the first "
                                             r"segment of its rank, seg-00000001\.h5, starts at step 2: the segment\(s\) "
                                             r"holding steps 0\.\.1 are missing"):
        InfluenceLog(tmp_path)


def test_a_log_started_by_a_resumed_fit_reads_from_its_first_step(tmp_path, resumable):
    root, before = resumable
    epoch_fit(tmp_path / "late", None, epochs=2, ckpt_path=str(root / "ckpt" / "epoch=0-step=4.ckpt"), overwrite=True,
              **BASE)
    log = InfluenceLog(tmp_path / "late")
    assert log.steps.tolist() == [4, 5, 6, 7] and log.finished
    got = [(r.step, r.ids, r.losses, r.grads) for r in log.iter_steps(fields=("loss", "grad"))]
    want = [(r[0], r[3], r[4], r[5]) for r in before["recs"] if r[0] >= 4]
    assert same(got, want)
    (tmp_path / "late" / "rank-0" / "seg-00000000.h5").unlink()  # and its own first segment is missed too
    with pytest.raises(LogFormatError, match=r"the log starts at step 4 \(meta\.h5\) .* holding steps 4\.\.5 are missing"):
        InfluenceLog(tmp_path / "late")


def test_swapped_segment_files_are_named_as_swapped_not_as_duplicates_or_gaps(tmp_path):
    for order in ([1, 0, 2, 3], [0, 2, 1, 3], [3, 1, 2, 0], [2, 3, 0, 1]):
        log = tmp_path / "".join(map(str, order))
        synthetic(log, steps=8, flush=2)
        segs = sorted((log / "rank-0").glob("seg-*.h5"))
        data = [p.read_bytes() for p in segs]
        for p, i in zip(segs, order):
            p.write_bytes(data[i])
        with pytest.raises(LogFormatError, match=r"segment files are out of order .* the steps are all there but the "
                                                 r"files were renamed or swapped") as err:
            InfluenceLog(log)
        assert "Delete" not in str(err.value) and "missing" not in str(err.value)


# ----------------------------------------------------------------------------- 4. ids that are ids
def tracked_fit(tmp_path, dataset, **kw):
    import lightning.pytorch as pl

    loader_kw = {k: kw.pop(k) for k in ("sampler", "batch_sampler") if k in kw}
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False,
                         callbacks=[InfluenceTracker(str(tmp_path / "log"), **kw)])
    args = loader_kw if "batch_sampler" in loader_kw else {"batch_size": 6, **loader_kw}
    trainer.fit(tiny(), DataLoader(dataset, **args))
    return trainer


class Unique(Dataset):
    """(x, y) pairs whose labels are unique within every batch of 6 (y = index % 6): labels that look like ids."""

    def __init__(self, n=24):
        self.x = make_data(n).tensors[0]

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], i % 6


class ShiftedIds(Dataset):
    def __init__(self, offset):
        self.data, self.offset = make_data(24), offset

    def __len__(self):
        return 24

    def __getitem__(self, i):
        x, y = self.data[i]
        return x, y, i + self.offset


class PairIds(Dataset):
    def __len__(self):
        return 24

    def __getitem__(self, i):
        x, y = make_data(24)[i]
        return x, y, [i, i]


def test_labels_are_never_taken_for_ids(tmp_path):
    """A plain (x, y) batch is refused at the first step, even with labels unique in every batch."""
    y = Unique()[0]
    assert isinstance(y, tuple)
    with pytest.raises(ValueError, match=r"the batch has two elements: \(x, y\) inputs and labels, or \(x, ids\)\? "
                                         r"Labels are never taken for sample ids.*WithIds.*ids_fn=lambda batch: batch\[1\]"):
        tracked_fit(tmp_path, Unique())
    assert InfluenceLog(tmp_path / "log").num_steps == 0  # nothing recorded
    # WithIds on a dataset of plain tensors gives (x, ids): taken as ids
    x_only = WithIds(TensorDataset(make_data(24).tensors[0]))
    assert x_only[3][1] == 3


def test_ids_outside_the_training_set_are_refused_at_the_first_step_with_a_fix(tmp_path):
    with pytest.raises(ValueError, match=r"sample ids \[.*\] are not indices into the training set, which has 24 "
                                         r"samples .*WithIds\(Subset\(data, rows\)\)"):
        tracked_fit(tmp_path, ShiftedIds(100))
    assert InfluenceLog(tmp_path / "log").num_steps == 0
    full = WithIds(make_data(48))
    with pytest.raises(ValueError, match=r"Subset of a WithIds dataset, so its ids index the inner dataset"):
        tracked_fit(tmp_path / "subset", Subset(full, list(range(10, 34))))
    tracked_fit(tmp_path / "ok", WithIds(Subset(make_data(48), list(range(10, 34)))))  # the fix works
    assert InfluenceLog(tmp_path / "ok" / "log").all_ids().tolist() == list(range(24))


def test_sampling_with_replacement_is_refused_saying_so(tmp_path):
    ds = WithIds(make_data(24))
    with pytest.raises(ValueError, match=r"samples with replacement .* Sample without replacement"):
        tracked_fit(tmp_path / "a", ds, sampler=RandomSampler(ds, replacement=True, num_samples=24))

    class Twice:  # a custom batch sampler drawing sample 0 twice: caught at the step itself
        def __iter__(self):
            yield [0, 0, 1, 2]

        def __len__(self):
            return 1

    with pytest.raises(ValueError, match=r"sample ids \[0\] appear more than once in one batch\. Sampling with "
                                         r"replacement .* is not supported") as err:
        tracked_fit(tmp_path / "b", ds, batch_sampler=Twice())
    assert "are these labels" not in str(err.value)


def test_two_dimensional_ids_and_a_scalar_per_sample_loss_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"sample ids must be a 1-D integer tensor \(one id per sample\), got shape \(2, 6\)"):
        tracked_fit(tmp_path / "a", PairIds())

    class Scalar(TinyClassifier):
        def per_sample_loss(self, batch):
            return F.cross_entropy(self(batch[0]), batch[1])

    import lightning.pytorch as pl

    for kw in ({}, {"record_gradients": True}, {"record_gradients": True, "gradient_engine": "vmap"}):
        trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, enable_checkpointing=False,
                             callbacks=[InfluenceTracker(str(tmp_path / f"s{len(kw)}"), **kw)])
        with pytest.raises(ValueError, match=r"Scalar\.per_sample_loss\(batch\) returned \(\) for a batch of 6 samples; "
                                             r"it must return one loss per sample, shape \[6\]"):
            trainer.fit(Scalar().double(), DataLoader(WithIds(make_data(24)), batch_size=6))


# --------------------------------------------------------------- 6. Ctrl+C on a full writer queue
@pytest.fixture
def ctrl_c():
    """SIGINT raises KeyboardInterrupt, as in a terminal: a job a shell starts in the background inherits SIGINT
    ignored, and Python then leaves it so (these tests would wait for an interrupt that never comes)."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


@pytest.mark.slow
def test_ctrl_c_while_training_waits_on_a_slow_disk_keeps_every_accepted_step(tmp_path):
    """A real SIGINT to a fit whose segment writes are slower than its steps (fsync sleeps 0.1 s): training is
    blocked on the full writer queue. Every step the tracker accepted is on disk afterwards, equal to an
    uninterrupted run's, and no step is reported lost."""
    out = subprocess.run([sys.executable, str(HERE / "crash_run.py"), str(tmp_path / "work"), "--sigint-at", "6"],
                         env=ENV, capture_output=True, text=True, timeout=600)
    report = json.loads((tmp_path / "work" / "report.json").read_text())
    run = report["sigint"]
    assert run["exit"] == 1, out.stderr[-3000:]  # Lightning's graceful shutdown exits 1
    assert "Detected KeyboardInterrupt" in out.stderr
    assert run["blocked_in_put"], "the interrupt did not land while the queue was full"
    got, ref = InfluenceLog(tmp_path / "work" / "sigint" / "log"), InfluenceLog(tmp_path / "work" / "ref" / "log")
    accepted = run["accepted"]  # the step the interrupted add_step was recording, + 1
    assert got.steps.tolist() == list(range(accepted)) and accepted >= run["completed_steps"] >= 6
    assert_same_records(got, ref, steps=range(accepted))
    assert "are not on disk" not in out.stderr


def test_ctrl_c_while_add_step_waits_on_a_full_queue_loses_no_accepted_step(tmp_path, monkeypatch, ctrl_c):
    """In-process: SIGINT to the training thread while ``add_step`` waits on a full queue behind 0.3 s writes; after
    ``close`` (what Lightning's graceful shutdown calls) every step the writer accepted is on disk."""
    synthetic(tmp_path, steps=2, flush=2)
    real = writer_mod.write_segment
    monkeypatch.setattr(writer_mod, "write_segment", lambda *a, **k: (time.sleep(0.3), real(*a, **k))[1])
    writer = LogWriter(tmp_path, flush_every_n_steps=1, max_pending=1)
    main = threading.get_ident()
    threading.Timer(0.8, lambda: signal.pthread_kill(main, signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt) as interrupted:
        for t in range(2, 200):
            writer.add_step(StepRecord(step=t, epoch=0, batch_idx=t, micro_batches=1, lrs=[0.1], ids=np.arange(3),
                                       losses=np.full(3, t), grads=np.ones((3, 6)), hvps=np.ones((3, 6))))
    frames = [f.name for f in __import__("traceback").extract_tb(interrupted.value.__traceback__)]
    assert "put" in frames, frames  # it landed while the queue was full
    accepted = writer._next_step  # the step being added was accepted (buffered) before the wait
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "not on disk" warning
        writer.close()
    log = InfluenceLog(tmp_path)
    assert log.steps.tolist() == list(range(accepted)) and accepted >= 3 and writer.lost is None
    assert [r.losses[0] for r in log.iter_steps(2, accepted, fields=("loss",))] == list(range(2, accepted))


def test_an_interrupted_close_reports_the_lost_range(tmp_path, monkeypatch, ctrl_c):
    """A second Ctrl+C while close() waits for a slow write: the steps not yet on disk are named."""
    synthetic(tmp_path, steps=2, flush=2)
    real = writer_mod.write_segment
    monkeypatch.setattr(writer_mod, "write_segment", lambda *a, **k: (time.sleep(0.5), real(*a, **k))[1])
    writer = LogWriter(tmp_path, flush_every_n_steps=2, max_pending=1)
    for t in range(2, 8):
        writer.add_step(StepRecord(step=t, epoch=0, batch_idx=t, micro_batches=1, lrs=[0.1], ids=np.arange(3),
                                   losses=np.ones(3), grads=np.ones((3, 6)), hvps=np.ones((3, 6))))
    main = threading.get_ident()
    for delay in (0.2, 0.4):  # the first lands in flush's wait, the second in the final wait for the writer thread
        threading.Timer(delay, lambda: signal.pthread_kill(main, signal.SIGINT)).start()
    with pytest.warns(RuntimeWarning, match=r"rank 0: steps (2|4|6)\.\.7 were recorded but are not on disk \(the "
                                            r"background writer was still writing"):
        with pytest.raises(KeyboardInterrupt):
            writer.close()
    writer.close()  # the process lives on: closing again finishes the writes, nothing is lost after all
    assert InfluenceLog(tmp_path).steps.tolist() == list(range(8)) and writer.lost is None


# ------------------------------------------------------------------------------- 7. overwrite
def test_overwrite_removes_only_the_logs_own_files(tmp_path):
    epoch_fit(tmp_path / "log", None, epochs=1)
    keep = {"notes.txt": "mine", "rank-0/plot.png": "png", "rank-7/other.bin": "x", "sub/seg-00000000.h5": "not a segment"}
    for name, text in keep.items():
        (tmp_path / "log" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "log" / name).write_text(text)
    (tmp_path / "log" / "rank-0" / "seg-00000009.h5.tmp").write_text("unfinished")
    epoch_fit(tmp_path / "log", None, epochs=2, overwrite=True)
    for name, text in keep.items():
        assert (tmp_path / "log" / name).read_text() == text, name
    log = InfluenceLog(tmp_path / "log")
    assert log.finished and log.num_steps == 8 and not list((tmp_path / "log").rglob("*.tmp"))


# -------------------------------------------------------------------------------- 8. messages
@pytest.mark.parametrize("where", ["writer.lock", "meta.h5.tmp", "data.pt.tmp"])
def test_disk_full_or_read_only_when_the_fit_starts_names_the_path_and_what_to_do(tmp_path, monkeypatch, where):
    import errno
    import traceback

    for code, advice in ((errno.ENOSPC, "The disk is full: free space"), (errno.EROFS, "log_dir is not writable"),
                         (errno.EFBIG, "A file may not be that large there")):
        log_dir = tmp_path / str(code) / "log"
        real_open = os.open

        def failing_open(path, flags, *args, **kwargs):
            if str(path).startswith(str(log_dir)) and str(path).endswith(where) and flags & os.O_CREAT:
                raise OSError(code, os.strerror(code), str(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", failing_open)
        with pytest.raises(LogWriteError) as err:
            epoch_fit(log_dir, None, epochs=1)
        monkeypatch.undo()
        message = str(err.value)
        assert str(log_dir) in message and where in message and advice in message, message
        assert "Nothing of this fit is in the log yet" in message and "start the fit again" in message
        printed = "".join(traceback.format_exception(err.value))
        assert printed.count(os.strerror(code)) == 1, printed  # raised once, not twice in a chained traceback
        assert not list(log_dir.rglob("*.tmp")) and not list(log_dir.rglob("writer.lock"))


def test_the_demo_with_two_epochs_reports_without_a_traceback(tmp_path, capsys, monkeypatch):
    """``max_epochs: 2`` gives two per-epoch windows, fewer than temporal patterns need: the demo says so."""
    import yaml

    from lightning_influence.examples import digits

    cfg = yaml.safe_load((HERE.parent / "configs" / "digits.yaml").read_text())
    cfg["trainer"].update(max_epochs=2, default_root_dir=str(tmp_path / "run"))
    cfg["trainer"]["callbacks"][0]["init_args"]["log_dir"] = str(tmp_path / "run" / "influence")
    cfg["data"].update(n_train=96)
    (tmp_path / "digits.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(tmp_path)
    digits.main(["--config", str(tmp_path / "digits.yaml")])
    out = capsys.readouterr().out
    assert "== last epoch: steps [3, 6) ==" in out and "need at least 3 epochs; this run has 2" in out


@pytest.mark.parametrize("how", ["deleted", "moved"])
def test_a_log_deleted_or_moved_while_written_stops_the_writer_instead_of_recreating_it(tmp_path, how):
    """``rm -rf runs/`` (or a move) during a fit: the writer re-created the folder around its later segments alone (no
    meta.h5, no earlier steps), unreadable, and training went on as if recorded. Now the next write fails, saying
    where the steps went and what to do, and nothing is re-created."""
    from test_log import synthetic_meta
    from test_segment_limits import _record

    log = tmp_path / "log"
    synthetic_meta(log)
    writer = LogWriter(log, background=False, flush_every_n_steps=2)
    for t in range(2):
        writer.add_step(_record(t))
    assert InfluenceLog(log).steps.tolist() == [0, 1]
    shutil.rmtree(log) if how == "deleted" else log.rename(tmp_path / "moved")
    writer.add_step(_record(2))
    with pytest.raises(LogWriteError, match=r"rank-0 was deleted or moved while this fit wrote it.*steps up to 1\) went "
                                            r"with the folder.*put it back where it was"):
        writer.add_step(_record(3))
    assert not log.exists()
    if how == "moved":
        assert InfluenceLog(tmp_path / "moved").steps.tolist() == [0, 1]
