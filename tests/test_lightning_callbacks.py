"""The tracker beside Lightning's own callbacks that change training: weight averaging, fine-tuning, accumulation
schedules.

θ_T with the weight-averaging callbacks (tracker_final.py):
``StochasticWeightAveraging`` and ``WeightAveraging`` (EMA) copy their average into the module when training ends,
before the tracker's ``on_train_end`` when listed before it. The log's θ_T must be the last optimizer step's result
(what a callback that saw every step recorded), so that replay reproduces it bit for bit; before, θ_T was the average
and every estimator's replay stopped at the last segment, blaming data or round-off.
"""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import (BackboneFinetuning, GradientAccumulationScheduler, StochasticWeightAveraging,
                                         WeightAveraging)
from torch.optim.swa_utils import get_ema_multi_avg_fn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import InfluenceLog, InfluenceTracker, WithIds
from lightning_influence.log.format import read_meta
from lightning_influence.replay import replay
from lightning_influence.step.optimizers import UnsupportedOptimizerError
from conftest import TinyClassifier, fit, loader, make_data, tiny

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class Net(TinyClassifier):
    def __init__(self) -> None:
        super().__init__(d_in=6, hidden=8, momentum=0.9)

    def validation_step(self, batch, batch_idx):  # EMA swaps its average in for validation, and back after it
        self.log("val_loss", self.per_sample_loss(batch).mean())


class LastStep(pl.Callback):
    """The parameters right after every optimizer step (the trajectory's), the last one kept."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.params = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


def _data() -> WithIds:
    return WithIds(make_data(40, d_in=6, dtype=torch.float32))


def _fit(log_dir, averaging: pl.Callback | None):
    pl.seed_everything(0)
    last = LastStep()
    callbacks = ([averaging] if averaging is not None else []) + [InfluenceTracker(str(log_dir), checkpoint_every_n_steps=3), last]
    trainer = pl.Trainer(max_epochs=4, accelerator="cpu", val_check_interval=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    module = Net()
    val = DataLoader(TensorDataset(torch.randn(8, 6), torch.randint(0, 3, (8,))), batch_size=8)
    trainer.fit(module, DataLoader(_data(), batch_size=8, shuffle=True), val)
    return module, last.params


@pytest.mark.parametrize("averaging", ["swa", "ema", None])
def test_theta_T_is_the_last_steps_and_replays_exactly(tmp_path, averaging):
    cb = {"swa": lambda: StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=2),
          "ema": lambda: WeightAveraging(multi_avg_fn=get_ema_multi_avg_fn(0.9)), None: lambda: None}[averaging]()
    module, last = _fit(tmp_path / "log", cb)
    log = InfluenceLog(tmp_path / "log")
    stored = log.checkpoint(log.num_steps)
    for name, p in last.items():
        np.testing.assert_array_equal(stored[name], p.numpy())
    moved = max(float((p - last[n]).abs().max()) for n, p in module.named_parameters())
    meta = read_meta(tmp_path / "log")
    if averaging is None:
        assert moved == 0 and "final_weights_replaced_by" not in meta
    else:
        assert moved > 1e-3  # the module ends with the average, which no step produced
        assert meta["final_weights_replaced_by"] == [type(cb).__name__]
    steps = [rs.step for rs in replay(log, Net(), _data(), 0, None, tolerance=0.0)]
    assert steps[-1] == log.num_steps == 20


class Backbone(Net):
    """``backbone`` and ``head``, as BackboneFinetuning expects; the optimizer takes the trainable parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone, self.head = self.net[:3], self.net[3]

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


def test_a_finetuning_callback_is_refused_before_the_first_step(tmp_path):
    """BackboneFinetuning unfreezes the backbone epochs into the fit as a new param group: refused at the fit's start
    (it stopped the fit at the unfreezing step, epochs in), with no step trained or written."""
    seen = LastStep()
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[BackboneFinetuning(unfreeze_backbone_at_epoch=1),
                                    InfluenceTracker(str(tmp_path / "log")), seen])
    with pytest.raises(UnsupportedOptimizerError, match="BackboneFinetuning"):
        trainer.fit(Backbone(), DataLoader(_data(), batch_size=8))
    assert not hasattr(seen, "params") and trainer.global_step == 0
    assert not (tmp_path / "log" / "meta.h5").exists()


def test_an_accumulation_schedule_replays_exactly(tmp_path):
    """GradientAccumulationScheduler changes accumulate_grad_batches between epochs: each step's accumulation is
    recorded, replay reproduces the run bit for bit."""
    pl.seed_everything(0)
    trainer = pl.Trainer(max_epochs=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[GradientAccumulationScheduler({0: 1, 2: 2}),
                                    InfluenceTracker(str(tmp_path / "log"), checkpoint_every_n_steps=2)])
    trainer.fit(Net(), DataLoader(_data(), batch_size=8, shuffle=True))
    log = InfluenceLog(tmp_path / "log")
    assert log.num_steps == 5 + 5 + 3 + 3  # 5 batches an epoch, in pairs from epoch 2 (the odd one alone)
    assert [rs.step for rs in replay(log, Net(), _data(), 0, None, tolerance=0.0)][-1] == log.num_steps


def test_a_stop_iteration_inside_the_tracker_fails_the_fit_instead_of_ending_the_epoch(log_dir, monkeypatch):
    """Lightning ends an epoch silently on a StopIteration raised in a training-loop hook (what its data fetcher
    raises at the end of the data): one escaping the tracker (found: a dataclass batch's first-step self-check)
    would drop the rest of the epoch and mix the half-recorded step into the next epoch's first."""
    real = InfluenceTracker._records_grads

    def broken(self, step):
        if step == 2:
            raise StopIteration("from inside the tracker")
        return real(self, step)

    monkeypatch.setattr(InfluenceTracker, "_records_grads", broken)
    with pytest.raises(RuntimeError, match=r"on_train_batch_start: a StopIteration was raised inside it .* Lightning "
                                           r"would have ended the epoch silently"):
        fit(tiny(), loader(make_data()), InfluenceTracker(log_dir, record_gradients=True), epochs=1)
