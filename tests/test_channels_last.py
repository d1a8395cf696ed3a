"""A ``channels_last`` model replays bit for bit: the checkpoints' parameters are loaded in the memory format of the
module's own (``replay.checkpoint_params``). Loaded contiguous, the convolutions ran other kernels than training's and
replay drifted from the log (2.4e-7 of a segment's movement in float32, 1.8e-5 under bf16 autocast, on an 8x8 CNN)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_influence import InfluenceLog, InfluenceTracker, WithIds
from lightning_influence.replay import replay
from tests.conftest import TinyClassifier, fit, loader

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class Conv(TinyClassifier):
    """An 8x8 one-channel image CNN in channels_last (its first weight, one input channel, has strides that are both
    contiguous and channels_last: the format is in the strides, not in ``is_contiguous()``)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.Tanh(), nn.Conv2d(4, 4, 3, stride=2),
                                 nn.Tanh(), nn.Flatten(), nn.Linear(36, 3)).to(memory_format=torch.channels_last)

    def per_sample_loss(self, batch):
        return F.cross_entropy(self(batch[0]), batch[1], reduction="none")


def test_a_channels_last_cnn_replays_bit_for_bit(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(24, 1, 8, 8, generator=g), torch.randint(0, 3, (24,), generator=g))
    torch.manual_seed(0)
    fit(Conv(), loader(data), InfluenceTracker(str(tmp_path / "log"), checkpoint_every_n_steps=2), epochs=2)
    log = InfluenceLog(tmp_path / "log")
    torch.manual_seed(0)
    module = Conv()
    assert module.net[0].weight.stride() == (9, 1, 3, 1) and module.net[3].weight.stride() == (36, 1, 12, 4)
    final = None
    for point in replay(log, module, WithIds(data), tolerance=0.0):  # tolerance 0: any drift at a checkpoint raises
        final = point
    for name, value in log.checkpoint(log.checkpoint_steps[-1]).items():
        np.testing.assert_array_equal(final.params[name].detach().numpy(), value)
