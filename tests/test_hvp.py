import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lightning_influence.capture import (
    HookGradientCapture,
    KroneckerProjector,
    exact_hvp,
    fd_directional_derivative,
    flatten,
    parameter_epsilon,
    per_sample_grads_hooks,
    unflatten,
)

B = 4


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


@pytest.fixture(scope="module")
def setup():
    """Tanh MLP, its batch, the batch-mean gradient G_B and exact per-sample H_z G_B."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    gen = torch.Generator().manual_seed(1)
    batch = (torch.randn(B, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (B,), generator=gen))
    params = {n: p.detach() for n, p in model.named_parameters()}
    g_b = dict(zip(params, torch.autograd.grad(loss_fn(model, batch).mean(), list(model.parameters()))))
    x, y = batch

    def sample_loss(i):
        return lambda p: F.cross_entropy(functional_call(model, p, (x[i : i + 1],)), y[i : i + 1])

    exact = {n: torch.stack([exact_hvp(sample_loss(i), params, g_b)[n] for i in range(B)]) for n in params}
    return model, batch, params, g_b, exact


def fd_per_sample_hvp(setup, dim, eps0):
    model, batch, params, g_b, exact = setup
    proj = KroneckerProjector({n: p.shape for n, p in params.items()}, dim=dim, seed=2)
    capture = HookGradientCapture(model, list(params), proj)
    fd, eps = fd_directional_derivative(
        lambda p: per_sample_grads_hooks(model, loss_fn, batch, capture, params=p)[0], params, g_b, eps0=eps0
    )
    return fd, proj.project(exact), eps


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("dim", [None, 8])
def test_fd_per_sample_hvp_matches_exact(setup, dim):
    fd, expected, _ = fd_per_sample_hvp(setup, dim, eps0=1e-3)
    assert fd.shape == expected.shape == (B, expected.shape[1])
    assert rel_err(fd, expected) < 1e-5


def test_fd_error_is_second_order(setup):
    # Central differences: error = c ε² + O(ε⁴), so halving ε divides it by ~4.
    # ε is large enough here that float64 rounding (~1e-16/ε) is negligible.
    fd1, expected, eps1 = fd_per_sample_hvp(setup, None, eps0=0.2)
    fd2, _, eps2 = fd_per_sample_hvp(setup, None, eps0=0.1)
    assert float(eps1) == pytest.approx(2 * float(eps2), rel=1e-12)  # ε: a 0-d tensor (no host sync)
    ratio = rel_err(fd1, expected) / rel_err(fd2, expected)
    assert 3.7 < ratio < 4.3


def test_forward_scheme_is_first_order_and_reuses_the_base_value(setup):
    # Forward differences: error = c ε + O(ε²), so halving ε halves it.
    model, batch, params, g_b, exact = setup
    proj = KroneckerProjector({n: p.shape for n, p in params.items()}, dim=None)
    capture = HookGradientCapture(model, list(params), proj)

    def fn(p):
        return per_sample_grads_hooks(model, loss_fn, batch, capture, params=p)[0]

    expected = proj.project(exact)
    errors = []
    for eps0 in (0.02, 0.01, 0.005):
        fd, _ = fd_directional_derivative(fn, params, g_b, eps0=eps0, scheme="forward")
        errors.append(rel_err(fd, expected))
    assert all(1.8 < errors[i] / errors[i + 1] < 2.2 for i in range(2)), errors
    base = fn(params)
    reused, _ = fd_directional_derivative(fn, params, g_b, eps0=0.01, scheme="forward", at=base)
    recomputed, _ = fd_directional_derivative(fn, params, g_b, eps0=0.01, scheme="forward")
    assert torch.equal(reused, recomputed)
    wrong, _ = fd_directional_derivative(fn, params, g_b, eps0=0.01, scheme="forward", at=base * 1.001)
    assert rel_err(wrong, expected) > 10 * errors[1]  # `at` is really used
    with pytest.raises(ValueError, match="scheme"):
        fd_directional_derivative(fn, params, g_b, scheme="backward")


def test_kink_guard_keeps_the_one_sided_difference_that_did_not_jump():
    """Rows linear in θ plus a unit jump where w_i·θ crosses k_i (a ReLU gradient's kink): the jump
    lies on the + side for row 0, on the − side for row 1, nowhere near for row 2."""
    theta = {"t": torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)}
    v = {"t": torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)}
    W = torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, 1.0], [2.0, 0.0, 1.0]], dtype=torch.float64)
    slopes = torch.tensor([3.0, -1.0, 0.5], dtype=torch.float64)
    eps0 = 1e-3
    eps = parameter_epsilon(theta, eps0)
    proj = W @ theta["t"]
    step = eps * (W @ v["t"]) / float(torch.linalg.vector_norm(v["t"]))  # how far w_i·θ moves at θ ± εv̂
    kinks = torch.stack([proj[0] + 0.5 * step[0], proj[1] - 0.5 * step[1], proj[2] + 100.0])

    def fn(p):
        z = W @ p["t"]
        return (slopes * z + (z > kinks).double())[:, None] * torch.ones(1, 2, dtype=torch.float64)  # 3 rows of 2

    exact = ((slopes * (W @ v["t"]))[:, None] * torch.ones(1, 2, dtype=torch.float64))
    plain, _ = fd_directional_derivative(fn, theta, v, eps0)
    guarded, _ = fd_directional_derivative(fn, theta, v, eps0, at=fn(theta), kink_guard=0.5)
    assert (plain[:2] - exact[:2]).abs().min() > 100  # the jump divided by 2ε
    torch.testing.assert_close(plain[2], exact[2], rtol=1e-8, atol=0)
    torch.testing.assert_close(guarded, exact, rtol=1e-8, atol=0)
    computed, _ = fd_directional_derivative(fn, theta, v, eps0, kink_guard=0.5)  # fn(θ) evaluated inside
    torch.testing.assert_close(computed, guarded, rtol=0, atol=0)
    with pytest.raises(ValueError, match="needs scheme='central'"):
        fd_directional_derivative(fn, theta, v, eps0, scheme="forward", kink_guard=0.5)


def test_parameter_epsilon():
    params = {"a": torch.full((3, 4), 2.0), "b": torch.zeros(4)}
    assert parameter_epsilon(params, eps0=1e-2) == pytest.approx(1e-2 * (1 + math.sqrt(48)) / 4, rel=1e-6)
    params64 = {n: t.double() for n, t in params.items()}
    assert parameter_epsilon(params64, eps0=1e-2) == pytest.approx(1e-2 * (1 + math.sqrt(48)) / 4, rel=1e-14)


def test_fd_isolates_rng_and_copies_params():
    params = {"w": torch.randn(50, dtype=torch.float64), "c": torch.randn(3, dtype=torch.float64)}
    originals = {n: t.clone() for n, t in params.items()}
    v = {"w": torch.randn(50, dtype=torch.float64)}

    def fn(p):  # linear in w, with a random dropout mask drawn on each call
        return F.dropout(p["w"], 0.5, training=True) * p["c"].sum()

    state = torch.get_rng_state()
    fd, _ = fd_directional_derivative(fn, params, v)
    assert torch.equal(torch.get_rng_state(), state)  # caller's random stream untouched
    mask = F.dropout(torch.ones(50, dtype=torch.float64), 0.5, training=True)  # the mask fn drew
    torch.testing.assert_close(fd, mask * v["w"] * params["c"].sum(), rtol=1e-8, atol=1e-10)
    assert all(torch.equal(params[n], originals[n]) for n in params)

    zero, _ = fd_directional_derivative(fn, params, {"w": torch.zeros(50, dtype=torch.float64)})
    assert torch.equal(zero, torch.zeros(50, dtype=torch.float64))


def test_exact_hvp_matches_explicit_hessian():
    gen = torch.Generator().manual_seed(3)
    shapes = {"w": (3, 2), "b": (3,)}
    params = {n: torch.randn(*s, generator=gen, dtype=torch.float64) for n, s in shapes.items()}
    x = torch.randn(5, 2, generator=gen, dtype=torch.float64)

    def loss(p):
        return torch.tanh(x @ p["w"].T + p["b"]).pow(3).sum()

    theta = flatten(params, shapes)
    hessian = torch.autograd.functional.hessian(lambda vec: loss(unflatten(vec, shapes)), theta)
    for v in (
        {n: torch.randn(*s, generator=gen, dtype=torch.float64) for n, s in shapes.items()},
        {"w": torch.randn(3, 2, generator=gen, dtype=torch.float64)},  # b missing: zero
    ):
        hv = exact_hvp(loss, params, v)
        v_flat = flatten({n: v.get(n, torch.zeros(s, dtype=torch.float64)) for n, s in shapes.items()}, shapes)
        torch.testing.assert_close(flatten(hv, shapes), hessian @ v_flat, rtol=1e-12, atol=1e-12)


def test_exact_hvp_through_fused_attention_in_float32():
    """A causal ``scaled_dot_product_attention`` layer in float32 on the CPU picks the fused flash kernel, which has no
    forward AD ('forward AD with _scaled_dot_product_flash_attention_for_cpu'): ``exact_hvp`` runs through the math
    kernel, and equals the float64 double-backward ``H v`` (``torch.autograd.functional.hvp``) of the same loss with
    the attention written out (softmax of the masked scores)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, 5, 8, generator=gen)  # (batch, heads, positions, head dim)
    params = {n: 0.3 * torch.randn(8, 8, generator=gen) for n in ("wq", "wk", "wv")}
    v = {n: torch.randn(8, 8, generator=gen) for n in params}

    def loss(p):
        q, k, val = x @ p["wq"], x @ p["wk"], x @ p["wv"]
        return F.scaled_dot_product_attention(q, k, val, is_causal=True).pow(2).sum()

    def written_out(*t):
        q, k, val = (x.double() @ w for w in t)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(torch.ones(5, 5).triu(1).bool(), float("-inf"))
        return (scores.softmax(-1) @ val).pow(2).sum()

    names = list(params)
    _, reference = torch.autograd.functional.hvp(written_out, tuple(params[n].double() for n in names),
                                                 tuple(v[n].double() for n in names))
    hv = exact_hvp(loss, params, v)
    for n, expected in zip(names, reference):
        assert hv[n].dtype == torch.float32
        torch.testing.assert_close(hv[n].double(), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fd_evaluates_at_exactly_theta_plus_and_minus_eps_v_hat(dtype):
    """Both sides share one ε v̂ per tensor (made once); the points are bit for bit θ ± ε v̂ as written out, and a
    caller's ``direction_norm`` (the stacked per-tensor norms, as the tracker reuses them) changes nothing."""
    from lightning_influence.capture.hvp import _epsilon, fd_directional_derivative, norm_of_norms

    g = torch.Generator().manual_seed(3)
    theta = {"a": torch.randn(5, 4, generator=g, dtype=dtype), "b": torch.randn(7, generator=g, dtype=dtype)}
    v = {"a": torch.randn(5, 4, generator=g, dtype=dtype), "b": torch.randn(7, generator=g, dtype=dtype)}
    seen = []

    def fn(params):
        seen.append({n: t.clone() for n, t in params.items()})
        return torch.cat([t.reshape(-1) for t in params.values()])[None] ** 3

    out, eps = fd_directional_derivative(fn, theta, v, 1e-3, "central")
    v_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in v.values()]).double())
    unit = _epsilon(theta, 1e-3) / v_norm
    for point, sign in zip(seen, (1.0, -1.0)):
        for n in theta:
            assert torch.equal(point[n], torch.addcmul(theta[n], v[n], (sign * unit).to(dtype)))
    norms = torch.stack([torch.linalg.vector_norm(t) for t in v.values()])
    again, _ = fd_directional_derivative(fn, theta, v, 1e-3, "central", direction_norm=norm_of_norms(norms))
    assert torch.equal(out, again)


