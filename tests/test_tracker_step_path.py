"""The tracker's per-step path (issue 13): its shortcuts against the general path they stand for.

Steps are handed to the writer a few at a time (``InfluenceTracker._land``), their ids checked and their random
states reduced there; a plain ``(x, y, ids)`` batch takes a shortcut through ``extract_ids``; CPU rows skip the
``HostCopy`` walk. Each shortcut must give what the general path gives, and refuse what it refuses.
"""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import InfluenceLog, InfluenceTracker, WithIds
from lightning_influence.capture.transfer import HostCopy
from lightning_influence.data import check_ids, extract_ids
from lightning_influence.log.writer import LogWriter
from lightning_influence.step import rng
from tests.conftest import fit, loader, make_data, tiny


class _Tuple(tuple):
    """A tuple subclass: not the shortcut's plain tuple, so ``extract_ids`` takes its general path."""


@pytest.mark.parametrize("checked", [True, False])
@pytest.mark.parametrize("ids", [torch.tensor([4, 0, 2]), torch.tensor([4, 4, 2]), torch.tensor([4, 0, 9]),
                                 torch.tensor([[4, 0, 2]]), torch.tensor([4, 0]), torch.tensor([4.0, 0.0, 2.0]),
                                 torch.tensor([4, 0, 2], dtype=torch.int32)])
def test_extract_ids_shortcut_returns_and_refuses_as_the_general_path(ids, checked):
    x = torch.zeros(3, 2)

    def outcome(batch):
        try:
            out = extract_ids(batch, checked=checked, dataset_size=5)
        except ValueError as err:
            return "refused", str(err)
        return out.dtype, out.tolist()

    general = outcome(_Tuple((x, torch.zeros(3), ids)))
    assert outcome((x, torch.zeros(3), ids)) == general
    assert outcome([x, torch.zeros(3), ids]) == general
    with_ids = extract_ids((x, torch.tensor([1, 0, 2])), with_ids=True)
    assert with_ids.tolist() == [1, 0, 2]
    with pytest.raises(ValueError, match="Labels are never taken for sample ids"):
        extract_ids((x, torch.tensor([1, 0, 2])))
    if not checked:  # the values are left to the caller's check_ids
        assert general[0] == "refused" or general[1] == ids.tolist()


def test_check_ids_takes_the_numpy_ids_of_a_step_as_the_tensor():
    for values in ([3, 0, 7], [2, 5, 2], [1, -4], [9, 1, 12]):
        def outcome(ids):
            try:
                check_ids(ids, dataset_size=9)
            except ValueError as err:
                return str(err)
            return None
        assert outcome(np.array(values)) == outcome(torch.tensor(values))
    with pytest.raises(ValueError, match=r"sample ids \[9, 12\] are not indices into the training set"):
        check_ids(np.array([9, 1, 12]), dataset_size=9)


def test_drawn_from_states_read_at_the_backward_equals_drawn_then():
    """``drawn(before, now)`` with ``now`` read when the backward ended (the tracker reduces it later) is
    ``drawn(before)`` at that moment, whether the forward drew or not, whatever happens to the generator after."""
    for draw in (False, True):
        before = rng.started()
        if draw:
            torch.rand(2)
        then, now = rng.drawn(before), rng.started()
        torch.rand(5)  # later steps draw: must not matter
        later = rng.drawn(before, now)
        assert later.drew == then.drew == draw
        if draw:
            np.testing.assert_array_equal(later.cpu, then.cpu)
        else:
            assert later is rng.NONE and then is rng.NONE


