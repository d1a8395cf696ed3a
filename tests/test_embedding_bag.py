"""``nn.EmbeddingBag`` on hooks (``capture/embedding_bag.py``): ``sum`` and ``mean`` bags of 2-D ids and of flat ids
with offsets (torchtext's text classifier), ``per_sample_weights``, ``padding_idx``, ``include_last_offset``, ``max``
bags (an empty one too), against projected float64 brute force; a tracked fit bit-identical to one without the
tracker."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_influence import InfluenceLog, InfluenceTracker
from lightning_influence.capture import HookGradientCapture, per_sample_grads, select_params

from test_layers_decoder import fit_net
from test_per_sample import B, brute_force, projector_for

V = 13


class Bags(nn.Module):
    """Two bag layers: ``a`` on ``(B, N)`` ids, ``b`` on the same ids flattened with offsets (one bag a sample)."""

    def __init__(self, mode_a, mode_b, padding_idx=None, last=False, weighted=False):
        super().__init__()
        self.a = nn.EmbeddingBag(V, 5, mode=mode_a, padding_idx=padding_idx)
        self.b = nn.EmbeddingBag(V, 5, mode=mode_b, include_last_offset=last)
        self.scores = nn.Parameter(torch.rand(V)) if weighted else None
        self.last, self.fc = last, nn.Linear(5, 3)

    def forward(self, ids):
        n = ids.shape[1]
        offsets = torch.arange(0, ids.shape[0] * n + (n if self.last else 0), n)
        weights = self.scores[ids] if self.scores is not None else None
        h = self.a(ids, per_sample_weights=weights) + self.b(ids.flatten(), offsets)
        return self.fc(torch.tanh(h))


def loss_fn(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def _batch():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (B, 6), generator=gen)
    ids[0, :3] = 2  # a repeated id; the padding row twice in sample 1, all of sample 2's first half
    ids[1, 1:3] = 0
    ids[2, :3] = 0
    return ids, torch.randint(0, 3, (B,), generator=gen)


CASES = {"sum-mean": ("sum", "mean", None, False, False), "mean-padding": ("mean", "sum", 0, True, False),
         "weighted": ("sum", "mean", 0, False, True), "max": ("max", "max", None, False, False),
         "max-padding-last": ("max", "max", 0, True, False), "max-sum-weighted": ("sum", "max", 0, False, True)}


@pytest.mark.parametrize("dim", [None, 8])
@pytest.mark.parametrize("case", list(CASES))
def test_bags_match_brute_force(case, dim):
    torch.manual_seed(0)
    model = Bags(*CASES[case]).double()
    batch = _batch()
    names = select_params(model)
    unsupported = HookGradientCapture.unsupported(model, names)
    assert unsupported == (["scores"] if CASES[case][4] else [])  # a bare parameter indexed by the batch: vmap
    proj = projector_for(model, names, dim)
    capture = HookGradientCapture(model, [n for n in names if n not in unsupported], proj)
    grads, _ = per_sample_grads(model, loss_fn, batch, names, proj, capture)
    torch.testing.assert_close(grads, proj.project(brute_force(model, loss_fn, batch, names)), rtol=1e-10, atol=1e-12)
    assert capture.verify(model, loss_fn, batch) == []


@pytest.mark.parametrize("dim", [None, 8])
def test_an_empty_max_bag_has_no_gradient(dim):
    """A sample whose bag holds only ``padding_idx`` (``max`` mode: zeros out, no maximum) gets no gradient from it,
    as autograd: PyTorch's maximum row of an empty bag is a placeholder the engine must not use."""
    torch.manual_seed(0)
    model = Bags("max", "sum", padding_idx=0).double()
    ids, y = _batch()
    ids[3] = 0
    names = select_params(model)
    proj = projector_for(model, names, dim)
    capture = HookGradientCapture(model, names, proj)
    grads, _ = per_sample_grads(model, loss_fn, (ids, y), names, proj, capture)
    expected = proj.project(brute_force(model, loss_fn, (ids, y), names))
    torch.testing.assert_close(grads, expected, rtol=1e-10, atol=1e-12)
    assert torch.equal(grads[3, proj.slices["a.weight"]], torch.zeros_like(grads[3, proj.slices["a.weight"]]))


def _bags(mode="mean"):
    torch.manual_seed(0)
    return Bags(mode, "sum" if mode == "mean" else "max", padding_idx=0).double()


@pytest.mark.parametrize("mode", ["mean", "max"])
def test_tracked_training_is_bit_identical(tmp_path, mode):
    ids = torch.randint(0, V, (12, 6), generator=torch.Generator().manual_seed(3))
    plain, _ = fit_net(lambda: _bags(mode), None, steps=3, inputs=ids)
    tracker = InfluenceTracker(str(tmp_path / "log"), record_gradients=True, record_hvp=True, projection_dim=16)
    tracked, _ = fit_net(lambda: _bags(mode), None, tracker, steps=3, inputs=ids)
    for (n, a), (_, b) in zip(plain.named_parameters(), tracked.named_parameters()):
        assert torch.equal(a, b), n
    log = InfluenceLog(tmp_path / "log")
    assert log.meta["gradient_engine"] == "hooks" and log.meta["demoted"] == {} and log.num_steps == 3
    assert np.isfinite(next(log.iter_steps(fields=("grad",))).grads).all()


class _Largest(torch.utils._python_dispatch.TorchDispatchMode):
    """The most elements any one op's output has while it is active."""

    def __init__(self):
        super().__init__()
        self.most = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.most = max(self.most, t.numel())
        return out


@pytest.mark.parametrize("case", ["sum-mean", "mean-padding", "weighted", "max-padding-last"])
def test_whole_rows_of_a_large_table_need_no_identity(case):
    """Rows kept whole (``projection_dim=None``) of a 3000-row table: no op makes more than the per-sample gradient's
    own ``B x out_dim`` elements (an identity table ``rows²`` is 9M; at 100k x 64 it was 40 GB a call), and the
    rows equal float64 brute force."""
    mode_a, mode_b, padding_idx, last, weighted = CASES[case]
    torch.manual_seed(0)
    model = Bags(mode_a, mode_b, padding_idx, last, weighted).double()
    big = 3000
    for name in ("a", "b"):
        old = getattr(model, name)
        setattr(model, name, nn.EmbeddingBag(big, 5, mode=old.mode, padding_idx=old.padding_idx,
                                             include_last_offset=old.include_last_offset).double())
    ids, y = _batch()
    ids[:, 3:] += big - V  # ids far apart in the table
    if weighted:
        model.scores = nn.Parameter(torch.rand(big, dtype=torch.float64))
    names = [n for n in select_params(model) if n != "scores"]
    proj = projector_for(model, names, None)
    capture = HookGradientCapture(model, names, proj)
    with _Largest() as largest:
        grads, _ = per_sample_grads(model, loss_fn, (ids, y), names, proj, capture)
    assert largest.most <= grads.numel()  # the rows themselves, B x (both tables' rows x 5 + the head's)
    torch.testing.assert_close(grads, proj.project(brute_force(model, loss_fn, (ids, y), names)), rtol=1e-10,
                               atol=1e-12)
