"""Subclasses of the engines' layer types that keep their base's forward are hooked (``layers._engine_of``); one with a
forward (or a convolution's ``_conv_forward``) of its own goes to vmap; rows equal projected float64 brute force."""

import torch
import torch.nn.functional as F
from torch import nn

from lightning_influence.capture import HookGradientCapture, per_sample_grads, select_params
from lightning_influence.capture.layers import AttentionEngine, LinearEngine, engine_for

from test_per_sample import B, brute_force, projector_for


def loss_fn(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


class Dense(nn.Linear):
    """A user's Linear with another constructor (no forward of its own)."""

    def __init__(self, d_in, d_out):
        super().__init__(d_in, d_out, bias=True)
        nn.init.zeros_(self.bias)


class Scaled(nn.Linear):
    """A Linear with a forward of its own: vmap."""

    def forward(self, x):
        return 2 * super().forward(x)


class SameConv(nn.Conv2d):
    """A convolution whose ``_conv_forward`` pads asymmetrically: vmap."""

    def _conv_forward(self, x, weight, bias):
        return F.conv2d(F.pad(x, (0, 1, 0, 1)), weight, bias, self.stride, 0, self.dilation, self.groups)


class Norm(nn.LayerNorm):
    pass


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = SameConv(2, 3, 2)
        self.plain = nn.modules.linear.NonDynamicallyQuantizableLinear(3 * 4 * 4, 8)
        self.norm = Norm(8)
        self.dense = Dense(8, 5)
        self.scaled = Scaled(5, 3)

    def forward(self, x):
        h = torch.tanh(self.plain(torch.tanh(self.conv(x)).flatten(1)))
        return self.scaled(torch.tanh(self.dense(self.norm(h))))


def test_subclasses_keeping_the_forward_are_hooked_and_exact():
    torch.manual_seed(0)
    model = Net().double()
    gen = torch.Generator().manual_seed(1)
    batch = torch.randn(B, 2, 4, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (B,), generator=gen)
    names = select_params(model)
    unsupported = HookGradientCapture.unsupported(model, names)
    assert unsupported == ["conv.weight", "conv.bias", "scaled.weight", "scaled.bias"]
    assert type(engine_for(model.dense)) is LinearEngine and engine_for(model.scaled) is None

    class Attention(nn.MultiheadAttention):  # placed by its exact type: not taken as a subclass
        pass

    assert engine_for(Attention(4, 2)) is None and type(engine_for(nn.MultiheadAttention(4, 2))) is AttentionEngine
    proj = projector_for(model, names, 8)
    capture = HookGradientCapture(model, [n for n in names if n not in unsupported], proj)
    grads, _ = per_sample_grads(model, loss_fn, batch, names, proj, capture)
    torch.testing.assert_close(grads, proj.project(brute_force(model, loss_fn, batch, names)), rtol=1e-10, atol=1e-12)
    assert capture.verify(model, loss_fn, batch) == []
