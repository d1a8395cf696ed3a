"""storage_dtype='float16' measures what it rounds away (log/half.py): a warning during training when significant, and
``info``'s bound, checked against the rows before the cast (a 30-epoch run had 15 % of its entries below float16's
normal range and rows off by up to 1.2e-3, silently)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_influence.cli import main
from lightning_influence.log import InfluenceLog
from lightning_influence.log.half import HALF_TINY
from tests._tinylog import epoch_batches, train_and_log


class _Centre(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(16, dtype=torch.float64))


def _run(path, scale: float):
    """Per-sample gradients ``θ − x_z`` of size ``scale`` (SGD at lr 0: they stay the data's)."""
    x = scale * torch.randn(8, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    batches, epochs = epoch_batches(8, 4, 2)
    m = _Centre()
    train_and_log(str(path), m, lambda m, b: 0.5 * ((m.theta - b[0]) ** 2).sum(1), TensorDataset(x), batches,
                  [0.0] * len(batches), torch.optim.SGD(m.parameters(), lr=0.0), checkpoint_every=None, epochs=epochs,
                  storage_dtype="float16")
    return x.numpy()


def test_float16_storage_warns_once_and_info_bounds_the_rounding(tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _run(tmp_path / "normal", 1.0)  # entries of order 1: float16's relative 2^-11, nothing to say
    with pytest.warns(RuntimeWarning, match=r"float16 rows: .*% of the entries below float16's normal range") as got:
        x = _run(tmp_path / "small", 1e-5)
    assert sum("float16 rows" in str(w.message) for w in got) == 1  # once

    assert main(["info", str(tmp_path / "small"), "-f", "json"]) == 0
    report = json.loads(capsys.readouterr().out)["float16_rounding"]
    log = InfluenceLog(tmp_path / "small")
    worst = 0.0
    for rec in log.iter_steps(0, log.num_steps, fields=("grad",)):
        true = -x[rec.ids]  # ∇ of ½‖θ − x‖² at θ = 0
        err = np.linalg.norm(np.asarray(rec.grads, dtype=np.float64) - true, axis=1) / np.linalg.norm(true, axis=1)
        worst = max(worst, float(err.max()))
    assert worst > 1e-3  # the rounding is significant here (float16's normal rows: at most 4.9e-4)
    assert worst <= report["row_relative_error_bound"] <= 10 * worst  # a bound, and not a loose one
    below = np.mean(np.abs(x) < HALF_TINY)
    assert report["below_normal_fraction"] == pytest.approx(below, abs=0.02)
