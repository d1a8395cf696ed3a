import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from lightning_influence.capture import (
    HookGradientCapture,
    KroneckerProjector,
    per_sample_grads_hooks,
    per_sample_grads_vmap,
    select_params,
)

B = 4


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 7)
        self.act = nn.ReLU(inplace=True)  # in-place op right after a hooked output
        self.fc2 = nn.Linear(7, 3)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def mlp_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def mlp_batch(gen):
    return (torch.randn(B, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (B,), generator=gen))


class SeqModel(nn.Module):
    """Linear on (B, L, in), then a Linear used twice, plus a Linear never called."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 6)
        self.shared = nn.Linear(6, 6)
        self.head = nn.Linear(6, 2, bias=False)
        self.unused = nn.Linear(6, 6)

    def forward(self, x):
        h = torch.tanh(self.embed(x))  # (B, L, 6)
        h = torch.tanh(self.shared(torch.tanh(self.shared(h))))
        return self.head(h.mean(1))


def seq_loss(model, batch):
    return ((model(batch["x"]) - batch["y"]) ** 2).sum(-1) * batch["scale"]


def seq_batch(gen):
    return {
        "x": torch.randn(B, 3, 4, generator=gen, dtype=torch.float64),
        "y": torch.randn(B, 2, generator=gen, dtype=torch.float64),
        "scale": 0.5,  # non-tensor leaf
    }


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(3, 4, 2, dilation=2, padding=1, padding_mode="reflect")
        self.c3 = nn.Conv2d(4, 2, 3, padding="same", bias=False)
        self.fc = nn.Linear(32, 3)

    def forward(self, x):  # (B, 2, 7, 7) -> 4x4 -> 4x4 -> 4x4
        h = torch.tanh(self.c2(torch.tanh(self.c1(x))))
        return self.fc(torch.tanh(self.c3(h)).flatten(1))


def conv_batch(gen):
    return (torch.randn(B, 2, 7, 7, generator=gen, dtype=torch.float64), torch.randint(0, 3, (B,), generator=gen))


CASES = {
    "mlp": (MLP, mlp_loss, mlp_batch),
    "seq": (SeqModel, seq_loss, seq_batch),
    "conv": (ConvNet, mlp_loss, conv_batch),
}


def make_case(case: str):
    model_cls, loss_fn, batch_fn = CASES[case]
    torch.manual_seed(0)
    model = model_cls().double()
    return model, loss_fn, batch_fn(torch.Generator().manual_seed(1))


def brute_force(model, loss_fn, batch, names) -> dict[str, torch.Tensor]:
    """Per-sample gradients by one autograd.grad call per sample (zeros if unused)."""
    params = dict(model.named_parameters())
    rows = []
    for i in range(B):
        sample = pytree.tree_map(lambda x: x[i : i + 1] if isinstance(x, torch.Tensor) else x, batch)
        grads = torch.autograd.grad(loss_fn(model, sample)[0], [params[n] for n in names], allow_unused=True)
        rows.append([torch.zeros_like(params[n]) if g is None else g for n, g in zip(names, grads)])
    return {n: torch.stack([r[j] for r in rows]) for j, n in enumerate(names)}


def projector_for(model, names, dim):
    params = dict(model.named_parameters())
    return KroneckerProjector({n: params[n].shape for n in names}, dim=dim, seed=5)


def assert_hooks_match_brute_force(model, loss_fn, batch, dim):
    """Every tracked parameter of ``model`` on hooks, its projected rows equal to projected brute force at 1e-10, and
    the first step's check against autograd demoting none."""
    names = select_params(model)
    assert HookGradientCapture.unsupported(model, names) == []
    proj = projector_for(model, names, dim)
    capture = HookGradientCapture(model, names, proj)
    grads, _ = per_sample_grads_hooks(model, loss_fn, batch, capture)
    torch.testing.assert_close(grads, proj.project(brute_force(model, loss_fn, batch, names)), rtol=1e-10, atol=1e-12)
    assert capture.verify(model, loss_fn, batch) == []


