"""``info`` on a ``16-mixed`` run whose GradScaler skipped steps: which steps, and which samples' losses were not finite.

A sample with a NaN loss makes the GradScaler skip every step it is in; the log kept those steps (skipped, their
losses as they were), and every estimator and replay leave-one-out keep them skipped, so the sample scored 0: nothing
said why. ``info`` now names the skipped steps and the ids with non-finite losses there (``step_summary``).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins import MixedPrecision

from lightning_influence import InfluenceLog, InfluenceTracker
from lightning_influence.cli import main
from tests.conftest import TinyClassifier, fit, loader, make_data

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
BAD = 13


class NaNFor13(TinyClassifier):
    def per_sample_loss(self, batch):
        loss = F.cross_entropy(self(batch[0]), batch[1], reduction="none")
        return loss * torch.where(batch[2] == BAD, torch.nan, 1.0)


def test_info_names_the_skipped_steps_and_the_samples_whose_losses_were_not_finite(tmp_path, capsys):
    data = loader(make_data(24, dtype=torch.float32))
    torch.manual_seed(0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)  # small: only the NaN makes a gradient non-finite
    fit(NaNFor13().float(), data, InfluenceTracker(str(tmp_path / "log"), checkpoint_every_n_steps=2), epochs=2,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
    log = InfluenceLog(tmp_path / "log")
    with_bad = [t for t in range(log.num_steps) if BAD in log.batch_ids(t).tolist()]
    assert len(with_bad) == 2 and [t for t in range(log.num_steps) if log.skipped(t)] == with_bad

    assert main(["info", str(tmp_path / "log"), "-f", "json"]) == 0
    step = json.loads(capsys.readouterr().out)["step"]
    assert step["skipped_steps"] == with_bad and step["non_finite_loss_ids"] == [BAD]
    assert main(["info", str(tmp_path / "log")]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("step "))
    assert (f"GradScaler skipped steps {with_bad[0]}, {with_bad[1]}; non-finite losses there for ids [{BAD}]"
            in line), line
