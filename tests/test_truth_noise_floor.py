"""``evaluate``'s noise floor covers training's amplification of round-off, measured against independent retraining.

A GroupNorm CNN trained 160 steps in float32 with Nesterov SGD at lr 0.2: changing one sample's weight by 4 ulps moves
the final validation loss by 1e-3 to 5e-2 (a plain torch loop), while the floor computed from the replay drift alone
was about 1e-6, so ``evaluate`` called leave-one-out values of that size meaningful (the vision run of the twelfth
session: 3.3e-6 stated, 3e-4 measured).
"""

from __future__ import annotations

import json

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from _tinylog import epoch_batches, train_and_log
from test_truth_linearity import GNNet, _data
from lightning_influence import InfluenceTracker, WithIds
from lightning_influence.cli import main

N, BATCH, EPOCHS, LR, PROBES = 256, 32, 20, 0.2, [3, 10, 50, 100]
DELTA = 4 * float(np.finfo(np.float32).eps)


def build():
    """The CLI's --builder: the float32 model, the training set by id and the validation batch."""
    train, (xv, yv) = _data()
    x, y = train.tensors
    return {"module": GNNet().float(), "train_data": torch.utils.data.TensorDataset(x.float(), y), "val_data": (xv.float(), yv)}


def _sgd(model: nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, nesterov=True, weight_decay=1e-4)


def _val_loss(batches, sample: int = -1, weight: float = 1.0) -> float:
    """Plain torch in float32: the final validation loss with ``sample``'s loss weighted by ``weight``."""
    data = build()
    model, train, (xv, yv) = data["module"], data["train_data"], data["val_data"]
    opt = _sgd(model)
    for ids in batches:
        x, y = train[torch.as_tensor(ids)]
        w = torch.where(torch.as_tensor(ids) == sample, torch.tensor(weight), torch.tensor(1.0))
        opt.zero_grad()
        (F.cross_entropy(model(x), y, reduction="none") * w).mean().backward()
        opt.step()
    with torch.no_grad():
        return F.cross_entropy(model(xv), yv).item()


def test_floor_covers_the_truths_response_to_round_off(tmp_path, capsys):
    batches, epoch_of = epoch_batches(N, BATCH, EPOCHS)
    f0 = _val_loss(batches)
    response = max(abs(_val_loss(batches, j, 1 - DELTA) - f0) for j in PROBES)
    assert response > 1e-4  # the premise: 4 ulps of one weight move the loss far beyond the drift's floor
    data = build()
    train_and_log(str(tmp_path / "log"), data["module"], lambda m, b: m.per_sample_loss(b), data["train_data"], batches,
                  [LR] * len(batches), _sgd(data["module"]), checkpoint_every=4, record_gradients=True,
                  projection_dim=8, epochs=epoch_of, dataset_size=N, storage_dtype="float32")
    code = main(["evaluate", str(tmp_path / "log"), "--builder", f"{__file__}:build", "-m", "tracin", "--samples",
                 ",".join(map(str, PROBES)), "-q", "-f", "json", "--no-linearity"])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    drift_only = result["truth_noise_floor_drift"]
    assert drift_only < 1e-5  # what the floor was: the replay drift (0) and float32 round-off over 160 steps
    # the replayed copies round otherwise than the plain loop (batched kernels): the same order of magnitude
    assert result["truth_noise_floor"] > 0.05 * response and result["truth_noise_floor"] > 100 * drift_only
    truth = np.array([s["truth"] for s in result["samples"]])
    assert result["truth_above_floor"] == int(np.count_nonzero(np.abs(truth) > result["truth_noise_floor"]))


class Net(pl.LightningModule):
    """The float32 GroupNorm CNN as a LightningModule, for a bf16-mixed fit."""

    def __init__(self) -> None:
        super().__init__()
        self.net = GNNet().net.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def per_sample_loss(self, batch):
        return F.cross_entropy(self(batch[0]), batch[1], reduction="none")

    def training_step(self, batch, batch_idx):
        return self.per_sample_loss(batch).mean()

    def configure_optimizers(self):
        return _sgd(self)


def build_bf16():
    """The --builder of the bf16-mixed run."""
    return {**build(), "module": Net()}


def test_bf16_mixed_run_is_probed_at_bf16_rounding(tmp_path, capsys):
    """Under bf16 autocast a weight changed by 4 float32 ulps is rounded away in the bf16 products: the truth's
    response was exactly 0 and said nothing. The probe's change is 4 ulps of bfloat16 there."""
    data = build()
    trainer = pl.Trainer(max_epochs=2, precision="bf16-mixed", accelerator="cpu", logger=False, deterministic=True,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[InfluenceTracker(str(tmp_path / "log"), checkpoint_every_n_steps=4)])
    trainer.fit(Net(), DataLoader(WithIds(data["train_data"]), batch_size=BATCH, shuffle=True))
    code = main(["evaluate", str(tmp_path / "log"), "--builder", f"{__file__}:build_bf16", "-m", "dit", "--samples",
                 "3,10,50", "-q", "-f", "json", "--no-linearity"])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    assert result["truth_roundoff_weight_change"] == 4 * torch.finfo(torch.bfloat16).eps
    assert result["truth_roundoff_response"] > 0
