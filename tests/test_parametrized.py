"""The parametrized layers' engine (``capture/parametrized.py``): originals of ``weight_norm``, ``spectral_norm``,
``orthogonal`` and a user's ``register_parametrization`` on Linear, Conv and ConvTranspose layers, against projected
brute-force autograd (float64, 1e-10), mixed with vmap, and in a tracked fit (bit-identical training)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations as P
from torch.nn.utils import parametrize

from lightning_influence import InfluenceLog, InfluenceTracker
from lightning_influence.capture import HookGradientCapture, per_sample_grads, per_sample_grads_hooks, select_params

from test_layers_decoder import fit_net
from test_per_sample import B, projector_for


def loss_fn(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


class Symmetric(nn.Module):
    def forward(self, x):
        return x.triu() + x.triu(1).transpose(0, 1)


class Scaled(nn.Module):
    """A parametrization of two tensors, ``original0 * original1`` (a scale per output row)."""

    def forward(self, w, s):
        return w * s

    def right_inverse(self, w):
        return w, torch.full((w.shape[0], 1), 2.0, dtype=w.dtype)


SQUARE = {
    "weight_norm": lambda m: P.weight_norm(m),
    "spectral_norm": P.spectral_norm,
    "orthogonal": P.orthogonal,
    "symmetric": lambda m: parametrize.register_parametrization(m, "weight", Symmetric()),
    "two-tensors": lambda m: parametrize.register_parametrization(m, "weight", Scaled()),
    "chained": lambda m: parametrize.register_parametrization(P.weight_norm(m), "weight", Symmetric()),
}


class Net(nn.Module):
    """A weight-normed convolution, a spectral-normed transposed convolution, a plain Linear, a square Linear under
    the parametrization ``kind``, a Linear normalised as a whole (``weight_norm(dim=None)``, no bias)."""

    def __init__(self, kind: str):
        super().__init__()
        self.conv = P.weight_norm(nn.Conv2d(2, 4, 3, padding=1))
        self.up = P.spectral_norm(nn.ConvTranspose2d(4, 3, 2, stride=2))
        self.fc = nn.Linear(3 * 8 * 8, 6)
        self.sq = SQUARE[kind](nn.Linear(6, 6))
        self.out = P.weight_norm(nn.Linear(6, 3, bias=False), dim=None)

    def forward(self, x):
        h = torch.tanh(self.up(torch.tanh(self.conv(x))))
        return self.out(torch.tanh(self.sq(torch.tanh(self.fc(h.flatten(1))))))


def _case(kind):
    torch.manual_seed(0)
    model = Net(kind).double()
    gen = torch.Generator().manual_seed(1)
    batch = torch.randn(B, 2, 4, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (B,), generator=gen)
    return model, batch, select_params(model)


def brute_force(model, batch, names):
    """Per-sample gradients by autograd on each sample alone, each from the model's buffers as they were (a spectral
    norm's power iteration updates its vectors at every train-mode forward: every sample's forward starts where the
    batch's did)."""
    params = dict(model.named_parameters())
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    rows = []
    for i in range(B):
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(buffers[n])
        grads = torch.autograd.grad(loss_fn(model, (batch[0][i:i + 1], batch[1][i:i + 1]))[0], [params[n] for n in names])
        rows.append(grads)
    with torch.no_grad():
        for n, b in model.named_buffers():
            b.copy_(buffers[n])
    return {n: torch.stack([r[j] for r in rows]) for j, n in enumerate(names)}


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("dim", [None, 8])
@pytest.mark.parametrize("kind", list(SQUARE))
def test_parametrized_layers_match_brute_force(kind, dim, train):
    model, batch, names = _case(kind)
    model.train(train)
    originals = [n for n in names if ".parametrizations." in n]
    assert len(originals) == 6 + (kind in ("weight_norm", "two-tensors", "chained"))
    assert HookGradientCapture.unsupported(model, names) == []
    proj = projector_for(model, names, dim)
    expected = proj.project(brute_force(model, batch, names))
    capture = HookGradientCapture(model, names, proj)
    grads, _ = per_sample_grads_hooks(model, loss_fn, batch, capture)
    torch.testing.assert_close(grads, expected, rtol=1e-10, atol=1e-12)
    assert capture.verify(model, loss_fn, batch, sample=1) == []
    capture.enable()
    loss_fn(model, batch)
    forms = {m: type(r[0][0]).__name__ for m, r in capture._records.items()}  # the transposed one's spectral norm
    assert forms == {"conv": "_Factored", "up": "tuple", "fc": "Tensor", "out": "_Factored",  # (dim=1): generic
                     "sq": "_Factored" if kind in ("weight_norm", "spectral_norm") else "tuple"}


