"""Diff-In's finite-difference products (``hvp="fd"``) on float32 runs go through DIT's float64 differences
(estimators/fd.py): Diff-In FD equals Diff-In with exact HVPs to ~1e-6 through ReLU kinks (batch products ``H_B v``
and per-sample ``H_z v``); the fallback to the native dtype when the float64 evaluation fails; the noise flag."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_influence.estimators import fd as fd_module
from lightning_influence.estimators.diffin import _Context, diffin, diffin_self_influence
from lightning_influence.log import InfluenceLog
from lightning_influence.queries import mean_loss
from tests._tinylog import epoch_batches, train_and_log
from tests.test_dit_fd import (QUERY, FixedProjection, TinyTransformer, dtype_dependent_loss, float32_head_loss, loss_fn,
                               train_data)

torch.set_num_threads(1)
N = 40
RTOL = 1e-5  # measured: ≤ 3e-8 (benchmarks/diffin_fd_accuracy.py); the float32 differences are 1e-2 .. 10 off


@pytest.fixture(scope="module")
def relu_log(tmp_path_factory):
    """The float32 ReLU transformer of tests/test_dit_fd.py, with the per-sample gradients Diff-In reads."""
    path = str(tmp_path_factory.mktemp("diffin32") / "log")
    model = TinyTransformer()
    batches, epochs = epoch_batches(N, 10, 3, seed=1)  # 12 steps
    train_and_log(path, model, loss_fn, train_data, batches, [0.2] * len(batches),
                  torch.optim.SGD(model.parameters(), lr=0.2, weight_decay=1e-3), epochs=epochs)
    return InfluenceLog(path)


def max_rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("form", ["step", "self"])
def test_fd_diffin_equals_exact_diffin_in_float32(relu_log, form, monkeypatch):
    """Batch products ``H_B v`` (the step form along the query, self-influence along each sample's gradient): float64
    differences at ε_0 = 1e-6 agree with the exact products to 1e-5 on every window; float32 differences do not."""
    kw = dict(module=TinyTransformer(), train_data=train_data, loss_fn=loss_fn)

    def run(window, hvp):
        if form == "self":
            return diffin_self_influence(relu_log, **kw, window=window, hvp=hvp)
        return diffin(relu_log, QUERY, **kw, window=window, form="step", hvp=hvp)

    windows = [(0, 12), (6, 12)]
    for window in windows:
        exact, fd = run(window, "exact"), run(window, "fd")
        assert fd.info["fd_dtype"] == "float64" and fd.info["eps0"] == fd_module.FD_EPS0
        assert fd.info["fd_asymmetry"] < 1e-4 and fd.info["fd_agreement"] < 1e-3 and not fd.info.get("fd_unreliable")
        assert fd.info["fd_products"] == fd.info["hvp_products"] and fd.info["fd_checked"] > 0
        assert np.abs(exact.column(0)).max() > 1e-4
        assert max_rel(fd.column(0), exact.column(0)) < RTOL, window
    monkeypatch.setattr(fd_module, "FD_DTYPE", torch.float32)  # differences in the parameters' dtype, as before
    with pytest.warns(RuntimeWarning):  # flagged: kinks or noise
        old = run(windows[0], "fd")
    assert old.info["fd_dtype"] == "float32" and old.info.get("fd_unreliable")
    assert max_rel(old.column(0), run(windows[0], "exact").column(0)) > 1e-3  # the test tells the two apart


def test_fd_per_sample_products_equal_exact_in_float32(relu_log):
    """Per-sample ``H_z Ĝ`` rows of a step's batch (its training masks), float64 differences against the exact
    reverse-over-reverse rows; each sample's row is one product (kink-guarded and counted)."""
    t = 7
    rows = {}
    for hvp in ("exact", "fd"):
        ctx = _Context(relu_log, TinyTransformer(), train_data, loss_fn, hvp, None, True, 512)
        (_, params), = list(ctx.params_at([t]))
        batch = ctx.step_batch(t)
        g_hat = ctx.batch_grad(params, batch, names=list(params), w=ctx.step_weights(t))
        rows[hvp] = ctx.per_sample_hvp(params, batch, g_hat).double().numpy()
    assert ctx.fd.info()["fd_dtype"] == "float64" and ctx.fd.products == len(batch.ids)
    assert ctx.fd.kinks == 0 and ctx.fd.asymmetry() < 1e-4
    assert max_rel(rows["fd"], rows["exact"]) < RTOL


class TanhMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


_g = torch.Generator().manual_seed(3)
XM, YM = torch.randn(N, 5, generator=_g), torch.randint(0, 3, (N,), generator=_g)


def mlp_data(ids):
    ids = torch.as_tensor(ids)
    return XM[ids], YM[ids]


def mlp_loss(module, batch):
    x, y = batch
    return F.cross_entropy(module(x), y, reduction="none")


def test_fd_published_form_over_every_sample_equals_exact_in_float32(tmp_path):
    """The published form with ``samples="all"``: per-sample ``H_z Ĝ`` of every training sample outside its steps
    (``vmap``) and ``H_B q``, float32 tanh MLP: float64 differences equal the exact products."""
    path = str(tmp_path / "log")
    model = TanhMLP()
    batches, epochs = epoch_batches(N, 10, 2, seed=2)
    train_and_log(path, model, mlp_loss, mlp_data, batches, [0.3] * len(batches),
                  torch.optim.SGD(model.parameters(), lr=0.3), epochs=epochs)
    log = InfluenceLog(path)
    query = mean_loss(mlp_data(np.arange(5)), mlp_loss)
    kw = dict(module=TanhMLP(), train_data=mlp_data, loss_fn=mlp_loss, form="published", samples="all", steps=3)
    exact, fd = diffin(log, query, **kw, hvp="exact"), diffin(log, query, **kw, hvp="fd")
    assert fd.info["fd_dtype"] == "float64" and fd.info["fd_products"] == 3 * (N + 1)  # N rows + 1 column per step
    assert max_rel(fd.column(0), exact.column(0)) < RTOL


@pytest.mark.parametrize("case", ["fails", "disagrees"])
def test_fd_diffin_falls_back_to_the_native_dtype_with_a_warning(relu_log, case, monkeypatch):
    """A float64 evaluation that fails (a float32 tensor outside the parameters) or computes another function (a
    dtype-dependent loss): the products are the native ones (ε_0 3e-2, as DIT's fallback), said in ``info`` and a
    warning naming Diff-In."""
    model, loss = (FixedProjection, loss_fn) if case == "fails" else (TinyTransformer, dtype_dependent_loss)
    kw = dict(train_data=train_data, loss_fn=loss, window=(6, 12), form="step", hvp="fd")
    with pytest.warns(RuntimeWarning, match="Diff-In with hvp='fd': the float64 evaluation of the finite differences "
                                            + ("failed" if case == "fails" else "differs from the native one at θ_0")):
        fd = diffin(relu_log, QUERY, module=model(), **kw)
    assert fd.info["fd_dtype"] == "float32" and fd.info["eps0"] == 3e-2 and "fd_fallback" in fd.info
    monkeypatch.setattr(fd_module, "FD_DTYPE", torch.float32)
    native = diffin(relu_log, QUERY, module=model(), **kw)
    assert "fd_fallback" not in native.info
    np.testing.assert_array_equal(fd.scores, native.scores)
    exact = diffin(relu_log, QUERY, module=model(), **{**kw, "hvp": "exact"})
    assert max_rel(fd.column(0), exact.column(0)) < 0.5  # still the same quantity, to the float32 differences' error


def test_fd_diffin_rounding_noise_is_flagged(relu_log):
    """A cast to float32 inside the loss: the float64 differences' one-sided halves disagree, Diff-In flags it."""
    with pytest.warns(RuntimeWarning, match="one-sided halves disagree"):
        fd = diffin(relu_log, QUERY, module=TinyTransformer(), train_data=train_data, loss_fn=float32_head_loss,
                    window=(6, 12), form="step", hvp="fd")
    assert fd.info["fd_unreliable"] and fd.info["fd_asymmetry"] > fd_module.NOISE_LIMIT
    assert "[FD unreliable]" in fd.method


@pytest.mark.slow
def test_fd_diffin_self_influence_split_over_two_processes_equals_one_process(relu_log):
    """Split by steps (2 gloo processes, each with its own float64 copy and check): the scores, and the summed
    kink/product counts and the median asymmetry of every process's products, equal one process's."""
    from lightning_influence.distributed import Processes, by_steps

    kw = dict(module=TinyTransformer(), train_data=train_data, loss_fn=loss_fn, window=(4, 12), form="step", hvp="fd")
    want = diffin_self_influence(relu_log, **kw)
    got = by_steps(diffin_self_influence, relu_log, None, Processes(devices=2, timeout_s=120), **kw)
    assert got.info["processes"] == 2 and got.info["fd_dtype"] == want.info["fd_dtype"] == "float64"
    for key in ("fd_products", "fd_kinks", "fd_checked", "fd_blowups", "hvp_products"):
        assert got.info[key] == want.info[key], key
    assert got.info["fd_products"] == 12 * 10 and "fd_fallback" not in got.info
    assert got.info["fd_asymmetry"] == pytest.approx(want.info["fd_asymmetry"], rel=1e-6)
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-10, atol=1e-12 * np.abs(want.scores).max())


