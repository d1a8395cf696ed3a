"""``nn.RNNCell``, ``nn.GRUCell`` and ``nn.LSTMCell`` on hooks (``capture/rnn_cells.py``) in a custom recurrent loop (one call a time
step, the first without a hidden state), against projected float64 brute force; a tracked fit with HVP products
(own passes at substituted parameters) bit-identical to one without the tracker."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_influence import InfluenceLog, InfluenceTracker
from lightning_influence.capture import HookGradientCapture, select_params

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


class _FusedCell(torch.autograd.Function):
    """An LSTM cell made by one autograd node, as CUDA's fused cell: ``h'`` is not computed from the ``c'`` tensor, so
    the gradient arriving at ``c'`` is the loss's alone."""

    @staticmethod
    def forward(ctx, x, h, c, *weights):
        ctx.save_for_backward(x, h, c, *weights)
        return _COMPOSITE(x, (h, c), *weights)

    @staticmethod
    def backward(ctx, g_h, g_c):
        saved = ctx.saved_tensors
        leaves = [None if t is None else t.detach().requires_grad_() for t in saved]
        with torch.enable_grad():
            out = _COMPOSITE(leaves[0], (leaves[1], leaves[2]), *leaves[3:])
            grads = iter(torch.autograd.grad(out, [t for t in leaves if t is not None], (g_h, g_c)))
        return tuple(None if t is None else next(grads) for t in leaves)


_COMPOSITE = torch._VF.lstm_cell


class _FusedVF:
    """``torch._VF`` as ``nn.LSTMCell.forward`` sees it, its ``lstm_cell`` one node."""

    def __getattr__(self, name):
        return getattr(torch._VF, name)

    @staticmethod
    def lstm_cell(x, hx, *weights):
        return _FusedCell.apply(x, hx[0], hx[1], *weights)


@pytest.mark.parametrize("use", ["both", "c"])
def test_a_fused_lstm_cell_matches_brute_force(monkeypatch, use):
    """The cell as CUDA makes it (one node for ``h'`` and ``c'``: the engine must not take ``h'`` from ``c'`` apart,
    as it does for the CPU's composite cell, whose ``c'`` gradient includes ``h'``'s share)."""
    import torch.nn.modules.rnn as rnn

    from lightning_influence.capture.rnn_cells import _made_from

    monkeypatch.setattr(rnn, "_VF", _FusedVF())
    torch.manual_seed(0)
    model = Loop("tanh", use).double()
    h, c = model.lstm(torch.randn(2, 5, dtype=torch.float64))
    assert not _made_from(h, c)
    gen = torch.Generator().manual_seed(1)
    batch = torch.randn(B, 4, 3, generator=gen, dtype=torch.float64), torch.randint(0, 3, (B,), generator=gen)
    assert_hooks_match_brute_force(model, loss_fn, batch, 8)


class SpectralLoop(nn.Module):
    """A GRU cell and an LSTM cell whose ``weight_ih`` is spectral-normed (``parametrize``: a power iteration at each
    read in train mode), a Linear head."""

    def __init__(self):
        super().__init__()
        from torch.nn.utils.parametrizations import spectral_norm

        self.gru = spectral_norm(nn.GRUCell(3, 4), "weight_ih")
        self.lstm = spectral_norm(nn.LSTMCell(4, 3), "weight_ih")
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        h = state = None
        for t in range(x.shape[1]):
            h = self.gru(x[:, t], h)
            state = self.lstm(h, state)
        return self.head(state[0])


def _spectral():
    torch.manual_seed(0)
    return SpectralLoop().double()


def test_parametrized_cells_stay_on_vmap_and_training_is_bit_identical(tmp_path):
    """A cell engine reads the weights at each call: on a parametrized cell that read makes the weight again, and a
    spectral norm's power iteration then ran once more a call than without the tracker (training changed). A cell with
    parametrized tensors has no engine: all its parameters go to vmap."""
    model = _spectral()
    names = select_params(model)
    assert HookGradientCapture.unsupported(model, names) == [n for n in names if not n.startswith("head.")]
    plain, _ = fit_net(_spectral, (4, 3), steps=3)
    tracker = InfluenceTracker(str(tmp_path / "log"), record_gradients=True, projection_dim=16)
    tracked, _ = fit_net(_spectral, (4, 3), tracker, steps=3)
    for (n, a), (_, b) in zip([*plain.named_parameters(), *plain.named_buffers()],
                              [*tracked.named_parameters(), *tracked.named_buffers()]):
        assert torch.equal(a, b), n
