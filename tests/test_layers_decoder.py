"""Hook engines of decoder layers (``nn.ConvTranspose1d/2d/3d``, ``nn.PReLU``) against projected brute-force
autograd (float64, 1e-10), mixed with vmap, and in a tracked fit (bit-identical training, rows equal brute force)."""

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import InfluenceLog, InfluenceTracker, WithIds
from lightning_influence.capture import (HookGradientCapture, KroneckerProjector, per_sample_grads, per_sample_grads_hooks,
                                         select_params)

from conftest import weight_normed_cell
from test_per_sample import B, brute_force, projector_for


def loss_fn(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


class Decoder2d(nn.Module):
    """One transposed convolution on each path: ``t1`` (3 channels in, 2 out: the columns from a 2-channel output
    gradient in channels-last; stride 2, padding, output_padding), ``t2`` (groups, dilation, output_padding at least the
    stride: the column convolution gives one more position, cropped), ``t3`` (a 1x1 kernel, stride 2, no bias, 6 output
    channels: NCHW), PReLU with one weight and with one a channel."""

    def __init__(self):
        super().__init__()
        self.t1 = nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1)
        self.a1 = nn.PReLU()
        self.t2 = nn.ConvTranspose2d(2, 4, 3, stride=1, padding=1, dilation=2, output_padding=1, groups=2)
        self.a2 = nn.PReLU(4)
        self.t3 = nn.ConvTranspose2d(4, 6, 1, stride=2, bias=False)
        self.fc = nn.LazyLinear(3)

    def forward(self, x):
        h = self.a2(self.t2(self.a1(self.t1(x))))
        return self.fc(torch.tanh(self.t3(h)).flatten(1))


class Decoder13(nn.Module):
    """ConvTranspose1d and 3d (stride, padding, groups, dilation), PReLU on ``(B, C, L)`` and on ``(B, C)``."""

    def __init__(self):
        super().__init__()
        self.t1 = nn.ConvTranspose1d(4, 6, 4, stride=2, padding=1, groups=2)
        self.t3 = nn.ConvTranspose3d(2, 3, 2, stride=2, dilation=1, padding=(0, 0, 1))
        self.a1 = nn.PReLU(6)
        self.fc = nn.LazyLinear(5)
        self.a2 = nn.PReLU(5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        h1 = self.a1(self.t1(x)).flatten(1)  # (B, 6, 10)
        h3 = torch.tanh(self.t3(x.reshape(x.shape[0], 2, 2, 1, 5))).flatten(1)
        return self.out(self.a2(self.fc(torch.cat([h1, h3], 1))))


def _case(model_cls, shape):
    torch.manual_seed(0)
    model = model_cls()
    model(torch.zeros(1, *shape))  # materialise the lazy Linear
    model = model.double()
    gen = torch.Generator().manual_seed(1)
    batch = torch.randn(B, *shape, generator=gen, dtype=torch.float64), torch.randint(0, 3, (B,), generator=gen)
    return model, batch, select_params(model)


CASES = {"2d": (Decoder2d, (3, 4, 4)), "1d-3d": (Decoder13, (4, 5))}
# forced splits: each order of the one-group product and the per-group products at small k
SPLITS = {"2d": {"t1.weight": (3, 5), "t2.weight": (1, 6), "t3.weight": (4, 3)},
          "1d-3d": {"t1.weight": (2, 5), "t3.weight": (2, 6)}}


@pytest.mark.parametrize("dim,forced", [(None, False), (8, False), (20, True)])
@pytest.mark.parametrize("case", list(CASES))
def test_decoder_layers_match_brute_force(case, dim, forced):
    model, batch, names = _case(*CASES[case])
    assert HookGradientCapture.unsupported(model, names) == []
    params = dict(model.named_parameters())
    proj = KroneckerProjector({n: params[n].shape for n in names}, dim=dim, seed=5, splits=SPLITS[case] if forced else None)
    if forced:
        assert {n: (proj.spec(n).k_rows, proj.spec(n).k_cols) for n in SPLITS[case]} == SPLITS[case]
    capture = HookGradientCapture(model, names, proj)
    expected = proj.project(brute_force(model, loss_fn, batch, names))
    grads, _ = per_sample_grads_hooks(model, loss_fn, batch, capture)
    torch.testing.assert_close(grads, expected, rtol=1e-10, atol=1e-12)
    assert capture.verify(model, loss_fn, batch, sample=1) == []


def test_output_size_argument_and_more_positions_than_the_input():
    """``forward(x, output_size=...)`` picks the output padding at the call (here one more position than the input's
    stride gives, and with dilation 3 an output padding beyond the stride: the column convolution yields more positions
    than the input has, cropped)."""

    class Sized(nn.Module):
        def __init__(self):
            super().__init__()
            self.t = nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1)
            self.d = nn.ConvTranspose1d(2, 2, 2, stride=1, dilation=3, output_padding=2)
            self.fc = nn.Linear(3 * 8 * 8 + 2 * 9, 3)

        def forward(self, x):
            h = self.t(x, output_size=(8, 8))
            return self.fc(torch.cat([h.flatten(1), self.d(x[:, :, 0]).flatten(1)], 1))

    torch.manual_seed(0)
    model = Sized().double()
    gen = torch.Generator().manual_seed(1)
    batch = torch.randn(B, 2, 4, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (B,), generator=gen)
    names = select_params(model)
    assert model.d(batch[0][:, :, 0]).shape[2] == 3 + 3 + 2 + 1  # (L-1) stride + dilation (k-1) + output_padding + 1
    proj = projector_for(model, names, 6)
    capture = HookGradientCapture(model, names, proj)
    grads, _ = per_sample_grads_hooks(model, loss_fn, batch, capture)
    torch.testing.assert_close(grads, proj.project(brute_force(model, loss_fn, batch, names)), rtol=1e-10, atol=1e-12)


