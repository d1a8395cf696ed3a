"""Rows beyond the storage dtype's range are refused at their step, not stored as inf (``StepRecord.check_storable``).

``storage_dtype="float16"`` holds values up to 65504; the writer casts each step's gradient and HVP rows to it, and a
larger value became ``inf`` on disk (only a numpy RuntimeWarning from the writer thread), which every estimator then
read as a score. Losses are stored in float64 whatever the storage dtype.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TinyClassifier, fit, loader, make_data
from lightning_influence import InfluenceLog, InfluenceTracker
from lightning_influence.log import LogWriter, StepRecord
from test_log import synthetic_meta


def six(*values: list[float]) -> np.ndarray:
    """Two rows of the synthetic log's 6 columns, starting with ``values``."""
    rows = np.zeros((2, 6))
    for row, v in zip(rows, values):
        row[:len(v)] = v
    return rows


def record(step: int, grads=None, hvps=None, losses=(1.0, 2.0)) -> StepRecord:
    losses = np.array(losses)
    return StepRecord(step=step, epoch=0, batch_idx=step, micro_batches=1, ids=np.array([4, 7]), lrs=[0.1],
                      losses=losses, grads=grads, hvps=hvps)


def test_writer_refuses_rows_beyond_float16_and_keeps_the_steps_before(tmp_path):
    ok = six([1.0, -65504.0], [2.0, 3.0]).astype(np.float32)  # 65504 is float16's largest: stored exactly
    synthetic_meta(tmp_path)
    writer = LogWriter(tmp_path, storage_dtype="float16", background=False)
    writer.add_step(record(0, grads=ok, hvps=ok, losses=np.array([1e300, 2.0])))
    with pytest.raises(FloatingPointError, match=r"step 1: per-sample gradient values up to 1e\+05 for sample ids \[7\] "
                                                 r"exceed storage_dtype='float16' .* nothing of this step was stored\. "
                                                 r"Record with storage_dtype='float32'"):
        writer.add_step(record(1, grads=six([1.0, 2.0], [3.0, -1e5]).astype(np.float32), hvps=ok))
    with pytest.raises(FloatingPointError, match=r"step 1: Hessian-gradient product values up to 7e\+04 for sample ids \[4\]"):
        writer.add_step(record(1, grads=ok, hvps=six([7e4], [3.0, 1.0])))
    writer.add_step(record(1, grads=six([65519.0]), hvps=ok))  # 65519 rounds to 65504
    writer.close()
    log = InfluenceLog(tmp_path)
    assert log.steps.tolist() == [0, 1]
    rows = {r.step: r for r in log.iter_steps(fields=("loss", "grad", "hvp"))}
    assert np.array_equal(rows[0].grads, ok) and np.array_equal(rows[0].hvps, ok)
    assert rows[0].losses.tolist() == [1e300, 2.0]  # losses are float64 on disk
    assert rows[1].grads[0, 0] == 65504.0


def test_float64_rows_beyond_float32_are_refused_and_float64_storage_keeps_them(tmp_path):
    big = six([1e39], [1.0, 1.0])
    synthetic_meta(tmp_path / "a")
    synthetic_meta(tmp_path / "b")
    with pytest.raises(FloatingPointError, match=r"storage_dtype='float32' .* Record with storage_dtype='float64'"):
        LogWriter(tmp_path / "a", storage_dtype="float32", background=False).add_step(record(0, grads=big, hvps=big))
    writer = LogWriter(tmp_path / "b", storage_dtype="float64", background=False)
    writer.add_step(record(0, grads=big, hvps=big))
    writer.close()
    assert next(InfluenceLog(tmp_path / "b").iter_steps()).grads[0, 0] == 1e39


class Loud(TinyClassifier):
    """One sample's loss scaled so that its gradient leaves float16's range (a finite, trainable run)."""

    def per_sample_loss(self, batch):
        loss = F.cross_entropy(self(batch[0]), batch[1], reduction="none")
        return loss * torch.where(batch[2] == 13, 1e7, 1.0).to(loss.dtype)


def test_a_fit_with_float16_storage_is_refused_at_the_step_whose_gradients_overflow(tmp_path):
    data = loader(make_data(24, dtype=torch.float32))
    order = [b[2].tolist() for b in data]
    step = next(i for i, ids in enumerate(order) if 13 in ids)
    torch.manual_seed(0)
    tracker = InfluenceTracker(str(tmp_path / "log"), record_gradients=True, projection_dim=None,
                               storage_dtype="float16")
    with pytest.raises(FloatingPointError, match=rf"step {step}: per-sample gradient values .* sample ids \[13\] .*"
                                                 r"storage_dtype='float32'"):
        fit(Loud(lr=1e-9), data, tracker, epochs=1)
    log = InfluenceLog(tmp_path / "log")
    assert log.steps.tolist() == list(range(step))
    assert all(np.isfinite(r.grads).all() for r in log.iter_steps())
