"""The functional update rules (step/optimizers.py) against torch.optim itself, in float64:
a few hundred steps with param groups and per-group warm-up + cosine schedules, restarts from
the state checkpoints store, the VJP against dense Jacobians, and the refusals."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_influence.step.optimizers import (
    OptimizerStep,
    UnsupportedOptimizerError,
    check_optimizer,
    coordinate_groups,
    rule_for,
)
from tests._tinylog import _checkpoint

torch.set_num_threads(1)
SHAPES = {"w": (3, 4), "b": (5,)}
NAMES = list(SHAPES)
SIZES = [math.prod(s) for s in SHAPES.values()]
P = sum(SIZES)
STEPS = 300

# (optimizer class, hyper of group "w", hyper of group "b")
CONFIGS = {
    "sgd": (torch.optim.SGD, dict(lr=0.05, weight_decay=0.01), dict(lr=0.1)),
    "sgd-momentum": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.2, weight_decay=0.01), dict(lr=0.1)),
    "sgd-nesterov": (torch.optim.SGD, dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.02),
                     dict(lr=0.1, momentum=0.5)),
    "adam": (torch.optim.Adam, dict(lr=0.01, weight_decay=0.01), dict(lr=0.02, betas=(0.8, 0.99), eps=1e-6)),
    "adam-amsgrad": (torch.optim.Adam, dict(lr=0.01, amsgrad=True), dict(lr=0.02, weight_decay=0.1)),
    "adam-decoupled": (torch.optim.Adam, dict(lr=0.01, weight_decay=0.05, decoupled_weight_decay=True), dict(lr=0.02)),
    "adamw": (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.05), dict(lr=0.02, weight_decay=0.0)),
    "adamw-amsgrad": (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.05, amsgrad=True), dict(lr=0.02, amsgrad=False)),
    "rmsprop": (torch.optim.RMSprop, dict(lr=0.01, weight_decay=0.01), dict(lr=0.005, alpha=0.9)),
    "rmsprop-centered": (torch.optim.RMSprop, dict(lr=0.01, momentum=0.9, centered=True, weight_decay=0.01),
                         dict(lr=0.005, alpha=0.95, momentum=0.5)),
    # torch fills Adagrad's "sum" from the constructor's initial_accumulator_value (a group's own is ignored)
    "adagrad": (torch.optim.Adagrad, dict(lr=0.1, lr_decay=0.01, weight_decay=0.01), dict(lr=0.05, eps=1e-8),
                dict(initial_accumulator_value=0.1)),
}

gen = torch.Generator().manual_seed(0)
A = torch.randn(P, P, generator=gen, dtype=torch.float64) / P**0.5
NOISE = torch.randn(STEPS, P, generator=gen, dtype=torch.float64) * 0.3
THETA0 = torch.randn(P, generator=gen, dtype=torch.float64)


def grad_at(theta: torch.Tensor, t: int) -> torch.Tensor:
    """A nonlinear, step-dependent gradient field (so every state entry matters)."""
    return A @ torch.sin(theta) + 0.5 * theta + NOISE[t]


def schedule(base: float, t: int) -> float:
    """Linear warm-up over 20 steps, then cosine decay."""
    return base * (t + 1) / 20 if t < 20 else base * 0.5 * (1 + math.cos(math.pi * (t - 20) / (STEPS - 20)))


def torch_run(name: str):
    cls, hw, hb, *defaults = CONFIGS[name]
    params = {n: THETA0[sum(SIZES[:i]):sum(SIZES[: i + 1])].reshape(SHAPES[n]).clone().requires_grad_(True)
              for i, n in enumerate(NAMES)}
    opt = cls([{"params": [params["w"]], **hw}, {"params": [params["b"]], **hb}], **(defaults[0] if defaults else {}))
    bases = [g["lr"] for g in opt.param_groups]
    return params, opt, bases


def flat(params) -> torch.Tensor:
    return torch.cat([params[n].detach().reshape(-1) for n in NAMES])


def stepper_for(opt: torch.optim.Optimizer, **kw) -> OptimizerStep:
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [n]} for g, n in zip(opt.param_groups, NAMES)]
    rule = rule_for(f"{type(opt).__module__}.{type(opt).__qualname__}")
    return OptimizerStep(rule, groups, coordinate_groups(groups, NAMES, SIZES), **kw)


def state_by_name(opt, params):
    return {n: opt.state.get(params[n], {}) for n in NAMES}


def torch_step(opt, params, t: int, bases) -> None:
    for g, base in zip(opt.param_groups, bases):
        g["lr"] = schedule(base, t)
    g = grad_at(flat(params), t)
    start = 0
    for n, k in zip(NAMES, SIZES):
        params[n].grad = g[start:start + k].reshape(SHAPES[n]).clone()
        start += k
    opt.step()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_rule_equals_torch_optim(name):
    params, opt, bases = torch_run(name)
    step = stepper_for(opt)
    theta, state = THETA0.clone(), step.init_state()
    restart_at, restarted = STEPS // 2, None
    worst = 0.0
    for t in range(STEPS):
        if t == restart_at:  # the state as checkpoints store it: numpy arrays + scalar attributes per name
            rec = _checkpoint(_Wrapped(params), opt, t)
            stored = {n: {**rec.optimizer_state.get(n, {}), **rec.optimizer_scalars.get(n, {})} for n in NAMES}
            restarted = (flat(params).clone(), step.state_from(stored, NAMES, SIZES))
            live = step.state_from(state_by_name(opt, params), NAMES, SIZES)
            for k in step.state_keys:
                torch.testing.assert_close(restarted[1][k], live[k], rtol=0, atol=0)
                worst = max(worst, float((state[k] - live[k]).abs().max() / live[k].abs().max().clamp_min(1e-300)))
        lrs = [schedule(b, t) for b in bases]
        theta, state = step.update(theta, state, grad_at(theta, t), lrs)
        if restarted is not None:
            restarted = step.update(restarted[0], restarted[1], grad_at(restarted[0], t), lrs)
        torch_step(opt, params, t, bases)
        ref = flat(params)
        worst = max(worst, float((theta - ref).abs().max() / ref.abs().max()))
    assert worst < 1e-12, (name, worst)
    ref = flat(params)
    assert float((restarted[0] - ref).abs().max() / ref.abs().max()) < 1e-12
    live = step.state_from(state_by_name(opt, params), NAMES, SIZES)
    for k in step.state_keys:
        assert float((state[k] - live[k]).abs().max() / live[k].abs().max()) < 1e-12, k
    assert torch.all(state["step"] == STEPS)


class _Wrapped(torch.nn.Module):
    """Parameters by name, so the tests' checkpoint writer stores them as the tracker would."""

    def __init__(self, params) -> None:
        super().__init__()
        self._p = params

    def named_parameters(self, *a, **k):
        return iter(self._p.items())