def test_mixed_with_a_layer_vmap_computes():
    """A layer without an engine (a weight-normed LSTM cell: vmap) after hooked decoder layers: per_sample_grads mixes
    the two engines."""

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.t = nn.ConvTranspose1d(3, 2, 3, stride=2)
            self.a = nn.PReLU(2)
            self.cell = weight_normed_cell(18, 4)
            self.out = nn.Linear(4, 3)

        def forward(self, x):
            h = self.a(self.t(x)).flatten(1)
            return self.out(self.cell(h)[0])

    torch.manual_seed(0)
    model = Mixed().double()
    gen = torch.Generator().manual_seed(1)
    batch = torch.randn(B, 3, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (B,), generator=gen)
    names = select_params(model)
    unsupported = HookGradientCapture.unsupported(model, names)
    assert unsupported == [n for n in names if n.startswith("cell.")] and len(unsupported) == 5
    proj = projector_for(model, names, 8)
    capture = HookGradientCapture(model, [n for n in names if n not in unsupported], proj)
    grads, _ = per_sample_grads(model, loss_fn, batch, names, proj, capture)
    torch.testing.assert_close(grads, proj.project(brute_force(model, loss_fn, batch, names)), rtol=1e-10, atol=1e-12)


class LitNet(pl.LightningModule):
    """``net`` trained on :func:`loss_fn` by SGD with momentum."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def per_sample_loss(self, batch):
        return loss_fn(self.net, batch)

    def training_step(self, batch, batch_idx):
        return self.per_sample_loss(batch).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def fit_net(make_net, shape, tracker=None, steps=4, inputs=None):
    """``(LitNet(make_net()) after ``steps`` steps on 12 seeded samples of ``shape`` (``inputs``: those inputs instead),
    3 classes, the data)``."""
    module = LitNet(make_net())
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(12, *shape, generator=gen, dtype=torch.float64) if inputs is None else inputs
    data = WithIds(TensorDataset(x, torch.randint(0, 3, (12,), generator=gen)))
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[tracker] if tracker else [])
    trainer.fit(module, DataLoader(data, batch_size=B, shuffle=True, generator=torch.Generator().manual_seed(0)))
    return module, data


def _decoder():
    return _case(*CASES["2d"])[0]


def test_tracked_decoder_training_is_bit_identical_and_rows_equal_brute_force(tmp_path):
    plain, _ = fit_net(_decoder, (3, 4, 4))
    tracker = InfluenceTracker(str(tmp_path / "log"), record_gradients=True, projection_dim=16,
                               checkpoint_every_n_steps=1, storage_dtype="float64")
    tracked, data = fit_net(_decoder, (3, 4, 4), tracker)
    for (n, a), (_, b) in zip(plain.named_parameters(), tracked.named_parameters()):
        assert torch.equal(a, b), n
    log = InfluenceLog(tmp_path / "log")
    assert log.meta["gradient_engine"] == "hooks" and log.meta["demoted"] == {}
    assert set(log.meta["gradient_engines"].values()) == {"hooks"}
    projector, steps = log.projector(), 0
    for rec in log.iter_steps(fields=("grad",)):
        module = LitNet(_decoder())
        module.load_state_dict({n: torch.from_numpy(v) for n, v in log.checkpoint(rec.step).items()}, strict=False)
        samples = [data[int(i)] for i in rec.ids]
        batch = torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])
        expected = projector.project(brute_force(module, LitNet.per_sample_loss, batch, log.param_names))
        np.testing.assert_allclose(rec.grads, expected.numpy(), rtol=1e-10, atol=1e-12)
        steps += 1
    assert steps == 4


class Styled(nn.Module):
    """A style-transfer-like generator: InstanceNorm2d(affine) after a convolution and after a transposed one (with
    running statistics: used in eval mode), InstanceNorm1d(affine) on ``(B, C, L)``."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.n1 = nn.InstanceNorm2d(4, affine=True)
        self.t = nn.ConvTranspose2d(4, 2, 2, stride=2)
        self.n2 = nn.InstanceNorm2d(2, affine=True, track_running_stats=True)
        self.n3 = nn.InstanceNorm1d(2, affine=True)
        self.fc = nn.Linear(2 * 16, 3)

    def forward(self, x):
        h = self.n2(self.t(torch.relu(self.n1(self.c(x)))))
        return self.fc(torch.tanh(self.n3(h.flatten(2))).flatten(1))


@pytest.mark.parametrize("train", [True, False])
def test_instance_norm_affine_parameters_match_brute_force(train):
    torch.manual_seed(0)
    model = Styled().double()
    with torch.no_grad():  # parameters and running statistics away from their initial values
        for p in [*model.parameters(), model.n2.running_mean, model.n2.running_var]:
            p.add_(torch.rand(p.shape, dtype=p.dtype))
    model.train(train)
    gen = torch.Generator().manual_seed(1)
    batch = torch.randn(B, 3, 4, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (B,), generator=gen)
    names = select_params(model)
    assert HookGradientCapture.unsupported(model, names) == []
    proj = projector_for(model, names, 8)
    capture = HookGradientCapture(model, names, proj)
    grads, _ = per_sample_grads_hooks(model, loss_fn, batch, capture)
    torch.testing.assert_close(grads, proj.project(brute_force(model, loss_fn, batch, names)), rtol=1e-10, atol=1e-12)
