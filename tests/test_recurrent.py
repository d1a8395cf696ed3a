"""``nn.RNN``, ``nn.GRU``, ``nn.LSTM`` on hooks (``capture/recurrent.py``): several layers, bidirectional, batch first or
not, an initial state or none, padded or packed sequences, the output sequence and/or the final states reaching the loss;
projected rows against projected float64 brute force, beside other engines; a tracked fit bit-identical to one without
the tracker."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from lightning_influence import InfluenceLog, InfluenceTracker
from lightning_influence.capture import HookGradientCapture, select_params

from test_layers_decoder import fit_net
from test_per_sample import B, assert_hooks_match_brute_force

T = 5


def lengths_of(x):
    """Each sample's length, 1 to ``T``, from its own first value (a sample sliced from the batch keeps it)."""
    return 1 + (x[:, 0, 0].abs() * 10).long() % T


class Net(nn.Module):
    """An embedding-free recurrent classifier over ``(B, T, 3)``: ``kind`` (``RNN``, ``GRU``, ``LSTM``) with
    ``layers`` layers; ``use``: which outputs reach the head (``seq``: the output at every step, averaged; ``state``:
    ``h_n`` (and ``c_n``); ``both``)."""

    def __init__(self, kind="LSTM", layers=2, bidirectional=True, batch_first=True, use="both", packed=False,
                 initial=False, **kw):
        super().__init__()
        self.rnn = getattr(nn, kind)(3, 4, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first, **kw)
        dirs = 2 if bidirectional else 1
        self.lstm, self.use, self.packed, self.batch_first = kind == "LSTM", use, packed, batch_first
        out = kw.get("proj_size") or 4  # the state's width (the cell's is 4)
        self.widths = (out, 4) if kind == "LSTM" else (out,)
        self.h0 = nn.Linear(3, layers * dirs * sum(self.widths)) if initial else None
        width = (dirs * out if use != "state" else 0) + (out + (4 if kind == "LSTM" else 0) if use != "seq" else 0)
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        hx = None
        if self.h0 is not None:  # an initial state made from the first step (a gradient path into h0 too)
            h = torch.tanh(self.h0(x[:, 0])).reshape(x.shape[0], -1, sum(self.widths)).transpose(0, 1)
            hx = tuple(t.contiguous() for t in h.split(self.widths, -1))
            hx = hx if self.lstm else hx[0]
        inp = x if self.batch_first else x.transpose(0, 1)
        if self.packed:
            inp = pack_padded_sequence(inp, lengths_of(x), batch_first=self.batch_first, enforce_sorted=False)
        out, state = self.rnn(inp, hx)
        if self.packed:
            out = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])[0]
        elif not self.batch_first:
            out = out.transpose(0, 1)
        states = state if self.lstm else (state,)
        features = [] if self.use == "state" else [out.mean(1)]  # the outputs the loss does not see get no gradient
        if self.use != "seq":  # the last layer's (last direction's) final states
            features += [s[-1] for s in states]
        return self.head(torch.cat(features, 1))


def loss_fn(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def _batch():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, 3, generator=gen, dtype=torch.float64)
    assert len(set(lengths_of(x).tolist())) > 2  # packed cases: lengths of several sizes, the longest not first
    return x, torch.randint(0, 3, (B,), generator=gen)


CASES = {
    "lstm-2-bi": dict(kind="LSTM"),
    "gru-2-bi-seq-first": dict(kind="GRU", batch_first=False),
    "rnn-tanh-1": dict(kind="RNN", layers=1, bidirectional=False),
    "rnn-relu-3-no-bias": dict(kind="RNN", layers=3, bidirectional=False, nonlinearity="relu", bias=False),
    "lstm-seq-only": dict(kind="LSTM", use="seq", bidirectional=False),
    "gru-state-only": dict(kind="GRU", use="state"),
    "lstm-packed": dict(kind="LSTM", packed=True),
    "gru-packed-seq-first": dict(kind="GRU", packed=True, batch_first=False, layers=1),
    "lstm-initial-state": dict(kind="LSTM", initial=True, layers=1),
    "gru-initial-state-packed": dict(kind="GRU", initial=True, packed=True),
    "lstm-proj-2-bi-initial-state": dict(kind="LSTM", proj_size=3, initial=True),
    "lstm-proj-packed": dict(kind="LSTM", proj_size=2, packed=True, batch_first=False),
}


@pytest.mark.parametrize("dim", [None, 8])
@pytest.mark.parametrize("case", list(CASES))
def test_recurrent_modules_match_brute_force(case, dim):
    torch.manual_seed(0)
    model = Net(**CASES[case]).double()
    assert_hooks_match_brute_force(model, loss_fn, _batch(), dim)


def test_dropout_between_layers_stays_on_vmap():
    """Dropout between layers (masks the fused kernel keeps to itself): the module's parameters are left to vmap; a
    one-layer module's dropout (never applied) is not."""
    assert HookGradientCapture.unsupported(nn.LSTM(3, 4, num_layers=2, dropout=0.5), ["weight_ih_l0"]) == ["weight_ih_l0"]
    model = nn.GRU(3, 4, dropout=0.5)
    assert HookGradientCapture.unsupported(model, select_params(model)) == []


def _net():
    torch.manual_seed(0)
    return Net("LSTM", packed=True).double()


def test_tracked_training_is_bit_identical(tmp_path):
    plain, _ = fit_net(_net, (T, 3), steps=3)
    tracker = InfluenceTracker(str(tmp_path / "log"), record_gradients=True, record_hvp=True, projection_dim=16)
    tracked, _ = fit_net(_net, (T, 3), tracker, steps=3)
    for (n, a), (_, b) in zip(plain.named_parameters(), tracked.named_parameters()):
        assert torch.equal(a, b), n
    log = InfluenceLog(tmp_path / "log")
    assert log.meta["gradient_engine"] == "hooks" and log.meta["demoted"] == {} and log.num_steps == 3