@pytest.mark.parametrize("dim", [None, 8])
@pytest.mark.parametrize("case", list(CASES))
def test_hooks_and_vmap_match_brute_force(case, dim):
    model, loss_fn, batch = make_case(case)
    names = select_params(model)
    proj = projector_for(model, names, dim)
    expected = proj.project(brute_force(model, loss_fn, batch, names))
    capture = HookGradientCapture(model, names, proj)
    hooks, losses = per_sample_grads_hooks(model, loss_fn, batch, capture)
    vmapped = per_sample_grads_vmap(model, loss_fn, batch, names, proj, chunk_size=3)
    assert hooks.shape == vmapped.shape == (B, proj.out_dim)
    torch.testing.assert_close(hooks, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(vmapped, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(losses, loss_fn(model, batch), rtol=1e-12, atol=0)
    if case == "seq":  # the never-called module gets zero gradients
        unused = torch.cat([hooks[:, proj.slices[n]] for n in ("unused.weight", "unused.bias")], 1)
        assert torch.equal(unused, torch.zeros_like(unused))


class Twice(nn.Module):
    """A Linear on ``(B, in)`` called twice: its blocks add up (the general sum, not the one-write fast path)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(torch.tanh(self.fc(x)))))


@pytest.mark.parametrize("dim", [None, 8])
def test_linear_called_twice_on_two_dim_inputs(dim):
    torch.manual_seed(0)
    model = Twice().double()
    batch = mlp_batch(torch.Generator().manual_seed(1))
    names = select_params(model)
    proj = projector_for(model, names, dim)
    expected = proj.project(brute_force(model, mlp_loss, batch, names))
    hooks, _ = per_sample_grads_hooks(model, mlp_loss, batch, HookGradientCapture(model, names, proj))
    torch.testing.assert_close(hooks, expected, rtol=1e-10, atol=1e-12)


def test_collect_in_a_training_step():
    """The capture as a callback uses it: backward of mean loss / accumulation steps."""
    model, loss_fn, batch = make_case("seq")
    names = select_params(model, exclude=["unused.*"])
    proj = projector_for(model, names, 8)
    expected = proj.project(brute_force(model, loss_fn, batch, names))
    capture = HookGradientCapture(model, names, proj)

    (loss_fn(model, batch).mean() / 2).backward()  # not enabled: nothing captured
    capture.enable()
    with torch.no_grad():  # validation-style forward: nothing captured
        loss_fn(model, batch)
    assert capture.pending == 0
    (loss_fn(model, batch).mean() / 2).backward()
    capture.disable()
    grads = capture.collect(torch.full((B,), 1 / (2 * B), dtype=torch.float64))
    torch.testing.assert_close(grads, expected, rtol=1e-10, atol=1e-12)
    assert capture.pending == 0

    capture.remove()
    capture.enable()
    (loss_fn(model, batch).sum()).backward()
    assert capture.pending == 0


@pytest.mark.parametrize("case", ["mlp", "conv"])
def test_collect_divides_each_row_by_its_own_weight(case):
    """Per-sample weights that differ (a weighted loss): every row divided by its own, on the one-write path with
    outer-product blocks only (the MLP) and with dense blocks beside them (the convolutions and the Linear head)."""
    model, loss_fn, batch = make_case(case)
    names = select_params(model)
    proj = projector_for(model, names, 8)
    expected = proj.project(brute_force(model, loss_fn, batch, names))
    capture = HookGradientCapture(model, names, proj)
    weights = torch.tensor([0.5, -2.0, 3.0, 0.25], dtype=torch.float64)
    capture.enable()
    (loss_fn(model, batch) * weights).sum().backward()
    capture.disable()
    torch.testing.assert_close(capture.collect(weights), expected, rtol=1e-10, atol=1e-12)


def test_params_override_leaves_live_model_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()
    batch = mlp_batch(torch.Generator().manual_seed(2))
    names = select_params(model, include=["0.*", "3.*"])
    proj = projector_for(model, names, None)
    before = copy.deepcopy(model.state_dict())
    perturbed = {n: p.detach() + 0.1 for n, p in model.named_parameters()}
    reference = copy.deepcopy(model)
    reference.load_state_dict(perturbed, strict=False)
    expected = proj.project(brute_force(reference.eval(), mlp_loss, batch, names))

    model.eval()
    vmapped = per_sample_grads_vmap(model, mlp_loss, batch, names, proj, params=perturbed)
    capture = HookGradientCapture(model, names, proj)
    hooks, _ = per_sample_grads_hooks(model, mlp_loss, batch, capture, params=perturbed)
    torch.testing.assert_close(vmapped, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(hooks, expected, rtol=1e-10, atol=1e-12)

    model.train()  # BatchNorm would update its running stats in place
    per_sample_grads_hooks(model, mlp_loss, batch, capture, params=perturbed)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())


def test_select_params():
    model = MLP()
    model.fc1.bias.requires_grad_(False)
    assert select_params(model) == ["fc1.weight", "fc2.weight", "fc2.bias"]
    assert select_params(model, include=["fc2.*", "*.bias"]) == ["fc2.weight", "fc2.bias"]
    assert select_params(model, exclude=["*.bias"]) == ["fc1.weight", "fc2.weight"]
    with pytest.raises(ValueError, match="available: \\['fc1.weight', 'fc2.weight', 'fc2.bias'\\]"):
        select_params(model, include=["conv*"])


def test_unsupported_params():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.ln = nn.LayerNorm(4)
            self.grouped = nn.Conv2d(4, 4, 1, groups=2)
            self.bn = nn.BatchNorm1d(4)  # has an engine (capture/batchnorm.py)
            self.tied = nn.Linear(4, 10, bias=False)  # tied with an Embedding: both have engines
            self.emb = nn.Embedding(10, 4)
            self.emb.weight = self.tied.weight
            self.odd = nn.Linear(4, 4, bias=False)  # tied with a module no engine covers (a subclass with a forward)
            self.sub = type("SubLinear", (nn.Linear,), {"forward": lambda self, x: nn.Linear.forward(self, x)})(4, 4, bias=False)
            self.sub.weight = self.odd.weight
            self.capped = nn.Embedding(10, 4, max_norm=1.0)  # renormalises rows in place
            self.attn = nn.MultiheadAttention(4, 2, add_bias_kv=True)
            self.pos = nn.Parameter(torch.zeros(4))  # used directly in some forward

    model = Mixed()
    names = select_params(model)
    assert "tied.weight" in names and "emb.weight" not in names  # one name per tensor
    assert HookGradientCapture.unsupported(model, names) == [
        "pos",
        "odd.weight",
        "capped.weight",
        "attn.bias_k",
        "attn.bias_v",
    ]
    with pytest.raises(ValueError, match="odd.weight"):
        HookGradientCapture(model, names, projector_for(model, names, None))


def test_call_with_params_moves_the_batch_to_the_parameters_device():
    """A dataset gives CPU batches while the estimators' parameters may live on a GPU (found by gpu_check on
    CUDA: DIT and Diff-In failed with 'Expected all tensors to be on the same device'); the ``meta`` device
    stands in for the GPU here."""
    import torch.nn.functional as F

    from lightning_influence.capture import call_with_params

    model = torch.nn.Linear(3, 2)
    params = {n: torch.empty_like(p, device="meta") for n, p in model.named_parameters()}
    batch = (torch.randn(4, 3), torch.tensor([0, 1, 1, 0]))
    out = call_with_params(model, lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"), params, batch)
    assert out.device.type == "meta" and out.shape == (4,)
    assert batch[0].device.type == "cpu"  # the caller's batch is not moved in place


def test_collect_refuses_a_zero_loss_weight():
    """A sample whose loss the step's total weighs by zero (or -0.0) has no recoverable per-sample gradient."""
    model, loss_fn, batch = make_case("mlp")
    names = select_params(model)
    capture = HookGradientCapture(model, names, projector_for(model, names, 8))
    for zero in (0.0, -0.0):
        weights = torch.tensor([0.5, zero, 3.0, 0.25], dtype=torch.float64)
        capture.enable()
        (loss_fn(model, batch) * weights).sum().backward()
        capture.disable()
        with pytest.raises(ValueError, match="loss_grad has zeros"):
            capture.collect(weights)
