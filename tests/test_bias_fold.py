"""Biases folded into their weight's projection: one block ``P_rᵀ [G g_b] P_c`` per Linear/Conv layer.

Every folded block is checked against an independent float64 oracle: brute-force per-sample autograd of the
weight and the bias, stacked as the augmented matrix ``[G g_b]`` and multiplied by the dense Kronecker
product of the projection's side matrices (no code path of the projector's own folding is used).
"""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import fit, loader, make_data, tiny
from lightning_influence import InfluenceLog, InfluenceTracker, tracin
from lightning_influence.capture import (HookGradientCapture, KroneckerProjector, per_sample_grads,
                                         per_sample_grads_vmap, select_params)
from lightning_influence.capture.layers import foldable_biases
from lightning_influence.queries import mean_loss

from test_layers import PosEmbed
from test_per_sample import B, brute_force
from test_tracin import brute_force_tracin


def dense_projection(proj: KroneckerProjector, grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """The oracle: each block ``vec(G) @ (P_r ⊗ P_c)``, a folded one's ``G`` being ``[G_W g_b]`` built here."""
    out = []
    for spec in proj.specs:
        g = grads[spec.name].reshape(grads[spec.name].shape[0], spec.rows, -1)
        if spec.bias is not None:
            g = torch.cat([g, grads[spec.bias].reshape(g.shape[0], spec.rows, 1)], dim=2)
        assert g.shape[1:] == (spec.rows, spec.cols)
        p_r, p_c = proj.side_matrices(spec.name, torch.float64)
        p_r = torch.eye(spec.rows, dtype=torch.float64) if p_r is None else p_r
        p_c = torch.eye(spec.cols, dtype=torch.float64) if p_c is None else p_c
        out.append(g.reshape(g.shape[0], -1) @ torch.kron(p_r, p_c))
    return torch.cat(out, dim=1)


def test_rule_metadata_and_old_layout():
    shapes = {"fc.weight": (20, 30), "fc.bias": (20,), "small.weight": (2, 3), "small.bias": (2,),
              "conv.weight": (6, 1, 2, 2), "conv.bias": (6,), "odd.weight": (4, 4), "odd.bias": (3,)}
    fold = {"fc.weight": "fc.bias", "small.weight": "small.bias", "conv.weight": "conv.bias", "odd.weight": "odd.bias"}
    proj = KroneckerProjector(shapes, dim=8, seed=2, fold=fold)
    # folded where the weight is projected (rows*cols > dim) and the bias has one entry per row
    assert {s.name: s.bias for s in proj.specs if s.bias} == {"fc.weight": "fc.bias", "conv.weight": "conv.bias"}
    fc, conv = proj.spec("fc.weight"), proj.spec("conv.weight")
    assert (fc.rows, fc.cols, fc.k_rows, fc.k_cols) == (20, 31, 2, 4)
    assert (conv.rows, conv.cols, conv.k_rows, conv.k_cols) == (6, 5, 2, 4)
    assert proj.block_of["fc.bias"] == "fc.weight" and proj.block_of["small.bias"] == "small.bias"
    unfolded = KroneckerProjector(shapes, dim=8, seed=2)
    assert proj.out_dim == unfolded.out_dim - 8 - 6  # the two bias blocks (min(rows, dim) columns) are gone
    meta = proj.to_metadata()
    assert {s["name"]: s.get("bias") for s in meta["specs"] if "bias" in s} == {"fc.weight": "fc.bias",
                                                                               "conv.weight": "conv.bias"}
    again = KroneckerProjector.from_metadata(meta)
    assert again.to_metadata() == meta and again.out_dim == proj.out_dim
    grads = {n: torch.randn(3, *s, dtype=torch.float64) for n, s in shapes.items()}
    torch.testing.assert_close(again.project(grads), dense_projection(proj, grads), rtol=1e-12, atol=1e-12)
    # metadata without "bias" (every log written before folding) reads as the unfolded layout
    old = unfolded.to_metadata()
    assert all("bias" not in s for s in old["specs"])
    assert all(s.bias is None for s in KroneckerProjector.from_metadata(old).specs)
    with pytest.raises(KeyError, match="fc.bias"):  # a full projection needs both halves of a folded block
        proj.project({n: g for n, g in grads.items() if n != "fc.bias"})


def test_partial_halves_add_up():
    """Another engine may fill one half of a folded block: the projection is linear, the parts add up."""
    shapes = {"fc.weight": (9, 7), "fc.bias": (9,)}
    proj = KroneckerProjector(shapes, dim=10, seed=1, fold={"fc.weight": "fc.bias"})
    grads = {n: torch.randn(2, *s, dtype=torch.float64) for n, s in shapes.items()}
    parts = proj.project({"fc.weight": grads["fc.weight"]}, partial=True) + proj.project(
        {"fc.bias": grads["fc.bias"]}, partial=True)
    torch.testing.assert_close(parts, dense_projection(proj, grads), rtol=1e-12, atol=1e-12)


class Lin3d(nn.Module):
    """Linear on (B, T, d) then on (B, d)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 7), nn.Linear(7, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)).mean(1))


class Lin2d(nn.Module):
    """``a``'s column side (3 inputs + the bias) is kept whole at dim 16: the folded identity case."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 20), nn.Linear(20, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


class Convs(nn.Module):
    def __init__(self, dims: int):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d}[dims]
        self.c1 = conv(2, 4, 3, stride=2, padding=1)
        self.c2 = conv(4, 6, 2, dilation=2, padding=2, groups=2, padding_mode="circular")
        self.c3 = conv(6, 6, 3, padding="same", groups=3)
        self.c4 = conv(6, 12, 1)  # at dim 49 the column side 6+1 <= isqrt(49) is kept whole (the identity)
        self.fc = nn.LazyLinear(3)

    def forward(self, x):
        h = torch.tanh(self.c2(torch.tanh(self.c1(x))))
        return self.fc(torch.tanh(self.c4(torch.tanh(self.c3(h)))).flatten(1))


