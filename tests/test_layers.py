"""Every layer engine's projected per-sample gradients against projected brute-force autograd (float64)."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_influence.capture import (HookGradientCapture, KroneckerProjector, per_sample_grads, per_sample_grads_hooks,
                                         select_params)
from lightning_influence.capture.layers import KeptInput, foldable_biases

from test_per_sample import B, brute_force, projector_for


class Seq(nn.Module):
    """Tokens (B, T) -> Embedding -> blocks -> mean-pooled logits; ``body`` sees (B, T, d)."""

    def __init__(self, body: nn.Module, vocab: int = 11, d: int = 6, padding_idx: int | None = None):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=padding_idx)
        self.body = body
        self.head = nn.Linear(d, 3)

    def forward(self, ids):
        return self.head(self.body(self.emb(ids)).mean(1))


class Residual(nn.Module):
    def __init__(self, *layers):
        super().__init__()
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.layers(x)


class Attention(nn.Module):
    """MultiheadAttention on (B, T, d) as self-, cross- (k is v) or general attention (k is not v)."""

    def __init__(self, d: int, batch_first: bool, kind: str = "self"):
        super().__init__()
        self.mha = nn.MultiheadAttention(d, 2, batch_first=batch_first)
        self.batch_first, self.kind = batch_first, kind

    def forward(self, x):
        x_in = x if self.batch_first else x.transpose(0, 1)
        mem = torch.tanh(x_in)
        k = {"self": x_in, "cross": mem, "general": mem}[self.kind]
        v = {"self": x_in, "cross": mem, "general": mem * 2}[self.kind]
        causal = torch.triu(torch.full((x.shape[1], x.shape[1]), float("-inf"), dtype=x.dtype), 1)
        out, _ = self.mha(x_in, k, v, attn_mask=causal if self.kind == "self" else None, need_weights=self.kind != "self")
        return out if self.batch_first else out.transpose(0, 1)


class PosEmbed(nn.Module):
    """A bare parameter used in forward: no hook covers it (vmap)."""

    def __init__(self, t: int, d: int):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(t, d) * 0.1)

    def forward(self, x):
        return x + self.pos


def seq_case(body_fn, padding_idx=None, vocab=11):
    def make():
        return Seq(body_fn(), vocab=vocab, padding_idx=padding_idx)

    def batch(gen):
        ids = torch.randint(0, vocab, (B, 5), generator=gen)
        ids[0, :2] = 3  # a repeated token within one sample
        if padding_idx is not None:
            ids[1, 1] = padding_idx
        return ids, torch.randint(0, 3, (B,), generator=gen)

    return make, batch


def seq_loss(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


class ConvNet(nn.Module):
    def __init__(self, dims: int):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.c1 = conv(2, 4, 3, stride=2, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.c2 = conv(4, 4, 2, dilation=2, padding=1, padding_mode="circular", groups=2)  # grouped
        self.c3 = conv(4, 6, 3, padding="same", groups=2, bias=False)
        self.dw = conv(6, 6, 3, padding=1, groups=6, padding_mode="reflect")  # depthwise
        self.fc = nn.LazyLinear(3)

    def forward(self, x):
        h = torch.tanh(self.gn(self.c1(x)))
        h = torch.tanh(self.dw(torch.tanh(self.c3(torch.tanh(self.c2(h))))))
        return self.fc(h.flatten(1))


def conv_case(dims, size):
    def make():
        model = ConvNet(dims)
        model(torch.zeros(1, 2, *([size] * dims)))  # materialise the lazy Linear
        return model

    def batch(gen):
        return torch.randn(B, 2, *([size] * dims), generator=gen), torch.randint(0, 3, (B,), generator=gen)

    return make, batch


CASES = {
    "embedding+linear-3d": seq_case(lambda: Residual(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 6))),
    "embedding-padding": seq_case(lambda: nn.Tanh(), padding_idx=0),
    "layernorm": seq_case(lambda: nn.Sequential(nn.LayerNorm(6), Residual(nn.Linear(6, 6), nn.GELU()), nn.LayerNorm(6))),
    "layernorm-2d-shape": seq_case(lambda: nn.Sequential(nn.Unflatten(2, (2, 3)), nn.LayerNorm((2, 3)),
                                                         nn.Flatten(2), nn.Tanh())),
    "layernorm-2d-input": seq_case(lambda: nn.Sequential(nn.Flatten(1), nn.LayerNorm(30), nn.Unflatten(1, (5, 6)))),
    "rmsnorm": seq_case(lambda: nn.Sequential(nn.RMSNorm(6), Residual(nn.Linear(6, 6), nn.Tanh()), nn.RMSNorm(6, eps=1e-3))),
    "mha-batch-first": seq_case(lambda: nn.Sequential(nn.LayerNorm(6), Attention(6, True))),
    "mha-seq-first": seq_case(lambda: Attention(6, False)),
    "mha-cross": seq_case(lambda: Attention(6, True, "cross")),
    "mha-general": seq_case(lambda: Attention(6, False, "general")),
    "mixed-pos-embedding": seq_case(lambda: nn.Sequential(PosEmbed(5, 6), nn.LayerNorm(6), Attention(6, True))),
    "conv1d-groupnorm": conv_case(1, 9),
    "conv2d-groupnorm": conv_case(2, 7),
    "conv3d": conv_case(3, 5),
}


def make(case):
    make_model, make_batch = CASES[case]
    torch.manual_seed(0)
    model = make_model().double()
    batch = make_batch(torch.Generator().manual_seed(1))
    batch = tuple(t.double() if t.is_floating_point() else t for t in batch)
    return model, batch


@pytest.mark.parametrize("dim", [None, 8])
@pytest.mark.parametrize("case", list(CASES))
def test_engines_match_brute_force(case, dim):
    model, batch = make(case)
    names = select_params(model)
    unsupported = HookGradientCapture.unsupported(model, names)
    assert unsupported == (["body.0.pos"] if case.startswith("mixed") else [])
    proj = projector_for(model, names, dim)
    expected = proj.project(brute_force(model, seq_loss, batch, names))
    capture = HookGradientCapture(model, [n for n in names if n not in unsupported], proj)
    grads, losses = per_sample_grads(model, seq_loss, batch, names, proj, capture)
    torch.testing.assert_close(grads, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(losses, seq_loss(model, batch), rtol=1e-12, atol=0)
    assert capture.pending == 0
    assert capture.verify(model, seq_loss, batch, sample=2) == []  # no false alarm on any engine
    assert capture.pending == 0 and not capture.enabled


@pytest.mark.parametrize("case", ["layernorm", "layernorm-2d-shape"])
def test_layer_norm_sums_by_chunks_of_samples(monkeypatch, case):
    """A LayerNorm's per-sample sums made a few samples at a time (one sample a chunk; three, the last chunk short)
    give the rows of the whole batch in one chunk bit for bit, and projected brute force (float64, 1e-10)."""
    from lightning_influence.capture import norms
    model, batch = make(case)
    names = select_params(model)
    proj = projector_for(model, names, 8)
    expected = proj.project(brute_force(model, seq_loss, batch, names))
    sample_bytes = 5 * 6 * 8  # a sample's tokens at the LayerNorm: 5 of 6 values in float64
    rows = {}
    for samples in (B, 1, 3):
        monkeypatch.setattr(norms, "_NORM_CHUNK_BYTES", samples * sample_bytes)
        capture = HookGradientCapture(model, names, proj)
        rows[samples], _ = per_sample_grads_hooks(model, seq_loss, batch, capture)
        capture.remove()
    torch.testing.assert_close(rows[B], expected, rtol=1e-10, atol=1e-12)
    assert torch.equal(rows[1], rows[B]) and torch.equal(rows[3], rows[B])


def test_vmap_part_of_a_mixed_model_runs_with_the_hooks_paused():
    """A capture left enabled by its caller: the vmap pass for the parameters no hook covers runs with the hooks off
    (the layer engines never see vmap's batched tensors: nothing pending after), and the capture is enabled again."""
    model, batch = make("mixed-pos-embedding")
    names = select_params(model)
    proj = projector_for(model, names, 8)
    capture = HookGradientCapture(model, [n for n in names if n != "body.0.pos"], proj)
    capture.enable()
    grads, _ = per_sample_grads(model, seq_loss, batch, names, proj, capture)
    assert capture.enabled and capture.pending == 0
    torch.testing.assert_close(grads, proj.project(brute_force(model, seq_loss, batch, names)), rtol=1e-10, atol=1e-12)


class FewChannels(nn.Module):
    """A first convolution on one channel (its projected columns, k_cols a position, outgrow the input), a second on
    four with stride 2 (its columns are smaller than its input)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 2, 3, stride=2)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.c2(torch.tanh(self.c1(x)))).flatten(1))


def _image_case(model_cls: type[nn.Module], image: tuple[int, ...]):
    """``(model in float64, (images, labels) of B samples, tracked names)``, seeded."""
    torch.manual_seed(0)
    model = model_cls().double()
    gen = torch.Generator().manual_seed(1)
    batch = torch.randn(B, *image, generator=gen, dtype=torch.float64), torch.randint(0, 3, (B,), generator=gen)
    return model, batch, select_params(model)


def _folded_projector(model: nn.Module, names: list[str], dim: int, splits=None) -> KroneckerProjector:
    params = dict(model.named_parameters())
    return KroneckerProjector({n: params[n].shape for n in names}, dim=dim, seed=5, fold=foldable_biases(model, names),
                              splits=splits)


def test_conv_keeps_its_input_where_the_projected_columns_would_be_larger():
    """The forward keeps the first layer's input (KeptInput: 4 columns at each of 36 positions against 36 input
    values) and the gradient hook makes the columns; the second keeps its columns. Rows equal projected float64
    brute force, bias folded; with the input memo of the HVP passes on, the first layer's columns are made in the
    forward, kept by the memo, and the passes that reuse them give the same rows bit for bit."""
    model, batch, names = _image_case(FewChannels, (1, 6, 6))
    proj = _folded_projector(model, names, 16)
    assert proj.spec("c1.weight").bias == "c1.bias" and proj.spec("c1.weight").k_cols == 4
    capture = HookGradientCapture(model, names, proj)
    capture.enable()
    seq_loss(model, batch)
    kept = {m: type(records[0][0]) for m, records in capture._records.items()}
    assert kept["c1"] is KeptInput and kept["c2"] is torch.Tensor
    capture.disable()
    capture.clear()
    expected = proj.project(brute_force(model, seq_loss, batch, names))
    grads, _ = per_sample_grads_hooks(model, seq_loss, batch, capture)
    torch.testing.assert_close(grads, expected, rtol=1e-10, atol=1e-12)

    capture.inputs.keep = True  # the HVP passes' memo: c1 is fed the batch
    kept_pass, _ = per_sample_grads_hooks(model, seq_loss, batch, capture)
    saved = capture.inputs._entries[id(model.c1)][2]
    assert isinstance(saved, torch.Tensor) and saved.shape == (B, 1, 4, 36)
    capture.inputs.reuse = True
    reused, _ = per_sample_grads_hooks(model, seq_loss, batch, capture)
    assert torch.equal(kept_pass, grads) and torch.equal(reused, grads)


class ConvPaths(nn.Module):
    """One convolution on each path of the engine: ``c1`` (3 input channels: channels-last columns), ``p1``/``p2``
    (1x1 kernels, stride, zero and reflect padding, groups, a folded bias and none: their unprojected column side is
    the strided input itself), ``c3`` (12 channels: NCHW columns; stride, dilation), ``gc`` (grouped, circular padding,
    2 channels a group: channels-last, per-group products)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.p1 = nn.Conv2d(6, 8, 1, stride=2, padding=1)
        self.p2 = nn.Conv2d(8, 12, 1, groups=2, padding=1, padding_mode="reflect", bias=False)
        self.c3 = nn.Conv2d(12, 6, 3, stride=2, dilation=2, padding=2)
        self.gc = nn.Conv2d(6, 6, 3, groups=3, padding=1, padding_mode="circular")
        self.fc = nn.Linear(96, 3)

    def forward(self, x):
        for layer in (self.c1, self.p1, self.p2, self.c3, self.gc):
            x = torch.tanh(layer(x))
        return self.fc(x.flatten(1))


