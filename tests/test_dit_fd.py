"""DIT's finite-difference products (``hvp="fd"``, estimators/fd.py) on float32 runs: within 1e-3 of the exact
sweep through ReLU kinks (float64 differences), the fallback to the native dtype when the float64 evaluation is
a different function, and the flag when the differences are noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_influence.estimators import dit, timeline
from lightning_influence.estimators import fd as fd_module
from lightning_influence.log import InfluenceLog
from lightning_influence.queries import mean_loss
from tests._tinylog import epoch_batches, train_and_log

torch.set_num_threads(1)
N, L, V = 40, 6, 9  # samples, tokens per sample, vocabulary


class TinyTransformer(nn.Module):
    """Embedding + positions, LayerNorm, one TransformerEncoderLayer (ReLU feed-forward), mean pooling, a head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tok, self.pos = nn.Embedding(V, 8), nn.Embedding(L, 8)
        self.norm = nn.LayerNorm(8)
        self.enc = nn.TransformerEncoderLayer(8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.norm(self.tok(x) + self.pos.weight)).mean(1))


def loss_fn(module, batch):
    x, y = batch
    return F.cross_entropy(module(x), y, reduction="none")


gen = torch.Generator().manual_seed(0)
X = torch.randint(0, V, (N, L), generator=gen)
Y = (X[:, 0] + X[:, 1]) % 3
XV, YV = torch.randint(0, V, (16, L), generator=gen), torch.randint(0, 3, (16,), generator=gen)
QUERY = mean_loss((XV, YV), loss_fn)


def train_data(ids):
    ids = torch.as_tensor(ids)
    return X[ids], Y[ids]


@pytest.fixture(scope="module")
def relu_log(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("fd32") / "log")
    model = TinyTransformer()
    batches, epochs = epoch_batches(N, 10, 4, seed=1)  # 16 steps
    train_and_log(path, model, loss_fn, train_data, batches, [0.2] * len(batches),
                  torch.optim.SGD(model.parameters(), lr=0.2, weight_decay=1e-3), record_gradients=False, epochs=epochs)
    return InfluenceLog(path)


def max_rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_fd_dit_is_within_1e_3_of_exact_through_relu_kinks_in_float32(relu_log, monkeypatch):
    """Float64 differences at ε_0 = 1e-6: the float32 ReLU transformer's DIT agrees with the exact sweep to
    1e-3 on every window; the old float32 differences (ε_0 = 3e-2) do not (the kink bias, docs/replay.md)."""
    grid = [0, 4, 8, 12, 16]
    kw = dict(module=TinyTransformer(), train_data=train_data, loss_fn=loss_fn, grid=grid)
    exact = timeline(relu_log, QUERY, **kw)
    fd = timeline(relu_log, QUERY, **kw, hvp="fd")
    assert fd.info["fd_dtype"] == "float64" and fd.info["eps0"] == fd_module.FD_EPS0
    assert fd.info["fd_agreement"] < 1e-6 and fd.info["fd_asymmetry"] < 1e-4 and not fd.info.get("fd_unreliable")
    monkeypatch.setattr(fd_module, "FD_DTYPE", torch.float32)  # the products as DIT took them before
    before = timeline(relu_log, QUERY, **kw, hvp="fd")
    assert before.info["fd_dtype"] == "float32" and before.info["eps0"] == 3e-2
    errors, old = [], []
    for t1, t2 in [(0, 16), (12, 16), (8, 16), (0, 4)]:
        ref = exact.window(t1, t2).column(0)
        assert np.abs(ref).max() > 1e-4
        errors.append(max_rel(fd.window(t1, t2).column(0), ref))
        old.append(max_rel(before.window(t1, t2).column(0), ref))
    assert max(errors) < 1e-3, errors
    assert max(old) > 1e-3, old  # the test can tell the two apart