def test_cached_parametrizations_and_a_parametrized_layer_vmap_computes():
    """Under ``parametrize.cached()`` (the weight made once, before the layer's forward reads it) the engine takes the
    cached tensor; a parametrized GRU cell (its engine reads the weights at each call: not chained) goes to vmap whole,
    mixed with the hooks."""

    class WithCell(Net):
        def __init__(self):
            super().__init__("orthogonal")
            self.cell = P.weight_norm(nn.GRUCell(3, 3), "weight_hh")

        def forward(self, x):
            return self.cell(super().forward(x))

    torch.manual_seed(0)
    model = WithCell().double()
    batch = _case("orthogonal")[1]
    names = select_params(model)
    unsupported = HookGradientCapture.unsupported(model, names)
    assert unsupported == [n for n in names if n.startswith("cell.")] and len(unsupported) == 5
    proj = projector_for(model, names, 8)
    expected = proj.project(brute_force(model, batch, names))
    capture = HookGradientCapture(model, [n for n in names if n not in unsupported], proj)
    grads, _ = per_sample_grads(model, loss_fn, batch, names, proj, capture)
    torch.testing.assert_close(grads, expected, rtol=1e-10, atol=1e-12)

    def cached_loss(m, b):
        with parametrize.cached():
            m.sq.weight  # made here, outside the layer's forward
            return loss_fn(m, b)

    capture.remove()
    capture = HookGradientCapture(model, [n for n in names if n not in unsupported], proj)
    grads, _ = per_sample_grads(model, cached_loss, batch, names, proj, capture)
    torch.testing.assert_close(grads, expected, rtol=1e-10, atol=1e-12)


class Bags(nn.Module):
    """A ``kind``-parametrized Bilinear (on two inputs) and EmbeddingBag (``mode``), a Linear head."""

    def __init__(self, kind: str, mode: str):
        super().__init__()
        norm = {"weight_norm": P.weight_norm, "spectral_norm": P.spectral_norm,
                "two-tensors": SQUARE["two-tensors"]}[kind]
        self.bag = norm(nn.EmbeddingBag(9, 4, mode=mode))
        self.bil = norm(nn.Bilinear(3, 4, 3))
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        ids = (x[:, :5, 0].abs() * 7).long() % 9  # a sample's ids from its own values
        return self.head(torch.tanh(self.bil(x[:, 0, :3], self.bag(ids))))


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("kind, mode", [("weight_norm", "mean"), ("spectral_norm", "max"), ("two-tensors", "sum")])
def test_parametrized_bilinear_and_bags_match_brute_force(kind, mode, train):
    """Their engines keep a second input (or the offsets) by a pre-hook of their own: the parametrized engine chains
    them with that hook (before, their originals went to vmap)."""
    torch.manual_seed(0)
    model = Bags(kind, mode).double().train(train)
    gen = torch.Generator().manual_seed(1)
    hooked_rows_match_brute_force(model, (torch.randn(B, 6, 4, generator=gen, dtype=torch.float64),
                                          torch.randint(0, 3, (B,), generator=gen)))


def hooked_rows_match_brute_force(model, batch):
    """Every parameter of ``model`` on hooks, its projected rows (k = 8) equal to projected brute force
    (:func:`brute_force`: each sample from the same buffers) at 1e-10; returns the capture and the names."""
    names = select_params(model)
    assert HookGradientCapture.unsupported(model, names) == []
    proj = projector_for(model, names, 8)
    expected = proj.project(brute_force(model, batch, names))
    capture = HookGradientCapture(model, names, proj)
    grads, _ = per_sample_grads_hooks(model, loss_fn, batch, capture)
    torch.testing.assert_close(grads, expected, rtol=1e-10, atol=1e-12)
    return capture, names


def _bags():
    torch.manual_seed(0)
    return Bags("spectral_norm", "max").double()


def assert_tracked_training_is_bit_identical(make, shape, tmp_path):
    """A tracked fit (with HVP products) of ``make()`` on inputs of ``shape`` ends at the parameters and buffers (a
    spectral norm's vectors) of an untracked one, all on hooks."""
    plain, _ = fit_net(make, shape, steps=3)
    tracker = InfluenceTracker(str(tmp_path / "log"), record_gradients=True, record_hvp=True, projection_dim=16)
    tracked, _ = fit_net(make, shape, tracker, steps=3)
    for (n, a), (_, b) in zip([*plain.named_parameters(), *plain.named_buffers()],
                              [*tracked.named_parameters(), *tracked.named_buffers()]):
        assert torch.equal(a, b), n
    log = InfluenceLog(tmp_path / "log")
    assert log.meta["gradient_engine"] == "hooks" and log.meta["demoted"] == {} and log.num_steps == 3


def test_tracked_parametrized_bags_train_bit_identically(tmp_path):
    """Spectral norms (a power iteration at each read in train mode): the engine reads no weight a second time."""
    assert_tracked_training_is_bit_identical(_bags, (6, 4), tmp_path)


def _chained():
    torch.manual_seed(0)
    return Net("chained").double()