# (k_rows, k_cols) at dim 20 (c1, c3 forced to each order of a one-group product: c1 (2, 8), 6 x 28, rows first,
# 2 (6L + 8L) < 8 (6L + 12) multiply-adds a sample; c3 (4, 3), 6 x 109, columns first, 4 (6L + 3L) > 3 (6L + 24))
PATH_SPLITS = {"c1.weight": (2, 8), "p1.weight": (2, 7), "p2.weight": (4, 4), "c3.weight": (4, 3), "gc.weight": (3, 6)}


@pytest.mark.parametrize("forced", [False, True])
def test_every_convolution_path_matches_brute_force(forced):
    """Float64 brute force at 1e-10, by the split rule and by forced splits; the 1x1 kernels keep their column side
    whole by the rule too (p1: 8 x 7 folded, (2, 7), v = 1 against rows whole (8, 2), v = 1, ties to the smaller
    k_rows; p2: 12 x 4, (5, 4), v = 2/5). The HVP passes' input memo (c1 is fed the batch) gives the same rows."""
    model, batch, names = _image_case(ConvPaths, (3, 8, 8))
    proj = _folded_projector(model, names, 20, PATH_SPLITS if forced else None)
    sides = {s.name: (s.k_rows, s.k_cols) for s in proj.specs if s.name in PATH_SPLITS}
    assert sides == PATH_SPLITS if forced else {n: sides[n] for n in ("p1.weight", "p2.weight")} == {
        "p1.weight": (2, 7), "p2.weight": (5, 4)}
    assert proj.spec("p1.weight").bias == "p1.bias" and proj.side_matrices("p1.weight")[1] is None
    assert proj.side_matrices("p2.weight")[1] is None
    capture = HookGradientCapture(model, names, proj)
    expected = proj.project(brute_force(model, seq_loss, batch, names))
    grads, _ = per_sample_grads_hooks(model, seq_loss, batch, capture)
    torch.testing.assert_close(grads, expected, rtol=1e-10, atol=1e-12)
    assert capture.verify(model, seq_loss, batch, sample=1) == []
    capture.inputs.keep = True
    kept_pass, _ = per_sample_grads_hooks(model, seq_loss, batch, capture)
    capture.inputs.reuse = True
    reused, _ = per_sample_grads_hooks(model, seq_loss, batch, capture)
    assert torch.equal(kept_pass, grads) and torch.equal(reused, grads)