@pytest.mark.parametrize("scheme", ["central", "forward"])
def test_fd_workspace_is_reused_and_changes_nothing(scheme):
    """A caller's workspace holds the perturbed parameters (filled once, the same storage at every later call and
    for both sides); the results are bit for bit those without it and the parameters are never written."""
    g = torch.Generator().manual_seed(5)
    theta = {"a": torch.randn(6, 3, generator=g), "b": torch.randn(4, generator=g), "fixed": torch.randn(2, generator=g)}
    originals = {n: t.clone() for n, t in theta.items()}
    v = {"a": torch.randn(6, 3, generator=g), "b": torch.randn(4, generator=g)}  # "fixed" is not perturbed
    pointers = []

    def fn(p):
        pointers.append({n: p[n].data_ptr() for n in p})
        return torch.cat([t.reshape(-1) for t in p.values()])[None] ** 3

    workspace: dict[str, torch.Tensor] = {}
    for _ in range(2):
        with_ws, eps = fd_directional_derivative(fn, theta, v, 1e-2, scheme, workspace=workspace)
        without, eps2 = fd_directional_derivative(fn, theta, v, 1e-2, scheme)
        assert torch.equal(with_ws, without) and torch.equal(eps, eps2)
    assert set(workspace) == {"a", "b"}
    used = [p for i, p in enumerate(pointers) if i % 4 < 2]  # two calls each (both sides, or θ + ε v̂ and θ)
    perturbed = [p for p in used if p["a"] != theta["a"].data_ptr()]
    assert len(perturbed) == (4 if scheme == "central" else 2)
    for n in ("a", "b"):
        assert {p[n] for p in perturbed} == {workspace[n].data_ptr()}
    assert all(p["fixed"] == theta["fixed"].data_ptr() for p in pointers)
    assert all(torch.equal(theta[n], originals[n]) for n in theta)