def test_tracked_training_is_bit_identical_and_on_hooks(tmp_path):
    plain, _ = fit_net(_chained, (2, 4, 4), steps=3)
    tracker = InfluenceTracker(str(tmp_path / "log"), record_gradients=True, record_hvp=True, projection_dim=16,
                               checkpoint_every_n_steps=1, storage_dtype="float64")
    tracked, _ = fit_net(_chained, (2, 4, 4), tracker, steps=3)
    for (n, a), (_, b) in zip(plain.named_parameters(), tracked.named_parameters()):
        assert torch.equal(a, b), n
    for (n, a), (_, b) in zip(plain.named_buffers(), tracked.named_buffers()):  # the spectral norm's vectors too
        assert torch.equal(a, b), n
    log = InfluenceLog(tmp_path / "log")
    assert log.meta["gradient_engine"] == "hooks" and log.meta["demoted"] == {}
    assert sum(".parametrizations." in n for n in log.param_names) == 7
    assert log.num_steps == 3


class WeightNormed(nn.Module):
    """``weight_norm`` (the factored form) of a Linear on tokens ``(B, T, d)``, of a grouped Conv1d with reflect
    padding and of a ConvTranspose1d (dilation, an output padding beyond the stride: cropped), each with ``dim=0`` and
    ``dim=None``."""

    def __init__(self, dim):
        super().__init__()
        self.lin = P.weight_norm(nn.Linear(4, 6), dim=dim)
        self.conv = P.weight_norm(nn.Conv1d(6, 4, 3, groups=2, padding=1, padding_mode="reflect"), dim=dim)
        self.up = P.weight_norm(nn.ConvTranspose1d(4, 2, 2, stride=2, padding=1, dilation=3, output_padding=2), dim=dim)
        self.fc = nn.Linear(2 * 12, 3)

    def forward(self, x):
        h = torch.tanh(self.lin(x)).transpose(1, 2)  # (B, 6, T)
        return self.fc(torch.tanh(self.up(torch.tanh(self.conv(h)))).flatten(1))


@pytest.mark.parametrize("dim", [0, None])
def test_factored_weight_norm_matches_brute_force_and_the_generic_chain(monkeypatch, dim):
    from lightning_influence.capture import parametrized
    torch.manual_seed(0)
    model = WeightNormed(dim).double()
    gen = torch.Generator().manual_seed(1)
    batch = torch.randn(B, 5, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (B,), generator=gen)
    names = select_params(model)
    proj = projector_for(model, names, 8)
    expected = proj.project(brute_force(model, batch, names))
    rows = {}
    for factored in (True, False):
        if not factored:
            monkeypatch.setattr(parametrized, "_factored", lambda mod, base: None)
        capture = HookGradientCapture(model, names, proj)
        capture.enable()
        loss_fn(model, batch)
        kinds = {m: type(r[0][0]).__name__ for m, r in capture._records.items()}
        assert kinds == ({"lin": "_Factored", "conv": "_Factored", "up": "_Factored", "fc": "Tensor"} if factored else
                         {"lin": "tuple", "conv": "tuple", "up": "tuple", "fc": "Tensor"})
        capture.remove()
        capture = HookGradientCapture(model, names, proj)
        rows[factored], _ = per_sample_grads_hooks(model, loss_fn, batch, capture)
        torch.testing.assert_close(rows[factored], expected, rtol=1e-10, atol=1e-12)


class HookNormed(nn.Module):
    """The older hook-based ``torch.nn.utils.weight_norm`` (Linear, Conv1d with ``dim=None``) and ``spectral_norm``
    (its power iteration updates ``weight_u``/``weight_v`` in train mode), as in GAN discriminators and vocoders: all
    four factored."""

    def __init__(self):
        super().__init__()
        with pytest.warns(FutureWarning):
            self.lin = nn.utils.weight_norm(nn.Linear(4, 6))
            self.conv = nn.utils.weight_norm(nn.Conv1d(6, 4, 3, padding=1), dim=None)
        self.sn_conv = nn.utils.spectral_norm(nn.Conv1d(4, 3, 2, stride=2))
        self.sn_fc = nn.utils.spectral_norm(nn.Linear(6, 3))

    def forward(self, x):
        h = torch.tanh(self.lin(x)).transpose(1, 2)  # (B, 6, 4)
        return self.sn_fc(torch.tanh(self.sn_conv(torch.tanh(self.conv(h)))).flatten(1))


def _hook_normed():
    torch.manual_seed(0)
    return HookNormed().double()


@pytest.mark.parametrize("train", [True, False])
def test_hook_based_weight_and_spectral_norms_match_brute_force(train):
    model = _hook_normed().train(train)
    gen = torch.Generator().manual_seed(1)
    batch = torch.randn(B, 4, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (B,), generator=gen)
    capture, names = hooked_rows_match_brute_force(model, batch)
    assert {"lin.weight_g", "lin.weight_v", "conv.weight_g", "sn_conv.weight_orig", "sn_fc.weight_orig"} <= set(names)
    assert capture.verify(model, loss_fn, batch, sample=1) == []
    capture.enable()
    loss_fn(model, batch)
    kinds = {m: type(r[0][0]).__name__ for m, r in capture._records.items()}
    assert kinds == {"lin": "_Factored", "conv": "_Factored", "sn_conv": "_Factored", "sn_fc": "_Factored"}


def test_tracked_hook_normed_training_is_bit_identical(tmp_path):
    assert_tracked_training_is_bit_identical(_hook_normed, (4, 4), tmp_path)
