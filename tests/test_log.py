"""The HDF5 log: writer/reader round trip, windows, checkpoints, and plain-h5py readability."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from lightning_influence.capture import KroneckerProjector
from lightning_influence.log import CheckpointRecord, InfluenceLog, LogFormatError, LogWriter, StepRecord
from lightning_influence.log.writer import write_meta


def synthetic_meta(path, every=1):
    """The ``meta.h5`` of a log of 40 samples and one tracked 2x3 parameter ``w`` (losses, gradients, HVPs)."""
    shapes = {"w": [2, 3]}
    write_meta(path, {
        "dataset_size": 40, "tracked_params": ["w"], "param_shapes": shapes, "every_n_steps": every,
        "recorded": {"losses": True, "gradients": True, "hvp": True, "checkpoints": True},
        "projection": KroneckerProjector(shapes, None).to_metadata(),
        "optimizer": {"class": "torch.optim.sgd.SGD", "param_groups": [{"lr": 0.1, "params": ["w"]}]},
    })


def synthetic_log(path, steps=10, batch=4, k=6, every=1, flush=3, epochs_of=lambda t: t // 5, seed=0):
    """A log written through LogWriter with known random contents; returns the records."""
    rng = np.random.default_rng(seed)
    synthetic_meta(path, every)
    writer = LogWriter(path, flush_every_n_steps=flush, storage_dtype="float64")
    records = []
    for t in range(steps):
        ids = rng.choice(40, size=batch, replace=False)
        rec = StepRecord(step=t, epoch=epochs_of(t), batch_idx=t, micro_batches=1, lrs=[0.1 / (1 + t)], ids=ids,
                         losses=rng.random(batch))
        if t % every == 0:
            rec.grads, rec.hvps = rng.standard_normal((batch, k)), rng.standard_normal((batch, k))
        if t % 4 == 0:
            writer.add_checkpoint(CheckpointRecord(step=t, params={"w": rng.standard_normal((2, 3))},
                                                   optimizer_state={"w": {"momentum_buffer": np.ones((2, 3))}}))
        writer.add_step(rec)
        records.append(rec)
    writer.close()
    return records


def test_round_trip_every_field(tmp_path):
    recs = synthetic_log(tmp_path, steps=10, every=2)
    log = InfluenceLog(tmp_path)
    assert log.num_steps == 10 and list(log.steps) == list(range(10))
    assert log.checkpoint_steps == [0, 4, 8]
    assert log.optimizer_state(4)["w"]["momentum_buffer"].tolist() == [[1, 1, 1]] * 2
    got = list(log.iter_steps(fields=("loss", "grad", "hvp")))
    assert [g.step for g in got] == [0, 2, 4, 6, 8]  # gradient rows every 2 steps
    for g in got:
        r = recs[g.step]
        np.testing.assert_array_equal(g.ids, r.ids)
        np.testing.assert_array_equal(g.losses, r.losses)
        np.testing.assert_array_equal(g.grads, r.grads)
        np.testing.assert_array_equal(g.hvps, r.hvps)
        assert g.lrs[0] == r.lrs[0]
    ids_only = list(log.iter_steps(fields=()))
    assert len(ids_only) == 10 and all(np.array_equal(s.ids, recs[s.step].ids) for s in ids_only)
    assert len(log._segments) == 4  # flushed every 3 steps


def test_windows_in_steps_epochs_and_fractions(tmp_path):
    synthetic_log(tmp_path, steps=20, epochs_of=lambda t: t // 5)
    log = InfluenceLog(tmp_path)
    assert log.window(None) == (0, 20)
    assert log.window((3, 7)) == log.window("3:7") == (3, 7)
    assert log.window(":5") == (0, 5) and log.window("15:") == (15, 20)
    assert log.window(("epoch", 1, 3)) == log.window("epoch 1:3") == (5, 15)
    assert log.window("epoch 3:") == (15, 20)
    assert log.window((0.5, 1.0)) == log.window("0.5:1.0") == (10, 20)
    for bad, match in [((5, 5), "outside the run"), ((0, 21), "outside the run"), ("epoch 7:9", "hold no step"),
                       ((0.5, 1.5), "fractional window"), ("last", "cannot parse")]:
        with pytest.raises(ValueError, match=match):
            log.window(bad)


def test_a_fractional_window_at_the_end_is_the_last_step(tmp_path):
    """A fractional window rounding to an empty range is the one step it lies in: '0.99:1.0' of 20 steps (both ends
    at step 20) was [20, 21) and refused as outside the run (0 <= t1 < t2 <= T), a valid fraction of the run."""
    synthetic_log(tmp_path, steps=20, epochs_of=lambda t: t // 5)
    log = InfluenceLog(tmp_path)
    assert log.window("0.99:1.0") == log.window((0.99, 1.0)) == (19, 20)
    assert log.window("0.98:0.99") == (19, 20)  # a step's share of the run: the step both ends round into
    assert log.window("0:0.01") == (0, 1)


@pytest.mark.parametrize("bad", [["epoch", 2], 5, (0, 10, 20), ("a", "b"), (None, 10), range(0, 10), (True, 3),
                                 ("epoch", 1.5, 3)])
def test_a_window_of_another_form_is_refused_naming_the_forms(tmp_path, bad):
    """["epoch", 2] failed with "invalid literal for int() with base 10: 'epoch'", 5 with "object of type 'int' has no
    len()", (None, 10) with int()'s TypeError: now one ValueError listing the forms a window takes."""
    synthetic_log(tmp_path, steps=20, epochs_of=lambda t: t // 5)
    with pytest.raises(ValueError, match=r"^cannot read window .*: use \(t1, t2\) \(steps\)"):
        InfluenceLog(tmp_path).window(bad)


def test_missing_records_are_refused(tmp_path):
    synthetic_log(tmp_path)
    log = InfluenceLog(tmp_path)
    log.meta["recorded"]["hvp"] = False
    with pytest.raises(ValueError, match="did not record hvp"):
        next(log.iter_steps(fields=("hvp",)))


def test_readable_with_plain_h5py(tmp_path):
    """What docs/log-format.md promises, read without this package."""
    recs = synthetic_log(tmp_path, steps=3, flush=10)
    with h5py.File(tmp_path / "rank-0" / "seg-00000000.h5", "r") as f:
        assert f.attrs["format"] == b"lightning-influence-log" and f.attrs["format_version"] == 2
        steps = f["steps"]
        t = 1
        off, n = steps["sample_offset"][t], steps["sample_count"][t]
        m = steps["micro_offset"][t]  # a step recorded without micro-batch details: one micro-batch of all its ids
        assert steps["micro_batches"][t] == 1 and f["micro/size"][m] == n and f["micro/cpu_rng"][m] == -1
        np.testing.assert_array_equal(f["samples/id"][off : off + n], recs[t].ids)
        g = steps["grad_offset"][t]
        np.testing.assert_array_equal(f["grads/grad"][g : g + n], recs[t].grads)
        assert "step_00000000" in f["checkpoints"]
    with h5py.File(tmp_path / "meta.h5", "r") as f:
        assert f.attrs["format_version"] == 2


def test_a_meta_file_removed_while_it_is_opened_reads_as_missing(tmp_path, monkeypatch):
    """A reader that found meta.h5 and then could not open it because it was gone (a fit starting a new log over the
    directory removed it in between: the crash test's live reader met this) was told the file is corrupted and to
    restore it from a backup; it is missing, as a reader that came a moment later is told."""
    from lightning_influence.log import format as log_format

    synthetic_meta(tmp_path)
    opened = h5py.File

    def gone(path, *args, **kw):
        if Path(path).name == "meta.h5":
            Path(path).unlink()
        return opened(path, *args, **kw)

    monkeypatch.setattr(h5py, "File", gone)
    with pytest.raises(LogFormatError, match=r"not an influence log \(meta.h5 is missing\)") as err:
        log_format.read_meta(tmp_path)
    assert "corrupted" not in str(err.value)


def test_not_a_log_and_foreign_files_are_clear_errors(tmp_path):
    with pytest.raises(LogFormatError, match="meta.h5 is missing"):
        InfluenceLog(tmp_path)
    with h5py.File(tmp_path / "meta.h5", "w") as f:
        f.attrs["format"] = "something-else"
    with pytest.raises(LogFormatError, match="not a lightning-influence file"):
        InfluenceLog(tmp_path)


def test_a_version_1_log_still_opens():
    """tests/fixtures/log_v1 was written by the version-1 tracker (tests/fixtures/make_log_v1.py at commit 548308b)."""
    from pathlib import Path

    path = Path(__file__).parent / "fixtures" / "log_v1"
    with h5py.File(path / "meta.h5", "r") as f:
        assert f.attrs["format_version"] == 1
    log = InfluenceLog(path)
    assert log.num_steps == 4 and log.finished and log.checkpoint_steps == [0, 2, 4]
    assert log.meta.get("precision") is None  # readers take the version-2 defaults
    for t in range(4):
        (micro,) = log.micro_batches(t)  # one micro-batch of all ids, no random state, no inputs
        np.testing.assert_array_equal(micro.ids, log.batch_ids(t))
        assert micro.cpu_rng is None and micro.cuda_rng is None and micro.inputs is None
        assert log.grad_scale(t) is None and not log.skipped(t)
    recs = list(log.iter_steps(fields=("loss", "grad", "hvp")))
    assert len(recs) == 4 and recs[0].grads.shape == (4, 3) and sorted(np.concatenate([r.ids for r in recs[:2]])) == list(range(8))


def test_amend_meta_rewrites_meta_in_order_and_a_failure_stops_the_writer(tmp_path, monkeypatch):
    """``LogWriter.amend_meta`` (the tracker's engines after a demotion): ``meta.h5`` becomes ``amend(meta)`` once the
    segments queued before are written; a failed rewrite is reported as a segment's, naming meta.h5, and stops the
    writer (nothing more is written)."""
    import errno

    from lightning_influence.log import writer as writer_mod
    from lightning_influence.log.format import read_meta
    from lightning_influence.log.writer import LogWriteError

    synthetic_meta(tmp_path)
    writer = LogWriter(tmp_path, flush_every_n_steps=1, storage_dtype="float64")
    writer.add_step(StepRecord(step=0, epoch=0, batch_idx=0, micro_batches=1, lrs=[0.1], ids=np.arange(4),
                               losses=np.ones(4)))
    writer.amend_meta(lambda meta: {**meta, "demoted": {"w": 0}})
    writer.drain()
    assert read_meta(tmp_path)["demoted"] == {"w": 0} and read_meta(tmp_path)["dataset_size"] == 40
    assert writer.last_step_on_disk == 0

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer_mod, "write_file", no_space)
    writer.amend_meta(lambda meta: {**meta, "demoted": {}})
    with pytest.raises(LogWriteError, match=r"meta\.h5 \(the run metadata\): OSError: .*steps up to 0 are safe") as err:
        writer.drain()
    assert str(err.value).count("The disk is full") == 1  # described once
    writer.close(raise_errors=False)
    assert read_meta(tmp_path)["demoted"] == {"w": 0}


def test_discard_from_drops_buffered_steps_and_says_when_one_was_written(tmp_path):
    """A step refused after it was recorded leaves the log: dropped from the buffer (with any after it) and the writer
    continues at it; one already in a closed segment is reported (False), and a step never recorded is nothing."""
    from lightning_influence.log.reader import InfluenceLog

    synthetic_meta(tmp_path)
    writer = LogWriter(tmp_path, flush_every_n_steps=3, storage_dtype="float64")
    for t in range(5):  # steps 0..2 written (a closed segment), 3..4 buffered
        writer.add_step(StepRecord(step=t, epoch=0, batch_idx=t, micro_batches=1, lrs=[0.1], ids=np.arange(4) + 4 * t,
                                   losses=np.ones(4)))
    assert writer.discard_from(9) and writer.buffered_steps == 2  # never recorded
    assert not writer.discard_from(2) and writer.buffered_steps == 2  # in the closed segment
    assert writer.discard_from(4) and writer.buffered_steps == 1
    writer.close()
    assert InfluenceLog(tmp_path).steps.tolist() == [0, 1, 2, 3]