def test_mha_out_proj_captured_by_hooks_alone():
    """The attention engine fills out_proj's columns although out_proj's own module hooks never fire."""
    model, batch = make("mha-batch-first")
    names = [n for n in select_params(model) if ".mha." in n]
    assert names == ["body.1.mha.in_proj_weight", "body.1.mha.in_proj_bias", "body.1.mha.out_proj.weight",
                     "body.1.mha.out_proj.bias"]
    proj = projector_for(model, names, 8)
    capture = HookGradientCapture(model, names, proj)
    grads, _ = per_sample_grads_hooks(model, seq_loss, batch, capture)
    expected = proj.project(brute_force(model, seq_loss, batch, names))
    torch.testing.assert_close(grads, expected, rtol=1e-10, atol=1e-12)
    assert F.linear is torch._C._nn.linear  # the recorder is removed after the forward


def test_lora_tracks_only_the_adapters():
    class LoRALinear(nn.Module):
        def __init__(self, d_in, d_out, rank):
            super().__init__()
            self.base = nn.Linear(d_in, d_out)
            self.base.requires_grad_(False)
            self.down = nn.Linear(d_in, rank, bias=False)
            self.up = nn.Linear(rank, d_out, bias=False)

        def forward(self, x):
            return self.base(x) + self.up(self.down(x))

    model, batch = make("embedding+linear-3d")
    model.body.layers[0] = LoRALinear(6, 8, 2).double()
    model.emb.requires_grad_(False)
    names = select_params(model)
    assert [n for n in names if "layers.0" in n] == ["body.layers.0.down.weight", "body.layers.0.up.weight"]
    proj = projector_for(model, names, 8)
    capture = HookGradientCapture(model, names, proj)
    grads, _ = per_sample_grads_hooks(model, seq_loss, batch, capture)
    torch.testing.assert_close(grads, proj.project(brute_force(model, seq_loss, batch, names)), rtol=1e-10, atol=1e-12)


