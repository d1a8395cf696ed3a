"""When a segment file closes: after ``flush_every_n_steps`` steps, ``flush_every_n_seconds`` of age, or
``max_segment_bytes`` of rows and parameters (the tracker's default: 10 s or 64 MiB), whichever comes first."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from conftest import fit, loader, make_data, tiny
from test_log import synthetic_meta
from test_robustness import assert_same_records
from lightning_influence import InfluenceLog, InfluenceTracker
from lightning_influence import callback as callback_module
from lightning_influence.log import CheckpointRecord, LogWriter, StepRecord
from lightning_influence.log import writer as writer_module


def _record(t: int, batch: int = 4, k: int = 6) -> StepRecord:
    rng = np.random.default_rng(t)
    return StepRecord(step=t, epoch=0, batch_idx=t, micro_batches=1, lrs=[0.1], ids=rng.choice(40, batch, replace=False),
                      losses=rng.random(batch), grads=rng.standard_normal((batch, k)), hvps=rng.standard_normal((batch, k)))


def _writer(path, **kw) -> LogWriter:
    synthetic_meta(path)
    return LogWriter(path, background=False, **kw)


def _starts(path) -> list[int]:
    with InfluenceLog(path) as log:
        return log.segment_starts()


def test_a_segment_closes_at_the_first_step_that_finds_it_open_long_enough(tmp_path, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(writer_module, "clock", lambda: now[0])
    writer = _writer(tmp_path, flush_every_n_steps=None, flush_every_n_seconds=3.0)
    # by hand: opened at 0.0, step 3 at 3.0 closes it; opened at 3.2 (step 4), step 6 at 7.0 closes it; the rest at close
    for t, at in enumerate([0.0, 1.0, 2.9, 3.0, 3.2, 4.0, 7.0, 8.0, 9.5]):
        now[0] = at
        writer.add_step(_record(t))
    writer.close()
    assert _starts(tmp_path) == [0, 4, 7]


def test_steps_and_seconds_whichever_comes_first(tmp_path, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(writer_module, "clock", lambda: now[0])
    writer = _writer(tmp_path, flush_every_n_steps=3, flush_every_n_seconds=5.0)
    for t, at in enumerate([0, 1, 2, 3, 9, 10, 11, 12, 13]):  # 3 steps; then 5 s (steps 3, 4); then 3 steps; the rest
        now[0] = at
        writer.add_step(_record(t))
    writer.close()
    assert _starts(tmp_path) == [0, 3, 5, 8]


def test_a_segment_closes_at_the_step_that_brings_its_rows_and_parameters_to_the_size_limit(tmp_path):
    # each step: 2 x (4 x 6) float32 rows = 192 bytes; the checkpoint before step 0: 2 x 3 float64 = 48 bytes
    writer = _writer(tmp_path, flush_every_n_steps=None, max_segment_bytes=600)
    writer.add_checkpoint(CheckpointRecord(step=0, params={"w": np.ones((2, 3))}))
    records = [_record(t) for t in range(8)]
    for rec in records:  # 48 + 3 x 192 = 624 closes after step 2; then 4 x 192 = 768 after step 6 (576 after step 5)
        writer.add_step(rec)
    writer.close()
    assert _starts(tmp_path) == [0, 3, 7]
    with InfluenceLog(tmp_path) as log:  # however the steps were cut into segments, they read back exactly
        for got, want in zip(log.iter_steps(fields=("loss", "grad", "hvp")), records):
            assert np.array_equal(got.ids, want.ids) and np.array_equal(got.losses, want.losses)
            assert np.array_equal(got.grads, want.grads.astype(np.float32))
            assert np.array_equal(got.hvps, want.hvps.astype(np.float32))


@pytest.mark.parametrize("kw, message", [
    (dict(flush_every_n_steps=None, flush_every_n_seconds=None), "both None: set one of them"),
    (dict(flush_every_n_seconds=0), "flush_every_n_seconds must be None or a number of seconds > 0, got 0"),
    (dict(flush_every_n_seconds=float("nan")), "number of seconds > 0, got nan"),
    (dict(flush_every_n_seconds="10"), "got '10'"),
    (dict(flush_every_n_steps=0), "flush_every_n_steps must be None or an int >= 1, got 0"),
])
def test_bad_segment_limits_are_refused_at_construction(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        InfluenceTracker(str(tmp_path / "log"), **kw)


def test_the_tracker_closes_segments_by_age_by_default_and_the_log_reads_the_same(tmp_path, monkeypatch):
    ref = str(tmp_path / "ref")
    fit(tiny(), loader(make_data()), InfluenceTracker(ref, record_gradients=True, flush_every_n_steps=3), epochs=3)
    ticks = itertools.count()  # one second per reading of the clock: two at a segment's first step, one at the others
    monkeypatch.setattr(writer_module, "clock", lambda: float(next(ticks)))
    got = str(tmp_path / "got")
    tracker = InfluenceTracker(got, record_gradients=True, flush_every_n_seconds=4)
    fit(tiny(), loader(make_data()), tracker, epochs=3)
    assert _starts(got) == [0, 4, 8] and _starts(ref) == [0, 3, 6, 9]  # 12 steps: 4 a segment (4 s), 3 a segment
    with InfluenceLog(got) as log, InfluenceLog(ref) as want:
        assert log.meta["flush_every_n_steps"] is None and log.meta["flush_every_n_seconds"] == 4
        assert_same_records(log, want)


def test_the_tracker_closes_segments_by_size_by_default(tmp_path, monkeypatch):
    # tiny()'s per-sample gradient rows, its Linear blocks stored as factors (docs/log-format.md, Version 4): (7+5)+7+(3+7)+3
    # = 32 float32 values x 6 samples = 768 bytes a step (the size limit counts the bytes stored); θ_0 is 66 float64
    # values (528 bytes) stored with step 0: 528 + 2 x 768 = 2064 >= 1500 closes after step 1, then every 2 steps
    monkeypatch.setattr(callback_module, "SEGMENT_BYTES", 1500)
    path = str(tmp_path / "log")
    fit(tiny(), loader(make_data()), InfluenceTracker(path, record_gradients=True), epochs=2)
    assert _starts(path) == [0, 2, 4, 6]
    tracker = InfluenceTracker(path, record_gradients=True, flush_every_n_steps=5, overwrite=True)
    fit(tiny(), loader(make_data()), tracker, epochs=2)  # a step limit set: no size limit
    assert _starts(path) == [0, 5]


def test_drain_waits_for_the_closed_segments_and_leaves_the_open_one_open(tmp_path, monkeypatch):
    import threading
    import time

    gate = threading.Event()
    write = writer_module.write_segment

    def held(*args, **kwargs):  # the background thread writes only once the test lets it
        gate.wait(5)
        return write(*args, **kwargs)

    monkeypatch.setattr(writer_module, "write_segment", held)
    synthetic_meta(tmp_path)
    writer = LogWriter(tmp_path, flush_every_n_steps=2, flush_every_n_seconds=None)
    for t in range(3):  # steps 0-1 close a segment; step 2 opens the next
        writer.add_step(_record(t))
    assert _starts(tmp_path) == []  # held
    threading.Timer(0.2, gate.set).start()
    t0 = time.perf_counter()
    writer.drain()
    assert time.perf_counter() - t0 >= 0.15  # it waited for the held write
    assert _starts(tmp_path) == [0]  # the closed segment is on disk, step 2 still buffered
    assert writer.buffered_steps == 1
    writer.close()
    assert _starts(tmp_path) == [0, 2]