class Mixed(nn.Module):
    """A bare parameter (vmap) between folded Linear layers (hooks), and a norm layer."""

    def __init__(self):
        super().__init__()
        self.a, self.pos, self.ln, self.b = nn.Linear(5, 6), PosEmbed(4, 6), nn.LayerNorm(6), nn.Linear(6, 3)

    def forward(self, x):
        return self.b(self.ln(self.pos(self.a(x))).mean(1))


def _case(name):
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    if name == "linear-2d":
        model, x = Lin2d(), torch.randn(B, 3, generator=gen)
    elif name in ("linear-3d", "mixed"):
        model, x = (Lin3d() if name == "linear-3d" else Mixed()), torch.randn(B, 4, 5, generator=gen)
    else:
        dims = int(name[4])
        model, x = Convs(dims), torch.randn(B, 2, *([9] * dims), generator=gen)
        model(x[:1])  # materialise the lazy Linear
    return model.double(), (x.double(), torch.randint(0, 3, (B,), generator=gen))


def _loss(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


@pytest.mark.parametrize("dim", [16, 49])
@pytest.mark.parametrize("case", ["linear-2d", "linear-3d", "conv1d", "conv2d", "mixed"])
def test_folded_engines_match_brute_force(case, dim):
    model, batch = _case(case)
    names = select_params(model)
    fold = foldable_biases(model, names)
    assert set(fold) == {n for n in names if n.endswith("weight") and not n.startswith("ln.")}
    params = dict(model.named_parameters())
    proj = KroneckerProjector({n: params[n].shape for n in names}, dim, seed=7, fold=fold)
    assert {s.name for s in proj.specs if s.bias} == {w for w in fold if params[w].numel() > dim}  # the rule
    assert any(s.bias for s in proj.specs) or dim == 49
    whole_cols = [s.name for s in proj.specs if s.bias and proj.side_matrices(s.name)[1] is None]
    # linear-3d at 16: a (Linear(5, 7), folded: 7 x 6) gets (2, 6), columns whole, v = 2/2 = 1, tied with rows whole
    # (7, 2) and ahead of the square (4, 4), v = (3/2)^2 - 1 = 1.25 (mixed: a, 6 x 6, the same); c4 (1x1 kernel,
    # 12 x 7: its column side is its input, which may be kept whole): (7, 7) at 49, v = 2/7, and (2, 7) at 16, v = 1
    # against the square's 1.25
    assert whole_cols == {("linear-2d", 16): ["a.weight"], ("linear-2d", 49): ["a.weight"], ("conv1d", 49): ["c4.weight"],
                          ("conv2d", 49): ["c4.weight"], ("linear-3d", 16): ["a.weight"], ("conv1d", 16): ["c4.weight"],
                          ("conv2d", 16): ["c4.weight"], ("mixed", 16): ["a.weight"]}.get((case, dim), [])
    expected = dense_projection(proj, brute_force(model, _loss, batch, names))
    unsupported = HookGradientCapture.unsupported(model, names)
    assert unsupported == (["pos.pos"] if case == "mixed" else [])
    capture = HookGradientCapture(model, [n for n in names if n not in unsupported], proj)
    hooked, _ = per_sample_grads(model, _loss, batch, names, proj, capture)
    torch.testing.assert_close(hooked, expected, rtol=1e-10, atol=1e-12)
    vmapped = per_sample_grads_vmap(model, _loss, batch, names, proj)
    torch.testing.assert_close(vmapped, expected, rtol=1e-10, atol=1e-12)
    assert capture.verify(model, _loss, batch, sample=1) == []


def test_foldable_biases_needs_one_group_one_user_and_both_tracked():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Conv1d(2, 2, 3, bias=False)
            self.b.bias = self.a.bias  # a bias shared by two layers

    model = Tied()
    names = select_params(model)
    assert foldable_biases(model, names) == {}
    model = Lin2d()
    names = select_params(model)
    assert foldable_biases(model, names) == {"a.weight": "a.bias", "b.weight": "b.bias"}
    assert foldable_biases(model, ["a.weight", "b.weight", "b.bias"]) == {"b.weight": "b.bias"}
    groups = [[model.a.weight, model.b.weight, model.b.bias], [model.a.bias]]  # no weight decay on a.bias
    assert foldable_biases(model, names, groups) == {"b.weight": "b.bias"}


class _Broadcast(nn.Module):
    """A Linear run on a (B, d) buffer shared by every sample: shapes look per-sample, gradients are not."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.register_buffer("code", torch.randn(B, 6))

    def forward(self, x):
        return x + self.lin(self.code).mean(0)


def test_verify_demotes_a_folded_pair_together():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), _Broadcast(), nn.Linear(6, 3)).double()
    gen = torch.Generator().manual_seed(1)
    batch = (torch.randn(B, 5, generator=gen).double(), torch.randint(0, 3, (B,), generator=gen))
    names = select_params(model)
    params = dict(model.named_parameters())
    proj = KroneckerProjector({n: params[n].shape for n in names}, 16, seed=3, fold=foldable_biases(model, names))
    assert proj.spec("1.lin.weight").bias == "1.lin.bias"
    capture = HookGradientCapture(model, names, proj)
    expected = dense_projection(proj, brute_force(model, _loss, batch, names))
    wrong, _ = per_sample_grads(model, _loss, batch, names, proj, capture)
    assert not torch.allclose(wrong, expected)
    rows = wrong.clone()
    with pytest.warns(UserWarning, match="differ from autograd"):
        assert capture.verify(model, _loss, batch, rows) == ["1.lin.bias", "1.lin.weight"]
    cols = proj.slices["1.lin.weight"]
    assert torch.equal(rows[:, cols], torch.zeros_like(rows[:, cols]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grads, _ = per_sample_grads(model, _loss, batch, names, proj, capture)  # the pair on vmap now
    torch.testing.assert_close(grads, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fold_bias", [True, False])
def test_tracin_on_folded_and_unfolded_logs_equals_brute_force(tmp_path, fold_bias):
    ds, val = make_data(16, seed=1), make_data(8, seed=2).tensors
    tracker = InfluenceTracker(str(tmp_path), record_gradients=True, checkpoint_every_n_steps=1, projection_dim=6,
                               storage_dtype="float64", fold_bias=fold_bias)
    fit(tiny(), loader(ds, batch_size=4), tracker, epochs=2)
    log = InfluenceLog(tmp_path)
    proj = log.projector()
    folded = {s.name: s.bias for s in proj.specs if s.bias}
    assert folded == ({"net.0.weight": "net.0.bias", "net.3.weight": "net.3.bias"} if fold_bias else {})
    # unfolded, net.0.weight (7 x 5 at dim 6) keeps its columns whole: (1, 5), v = 2, against (2, 3), v = 2 * 5/3 - 1
    assert log.projector().out_dim == (6 + 6 if fold_bias else 5 + 6 + 6 + 3)
    got = tracin(log, mean_loss(val, name="val_loss"), module=tiny()).column(0)
    expected = brute_force_tracin(log, ds, val, *log.window(None), project=lambda g: dense_projection(proj, g))
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-14)


def test_hooks_on_the_trained_step_match_brute_force_rows(tmp_path):
    """The logged rows of a folded log (hooks in the training step's own backward) are the oracle's rows."""
    ds = make_data(16, seed=1)
    tracker = InfluenceTracker(str(tmp_path), record_gradients=True, checkpoint_every_n_steps=1, projection_dim=6,
                               storage_dtype="float64")
    with warnings.catch_warnings():  # the hooks' rows themselves: the first step's check hands none to vmap
        warnings.filterwarnings("error", message=".*not captured by hooks")
        fit(tiny(), loader(ds, batch_size=4), tracker, epochs=1)
    log = InfluenceLog(tmp_path)
    proj = log.projector()
    module = tiny()
    names = log.param_names
    for rec in log.iter_steps(fields=("grad",)):
        with torch.no_grad():
            for n, p in module.named_parameters():
                p.copy_(torch.from_numpy(log.checkpoint(rec.step)[n]))
        x, y = ds.tensors[0][rec.ids], ds.tensors[1][rec.ids]
        assert len(rec.ids) == B
        rows = dense_projection(proj, brute_force(module, _loss, (x, y), names))
        np.testing.assert_allclose(rec.grads, rows.numpy(), rtol=1e-10, atol=1e-13)


def test_a_resumed_fit_must_keep_its_logs_fold_layout():
    """A log written before folding (or with fold_bias=False) resumed by a folding fit: refused, naming fold_bias."""
    from lightning_influence.log.resume import meaning_differences

    shapes = {"fc.weight": (20, 30), "fc.bias": (20,)}
    recorded = {"recorded": {"gradients": True}}
    old = {**recorded, "projection": KroneckerProjector(shapes, 8).to_metadata()}
    new = {**recorded, "projection": KroneckerProjector(shapes, 8, fold={"fc.weight": "fc.bias"}).to_metadata()}
    assert meaning_differences(old, new) == [
        "fold_bias (biases folded into their weight's projection): the log has [], this fit has ['fc.bias']"]
    assert meaning_differences(new, new) == []
    # a resume that changed only projection_dim (fold_bias left at None) saw fold_bias listed as a second change it
    # never made: the line now says the fold follows the projection
    other = {**recorded, "projection": KroneckerProjector(shapes, 4).to_metadata()}
    assert meaning_differences(new, other) == [
        "projection_dim: the log has 8, this fit has 4",
        "fold_bias (biases folded into their weight's projection; with the default fold_bias=None it follows "
        "projection_dim): the log has ['fc.bias'], this fit has []"]


def test_an_unfolded_version_2_log_reads_and_scores_as_before():
    """tests/fixtures/log_v2_unfolded was written before folding (make_log_v2_unfolded.py): no spec names a bias, it
    reads as the unfolded layout and TracIn gives the scores that code gave and the brute-force unfolded ones."""
    from pathlib import Path

    import fixtures.make_log_v2_unfolded as old

    path = Path(__file__).parent / "fixtures" / "log_v2_unfolded"
    log = InfluenceLog(path)
    assert all("bias" not in s for s in log.meta["projection"]["specs"])
    proj = log.projector()
    assert [s.name for s in proj.specs] == ["lin.weight", "lin.bias", "out.weight", "out.bias"] and proj.out_dim == 14
    got = tracin(log, old.query(), module=old.make_module()).column(0)
    np.testing.assert_allclose(got, np.load(path / "tracin_scores.npy"), rtol=1e-12, atol=1e-15)
    module, ds = old.make_module(), old.DS()
    params = dict(module.named_parameters())
    expected = np.zeros(log.dataset_size)
    for t in range(*log.window(None)):
        with torch.no_grad():
            for n, v in log.checkpoint(t).items():
                params[n].copy_(torch.from_numpy(v))
        q = torch.autograd.grad(old.query()(module), list(params.values()))
        pq = dense_projection(proj, {n: g[None] for n, g in zip(params, q)})
        ids = log.batch_ids(t)
        for j in ids:
            b = {k: v[None] if isinstance(v, torch.Tensor) else v for k, v in ds[int(j)].items()}
            g = torch.autograd.grad(module.per_sample_loss(b)[0], list(params.values()))
            pg = dense_projection(proj, {n: gi[None] for n, gi in zip(params, g)})
            expected[j] += log.lr(t)[0] / len(ids) * float((pq * pg).sum())
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-14)


def test_row_size_of_the_benchmark_mlp():
    """MLP 784-512-512-10 at k=256, by hand: folded 256 + 256 + 10x25; unfolded adds the biases' 256 + 256 + 10."""
    from benchmarks.overhead_models import MLP

    model = MLP()
    names = select_params(model)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    folded = KroneckerProjector(shapes, 256, fold=foldable_biases(model, names))
    assert [(s.k_rows, s.k_cols) for s in folded.specs] == [(16, 16), (16, 16), (10, 25)]
    assert folded.out_dim == 762 and KroneckerProjector(shapes, 256).out_dim == 1284