def test_cpu_rows_without_checkpoint_skip_the_walk_and_copy_as_the_general_path():
    rows = {"ids": torch.tensor([3, 1]), "losses": torch.tensor([0.5, 1.5])}
    states = [(rng.started(), None)]
    quick = HostCopy.of_step(rows, None, states)
    assert quick.ready() and quick._rows[0] is rows  # kept as they are, nothing walked or copied
    general = HostCopy({"rows": rows, "checkpoint": None, "random": states}, fresh=("rows", "random"))
    a, b = quick.wait(), general.wait()
    assert a.keys() == b.keys() and a["checkpoint"] is b["checkpoint"] is None and a["random"] == b["random"]
    for k in rows:
        assert isinstance(a["rows"][k], np.ndarray) and np.array_equal(a["rows"][k], b["rows"][k])
    param = torch.ones(2)  # with a checkpoint: the general path, the parameters snapshotted
    out = HostCopy.of_step(rows, ({"w": param}, {}), None).wait()
    param.add_(1.0)
    assert out["checkpoint"][0]["w"].tolist() == [1.0, 1.0]


def test_steps_reach_the_writer_in_groups_and_the_log_is_the_same(tmp_path, monkeypatch):
    """On the CPU every copy is ready at once, yet steps are handed on ``tracker_inflight.IN_FLIGHT + 1`` at a time (the first at
    once); the log equals one written step by step."""
    kw = dict(record_gradients=True, projection_dim=4, checkpoint_every_n_steps=3, flush_every_n_steps=2)
    module_kw = dict(dropout=0.3)
    fit(tiny(**module_kw), loader(make_data()), InfluenceTracker(str(tmp_path / "grouped"), **kw), epochs=3)
    behind: list[int] = []
    add_step = LogWriter.add_step

    def spy(self, record, checkpoint=None):
        behind.append(tracker._next_step - record.step)
        return add_step(self, record, checkpoint)

    monkeypatch.setattr(LogWriter, "add_step", spy)
    tracker = InfluenceTracker(str(tmp_path / "grouped2"), **kw)
    fit(tiny(**module_kw), loader(make_data()), tracker, epochs=3)
    assert behind[:7] == [0, 2, 1, 0, 2, 1, 0]  # step 0 at once, then steps 1-3 at step 3, 4-6 at step 6, ...
    land = InfluenceTracker._land
    monkeypatch.setattr(InfluenceTracker, "_land", lambda self, keep=0: land(self, 0))  # every step at once
    fit(tiny(**module_kw), loader(make_data()), InfluenceTracker(str(tmp_path / "one_by_one"), **kw), epochs=3)
    logs = [InfluenceLog(tmp_path / name) for name in ("grouped", "grouped2", "one_by_one")]
    recs = [list(log.iter_steps(fields=("loss", "grad"))) for log in logs]
    micro = [[[(m.ids.tolist(), None if m.cpu_rng is None else m.cpu_rng.tobytes()) for m in log.micro_batches(t)]
              for t in log.steps] for log in logs]
    assert len(recs[0]) == 12 and any(rng_state is not None for step in micro[0] for _, rng_state in step)  # dropout
    for other, other_micro in zip(recs[1:], micro[1:]):
        assert other_micro == micro[0]
        for a, b in zip(recs[0], other, strict=True):
            np.testing.assert_array_equal(a.ids, b.ids)
            np.testing.assert_array_equal(a.losses, b.losses)
            np.testing.assert_array_equal(a.grads, b.grads)
    for log in logs:
        log.close()


def test_duplicate_ids_after_the_first_step_are_refused_naming_them_and_nothing_of_the_step_is_stored(tmp_path):
    ids = torch.arange(24)
    ids[14] = 12  # step 2's batch (no shuffling) holds sample 12 twice
    x, y = make_data().tensors
    data = DataLoader(TensorDataset(x, y, ids), batch_size=6)
    with pytest.raises(ValueError, match=r"sample ids \[12\] appear more than once in one batch"):
        fit(tiny(), data, InfluenceTracker(str(tmp_path / "log"), flush_every_n_steps=1))
    with InfluenceLog(tmp_path / "log") as log:
        assert log.steps.tolist() == [0, 1]


def test_labels_as_ids_are_refused_at_the_first_step_before_the_optimizer_moves(tmp_path):
    module = tiny()
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(ValueError, match="appear more than once in one batch"):
        fit(module, DataLoader(WithIds(make_data()), batch_size=6), InfluenceTracker(str(tmp_path / "log"),
                                                                                      ids_fn=lambda b: b[1]))
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))  # refused before the first update