def _clip(max_norm: float):
    def transform(g: torch.Tensor) -> torch.Tensor:  # Lightning's norm clipping
        return g * torch.clamp(max_norm / (torch.linalg.vector_norm(g) + 1e-6), max=1.0)

    return transform


@pytest.mark.parametrize("name", ["sgd-nesterov", "adamw-amsgrad", "rmsprop-centered", "adagrad"])
@pytest.mark.parametrize("clip", [None, 0.5])
def test_vjp_equals_dense_jacobian(name, clip):
    """The VJP of ``u(θ, s, c(g))`` against dense Jacobians taken by plain autograd."""
    params, opt, bases = torch_run(name)
    step = stepper_for(opt)
    theta, state = THETA0.clone(), step.init_state()
    for t in range(5):  # a mid-run state (momentum buffers, bias corrections away from 1)
        theta, state = step.update(theta, state, grad_at(theta, t), [schedule(b, t) for b in bases])
    g, lrs = grad_at(theta, 5), [0.3 * b for b in bases]
    transform = None if clip is None else _clip(clip)
    keys = step.state_keys

    def f(th, g_, *s):
        th2, st2 = step.update(th, {"step": state["step"], **dict(zip(keys, s))}, g_, lrs, transform)
        return (th2, *[st2[k] for k in keys])

    inputs = (theta, g, *[state[k] for k in keys])
    J = torch.autograd.functional.jacobian(f, inputs)  # J[out][in]: (P, P)
    C = 3
    cot = [torch.randn(P, C, generator=gen, dtype=torch.float64) for _ in range(1 + len(keys))]
    th_bar, st_bar, g_bar = step.vjp(theta, state, g, lrs, cot[0], dict(zip(keys, cot[1:])), transform)
    bars = [th_bar, g_bar, *[st_bar[k] for k in keys]]
    for i, bar in enumerate(bars):
        ref = sum(J[o][i].T @ cot[o] for o in range(len(cot)))
        torch.testing.assert_close(bar, ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("before", [0, 4])
def test_vjp_with_settings_every_group_shares(name, before):
    """Every group the same settings and step count (the usual run): the hyperparameters and the step are scalars and
    each condition takes its side whole, nothing selected elementwise (``OptimizerStep.vjp`` 2x faster at 2.5M
    coordinates, ``benchmarks/optimizer_vjp.py``). Its VJP equals the dense Jacobians of the per-coordinate form (each
    setting a ``(p,)`` vector, every condition a ``torch.where``: what ``test_rule_equals_torch_optim`` checks against
    torch.optim), at the first step (SGD's momentum buffer then unused) and mid-run."""
    cls, hw, _, *defaults = CONFIGS[name]
    params, _, _ = torch_run(name)
    opt = cls([{"params": [params["w"]], **hw}, {"params": [params["b"]], **hw}], **(defaults[0] if defaults else {}))
    step = stepper_for(opt)
    lrs = [0.3 * hw["lr"]] * 2
    scalar = step.hyper(lrs)
    assert all(v.dim() == 0 for v in scalar.values() if torch.is_tensor(v))
    theta, state = THETA0.clone(), step.init_state()
    for t in range(before):
        theta, state = step.update(theta, state, grad_at(theta, t), [hw["lr"]] * 2)
    g = grad_at(theta, before)
    keys = step.adjoint_keys
    per_coordinate = {k: v.expand(P) if torch.is_tensor(v) else v for k, v in scalar.items()}

    def f(th, g_, *s):  # the per-coordinate form
        th2, st2 = step.rule.update(th, {"step": state["step"], **dict(zip(keys, s))}, g_, per_coordinate)
        return (th2, *[st2[k] for k in keys])

    J = torch.autograd.functional.jacobian(f, (theta, g, *[state[k] for k in keys]))
    cot = [torch.randn(P, 3, generator=gen, dtype=torch.float64) for _ in range(1 + len(keys))]
    th_bar, st_bar, g_bar = step.vjp(theta, state, g, lrs, cot[0], dict(zip(keys, cot[1:])))
    for i, bar in enumerate([th_bar, g_bar, *[st_bar[k] for k in keys]]):  # (sums of the same terms in other orders:
        ref = sum(J[o][i].T @ cot[o] for o in range(len(cot)))  # 8e-12 of centered RMSprop's first step, which cancels)
        torch.testing.assert_close(bar, ref, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name", ["sgd-nesterov", "adamw-amsgrad", "rmsprop-centered", "adagrad"])
@pytest.mark.parametrize("clip", [None, 0.5])
def test_removal_terms_are_the_exact_change_and_tend_to_the_vjp(name, clip):
    """``removal_terms`` = ⟨λ, u(g − r) − u(g)⟩ with ``u`` evaluated one row at a time by plain calls, and for a
    removal shrunk by ``ε`` it tends to the linear term ``−⟨ḡ, r⟩`` of the VJP (error O(ε))."""
    params, opt, bases = torch_run(name)
    step = stepper_for(opt)
    theta, state = THETA0.clone(), step.init_state()
    for t in range(5):
        theta, state = step.update(theta, state, grad_at(theta, t), [schedule(b, t) for b in bases])
    g, lrs = grad_at(theta, 5), [0.3 * b for b in bases]
    transform = None if clip is None else _clip(clip)
    keys = step.adjoint_keys
    rows = 0.3 * torch.randn(4, P, generator=gen, dtype=torch.float64)
    lam = torch.randn(P, 3, generator=gen, dtype=torch.float64)
    lam_s = {k: torch.randn(P, 3, generator=gen, dtype=torch.float64) for k in keys}
    got = step.removal_terms(theta, state, g, lrs, rows, lam, lam_s, transform, chunk_size=3)
    th0, st0 = step.update(theta, state, g, lrs, transform)
    for j in range(len(rows)):
        th_j, st_j = step.update(theta, state, g - rows[j], lrs, transform)
        ref = (th_j - th0) @ lam + sum((st_j[k] - st0[k]) @ lam_s[k] for k in keys)
        torch.testing.assert_close(got[:, j], ref, rtol=1e-12, atol=1e-15)
    _, _, g_bar = step.vjp(theta, state, g, lrs, lam, lam_s, transform)
    linear = -(rows @ g_bar).T
    errs = [float((step.removal_terms(theta, state, g, lrs, e * rows, lam, lam_s, transform) / e - linear).abs().max())
            for e in (1e-3, 1e-4)]
    if name == "sgd-nesterov" and clip is None:  # affine in g: the removal is its derivative, to rounding
        torch.testing.assert_close(got, linear, rtol=1e-10, atol=1e-14)
        return
    assert errs[1] < 0.2 * errs[0] and errs[1] < 1e-3 * float(linear.abs().max()), errs
    assert float((got - linear).abs().max()) > 1e-6 * float(linear.abs().max())  # a whole removal is not linear


def test_frozen_preconditioner_cuts_only_the_denominator():
    params, opt, bases = torch_run("adamw")
    exact, frozen = stepper_for(opt), stepper_for(opt, frozen_preconditioner=True)
    theta, state = THETA0.clone(), exact.init_state()
    for t in range(3):
        theta, state = exact.update(theta, state, grad_at(theta, t), [schedule(b, t) for b in bases])
    g, lrs = grad_at(theta, 3), bases
    cot = torch.randn(P, 2, generator=gen, dtype=torch.float64)
    _, st_f, g_f = frozen.vjp(theta, state, g, lrs, cot, {})
    _, st_e, g_e = exact.vjp(theta, state, g, lrs, cot, {})
    assert frozen.adjoint_keys == ["exp_avg"] and exact.adjoint_keys == ["exp_avg", "exp_avg_sq"]
    assert set(st_f) == {"exp_avg"} and not torch.all(st_e["exp_avg_sq"] == 0)
    # frozen: ḡ = (1−β₁) · (−η/(1−β₁ᵏ)) · D λ with D = 1/(√v̂' + ε) from the run
    _, after = exact.update(theta, state, g, lrs)
    h = exact.hyper(lrs)
    k = float(after["step"][0])
    D = 1 / (after["exp_avg_sq"].sqrt() / math.sqrt(1 - 0.999**k) + 1e-8)
    ref = (1 - 0.9) * (-h["lr"] / (1 - 0.9**k) * D)[:, None] * cot
    torch.testing.assert_close(g_f, ref, rtol=1e-12, atol=0)
    assert not torch.allclose(g_e, ref)


def test_refusals_by_name():
    w = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(UnsupportedOptimizerError, match=r"NAdam.*SGD, Adam, AdamW, RMSprop, Adagrad"):
        check_optimizer(torch.optim.NAdam([w]))
    with pytest.raises(UnsupportedOptimizerError, match="LBFGS.*line search"):
        check_optimizer(torch.optim.LBFGS([w]))

    class MySGD(torch.optim.SGD):
        pass

    with pytest.raises(UnsupportedOptimizerError, match="MySGD.*not subclasses"):
        check_optimizer(MySGD([w], lr=0.1))
    with pytest.raises(UnsupportedOptimizerError, match="maximize=True"):
        check_optimizer(torch.optim.Adam([w], maximize=True))
    with pytest.raises(UnsupportedOptimizerError, match="mypkg.Fancy"):
        rule_for("mypkg.Fancy")
    for cls in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad):
        assert check_optimizer(cls([w], lr=0.1)).cls is cls


@pytest.mark.parametrize("cls, kw", [(torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
                                     (torch.optim.AdamW, dict(lr=0.01, amsgrad=True)),
                                     (torch.optim.RMSprop, dict(lr=0.01, momentum=0.5, centered=True)),
                                     (torch.optim.Adagrad, dict(lr=0.1, initial_accumulator_value=0.2))])
def test_state_from_the_hdf5_log(tmp_path, cls, kw):
    """The state as the log stores it (HDF5 arrays and scalar attributes) reads back to the live state."""
    from lightning_influence.log import InfluenceLog
    from tests._tinylog import train_and_log

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(3, 2)).double()
    X, Y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    opt = cls(module.parameters(), **kw)
    loss = lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")  # noqa: E731
    batches = [[0, 1, 2, 3], [4, 5, 6, 7], [0, 2, 4, 6]]
    train_and_log(str(tmp_path), module, loss, lambda ids: (X[ids], Y[ids]), batches, [kw["lr"]] * 3, opt,
                  record_gradients=False)
    log = InfluenceLog(tmp_path)
    names = [n for n, _ in module.named_parameters()]
    sizes = [p.numel() for _, p in module.named_parameters()]
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": names} for g in opt.param_groups]
    step = OptimizerStep(rule_for(f"{cls.__module__}.{cls.__qualname__}"), groups, coordinate_groups(groups, names, sizes))
    stored = step.state_from(log.optimizer_state(3), names, sizes)
    live = step.state_from({n: opt.state[p] for n, p in module.named_parameters()}, names, sizes)
    assert set(stored) == set(live) == {"step", *step.state_keys}
    for k in stored:
        torch.testing.assert_close(stored[k], live[k], rtol=0, atol=0)
    assert float(stored["step"][0]) == (1.0 if cls is torch.optim.SGD else 3.0)