def test_module_without_batch_dimension_is_demoted_to_vmap():
    """nanoGPT-style positional embedding of ``arange(T)``: its output has no batch dimension."""

    class Positional(nn.Module):
        def __init__(self):
            super().__init__()
            self.wpe = nn.Embedding(5, 6)

        def forward(self, x):
            return x + self.wpe(torch.arange(x.shape[1]))

    torch.manual_seed(0)
    model = Seq(nn.Sequential(Positional(), nn.LayerNorm(6))).double()
    batch = CASES["embedding+linear-3d"][1](torch.Generator().manual_seed(1))
    names = select_params(model)
    proj = projector_for(model, names, 8)
    capture = HookGradientCapture(model, names, proj)
    assert "body.0.wpe.weight" in capture.param_names
    expected = proj.project(brute_force(model, seq_loss, batch, names))
    with pytest.warns(UserWarning, match="body.0.wpe.weight"):  # demoted at the first pass
        first, _ = per_sample_grads(model, seq_loss, batch, names, proj, capture)
    with warnings.catch_warnings():  # on vmap from then on, silently
        warnings.simplefilter("error")
        second, _ = per_sample_grads(model, seq_loss, batch, names, proj, capture)
    for grads in (first, second):
        torch.testing.assert_close(grads, expected, rtol=1e-10, atol=1e-12)
    assert capture.demoted == ["body.0.wpe.weight"] and "body.0.wpe.weight" not in capture.param_names