class FixedProjection(TinyTransformer):
    """Keeps a float32 tensor as a plain attribute (not a buffer): a float64 copy cannot multiply it."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = torch.eye(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) @ self.mix


def dtype_dependent_loss(module, batch):
    x, y = batch
    out = module(x)
    return F.cross_entropy(out * (1.05 if out.dtype == torch.float64 else 1.0), y, reduction="none")


@pytest.mark.parametrize("case", ["fails", "disagrees"])
def test_fd_falls_back_to_the_native_dtype_with_a_warning(relu_log, case, monkeypatch):
    """A float64 evaluation that raises, or computes another function (here a loss that depends on the dtype, as
    dropout masks drawn per dtype would), is not used: the products are the native ones, said in info and a warning
    (and, float32 differences on a ReLU transformer being ~1e-2 off, flagged)."""
    module, loss = (FixedProjection(), loss_fn) if case == "fails" else (TinyTransformer(), dtype_dependent_loss)
    kw = dict(module=module, train_data=train_data, loss_fn=loss, window=(8, 16), hvp="fd")
    with pytest.warns(RuntimeWarning, match="float64 evaluation of the finite differences " +
                      ("failed" if case == "fails" else "differs from the native one")):
        fd = dit(relu_log, QUERY, **kw)
    assert fd.info["fd_dtype"] == "float32" and fd.info["eps0"] == 3e-2 and "fd_fallback" in fd.info
    monkeypatch.setattr(fd_module, "FD_DTYPE", torch.float32)
    with pytest.warns(RuntimeWarning, match="one-sided halves disagree"):
        native = dit(relu_log, QUERY, **kw)
    assert "fd_fallback" not in native.info
    np.testing.assert_array_equal(fd.scores, native.scores)


def float32_head_loss(module, batch):
    x, y = batch
    return F.cross_entropy(module(x).float(), y, reduction="none")  # the logits rounded to float32 in every dtype


def test_fd_rounding_noise_is_flagged(relu_log):
    """A cast to float32 inside the loss puts float32 noise into the float64 differences at ε_0 = 1e-6: their
    one-sided halves disagree, the scores are flagged instead of returned silently."""
    with pytest.warns(RuntimeWarning, match="one-sided halves disagree"):
        fd = dit(relu_log, QUERY, module=TinyTransformer(), train_data=train_data, loss_fn=float32_head_loss,
                 window=(8, 16), hvp="fd")
    assert fd.info["fd_unreliable"] and fd.info["fd_asymmetry"] > fd_module.NOISE_LIMIT


class ValLosses32:
    """A picklable 3-output query in float32: the losses of 3 fixed samples."""

    query_names = ["a", "b", "c"]

    def __init__(self) -> None:
        from conftest import make_data

        self.batch = make_data(3, seed=4, dtype=torch.float32).tensors

    def __call__(self, module):
        return module.per_sample_loss(self.batch)


def _fd_sweep(fabric, path, kw):
    from lightning_influence.distributed import _batch_worker

    return _batch_worker(fabric, dit, path, ValLosses32(), kw, "test fd sweep")


@pytest.mark.slow
def test_fd_dit_split_by_batch_on_two_gloo_processes_equals_one_process(tmp_path):
    """A float32 dropout run with clipping and 2 micro-batches per step: the float64 differences with the rows split
    over 2 processes (each evaluation, and the float64 check at θ, summed over them) equal one process's."""
    from conftest import fit, loader, make_data, tiny

    from lightning_influence import InfluenceTracker
    from lightning_influence.distributed import launch

    path = str(tmp_path / "log")
    tracker = InfluenceTracker(path, checkpoint_every_n_steps=3, storage_dtype="float64")
    fit(tiny(dropout=0.3, momentum=0.5).float(), loader(make_data(16, seed=5, dtype=torch.float32), batch_size=4),
        tracker, epochs=2, gradient_clip_val=0.05, accumulate_grad_batches=2)
    kw = {"module": tiny(dropout=0.3, momentum=0.5).float(), "train_data": make_data(16, seed=5, dtype=torch.float32),
          "hvp": "fd"}
    two = launch(_fd_sweep, path, kw, devices=2, timeout_s=120)
    with InfluenceLog(path) as log:
        one = dit(log, ValLosses32(), **kw)
        exact = dit(log, ValLosses32(), **{**kw, "hvp": "exact"})
    assert two.info["split"] == "batch" and two.info["fd_dtype"] == one.info["fd_dtype"] == "float64"
    scale = np.abs(exact.scores).max()
    assert scale > 1e-6
    np.testing.assert_allclose(two.scores, one.scores, rtol=0, atol=1e-5 * scale)
    assert np.abs(one.scores - exact.scores).max() < 1e-3 * scale
