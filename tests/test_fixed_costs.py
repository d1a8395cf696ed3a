"""The tracker's per-step bookkeeping made cheaper keeps its answers and its refusals (issue 13, fixed costs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_influence.data import check_ids
from lightning_influence.log import StepRecord
from lightning_influence.step import rng
from lightning_influence.step.recorder import StepRecorder


def test_check_ids_refusals_name_the_ids():
    check_ids(torch.tensor([3, 0, 7]), dataset_size=8)
    check_ids(torch.tensor([], dtype=torch.int64), dataset_size=8)
    with pytest.raises(ValueError, match=r"sample ids \[2\] appear more than once in one batch"):
        check_ids(torch.tensor([2, 5, 2]))
    with pytest.raises(ValueError, match=r"sample ids must be non-negative, got -4\. Give each sample"):
        check_ids(torch.tensor([1, -4, -1]))
    with pytest.raises(ValueError, match=r"sample ids \[9, 12\] are not indices into the training set, which has 9 "):
        check_ids(torch.tensor([9, 1, 12]), dataset_size=9)
    check_ids(np.array([5, 0, 3]), dataset_size=6)  # a step's host ids, as the tracker checks them
    with pytest.raises(ValueError, match=r"sample ids \[12, 9\] are not indices"):  # in the batch's order
        check_ids(np.array([12, 1, 9]), dataset_size=9)


def _record(**kw):
    return StepRecord(step=5, epoch=0, batch_idx=0, micro_batches=1, lrs=[0.1], ids=np.array([4, 7, 9]), **kw)


def test_validate_names_the_non_finite_rows_and_lets_a_skipped_steps_losses_overflow():
    _record(losses=np.ones(3), grads=np.ones((3, 2))).validate()
    with pytest.raises(FloatingPointError, match=r"step 5: non-finite per-sample loss for sample ids \[7\]"):
        _record(losses=np.array([1.0, np.inf, 2.0])).validate()
    with pytest.raises(FloatingPointError, match=r"step 5: non-finite per-sample gradient for sample ids \[4, 9\]"):
        _record(grads=np.array([[np.nan, 0], [0, 0], [0, -np.inf]])).validate()
    _record(losses=np.array([1.0, np.inf, 2.0]), skipped=True).validate()  # GradScaler skips the step
    with pytest.raises(FloatingPointError, match=r"non-finite per-sample gradient for sample ids \[7\]"):
        _record(losses=np.array([1.0, np.inf, 2.0]), grads=np.array([[0.0], [np.nan], [0.0]]), skipped=True).validate()
    with pytest.raises(FloatingPointError, match=r"step 5: non-finite learning rate \[0.1, inf\]"):
        StepRecord(step=5, epoch=0, batch_idx=0, micro_batches=1, lrs=[0.1, float("inf")], ids=np.arange(2)).validate()


@pytest.mark.parametrize("take", [rng.capture, rng.started])
def test_drawn_keeps_the_cpu_state_only_when_the_forward_drew(take):
    assert rng.drawn(take()) is rng.NONE or not rng.drawn(take()).drew
    before, at_start = take(), torch.get_rng_state()
    expected = torch.rand(3)
    state = rng.drawn(before)
    assert isinstance(state.cpu, np.ndarray) and state.cuda.shape == (0, rng.CUDA_STATE_BYTES)
    np.testing.assert_array_equal(state.cpu, at_start.numpy())
    with rng.restored(state):
        assert torch.equal(torch.rand(3), expected)


def test_step_weights_follow_the_micro_batch_sizes_step_by_step():
    recorder = StepRecorder()
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    seen = []
    for sizes, accumulate in (([4], 1), ([4], 1), ([3], 1), ([4, 2], 2), ([4], 1)):
        record = StepRecord(step=len(seen), epoch=0, batch_idx=0, micro_batches=len(sizes), lrs=[0.1], ids=np.arange(sum(sizes)))
        recorder.record(record, sizes, [accumulate] * len(sizes), 1, optimizer)
        seen.append(record.weights)
        assert record.accumulate == accumulate and not record.weights.flags.writeable
    np.testing.assert_array_equal(seen[0], np.full(4, 0.25))
    np.testing.assert_array_equal(seen[2], np.full(3, 1 / 3))
    np.testing.assert_array_equal(seen[3], np.r_[np.full(4, 1 / 8), np.full(2, 1 / 4)])
    np.testing.assert_array_equal(seen[4], np.full(4, 0.25))
