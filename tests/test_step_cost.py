"""What the per-step cost work changed (issue 13): the step's bookkeeping does only what the level needs,
and the hooked rows are assembled without a pass per block, with the same values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from conftest import fit, loader, make_data, tiny
from lightning_influence import InfluenceLog, InfluenceTracker
from lightning_influence.capture import HookGradientCapture, KroneckerProjector, select_params


def _mean_grad_norm(log: InfluenceLog, ds, step: int) -> float:
    """``‖Ĝ_t‖`` by brute force: the batch-mean loss's gradient at the logged ``θ_t``, float64."""
    module = tiny()
    with torch.no_grad():
        for n, p in module.named_parameters():
            p.copy_(torch.from_numpy(log.checkpoint(step)[n]))
    ids = log.batch_ids(step)
    x = torch.stack([ds[int(i)][0] for i in ids])
    y = torch.stack([ds[int(i)][1] for i in ids])
    module.per_sample_loss((x, y)).mean().backward()
    return float(torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in module.parameters()])))


@pytest.mark.parametrize("level", ["losses", "gradients", "hvp", "clip"])
def test_batch_grad_norm_only_where_the_step_reads_the_whole_gradient(log_dir, level):
    """No pass over the whole gradient at the losses/gradients levels (NaN: not recorded); with HVP products or norm
    clipping it is recorded and equals the brute-force norm of the batch-mean gradient before clipping."""
    ds = make_data(12)
    kw = {"losses": {}, "gradients": dict(record_gradients=True), "clip": {},
          "hvp": dict(record_gradients=True, record_hvp=True)}[level]
    trainer_kw = dict(gradient_clip_val=0.05) if level == "clip" else {}
    fit(tiny(), loader(ds, batch_size=4), InfluenceTracker(log_dir, checkpoint_every_n_steps=1, **kw), epochs=1,
        **trainer_kw)
    log = InfluenceLog(log_dir)
    norms = np.array([log.step_column(t, "batch_grad_norm") for t in range(log.num_steps)])
    if level in ("losses", "gradients"):
        assert np.isnan(norms).all()
    else:
        expected = [_mean_grad_norm(log, ds, t) for t in range(log.num_steps)]
        np.testing.assert_allclose(norms, expected, rtol=1e-12)


class _Twice(nn.Module):
    """The same Linear called twice: its block has two parts (the general path of the assembly)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)) + self.a(x).square())


@pytest.mark.parametrize("twice", [False, True])
def test_collected_rows_equal_projected_brute_force(twice):
    """One part per block (concatenated) or several (summed): the projected per-sample gradients of autograd."""
    torch.manual_seed(0)
    model = (_Twice() if twice else nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))).double()
    x, y = torch.randn(7, 6, dtype=torch.float64), torch.randint(0, 3, (7,))
    names = select_params(model)
    projector = KroneckerProjector({n: p.shape for n, p in model.named_parameters()}, 4)
    capture = HookGradientCapture(model, names, projector)
    capture.enable()
    losses = nn.functional.cross_entropy(model(x), y, reduction="none")
    losses.mean().backward()
    capture.disable()
    rows = capture.collect(torch.full((7,), 1 / 7, dtype=torch.float64))
    params = dict(model.named_parameters())
    expected = []
    for i in range(7):
        g = torch.autograd.grad(nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), [params[n] for n in names])
        expected.append(projector.project({n: t[None] for n, t in zip(names, g)})[0])
    assert torch.allclose(rows, torch.stack(expected), rtol=1e-10, atol=1e-12)


_NORMS = {
    "layernorm": lambda: nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3)),
    "layernorm-2d-shape": lambda: nn.Sequential(nn.Linear(6, 8), nn.Unflatten(1, (2, 4)), nn.LayerNorm((2, 4)),
                                                nn.Flatten(), nn.Linear(8, 3)),
    "groupnorm": lambda: nn.Sequential(nn.Unflatten(1, (6, 1, 1)), nn.Conv2d(6, 8, 1, padding=1), nn.GroupNorm(4, 8),
                                       nn.Flatten(), nn.Linear(72, 3)),
}


@pytest.mark.parametrize("case", sorted(_NORMS))
def test_layer_and_group_norm_reuse_the_forward_statistics(monkeypatch, case):
    """LayerNorm and GroupNorm rows come from the statistics their forward saved (the normalisation is not run
    again: it would fail here) and equal projected brute-force per-sample autograd (float64, inputs off-centre)."""
    torch.manual_seed(0)
    model = _NORMS[case]().double()
    x, y = torch.randn(5, 6, dtype=torch.float64) * 3 + 2, torch.randint(0, 3, (5,))
    names = select_params(model)
    projector = KroneckerProjector({n: p.shape for n, p in model.named_parameters()}, 6)
    capture = HookGradientCapture(model, names, projector)
    capture.enable()
    loss = nn.functional.cross_entropy(model(x), y, reduction="none").mean()

    def refused(*args, **kwargs):
        raise AssertionError("the normalisation was recomputed")

    from lightning_influence.capture import layers
    with monkeypatch.context() as patch:  # the backward, where the output-gradient hooks form the blocks
        patch.setattr(layers.F, "layer_norm", refused)
        patch.setattr(layers.F, "group_norm", refused)
        loss.backward()
    capture.disable()
    rows = capture.collect(torch.full((5,), 0.2, dtype=torch.float64))
    params = dict(model.named_parameters())
    expected = torch.stack([projector.project({n: t[None] for n, t in zip(names, torch.autograd.grad(
        nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), [params[n] for n in names]))})[0] for i in range(5)])
    assert torch.allclose(rows, expected, rtol=1e-10, atol=1e-12)


def test_output_edges_are_get_gradient_edge_and_differentiate_after_in_place_ops():
    """``layers._edge`` (the hooks' cheap ``get_gradient_edge``): the same node and output number for an op's output, a
    leaf and a custom autograd Function's output (which needs the ownership token), and ``autograd.grad`` through the
    edge taken before an in-place op gives the gradient at the layer's output, as ``get_gradient_edge`` does."""
    from torch.autograd.graph import get_gradient_edge
    from lightning_influence.capture.layers import _edge

    class Twice(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return 2 * x

        @staticmethod
        def backward(ctx, g):
            return 2 * g

    x = torch.randn(5, 3, requires_grad=True)
    lin = nn.Linear(3, 4)
    for t in (lin(x), x, Twice.apply(x), lin(x)[:, 1:]):
        ours, theirs = _edge(t), get_gradient_edge(t)
        assert ours.node is theirs.node and ours.output_nr == theirs.output_nr
        assert (ours.ownership_token is None) == (theirs.ownership_token is None)
    y = lin(x)
    edge = _edge(y)
    loss = (y.relu_() * torch.arange(4.0)).sum()  # in place after the layer: the edge is still the layer's output
    g, = torch.autograd.grad(loss, edge)
    expected = (lin(x) > 0) * torch.arange(4.0)
    assert torch.equal(g, expected.expand_as(g).to(g.dtype))
