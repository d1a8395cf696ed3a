"""Non-blocking host copies (``capture.transfer``) and the tracker's steps in flight (``InfluenceTracker._add_step``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_influence import InfluenceLog, InfluenceTracker
from lightning_influence.capture.transfer import HostCopy
from lightning_influence.log.writer import LogWriter
from tests.conftest import fit, loader, make_data, tiny


def test_host_copy_is_an_independent_numpy_snapshot_of_a_tree() -> None:
    w = torch.arange(6.0).reshape(2, 3)
    copy = HostCopy({"rows": {"w": w, "n": torch.tensor(2.5)}, "ckpt": (torch.ones(2, dtype=torch.float64), None), "k": 3})
    w.add_(100.0)  # an in-place update after the copy was started (the optimizer step) must not show
    assert copy.ready()
    out = copy.wait()
    assert isinstance(out["rows"]["w"], np.ndarray) and out["rows"]["w"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert float(out["rows"]["n"]) == 2.5 and out["ckpt"][0].dtype == np.float64 and out["ckpt"][1] is None
    assert out["k"] == 3


def _record(log_dir: str) -> dict[str, list[np.ndarray]]:
    with InfluenceLog(log_dir) as log:
        recs = list(log.iter_steps(fields=("loss", "grad", "hvp")))
        return {"ids": [r.ids for r in recs], "loss": [r.losses for r in recs], "grad": [r.grads for r in recs],
                "hvp": [r.hvps for r in recs], "ckpt": [log.checkpoint(t)["net.0.weight"] for t in log.checkpoint_steps]}


def test_steps_held_in_flight_reach_the_log_unchanged(tmp_path, monkeypatch) -> None:
    """Copies that are never 'ready' (a busy GPU): the tracker keeps two steps in flight, then the same log."""
    kw = dict(record_gradients=True, record_hvp=True, projection_dim=4, checkpoint_every_n_steps=2, flush_every_n_steps=3)
    fit(tiny(), loader(make_data()), InfluenceTracker(str(tmp_path / "now"), **kw))
    staged_behind: list[int] = []
    add_step = LogWriter.add_step

    def spy(self, record, checkpoint=None):
        staged_behind.append(tracker._next_step - record.step)  # steps staged since this one (during _add_step: step = _next_step)
        return add_step(self, record, checkpoint)

    monkeypatch.setattr(HostCopy, "ready", lambda self: False)
    monkeypatch.setattr(LogWriter, "add_step", spy)
    tracker = InfluenceTracker(str(tmp_path / "later"), **kw)
    fit(tiny(), loader(make_data()), tracker)
    assert staged_behind[0] == 0 and max(staged_behind) == 2  # the first step at once, then two in flight
    now, later = _record(str(tmp_path / "now")), _record(str(tmp_path / "later"))
    for key in now:
        assert len(now[key]) == len(later[key]) == (8 if key != "ckpt" else 5)
        for a, b in zip(now[key], later[key]):
            np.testing.assert_array_equal(a, b)


def test_a_non_finite_step_in_flight_is_refused_naming_its_step(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(HostCopy, "ready", lambda self: False)
    module = tiny()
    per_sample_loss = module.per_sample_loss
    calls = {"n": 0}

    def poisoned(batch):
        calls["n"] += 1
        out = per_sample_loss(batch)
        return out * float("nan") if calls["n"] == 4 else out  # the 4th training step's forward

    module.per_sample_loss = poisoned
    with pytest.raises(FloatingPointError, match="step 3: non-finite per-sample loss"):
        fit(module, loader(make_data()), InfluenceTracker(str(tmp_path / "log"), flush_every_n_steps=2))
    with InfluenceLog(tmp_path / "log") as log:
        assert log.num_steps <= 3  # nothing of step 3 (or later) was stored


def test_host_copy_hands_over_fresh_cpu_tensors_and_clones_the_others() -> None:
    """``fresh`` keys (the step's new rows) are taken as they are; the others (parameters) are snapshots."""
    rows, param = torch.arange(4.0), torch.ones(3)
    out = HostCopy({"rows": {"r": rows}, "checkpoint": (param,)}, fresh=("rows",)).wait()
    param.add_(1.0)
    assert np.shares_memory(out["rows"]["r"], rows.numpy()) and out["rows"]["r"].tolist() == [0, 1, 2, 3]
    assert not np.shares_memory(out["checkpoint"][0], param.numpy()) and out["checkpoint"][0].tolist() == [1, 1, 1]