class _WPE(nn.Module):
    """nanoGPT-style positional embedding: ``wpe(arange(T))``, broadcast over the batch."""

    def __init__(self, t: int, d: int):
        super().__init__()
        self.wpe = nn.Embedding(t, d)

    def forward(self, x):
        return x + self.wpe(torch.arange(x.shape[1]))


def test_verify_demotes_a_broadcast_module_whose_length_equals_the_batch():
    """With T == B the shapes look per-sample; only the comparison with one sample's autograd tells."""
    torch.manual_seed(0)
    model = Seq(nn.Sequential(_WPE(B, 6), nn.LayerNorm(6))).double()
    gen = torch.Generator().manual_seed(1)
    batch = (torch.randint(0, 11, (B, B), generator=gen), torch.randint(0, 3, (B,), generator=gen))
    names = select_params(model)
    proj = projector_for(model, names, 8)
    capture = HookGradientCapture(model, names, proj)
    expected = proj.project(brute_force(model, seq_loss, batch, names))
    wrong, _ = per_sample_grads(model, seq_loss, batch, names, proj, capture)  # shapes match: not caught
    assert not torch.allclose(wrong, expected)
    rows = wrong.clone()
    with pytest.warns(UserWarning, match="differ from autograd"):
        assert capture.verify(model, seq_loss, batch, rows) == ["body.0.wpe.weight"]
    cols = proj.slices["body.0.wpe.weight"]
    assert torch.equal(rows[:, cols], torch.zeros_like(rows[:, cols]))
    torch.testing.assert_close(rows, wrong.index_fill(1, torch.arange(cols.start, cols.stop), 0))
    grads, _ = per_sample_grads(model, seq_loss, batch, names, proj, capture)
    torch.testing.assert_close(grads, expected, rtol=1e-10, atol=1e-12)


def test_tied_embedding_and_output_layer_add_up():
    """GPT-style weight tying: the token embedding is the output layer; both engines' blocks add up."""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.ln = nn.Embedding(11, 6), nn.LayerNorm(6)
            self.out = nn.Linear(6, 11, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, ids):
            return self.out(self.ln(self.emb(ids))).mean(1)[:, :3]

    torch.manual_seed(0)
    model = Tied().double()
    batch = CASES["embedding+linear-3d"][1](torch.Generator().manual_seed(1))
    names = select_params(model)
    assert names == ["emb.weight", "ln.weight", "ln.bias"]
    proj = projector_for(model, names, 8)
    capture = HookGradientCapture(model, names, proj)
    grads, _ = per_sample_grads_hooks(model, seq_loss, batch, capture)
    torch.testing.assert_close(grads, proj.project(brute_force(model, seq_loss, batch, names)), rtol=1e-10, atol=1e-12)
    assert capture.verify(model, seq_loss, batch) == []


def test_projected_columns_stay_float32_under_autocast():
    """A Linear fed a float32 batch inside bf16 autocast: its projected columns ``x P_c`` are taken in float32 (autocast
    rounded them to bfloat16: rows off by ~1e-3). The loss is linear in the output with bf16-exact coefficients, so the
    output gradient is exact and the rows equal the float64 projection of ``c ⊗ x_b`` up to float32 round-off (1e-5:
    the products' summation order is the BLAS's, 1.9e-6 off on an AMD EPYC; bfloat16 columns are ~1e-3 off)."""
    torch.manual_seed(0)
    model = nn.Linear(40, 30)
    c = torch.randint(-3, 4, (30,)).float()
    x = torch.randn(B, 40)
    names = ["weight", "bias"]
    proj = KroneckerProjector({n: p.shape for n, p in model.named_parameters()}, dim=64, seed=5)
    capture = HookGradientCapture(model, names, proj)
    capture.enable()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = (model(x) * c).sum(1)
    capture.disable()
    losses.sum().backward()
    rows = capture.collect(torch.ones(B))
    expected = proj.project({"weight": c.double()[None, :, None] * x.double()[:, None, :],
                             "bias": c.double().expand(B, -1)})
    torch.testing.assert_close(rows.double(), expected, rtol=1e-5, atol=1e-5)