def test_the_clipping_wrapper_leaves_after_checking_lightnings_clipping_once_and_stays_for_an_override(tmp_path):
    """Lightning's own ``configure_gradient_clipping`` is checked at the first step, then the tracker's wrapper is
    removed (nothing more to check); an override is checked at every step, so its wrapper stays for the fit."""
    from tests.test_step_weights import LoggingClipping

    seen: list[bool] = []

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append("configure_gradient_clipping" in vars(pl_module))

    for module, clip, expected in ((tiny(), None, [False] * 3), (LoggingClipping().double(), 0.05, [True] * 3)):
        seen.clear()
        pl.seed_everything(0, verbose=False)
        trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=clip,
                             callbacks=[InfluenceTracker(str(tmp_path / f"log{clip}")), Probe()])
        trainer.fit(module, loader(make_data(18)))
        assert seen == expected
        assert "configure_gradient_clipping" not in vars(module)  # and none is left after the fit
    assert module.calls == 3  # the override ran (and was checked) at every step


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_validate_refuses_a_non_finite_value_whatever_the_rows_sum_to(dtype):
    """``StepRecord.validate``'s finiteness shortcut (a finite sum: every value finite) takes what the value-by-value
    check takes and refuses what it refuses: a NaN or an infinity among finite values, infinities of both signs, and
    finite rows whose sum overflows are accepted."""
    from lightning_influence.log.records import StepRecord

    big = float(np.finfo(dtype).max)

    def outcome(losses, grads=None):
        record = StepRecord(step=7, epoch=0, batch_idx=0, micro_batches=1, lrs=[0.1], ids=np.arange(len(losses)),
                            losses=np.asarray(losses, dtype), grads=None if grads is None else np.asarray(grads, dtype))
        try:
            record.validate()
        except FloatingPointError as err:
            return str(err)
        return None

    assert outcome([1.0, 2.0, 3.0]) is None
    assert outcome([big, big, big]) is None and outcome([-big, -big]) is None  # finite values, their sum overflows
    assert "step 7: non-finite per-sample loss for sample ids [1]" in outcome([1.0, float("nan"), 3.0])
    assert "sample ids [0, 1]" in outcome([float("inf"), float("-inf"), 3.0])
    assert "sample ids [2]" in outcome([big, big, float("inf")])
    grads = np.ones((3, 4))
    grads[2, 1] = float("nan")
    assert "non-finite per-sample gradient for sample ids [2]" in outcome([1.0, 2.0, 3.0], grads)


def test_losses_are_recorded_in_their_own_dtype_and_stored_as_float64(tmp_path):
    """The step record keeps the per-sample losses as training computed them (float32 here, no conversion at every
    step); the log stores them as float64, equal to them, and the live TensorBoard counts them at 8 bytes."""
    from lightning_influence.tensorboard import LiveTensorBoard

    records = []
    add_step = LogWriter.add_step

    def spy(self, record, checkpoint=None):
        records.append(record)
        return add_step(self, record, checkpoint)

    module = tiny().float()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LogWriter, "add_step", spy)
        fit(module, loader(make_data(dtype=torch.float32)), InfluenceTracker(str(tmp_path / "log")))
    assert records and all(r.losses.dtype == np.float32 for r in records)
    with InfluenceLog(tmp_path / "log") as log:
        stored = list(log.iter_steps(fields=("loss",)))
    assert len(stored) == len(records)
    for rec, out in zip(records, stored):
        assert out.losses.dtype == np.float64
        np.testing.assert_array_equal(out.losses, rec.losses.astype(np.float64))

    class Experiment:
        def add_scalar(self, tag, value, step):
            self.bytes = value if tag.endswith("bytes_recorded") else getattr(self, "bytes", None)

    live = LiveTensorBoard(Experiment(), every=1)
    live.on_step(0, records[0], 0)
    assert live.experiment.bytes == records[0].ids.nbytes + 8 * len(records[0].losses)