def test_guarded_difference_in_one_buffer_equals_its_definition():
    """Rows that agree get the mean, rows that disagree the smaller side (either side), bit for bit the plain
    formula; the inputs are left as they were (the result lives in a buffer of its own)."""
    from lightning_influence.capture.hvp import asymmetry, guarded_difference

    g = torch.Generator().manual_seed(7)
    f = torch.randn(6, 5, generator=g)
    b = f + 1e-3 * torch.randn(6, 5, generator=g)  # rows agree ...
    b[1] *= 40.0  # ... but row 1's backward side jumped (forward is smaller)
    f[3] *= 40.0  # and row 3's forward side (backward is smaller)
    f[5], b[5] = 0.0, 0.0  # both vanish: asymmetry 0, the mean
    f0, b0 = f.clone(), b.clone()
    seen = []
    out, kink = guarded_difference(f, b, 0.5, seen.append)
    assert kink.tolist() == [False, True, False, True, False, False]
    nf, nb = f.norm(dim=1), b.norm(dim=1)
    expected = torch.where(kink[:, None], torch.where((nf <= nb)[:, None], f, b), (f + b) / 2)
    assert torch.equal(out, expected) and torch.equal(out[1], f[1]) and torch.equal(out[3], b[3])
    assert torch.equal(seen[0], asymmetry(f, b)) and torch.equal(f, f0) and torch.equal(b, b0)
    flat, k1 = guarded_difference(f[0], b[0], 0.5)  # one row given as a vector
    assert flat.shape == (5,) and torch.equal(flat, (f[0] + b[0]) / 2) and k1.tolist() == [False]


def test_tracker_hvp_passes_reuse_one_workspace(tmp_path):
    """The tracker's HVP passes write their perturbed parameters into one workspace for the whole fit: the same
    tensors at every step, one per trainable parameter, the live parameters never among them."""
    from conftest import fit, loader, make_data, tiny
    from lightning_influence import InfluenceTracker

    class Watching(InfluenceTracker):
        seen: list[dict[str, int]] = []

        def on_train_batch_end(self, trainer, pl_module, *args):
            super().on_train_batch_end(trainer, pl_module, *args)
            self.seen.append({n: t.data_ptr() for n, t in self._passes.workspace.items()})
            self.live = {p.data_ptr() for p in pl_module.parameters()}

    tracker = Watching(str(tmp_path / "log"), record_gradients=True, record_hvp=True, projection_dim=4)
    module = tiny()
    fit(module, loader(make_data(24)), tracker, epochs=1)
    assert len(tracker.seen) == 4 and all(s == tracker.seen[0] for s in tracker.seen)
    assert set(tracker.seen[0]) == {n for n, p in module.named_parameters() if p.requires_grad}
    assert not set(tracker.seen[0].values()) & tracker.live
