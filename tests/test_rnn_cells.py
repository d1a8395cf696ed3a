"""``nn.RNNCell``, ``nn.GRUCell`` and ``nn.LSTMCell`` on hooks (``capture/rnn_cells.py``) in a custom recurrent loop (one call a time
step, the first without a hidden state), against projected float64 brute force; a tracked fit with HVP products
(own passes at substituted parameters) bit-identical to one without the tracker."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_influence import InfluenceLog, InfluenceTracker

from test_layers_decoder import fit_net
from test_per_sample import B, assert_hooks_match_brute_force


class Loop(nn.Module):
    """An RNN cell (``nonlinearity``), a GRU cell and an LSTM cell over the time steps of ``(B, T, 3)``, a head on the
    last states (``use``: the LSTM cell's ``h``, its ``c`` or both)."""

    def __init__(self, nonlinearity="tanh", use="both"):
        super().__init__()
        self.rnn = nn.RNNCell(3, 4, nonlinearity=nonlinearity)
        self.gru = nn.GRUCell(4, 5, bias=nonlinearity == "tanh")
        self.lstm = nn.LSTMCell(5, 3, bias=nonlinearity == "tanh")
        self.head = nn.Linear(5 + 3 * (2 if use == "both" else 1), 3)
        self.use = use

    def forward(self, x):
        h1 = h2 = state = None
        for t in range(x.shape[1]):
            h1 = self.rnn(x[:, t]) if h1 is None else self.rnn(x[:, t], h1)
            h2 = self.gru(h1, hx=h2)
            state = self.lstm(h2) if state is None else self.lstm(h2, state)
        last = [state[0], state[1]] if self.use == "both" else [state[0] if self.use == "h" else state[1]]
        return self.head(torch.cat([h2, *last], 1))


def loss_fn(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


@pytest.mark.parametrize("nonlinearity, use", [("tanh", "both"), ("relu", "h"), ("tanh", "c")])
@pytest.mark.parametrize("dim", [None, 8])
def test_cells_match_brute_force(nonlinearity, use, dim):
    torch.manual_seed(0)
    model = Loop(nonlinearity, use).double()
    gen = torch.Generator().manual_seed(1)
    batch = torch.randn(B, 4, 3, generator=gen, dtype=torch.float64), torch.randint(0, 3, (B,), generator=gen)
    assert_hooks_match_brute_force(model, loss_fn, batch, dim)


def _loop():
    torch.manual_seed(0)
    return Loop().double()


def test_tracked_training_is_bit_identical(tmp_path):
    plain, _ = fit_net(_loop, (4, 3), steps=3)
    tracker = InfluenceTracker(str(tmp_path / "log"), record_gradients=True, record_hvp=True, projection_dim=16)
    tracked, _ = fit_net(_loop, (4, 3), tracker, steps=3)
    for (n, a), (_, b) in zip(plain.named_parameters(), tracked.named_parameters()):
        assert torch.equal(a, b), n
    log = InfluenceLog(tmp_path / "log")
    assert log.meta["gradient_engine"] == "hooks" and log.meta["demoted"] == {} and log.num_steps == 3
