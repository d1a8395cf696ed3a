"""DIT (docs/influence-math.md §2-3): the adjoint sweep against an independent forward recursion, hand oracles,
window additivity, timelines, the approximations and the refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_influence.capture.hvp import unflatten
from lightning_influence.estimators import dit, dit_gauss_newton, dit_local, timeline
from lightning_influence.log import InfluenceLog
from lightning_influence.log.writer import write_meta
from lightning_influence.queries import mean_loss, sample_losses
from lightning_influence.replay import ReplayMismatchError, UnsupportedOptimizerError, batch_from_ids, functional_loss
from tests._tinylog import epoch_batches, train_and_log

torch.set_num_threads(1)
N, D, C = 10, 3, 3


class TinyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D, 4), nn.Tanh(), nn.Linear(4, C))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def per_sample_loss(self, batch):
        x, y = batch
        return F.cross_entropy(self(x), y, reduction="none")


def loss_fn(module, batch):
    return module.per_sample_loss(batch)


gen = torch.Generator().manual_seed(0)
X = torch.randn(N, D, generator=gen, dtype=torch.float64)
Y = torch.randint(0, C, (N,), generator=gen)
XV = torch.randn(6, D, generator=gen, dtype=torch.float64)
YV = torch.randint(0, C, (6,), generator=gen)


def train_data(ids):
    ids = torch.as_tensor(ids)
    return X[ids], Y[ids]


QUERY = mean_loss((XV, YV), loss_fn)
BATCHES, EPOCHS = epoch_batches(N, 3, 3, seed=1)  # 12 steps, last batch of each epoch has 1 sample
T = len(BATCHES)
LRS = [0.5 if e == 0 else 0.25 for e in EPOCHS]  # step schedule


def make_opt(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.5, weight_decay=0.01)
    if kind == "momentum":
        return torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, dampening=0.1, weight_decay=0.01)
    if kind == "nesterov":
        return torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.8, nesterov=True, weight_decay=0.01)
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=0.05, weight_decay=0.01)
    if kind == "adam-decoupled":
        return torch.optim.Adam(model.parameters(), lr=0.05, weight_decay=0.05, decoupled_weight_decay=True,
                                betas=(0.8, 0.99), eps=1e-6)
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.05, amsgrad=True)
    if kind == "rmsprop":
        return torch.optim.RMSprop(model.parameters(), lr=0.01, alpha=0.9, momentum=0.5, centered=True, weight_decay=0.01)
    if kind == "rmsprop-plain":
        return torch.optim.RMSprop(model.parameters(), lr=0.01, weight_decay=0.02)
    if kind == "adagrad":
        return torch.optim.Adagrad(model.parameters(), lr=0.1, lr_decay=0.05, weight_decay=0.01, initial_accumulator_value=0.1)
    raise ValueError(kind)


ADAPTIVE = ("adam", "adam-decoupled", "adamw", "rmsprop", "rmsprop-plain", "adagrad")
# the logged learning rate per step: the test schedule scaled to each optimizer's own lr
LR_SCALE = {"adam": 0.1, "adam-decoupled": 0.1, "adamw": 0.1, "rmsprop": 0.02, "rmsprop-plain": 0.02, "adagrad": 0.2}


_LOGS: dict = {}


def make_log(tmp_path_factory, kind: str = "sgd", checkpoint_every: int | None = 1, lrs=None) -> InfluenceLog:
    key = (kind, checkpoint_every)
    custom = lrs is not None
    if key not in _LOGS or custom:
        torch.manual_seed(3)
        model = TinyMLP().double()
        path = tmp_path_factory.mktemp(f"log_{kind}")
        lrs = lrs or [lr * LR_SCALE.get(kind, 1.0) for lr in LRS]
        train_and_log(str(path), model, loss_fn, train_data, BATCHES, lrs, make_opt(kind, model),
                      checkpoint_every=checkpoint_every, dataset_size=N, epochs=EPOCHS)
        if custom:
            return InfluenceLog(path)
        _LOGS[key] = path
    return InfluenceLog(_LOGS[key])


def model():
    return TinyMLP().double()


# ------------------------------------------------------------------ independent reference
# torch.optim's state keys -> the deviations full_state_step keeps
LIN_KEY = {"exp_avg": "m", "exp_avg_sq": "v", "max_exp_avg_sq": "vmax", "square_avg": "a", "grad_avg": "ga",
           "momentum_buffer": "b", "sum": "s"}


def torch_optim_step(kind: str, theta: torch.Tensor, before: dict, g: torch.Tensor, eta: float, names, shapes
                     ) -> tuple[torch.Tensor, dict]:
    """One ``torch.optim`` step from ``θ`` and the logged state ``before`` with gradient ``g``: ``(θ', {key: state'})``,
    flat (an independent reference for the exact per-step removal)."""
    params = [nn.Parameter(v.clone()) for v in unflatten(theta, shapes).values()]
    opt = make_opt(kind, nn.ParameterList(params))
    for group in opt.param_groups:
        group["lr"] = eta
    for n, prm in zip(names, params):
        if n in before and before[n]:
            opt.state[prm] = {k: torch.as_tensor(v).clone() for k, v in before[n].items()}
    for prm, gi in zip(params, unflatten(g, shapes).values()):
        prm.grad = gi.clone()
    opt.step()
    keys = [k for k, v in opt.state[params[0]].items() if k != "step" and torch.is_tensor(v)]
    return (torch.cat([prm.detach().reshape(-1) for prm in params]),
            {k: torch.cat([opt.state[prm][k].reshape(-1) for prm in params]) for k in keys})


def forward_recursion(log: InfluenceLog, kind: str, query, t_start: int = 0, frozen: bool = False,
                      removal: str = "linear") -> np.ndarray:
    """``F_j(t)`` ``(N, T+1)`` by the explicit forward recursion of docs/influence-math.md §2 over the whole
    optimizer state (hand-derived per optimizer in :func:`full_state_step`, forward mode).

    Every ``θ_t`` and optimizer state is read from a log with a checkpoint at every step;
    Hessians are dense (``torch.autograd.functional.hessian``), one ``δ_j`` per sample.
    With ``t_start > 0`` the deviation starts at ``t_start`` (removal inside the window only).
    ``removal="step"``: sample ``j`` enters each step it is in with the step's exact change when it is dropped,
    ``torch.optim``'s step with ``ĝ − g_j/B`` minus its step with ``ĝ`` (``θ`` and every state entry), in place of
    the linear ``−E`` (docs/optimizer-adjoint.md §2); the deviations are propagated as before.
    """
    m = model()
    names = [n for n, _ in m.named_parameters()]
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    hyper = log.meta["optimizer"]["param_groups"][0]
    lam = hyper["weight_decay"]
    flat = lambda d: torch.cat([torch.as_tensor(d[n]).reshape(-1) for n in names])  # noqa: E731
    p = sum(int(np.prod(s)) for s in shapes.values())
    delta = torch.zeros(p, N, dtype=torch.float64)
    dv = torch.zeros(p, N, dtype=torch.float64)
    lin: dict = {}  # δ of each optimizer state entry
    I = torch.eye(p, dtype=torch.float64)  # noqa: E741
    out = np.zeros((N, T + 1))

    def q_at(theta):
        th = theta.clone().requires_grad_(True)
        f = torch.func.functional_call(_QueryOf(m), {f"m.{k}": v for k, v in unflatten(th, shapes).items()}, ())
        return torch.autograd.grad(f, th)[0]

    for t in range(t_start, T):
        theta = flat(log.checkpoint(t))
        ids = log.batch_ids(t)
        B = len(ids)
        eta = float(log.lr(t)[0])
        batch = batch_from_ids(train_data, ids)
        losses = lambda th: functional_loss(m, loss_fn, unflatten(th, shapes), batch)  # noqa: E731
        H = torch.autograd.functional.hessian(lambda th: losses(th).mean(), theta)
        G = torch.autograd.functional.jacobian(losses, theta)  # (B, p)
        E = torch.zeros(p, N, dtype=torch.float64)
        E[:, torch.as_tensor(ids)] = G.T / B
        if frozen:  # the frozen-preconditioner approximation: D_t from the run, no δv
            decoupled = kind in ("adamw", "adam-decoupled")
            lam_c, lam_d = (0.0, lam) if decoupled else (lam, 0.0)
            b1, b2 = hyper["betas"]
            after = log.optimizer_state(t + 1)
            v = flat({n: after[n]["max_exp_avg_sq" if hyper["amsgrad"] else "exp_avg_sq"] for n in names})
            s = float(after[names[0]]["step"])
            Dt = 1.0 / (v.sqrt() / np.sqrt(1 - b2**s) + hyper["eps"])
            dg = (H + lam_c * I) @ delta - E
            dv = b1 * dv + (1 - b1) * dg
            delta = (1 - eta * lam_d) * delta - (eta / (1 - b1**s)) * Dt[:, None] * dv
        elif removal == "linear":
            delta = full_state_step(kind, hyper, log.optimizer_state(t), flat, names, theta, G.mean(0), H, E, eta,
                                    delta, lin)
        else:
            before = log.optimizer_state(t)
            delta = full_state_step(kind, hyper, before, flat, names, theta, G.mean(0), H, torch.zeros_like(E), eta,
                                    delta, lin)
            base_th, base_st = torch_optim_step(kind, theta, before, G.mean(0), eta, names, shapes)
            for i, j in enumerate(ids):
                th_j, st_j = torch_optim_step(kind, theta, before, G.mean(0) - G[i] / B, eta, names, shapes)
                delta[:, j] += th_j - base_th
                for k, v in st_j.items():
                    lin.setdefault(LIN_KEY[k], torch.zeros(p, N, dtype=torch.float64))[:, j] += v - base_st[k]
        q = q_at(flat(log.checkpoint(t + 1)))
        out[:, t + 1] = (q @ delta).numpy()
    return out


def full_state_step(kind, h, before, flat, names, theta, g, H, E, eta, delta, lin):
    """One step of the linearised optimizer, hand-derived: returns ``δθ_{t+1}``, updates ``lin``
    (the deviations of the state) in place. ``before``: the logged state before the step."""
    p = len(theta)
    Z = torch.zeros(p, N, dtype=torch.float64)
    has_state = bool(before)

    def st(key, default=0.0):
        return flat({n: before[n][key] for n in names}) if has_state and key in before[names[0]] else \
            torch.full((p,), default, dtype=torch.float64)

    k = float(before[names[0]]["step"]) + 1 if has_state and "step" in before[names[0]] else 1.0
    wd = h["weight_decay"]
    decoupled = kind in ("adamw", "adam-decoupled")
    lam = 0.0 if decoupled else wd
    gc = g + lam * theta
    dg = H @ delta + lam * delta - E  # δ of the (decayed) gradient
    if kind in ("sgd", "momentum", "nesterov"):
        mu = h["momentum"]
        if mu == 0:
            return delta - eta * dg
        db = dg if not has_state else mu * lin.get("b", Z) + (1 - h["dampening"]) * dg
        lin["b"] = db
        return delta - eta * (dg + mu * db if h["nesterov"] else db)
    if kind.startswith("adam"):
        b1, b2 = h["betas"]
        m = b1 * st("exp_avg") + (1 - b1) * gc
        v = b2 * st("exp_avg_sq") + (1 - b2) * gc**2
        lin["m"] = b1 * lin.get("m", Z) + (1 - b1) * dg
        lin["v"] = b2 * lin.get("v", Z) + 2 * (1 - b2) * gc[:, None] * dg
        vh, dvh = v, lin["v"]
        if h["amsgrad"]:
            take = (v >= st("max_exp_avg_sq"))[:, None]
            vh = torch.maximum(v, st("max_exp_avg_sq"))
            dvh = lin["vmax"] = torch.where(take, lin["v"], lin.get("vmax", Z))
        sb2 = np.sqrt(1 - b2**k)
        den = vh.sqrt() / sb2 + h["eps"]
        dden = dvh / (2 * vh.sqrt() * sb2)[:, None]
        shrink = 1 - eta * wd if decoupled else 1.0
        return shrink * delta - eta / (1 - b1**k) * (lin["m"] / den[:, None] - (m / den**2)[:, None] * dden)
    if kind.startswith("rmsprop"):
        a = h["alpha"]
        avg = a * st("square_avg") + (1 - a) * gc**2
        lin["a"] = a * lin.get("a", Z) + 2 * (1 - a) * gc[:, None] * dg
        davg = lin["a"]
        if h["centered"]:
            ga = a * st("grad_avg") + (1 - a) * gc
            lin["ga"] = a * lin.get("ga", Z) + (1 - a) * dg
            avg, davg = avg - ga**2, davg - 2 * ga[:, None] * lin["ga"]
        den = avg.sqrt() + h["eps"]
        dstep = dg / den[:, None] - (gc / den**2)[:, None] * davg / (2 * avg.sqrt())[:, None]
        if h["momentum"]:
            lin["b"] = h["momentum"] * lin.get("b", Z) + dstep
            dstep = lin["b"]
        return delta - eta * dstep
    assert kind == "adagrad"
    s = st("sum", h["initial_accumulator_value"]) + gc**2
    lin["s"] = lin.get("s", Z) + 2 * gc[:, None] * dg
    den = s.sqrt() + h["eps"]
    clr = eta / (1 + (k - 1) * h["lr_decay"])
    return delta - clr * (dg / den[:, None] - (gc / den**2)[:, None] * lin["s"] / (2 * s.sqrt())[:, None])


class _QueryOf(nn.Module):
    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self) -> torch.Tensor:
        return QUERY(self.m)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("removal", ["step", "linear"])
@pytest.mark.parametrize("kind", ["sgd", "momentum", "nesterov", *ADAPTIVE])
def test_dit_equals_forward_recursion(tmp_path_factory, kind, removal):
    log = make_log(tmp_path_factory, kind)
    ref = forward_recursion(log, kind, QUERY, removal=removal)
    s = dit(log, QUERY, module=model(), train_data=train_data, window=(4, 9), loss_fn=loss_fn, removal=removal)
    assert s.scores.shape == (N, 1) and s.window == (4, 9)
    assert rel(s.column(0), ref[:, 9] - ref[:, 4]) < 1e-8
    assert "approx." not in s.method and s.info["preconditioner"] == "exact" and s.info["removal"] == removal
    tl = timeline(log, QUERY, module=model(), train_data=train_data, grid=[0, 4, 9, T], loss_fn=loss_fn, removal=removal)
    for t1, t2 in [(0, T), (0, 4), (9, T)]:
        assert rel(tl.window(t1, t2).column(0), ref[:, t2] - ref[:, t1]) < 1e-8, (kind, t1, t2)
    if kind in ADAPTIVE and removal == "step":  # the two removals are different numbers for an adaptive optimizer
        assert rel(s.column(0), (lambda r: r[:, 9] - r[:, 4])(forward_recursion(log, kind, QUERY))) > 1e-3


@pytest.mark.parametrize("kind", ADAPTIVE)
def test_step_removal_is_exact_for_one_step_and_a_linear_query(tmp_path_factory, kind):
    """Removing ``z_j`` from the last step only, with a query linear in ``θ``: nothing is linearised, so the step
    removal equals replay leave-one-out (torch.optim) to rounding; the derivative does not."""
    from lightning_influence.evaluation.ground_truth import replay_loo

    log = make_log(tmp_path_factory, kind)
    c = torch.linspace(-1, 1, sum(p.numel() for p in model().parameters()), dtype=torch.float64)

    def linear_query(m):
        return torch.cat([p.reshape(-1) for p in m.parameters()]) @ c

    win = (T - 2, T)
    loo = replay_loo(log, model(), train_data, linear_query, window=win, in_window_only=True, loss_fn=loss_fn)
    truth = loo.window(*win)
    step = dit_local(log, linear_query, module=model(), train_data=train_data, window=(T - 1, T), loss_fn=loss_fn)
    ids = log.batch_ids(T - 1)
    assert np.abs(truth[ids]).min() > 1e-6
    assert rel(step.column(0)[ids], truth[ids]) < 1e-10
    linear = dit_local(log, linear_query, module=model(), train_data=train_data, window=(T - 1, T), loss_fn=loss_fn,
                       removal="linear")
    assert rel(linear.column(0)[ids], truth[ids]) > 1e-3


@pytest.mark.parametrize("kind", ["adam", "adamw"])
def test_frozen_preconditioner_equals_its_recursion(tmp_path_factory, kind):
    log = make_log(tmp_path_factory, kind)
    ref = forward_recursion(log, kind, QUERY, frozen=True)
    s = dit(log, QUERY, module=model(), train_data=train_data, window=(4, T), loss_fn=loss_fn, preconditioner="frozen")
    assert rel(s.column(0), ref[:, T] - ref[:, 4]) < 1e-8
    assert s.method == f"dit (frozen {'AdamW' if kind == 'adamw' else 'Adam'} preconditioner, approx.)"
    exact = forward_recursion(log, kind, QUERY)
    assert rel(s.column(0), exact[:, T] - exact[:, 4]) > 1e-3  # a different (approximate) answer


@pytest.mark.parametrize("kind", ["sgd", "momentum"])
def test_dit_local_equals_in_window_recursion(tmp_path_factory, kind):
    log = make_log(tmp_path_factory, kind)
    t1, t2 = 4, 9
    ref = forward_recursion(log, kind, QUERY, t_start=t1)
    s = dit_local(log, QUERY, module=model(), train_data=train_data, window=(t1, t2), loss_fn=loss_fn)
    assert "approx." in s.method and s.method.startswith("dit-local")
    # with momentum the local sweep drops the pre-window δv as well: the recursion starting at t1 does too
    assert rel(s.column(0), ref[:, t2]) < 1e-8


@pytest.mark.parametrize("kind", ["momentum", "adamw"])
def test_sparse_checkpoints_and_memory_anchors_match_dense(tmp_path_factory, kind):
    dense = dit(make_log(tmp_path_factory, kind), QUERY, module=model(), train_data=train_data, window=(2, T),
                loss_fn=loss_fn)
    sparse_log = make_log(tmp_path_factory, kind, checkpoint_every=None)
    assert sparse_log.checkpoint_steps == [0, T]
    sparse = dit(sparse_log, QUERY, module=model(), train_data=train_data, window=(2, T), loss_fn=loss_fn)
    tiny_budget = dit(sparse_log, QUERY, module=model(), train_data=train_data, window=(2, T), loss_fn=loss_fn,
                      max_memory_bytes=1)
    np.testing.assert_allclose(sparse.scores, dense.scores, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(tiny_budget.scores, dense.scores, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("kind", ["adam", "rmsprop"])
def test_step_removal_rows_follow_the_memory_budget(tmp_path_factory, kind):
    """The step removal's per-sample rows ``(B, p)`` held at once are within ``max_memory_bytes``: a budget of two
    rows' bytes takes them two at a time (a step of 3 samples in two blocks), scores equal to the whole block's at
    1e-12 in float64 (the budget also splits the replay into in-memory segments: the same numbers)."""
    log = make_log(tmp_path_factory, kind)
    p = sum(x.numel() for x in model().parameters())
    whole = dit(log, QUERY, module=model(), train_data=train_data, window=(2, T), loss_fn=loss_fn)
    assert whole.info["peak_removal_rows_bytes"] == 3 * p * 8 and whole.info["removal_rows_per_block"] >= 3
    two = dit(log, QUERY, module=model(), train_data=train_data, window=(2, T), loss_fn=loss_fn,
              max_memory_bytes=2 * p * 8 + 7)
    assert two.info["peak_removal_rows_bytes"] == 2 * p * 8 and two.info["removal_rows_per_block"] == 2
    np.testing.assert_allclose(two.scores, whole.scores, rtol=1e-12, atol=1e-15)
    one = dit(log, QUERY, module=model(), train_data=train_data, window=(2, T), loss_fn=loss_fn, max_memory_bytes=1)
    assert one.info["peak_removal_rows_bytes"] == p * 8 and one.info["removal_rows_per_block"] == 1
    np.testing.assert_allclose(one.scores, whole.scores, rtol=1e-12, atol=1e-15)


def test_fd_hvp_matches_exact(tmp_path_factory):
    log = make_log(tmp_path_factory, "sgd")
    exact = dit(log, QUERY, module=model(), train_data=train_data, loss_fn=loss_fn)
    fd = dit(log, QUERY, module=model(), train_data=train_data, loss_fn=loss_fn, hvp="fd")
    assert "fd-hvp" in fd.method
    assert rel(fd.column(0), exact.column(0)) < 1e-7


def test_several_queries_in_one_sweep(tmp_path_factory):
    log = make_log(tmp_path_factory, "momentum")
    multi = sample_losses((XV[:3], YV[:3]), loss_fn, names=["a", "b", "c"])
    s = dit(log, multi, module=model(), train_data=train_data, window=(3, T), loss_fn=loss_fn)
    assert s.scores.shape == (N, 3) and s.query_names == ["a", "b", "c"]
    for i in range(3):
        single = dit(log, sample_losses((XV[i : i + 1], YV[i : i + 1]), loss_fn), module=model(),
                     train_data=train_data, window=(3, T), loss_fn=loss_fn)
        np.testing.assert_allclose(s.column(i), single.column(0), rtol=1e-10, atol=1e-14)


def test_prediction_and_callable_queries(tmp_path_factory):
    log = make_log(tmp_path_factory, "sgd")
    from lightning_influence.queries import prediction

    pred = prediction(XV[:1], target_class=1, margin=True)
    s = dit(log, pred, module=model(), train_data=train_data, loss_fn=loss_fn)
    same = dit(log, lambda m: pred(m), module=model(), train_data=train_data, loss_fn=loss_fn)
    np.testing.assert_allclose(s.scores, same.scores, rtol=1e-12)
    assert s.query_names == ["margin[1]"] and np.abs(s.scores).max() > 0


@pytest.mark.parametrize("kind", ["nesterov", *ADAPTIVE])
def test_dit_is_the_derivative_of_weighted_replay(tmp_path_factory, kind):
    """Independent of the recursion and of the functional update rules: F_j = lim (f(θ_T with
    z_j weighted 1−ε) − f(θ_T)) / ε, by torch.optim replay (central differences)."""
    from lightning_influence.replay import replay

    log = make_log(tmp_path_factory, kind)
    s = dit(log, QUERY, module=model(), train_data=train_data, window=(0, T), loss_fn=loss_fn, removal="linear").column(0)
    eps = 1e-6
    fd = []
    for j in range(4):
        vals = []
        for e in (eps, -eps):
            w = lambda t, ids, e=e, j=j: torch.tensor([1.0 - e if i == j else 1.0 for i in ids], dtype=torch.float64)  # noqa: E731
            last = list(replay(log, model(), train_data, loss_fn=loss_fn, weights=w))[-1]
            vals.append(float(torch.func.functional_call(_QueryOf(model()), {f"m.{k}": v for k, v in last.params.items()}, ())))
        fd.append((vals[0] - vals[1]) / (2 * eps))
    assert rel(s[:4], np.array(fd)) < 1e-6


# ----------------------------------------------------------------- hand oracle (scalar θ)
class Scalar(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(1.0, dtype=torch.float64))

    def per_sample_loss(self, a):
        return 0.5 * a * self.theta**2


def scalar_log(tmp_path, a, batches, lrs):
    a = torch.tensor(a, dtype=torch.float64)
    m = Scalar()
    train_and_log(str(tmp_path), m, lambda mod, b: mod.per_sample_loss(b), lambda ids: a[torch.as_tensor(ids)], batches,
                  lrs, torch.optim.SGD(m.parameters(), lr=lrs[0]), dataset_size=len(a))
    return InfluenceLog(tmp_path), (lambda ids: a[torch.as_tensor(ids)])


def test_hand_oracle_window(tmp_path):
    log, data = scalar_log(tmp_path, [1.0, 2.0], [[0], [1]], [0.1, 0.2])
    lf = lambda mod, b: mod.per_sample_loss(b)  # noqa: E731
    lin = dit(log, lambda m: m.theta, module=Scalar(), train_data=data, window=(1, 2), loss_fn=lf)
    quad = dit(log, lambda m: 0.5 * m.theta**2, module=Scalar(), train_data=data, window=(1, 2), loss_fn=lf)
    assert lin.column(0)[0] == pytest.approx(-0.04, abs=1e-15)
    assert quad.column(0)[0] == pytest.approx(-0.0576, abs=1e-15)
    # sample 1 enters at step 1: F_1(1) = 0, F_1(2) = η_1 · q_2 · g_{1,1} / 1 = 0.2 · 1 · 2 · 0.9
    assert lin.column(0)[1] == pytest.approx(0.36, abs=1e-15)


def test_hand_oracle_removal(tmp_path):
    log, data = scalar_log(tmp_path, [1.0, 3.0], [[0, 1]], [0.1])
    s = dit(log, lambda m: m.theta, module=Scalar(), train_data=data, loss_fn=lambda mod, b: mod.per_sample_loss(b))
    assert float(log.checkpoint(1)["theta"]) == pytest.approx(0.8, abs=1e-15)
    assert s.column(0)[0] == pytest.approx(0.05, abs=1e-15)  # θ^{-0}_1 = 0.85: one step is linear in removal


# --------------------------------------------------------------- timeline and additivity
def test_timeline_additivity_and_patterns(tmp_path_factory):
    log = make_log(tmp_path_factory, "nesterov")
    ref = forward_recursion(log, "nesterov", QUERY)
    tl = timeline(log, QUERY, module=model(), train_data=train_data, grid=[0, 2, 4, 6, 9, T], loss_fn=loss_fn)
    assert tl.values.shape == (N, 6, 1)
    for g, t in enumerate(tl.grid):
        assert rel(tl.values[:, g, 0], ref[:, t]) < 1e-8 if t else np.all(tl.values[:, g, 0] == 0)
    # window additivity: DIT[a,c] = DIT[a,b] + DIT[b,c], and the timeline's columns agree with dit()
    ac = dit(log, QUERY, module=model(), train_data=train_data, window=(2, 9), loss_fn=loss_fn).column(0)
    ab = dit(log, QUERY, module=model(), train_data=train_data, window=(2, 6), loss_fn=loss_fn).column(0)
    bc = dit(log, QUERY, module=model(), train_data=train_data, window=(6, 9), loss_fn=loss_fn).column(0)
    np.testing.assert_allclose(ac, ab + bc, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(tl.window(2, 9).column(0), ac, rtol=1e-10, atol=1e-15)
    assert np.allclose(tl.window(0, 4).column(0) + tl.window(4, T).column(0), tl.window(0, T).column(0), rtol=0, atol=1e-15)
    res = tl.patterns()
    assert len(res.labels) == N and set(res.labels) <= {"negligible", "stable", "early", "late", "fluctuating"}


def test_timeline_default_grid_is_epochs(tmp_path_factory):
    log = make_log(tmp_path_factory, "sgd")
    tl = timeline(log, QUERY, module=model(), train_data=train_data, loss_fn=loss_fn)
    assert tl.grid.tolist() == [0, 4, 8, 12]
    whole = dit(log, QUERY, module=model(), train_data=train_data, loss_fn=loss_fn)
    np.testing.assert_allclose(tl.at(T)[:, 0], whole.column(0), rtol=1e-10)
    first = dit(log, QUERY, module=model(), train_data=train_data, window=("epoch", 0, 1), loss_fn=loss_fn)
    np.testing.assert_allclose(tl.window(0, 4).column(0), first.column(0), rtol=1e-10)
    half = dit(log, QUERY, module=model(), train_data=train_data, window=(0.5, 1.0), loss_fn=loss_fn)
    assert half.window == (6, 12)


# -------------------------------------------------------------------- Gauss-Newton
def test_gauss_newton_equals_gn_recursion(tmp_path_factory):
    log = make_log(tmp_path_factory, "momentum")
    s = dit_gauss_newton(log, QUERY, module=model(), window=(0, T))
    assert s.method == "dit-gauss-newton (approx.)"
    # reference: the momentum recursion with H_t = (1/B) Σ g gᵀ + λ from the logged (full) gradients
    hyper = log.meta["optimizer"]["param_groups"][0]
    mu, lam, damp = hyper["momentum"], hyper["weight_decay"], hyper["dampening"]
    from lightning_influence.estimators import checkpoint_query_gradients

    qg, _ = checkpoint_query_gradients(log, model(), QUERY, [T])
    p = qg[T].shape[1]
    delta, dv = np.zeros((p, N)), np.zeros((p, N))
    for rec in log.iter_steps(0, T, fields=("grad",)):
        G, B, eta = rec.grads, len(rec.ids), rec.lrs[0]
        E = np.zeros((p, N))
        E[:, rec.ids] = G.T / B
        dg = (G.T @ G / B + lam * np.eye(p)) @ delta - E
        dv = dg if rec.step == 0 else mu * dv + (1 - damp) * dg
        delta = delta - eta * dv
    assert rel(s.column(0), (qg[T] @ delta)[0]) < 1e-10
    # log-only: precomputed projected query gradients, no model
    s2 = dit_gauss_newton(log, qg, window=(0, T), query_names_=["val"])
    np.testing.assert_allclose(s2.column(0), s.column(0), rtol=1e-12)
    local = dit_gauss_newton(log, QUERY, module=model(), window=(4, 9), local=True)
    assert "approx." in local.method and local.scores.shape == (N, 1)


def test_gauss_newton_refuses_adam(tmp_path_factory):
    with pytest.raises(UnsupportedOptimizerError, match="SGD only"):
        dit_gauss_newton(make_log(tmp_path_factory, "adamw"), QUERY, module=model())


# --------------------------------------------------------------------------- refusals
def _meta_log(tmp_path_factory, **changes):
    src = make_log(tmp_path_factory, "sgd")
    path = tmp_path_factory.mktemp("edited")
    import shutil

    shutil.copytree(src.path, path, dirs_exist_ok=True)
    meta = dict(src.meta)
    meta.update(changes)
    write_meta(path, meta)
    return InfluenceLog(path)


def test_refuses_lbfgs_and_several_optimizers(tmp_path_factory):
    log = make_log(tmp_path_factory, "sgd")
    lbfgs = _meta_log(tmp_path_factory, optimizer={**log.meta["optimizer"], "class": "torch.optim.lbfgs.LBFGS"})
    with pytest.raises(UnsupportedOptimizerError, match="LBFGS"):
        dit(lbfgs, QUERY, module=model(), train_data=train_data, loss_fn=loss_fn)
    two = _meta_log(tmp_path_factory, optimizer=[log.meta["optimizer"], log.meta["optimizer"]])
    with pytest.raises(UnsupportedOptimizerError, match="2 optimizers"):
        dit(two, QUERY, module=model(), train_data=train_data, loss_fn=loss_fn)
    manual = _meta_log(tmp_path_factory, automatic_optimization=False)
    with pytest.raises(UnsupportedOptimizerError, match="manual optimization"):
        dit(manual, QUERY, module=model(), train_data=train_data, loss_fn=loss_fn)
    custom = _meta_log(tmp_path_factory, optimizer={**log.meta["optimizer"], "class": "mypkg.MySGD"})
    with pytest.raises(UnsupportedOptimizerError, match="not supported"):
        dit(custom, QUERY, module=model(), train_data=train_data, loss_fn=loss_fn)


def test_replay_mismatch_is_an_error_not_a_wrong_answer(tmp_path_factory):
    log = make_log(tmp_path_factory, "sgd", checkpoint_every=5)

    def other_data(ids):  # not the samples the run saw
        x, y = train_data(ids)
        return x + 0.01, y

    with pytest.raises(ReplayMismatchError, match=r"step 12, after replaying steps 10..11.*differs"):
        dit(log, QUERY, module=model(), train_data=other_data, loss_fn=loss_fn, tolerance=0.0)


def test_bad_arguments(tmp_path_factory):
    log = make_log(tmp_path_factory, "sgd")
    with pytest.raises(ValueError, match="hvp must be"):
        dit(log, QUERY, module=model(), train_data=train_data, loss_fn=loss_fn, hvp="magic")
    with pytest.raises(ValueError, match="preconditioner must be"):
        dit(log, QUERY, module=model(), train_data=train_data, loss_fn=loss_fn, preconditioner="magic")
    with pytest.raises(ValueError, match="outside the run"):
        dit(log, QUERY, module=model(), train_data=train_data, window=(3, 99), loss_fn=loss_fn)
    with pytest.raises(ValueError, match="module does not match"):
        dit(log, QUERY, module=nn.Linear(3, 3).double(), train_data=train_data, loss_fn=loss_fn)
