"""Raw parameters used directly in the forward (capture/raw_params.py): their projected per-sample gradients come
from the hooked forward/backward (no vmap) and equal brute-force per-sample autograd; an unknown use falls back to
vmap; training with the tracker stays bit-identical."""

import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import InfluenceLog, InfluenceTracker, WithIds
from lightning_influence.capture import KroneckerProjector, per_sample_grads, select_params
from lightning_influence.capture.own_pass import choose_engine

B, T, D = 5, 4, 6


class ViT(nn.Module):
    """Tokens (B, T, D) -> Linear patch embedding, class token expanded and concatenated, position table (full or a
    slice), two layer scales (a broadcast and an indexed one), a parameter used twice, a head on the class token."""

    def __init__(self, pattern: str = "all", table: int = T + 1, unknown: str | None = None) -> None:
        super().__init__()
        self.pattern, self.unknown = pattern, unknown
        self.patch = nn.Linear(D, D)
        self.cls_token = nn.Parameter(torch.randn(1, 1, D) * 0.5)
        self.pos_embed = nn.Parameter(torch.randn(1, table, D) * 0.5)
        self.gamma = nn.Parameter(torch.rand(D) + 0.5)
        self.norm = nn.LayerNorm(D)
        self.fc = nn.Linear(D, D)
        self.gamma2 = nn.Parameter(torch.rand(T + 1) + 0.5)
        self.twice = nn.Parameter(torch.randn(D) * 0.5)
        self.head = nn.Linear(D, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch(x)
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1)  # (B, T+1, D)
        h = h + self.pos_embed[:, :h.shape[1]]  # a slice (the full table when it has T+1 rows)
        h = h + self.gamma * torch.tanh(self.fc(self.norm(h)))  # layer scale
        h = self.gamma2[:, None] * h  # a layer scale over the tokens, indexed
        h = torch.tanh(h - self.twice) * self.twice.double().float().to(h.dtype)  # used twice, once through casts
        if self.unknown == "matmul":
            h = h @ torch.diag(self.twice)
        elif self.unknown == "einsum":
            h = torch.einsum("btd,d->btd", h, self.twice)
        return self.head(h[:, 0])


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def batch(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, T, D, generator=g, dtype=dtype), torch.randint(0, 3, (B,), generator=g)


def brute(model, names, projector, data):
    """Each sample alone through ordinary autograd, projected."""
    params = dict(model.named_parameters())
    rows = []
    for i in range(B):
        one = tuple(t[i:i + 1] for t in data)
        grads = torch.autograd.grad(loss_fn(model, one)[0], [params[n] for n in names])
        rows.append({n: g[None] for n, g in zip(names, grads)})
    return torch.cat([projector.project(r) for r in rows])


RAW = ["cls_token", "pos_embed", "gamma", "gamma2", "twice"]


@pytest.mark.parametrize("dim", [None, 8])
@pytest.mark.parametrize("table", [T + 1, T + 3])  # the whole table, a slice of it
def test_raw_parameters_are_hooked_and_equal_brute_force(dim, table):
    torch.manual_seed(0)
    model = ViT(table=table).double()
    names = select_params(model)
    projector = KroneckerProjector({n: p.shape for n, p in model.named_parameters()}, dim, seed=3)
    capture, rest, engine = choose_engine(model, names, projector, "auto")
    assert engine == "hooks" and rest == [] and capture.raw is not None and sorted(capture.raw.names) == sorted(RAW)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no demotion
        rows, losses = per_sample_grads(model, loss_fn, batch(), names, projector, capture)
    assert capture.demoted == [] and sorted(capture.param_names) == sorted(names)
    expected = brute(model, names, projector, batch())
    torch.testing.assert_close(rows, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(losses, loss_fn(model, batch()), rtol=0, atol=0)


@pytest.mark.parametrize("unknown", ["matmul", "einsum"])
def test_an_unknown_use_falls_back_to_vmap_and_still_matches(unknown):
    torch.manual_seed(0)
    model = ViT(unknown=unknown).double()
    names = select_params(model)
    projector = KroneckerProjector({n: p.shape for n, p in model.named_parameters()}, 8, seed=3)
    capture, rest, _ = choose_engine(model, names, projector, "auto")
    with pytest.warns(UserWarning, match=r"raw-parameter engine does not know.*\['twice'\]"):
        rows, _ = per_sample_grads(model, loss_fn, batch(), names, projector, capture)
    assert capture.demoted == ["twice"] and "twice" not in capture.raw.names
    torch.testing.assert_close(rows, brute(model, names, projector, batch()), rtol=1e-10, atol=1e-10)
    rows, _ = per_sample_grads(model, loss_fn, batch(), names, projector, capture)  # from now on by vmap
    torch.testing.assert_close(rows, brute(model, names, projector, batch()), rtol=1e-10, atol=1e-10)


def test_the_mode_is_on_the_stack_only_while_watching_and_leaves_on_an_error():
    model = ViT().double()
    names = select_params(model)
    capture, _, _ = choose_engine(model, names, KroneckerProjector({n: p.shape for n, p in model.named_parameters()},
                                                                   8), "auto")
    depth = torch._C._len_torch_function_stack()

    def failing(m, b):
        loss_fn(m, b)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        per_sample_grads(model, failing, batch(), names, capture.projector, capture)
    assert torch._C._len_torch_function_stack() == depth
    capture.enable()
    capture.watch(B)
    assert torch._C._len_torch_function_stack() == depth + 1
    capture.remove()
    assert torch._C._len_torch_function_stack() == depth


def test_torch_nn_modules_without_an_engine_stay_on_vmap():
    model = nn.Sequential(nn.Linear(3, 3), nn.PReLU(3))
    names = select_params(model)
    _, rest, engine = choose_engine(model, names, KroneckerProjector({n: p.shape for n, p in model.named_parameters()},
                                                                     None), "auto")
    assert rest == ["1.weight"] and engine == "mixed"
