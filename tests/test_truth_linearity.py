"""``evaluate`` measures how linear the ground truth is in the removal, against independent retraining.

A GroupNorm CNN trained 160 steps with Nesterov SGD at lr 0.05: leave-one-out there is far from linear in the removed sample's
weight (half a removal, doubled, is not a whole one), so DIT, TracIn and Diff-In (first order) cannot follow it, and
``evaluate`` said only "no method agrees" (a vision run of the twelfth session: DIT Spearman 0.29 against replay
leave-one-out over a whole run, 0.87 on its last epoch in-window). The reference is a plain torch loop in float64.
"""

from __future__ import annotations

import json

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset

from _tinylog import epoch_batches, train_and_log
from lightning_influence.cli import main
from lightning_influence.evaluation.metrics import pearson, spearman
from lightning_influence.evaluation.verdict import truth_linearity, verdict

N, BATCH, SAMPLES = 256, 32, [3, 10, 50, 100, 150, 200]


class GNNet(pl.LightningModule):
    """A small GroupNorm CNN on 8x8 digits, in float64."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
                                 nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 10)).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def per_sample_loss(self, batch):
        return F.cross_entropy(self(batch[0]), batch[1], reduction="none")


def _data():
    d = load_digits()
    x = torch.tensor(d.images[:400] / 16.0, dtype=torch.float64)[:, None]
    y = torch.tensor(d.target[:400])
    return TensorDataset(x[:N], y[:N]), (x[N:], y[N:])


def build():
    """The CLI's --builder: the model, the training set by id and the validation batch."""
    train, val = _data()
    return {"module": GNNet(), "train_data": train, "val_data": val}


def _sgd(model: nn.Module, lr: float) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-4)


def _val_loss(batches, lr: float, sample: int = -1, weight: float = 1.0) -> float:
    """Plain torch: the final validation loss with ``sample``'s loss weighted by ``weight`` at every step."""
    train, (xv, yv) = _data()
    model = GNNet()
    opt = _sgd(model, lr)
    for ids in batches:
        x, y = train[torch.as_tensor(ids)]
        w = torch.where(torch.as_tensor(ids) == sample, torch.tensor(weight, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
        opt.zero_grad()
        (F.cross_entropy(model(x), y, reduction="none") * w).mean().backward()
        opt.step()
    with torch.no_grad():
        return F.cross_entropy(model(xv), yv).item()


def _run(root, epochs: int, lr: float):
    """The log of ``epochs`` epochs, and the independent truths: whole removals and half removals (doubled)."""
    batches, epoch_of = epoch_batches(N, BATCH, epochs)
    model = GNNet()
    train, _ = _data()
    train_and_log(str(root), model, lambda m, b: m.per_sample_loss(b), train, batches, [lr] * len(batches), _sgd(model, lr),
                  checkpoint_every=40, record_gradients=True, projection_dim=8, epochs=epoch_of, dataset_size=N)
    f0 = _val_loss(batches, lr)
    full = np.array([_val_loss(batches, lr, j, 0.0) - f0 for j in SAMPLES])
    half = np.array([_val_loss(batches, lr, j, 0.5) - f0 for j in SAMPLES])
    return str(root), full, half


def _evaluate(log: str, capsys) -> dict:
    code = main(["evaluate", log, "--builder", f"{__file__}:build", "-m", "tracin", "--samples",
                 ",".join(map(str, SAMPLES)), "-q", "-f", "json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


@pytest.mark.slow
def test_evaluate_measures_a_nonlinear_truth(tmp_path, capsys):
    log, full, half = _run(tmp_path / "log", epochs=20, lr=0.05)
    assert pearson(2 * half, full) < 0.6  # the premise, from the independent retraining
    result = _evaluate(log, capsys)
    np.testing.assert_allclose([s["truth"] for s in result["samples"]], full, rtol=1e-6, atol=1e-12)
    lin = result["truth_linearity"]
    assert lin["pearson"] == pytest.approx(pearson(2 * half, full), abs=1e-6)
    assert lin["spearman"] == pytest.approx(spearman(2 * half, full), abs=1e-9)
    assert result["verdict"].startswith("leave-one-out is not linear in the removal on this window")


def test_evaluate_measures_a_linear_truth(tmp_path, capsys):
    """One epoch at lr 0.01: the truth is linear in the removal (at lr 0.05 already 0.86), the verdict judges the
    methods."""
    log, full, half = _run(tmp_path / "log", epochs=1, lr=0.01)
    result = _evaluate(log, capsys)
    lin = result["truth_linearity"]
    assert lin["pearson"] == pytest.approx(pearson(2 * half, full), abs=1e-6) and lin["pearson"] > 0.99
    assert "not linear" not in result["verdict"]


def test_linearity_in_the_verdict_on_hand_made_numbers():
    full = np.array([1.0, -2.0, 3.0, 0.5])
    assert truth_linearity(full, full / 2) == {"pearson": pytest.approx(1.0), "spearman": pytest.approx(1.0)}
    assert np.isnan(truth_linearity(full[:2], full[:2])["pearson"])
    metrics = {"dit": {"spearman": 0.1}}
    flat = {"pearson": 0.2, "spearman": 0.1}
    assert verdict(metrics, full, 0.0, flat).startswith("leave-one-out is not linear in the removal on this window "
                                                       "(half a removal, doubled, against a whole one: Pearson 0.20)")
    assert verdict(metrics, full, 0.0, flat).endswith("judge them on a shorter window with --in-window")
    assert verdict(metrics, full, 0.0, flat, in_window=True).endswith("judge them on a shorter window")  # already is
    assert verdict(metrics, full, 0.0, {"pearson": 0.95, "spearman": 0.9}).startswith("no method agrees")
    assert verdict({"dit": {"spearman": 0.9}}, full, 0.0, None).startswith("dit agrees best")