class DropoutMLP(TanhMLP):
    """TanhMLP's parameters (same names) with a dropout after the hidden layer, left in train mode."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.drop(self.net[1](self.net[0](x))))


@pytest.mark.parametrize("hvp", ["exact", "fd"])
def test_samples_outside_their_steps_are_evaluated_with_dropout_off(tmp_path, hvp):
    """``samples="all"`` evaluates every training sample at θ_t outside its steps, where no dropout mask was drawn:
    as a query, with dropout off, so two evaluations agree (train-mode masks made them random) and equal the
    model without dropout."""
    path = str(tmp_path / "log")
    batches, epochs = epoch_batches(N, 10, 1, seed=2)
    model = TanhMLP()
    train_and_log(path, model, mlp_loss, mlp_data, batches, [0.3] * len(batches),
                  torch.optim.SGD(model.parameters(), lr=0.3), epochs=epochs)
    log = InfluenceLog(path)
    ids = np.arange(12)
    gen = torch.Generator().manual_seed(5)
    direction = {n: torch.randn(p.shape, generator=gen) for n, p in TanhMLP().named_parameters()}
    out = {}
    for name, module in (("dropout", DropoutMLP()), ("plain", TanhMLP())):
        ctx = _Context(log, module, mlp_data, mlp_loss, hvp, None, True, 512)
        (_, params), = ctx.params_at([2])
        rows = [(ctx.per_sample_grads(params, ctx.batch(ids)), ctx.per_sample_hvp(params, ctx.batch(ids), direction))
                for _ in range(2)]
        for a, b in zip(*rows):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        out[name] = rows[0]
        assert module.training  # the module's own mode is restored
    for a, b in zip(out["dropout"], out["plain"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
