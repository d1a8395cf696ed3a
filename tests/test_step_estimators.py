"""Estimators and ground truth use the step as Lightning ran it: the recorded sample weights of an
incomplete accumulation and the clipping Jacobian, checked against brute force in float64."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch.func import functional_call

from lightning_influence import InfluenceTracker
from lightning_influence.estimators import dit, dit_gauss_newton, tracin
from lightning_influence.evaluation import replay_loo
from lightning_influence.log import InfluenceLog
from lightning_influence.replay import batch_from_ids
from tests.conftest import TinyClassifier, fit, loader, make_data

torch.set_num_threads(1)

N, BATCH, ACC, CLIP, WD = 26, 6, 2, 0.3, 0.01  # 5 batches per epoch: steps (6+6), (6+6), (2) -> weights 1/12, 1/12, 1/4
VAL = (torch.randn(5, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1]))


def loss_fn(m: Any, batch: Any) -> torch.Tensor:
    return m.per_sample_loss(batch)


def query(m: Any) -> torch.Tensor:
    return m.per_sample_loss(VAL).mean()


VALUE_CLIP = 0.02  # value clipping: binds on some entries of most steps


def _tracked_run(tmp: Any, **clipping: Any) -> tuple[InfluenceLog, Any, Any]:
    torch.manual_seed(0)
    m = TinyClassifier(lr=0.8, weight_decay=WD).double()
    ds = make_data(N)
    tracker = InfluenceTracker(str(tmp / "log"), checkpoint_every_n_steps=1, record_gradients=True, storage_dtype="float64")
    fit(m, loader(ds, BATCH), tracker, epochs=2, accumulate_grad_batches=ACC, **clipping)
    return InfluenceLog(tmp / "log"), ds, lambda: TinyClassifier().double()


@pytest.fixture(scope="module")
def run(tmp_path_factory: Any) -> tuple[InfluenceLog, Any, Any]:
    return _tracked_run(tmp_path_factory.mktemp("acc_clip"), gradient_clip_val=CLIP)


@pytest.fixture(scope="module")
def value_run(tmp_path_factory: Any) -> tuple[InfluenceLog, Any, Any]:
    return _tracked_run(tmp_path_factory.mktemp("acc_value_clip"), gradient_clip_val=VALUE_CLIP,
                        gradient_clip_algorithm="value")


def _norm_clip_jacobian(g: torch.Tensor) -> torch.Tensor:
    """d/dg [g c/(‖g‖+ε)] = c/(n+ε) I − c g gᵀ/(n (n+ε)²) where the clip binds, else I."""
    n = float(g.norm())
    eye = torch.eye(len(g), dtype=torch.float64)
    return CLIP / (n + 1e-6) * eye - CLIP * torch.outer(g, g) / (n * (n + 1e-6) ** 2) if CLIP / (n + 1e-6) < 1 else eye


def _value_clip_jacobian(g: torch.Tensor) -> torch.Tensor:
    return torch.diag((g.abs() < VALUE_CLIP).double())


def _flat(log: InfluenceLog, t: int, names: list[str]) -> torch.Tensor:
    ck = log.checkpoint(t)
    return torch.cat([torch.from_numpy(ck[n]).reshape(-1) for n in names])


def _unflat(x: torch.Tensor, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for n, s in shapes.items():
        k = int(np.prod(s))
        out[n] = x[i:i + k].reshape(s)
        i += k
    return out


class _Dense:
    """The model as a function of its flat parameter vector, for dense float64 brute force."""

    def __init__(self, make: Any) -> None:
        self.m = make()
        self.shapes = {n: tuple(p.shape) for n, p in self.m.named_parameters()}
        self.names = list(self.shapes)
        self.p = sum(int(np.prod(s)) for s in self.shapes.values())

    def losses(self, x: torch.Tensor, batch: Any) -> torch.Tensor:
        logits = functional_call(self.m, _unflat(x, self.shapes), (batch[0],))
        return torch.nn.functional.cross_entropy(logits, batch[1], reduction="none")

    def theta(self, log: InfluenceLog, t: int) -> torch.Tensor:
        return _flat(log, t, self.names)


def _independent_weights(ids_count: int) -> np.ndarray:
    """Lightning's weights for this batch structure, written out by hand (not from the log)."""
    return np.full(ids_count, 1 / 12) if ids_count == 12 else np.full(ids_count, 1 / (ACC * ids_count))


def test_recorded_clipping_binds_and_weights_are_lightnings(run: Any) -> None:
    log, _, _ = run
    coefs = [float(log.step_column(t, "clip_coef")) for t in range(log.num_steps)]
    assert sum(c < 1 for c in coefs) >= log.num_steps // 2, coefs
    for t in range(log.num_steps):
        np.testing.assert_array_equal(log.weights(t), _independent_weights(len(log.batch_ids(t))))
    assert sorted({len(log.batch_ids(t)) for t in range(log.num_steps)}) == [2, 12]


def _norm_clip(g: torch.Tensor) -> torch.Tensor:
    """Lightning's norm clipping, written out: ``g · min(1, c/(‖g‖ + 1e-6))``."""
    return g * min(1.0, CLIP / (float(g.norm()) + 1e-6))


def _brute_force(log: InfluenceLog, ds: Any, make: Any, gauss_newton: bool = False, clip_jacobian: Any = _norm_clip_jacobian,
                 removal: str = "linear") -> np.ndarray:
    """F_j = ⟨q_T, δ_j(T)⟩ by the explicit float64 recursion with dense Hessians and the clipping Jacobian
    written out: δ_{t+1} = δ_t − η_t [J_C(ĝ_t)(H_t δ_t − w_{j,t} g_{j,t}) + λ δ_t], all from θ_t in the log.
    ``removal="step"``: the removal enters with the clipped step's exact change, ``−η_t [C(ĝ_t − w_j g_j) − C(ĝ_t)]``
    in place of ``η_t J_C w_j g_j`` (docs/optimizer-adjoint.md §2)."""
    d = _Dense(make)
    losses_at, p, T = d.losses, d.p, log.num_steps
    delta = torch.zeros(N, p, dtype=torch.float64)
    for t in range(T):
        x = d.theta(log, t)
        ids = log.batch_ids(t)
        batch = batch_from_ids(ds, ids)
        w = torch.from_numpy(_independent_weights(len(ids)))
        J = torch.autograd.functional.jacobian(lambda y: losses_at(y, batch), x)  # (B, p) per-sample gradients
        g = w @ J
        if gauss_newton:
            H = J.T @ (w[:, None] * J)
        else:
            H = torch.autograd.functional.hessian(lambda y: (w * losses_at(y, batch)).sum(), x)
        Jc = clip_jacobian(g)
        eta = float(log.lr(t)[0])
        rows = torch.zeros(N, p, dtype=torch.float64)
        rows[torch.from_numpy(ids)] = w[:, None] * J
        if removal == "linear":
            delta = delta - eta * ((delta @ H.T - rows) @ Jc.T + WD * delta)
        else:
            delta = delta - eta * (delta @ H.T @ Jc.T + WD * delta)
            for i, j in enumerate(ids):
                delta[j] -= eta * (_norm_clip(g - rows[j]) - _norm_clip(g))
    q = torch.autograd.functional.jacobian(lambda y: losses_at(y, VAL).mean(), d.theta(log, T))
    return (delta @ q).numpy()


@pytest.mark.parametrize("removal", ["linear", "step"])
@pytest.mark.parametrize("hvp", ["exact", "fd"])
def test_dit_with_accumulation_and_clipping_equals_the_explicit_recursion(run: Any, hvp: str, removal: str) -> None:
    log, ds, make = run
    brute = _brute_force(log, ds, make, removal=removal)
    s = dit(log, query, module=make(), train_data=ds, loss_fn=loss_fn, hvp=hvp, removal=removal).scores[:, 0]
    err = np.abs(s - brute).max() / np.abs(brute).max()
    assert err < (1e-10 if hvp == "exact" else 1e-5), err
    assert np.abs(brute).max() > 1e-3
    if removal == "step":  # the clip's response to a removal is far from linear here (batches of 2 with weight 1/4)
        linear = _brute_force(log, ds, make)
        assert np.abs(linear - brute).max() / np.abs(brute).max() > 1e-2


def test_value_clipping_in_dit_and_gauss_newton_equals_the_explicit_recursion(value_run: Any) -> None:
    log, ds, make = value_run
    coefs = [float(log.step_column(t, "clip_coef")) for t in range(log.num_steps)]
    assert sum(c < 1 for c in coefs) >= log.num_steps // 2, coefs
    brute = _brute_force(log, ds, make, clip_jacobian=_value_clip_jacobian)
    s = dit(log, query, module=make(), train_data=ds, loss_fn=loss_fn, removal="linear").scores[:, 0]
    assert np.abs(s - brute).max() / np.abs(brute).max() < 1e-10
    brute_gn = _brute_force(log, ds, make, gauss_newton=True, clip_jacobian=_value_clip_jacobian)
    s = dit_gauss_newton(log, query, module=make()).scores[:, 0]
    assert np.abs(s - brute_gn).max() / np.abs(brute_gn).max() < 1e-10


def test_gauss_newton_dit_uses_the_weights_and_the_clipping_jacobian(run: Any) -> None:
    log, ds, make = run
    brute = _brute_force(log, ds, make, gauss_newton=True)
    s = dit_gauss_newton(log, query, module=make()).scores[:, 0]
    assert np.abs(s - brute).max() / np.abs(brute).max() < 1e-10


def test_tracin_weights_each_sample_as_the_step_did(run: Any) -> None:
    """TracIn = Σ_t η_t w_{j,t} ⟨J_C q_t, g_{j,t}⟩ with q_t at θ_t (a checkpoint every step), by brute force."""
    log, ds, make = run
    m = make()
    names = [n for n, _ in m.named_parameters()]
    out = np.zeros(N)
    for t in range(log.num_steps):
        ck = {n: torch.from_numpy(v) for n, v in log.checkpoint(t).items()}
        ids = log.batch_ids(t)
        w = _independent_weights(len(ids))

        def flat_grad(fn: Any) -> torch.Tensor:
            params = {n: v.clone().requires_grad_(True) for n, v in ck.items()}
            gs = torch.autograd.grad(fn(params), [params[n] for n in names])
            return torch.cat([g.reshape(-1) for g in gs])

        def ce(p: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
            return torch.nn.functional.cross_entropy(functional_call(m, p, (batch[0],)), batch[1], reduction="none")

        q = flat_grad(lambda p: ce(p, VAL).mean())
        G = torch.stack([flat_grad(lambda p, i=i: ce(p, batch_from_ids(ds, [i])).sum()) for i in ids])
        g = torch.from_numpy(w) @ G
        n = float(g.norm())
        Jq = CLIP / (n + 1e-6) * q - CLIP * g * (g @ q) / (n * (n + 1e-6) ** 2) if CLIP / (n + 1e-6) < 1 else q
        out[ids] += float(log.lr(t)[0]) * w * (G @ Jq).numpy()
    s = tracin(log, query, module=make()).scores[:, 0]
    np.testing.assert_allclose(s, out, rtol=1e-9, atol=1e-12)


def test_replay_loo_removes_the_sample_from_its_micro_batch_and_clips(run: Any) -> None:
    """Replay LOO = an independent torch loop: θ_0 from the log, each micro-batch's loss Σ_{i≠j} ℓ_i/(A|m|)
    back-propagated in turn, clip_grad_norm_, SGD with weight decay."""
    log, ds, make = run
    js = [0, 7, 25]
    res = replay_loo(log, make(), ds, query, sample_ids=js, grid=[log.num_steps], loss_fn=loss_fn)

    def train(drop: int | None) -> float:
        m = make()
        m.load_state_dict({n: torch.from_numpy(v) for n, v in log.checkpoint(0).items()}, strict=False)
        opt = torch.optim.SGD(m.parameters(), lr=1.0, weight_decay=WD)
        for t in range(log.num_steps):
            ids = log.batch_ids(t)
            for g in opt.param_groups:
                g["lr"] = float(log.lr(t)[0])
            opt.zero_grad()
            micro = [ids] if len(ids) == 2 else [ids[:6], ids[6:]]
            for mb in micro:
                keep = torch.tensor([0.0 if i == drop else 1.0 for i in mb], dtype=torch.float64)
                (keep * m.per_sample_loss(batch_from_ids(ds, mb))).sum().div(ACC * len(mb)).backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), CLIP)
            opt.step()
        return float(query(m).detach())

    base = train(None)
    expected = np.array([train(j) - base for j in js])
    np.testing.assert_allclose(res.at(log.num_steps)[:, 0], expected, rtol=1e-7, atol=1e-12)
    dit_scores = dit(log, query, module=make(), train_data=ds, loss_fn=loss_fn).scores[js, 0]
    assert np.corrcoef(dit_scores, expected)[0, 1] > 0.99


def test_diffin_step_form_uses_the_weights_and_the_clipped_step(run: Any) -> None:
    """Diff-In's step form G_z(T) = Σ_s η_s w_{z,s} ⟨J_{C,s} q_T, g_{z,s}⟩ Π_{r>s} (1 − η_r ⟨q, (c_r H_r + λ) q⟩/‖q‖²),
    with dense float64 Hessians of the weighted step loss and the clip coefficient c_r, by brute force."""
    from lightning_influence.estimators import diffin

    log, ds, make = run
    d = _Dense(make)
    losses_at, T = d.losses, log.num_steps

    q = torch.autograd.functional.jacobian(lambda y: losses_at(y, VAL).mean(), d.theta(log, T))
    terms, decay = [], []
    for t in range(T):
        x = d.theta(log, t)
        ids = log.batch_ids(t)
        batch = batch_from_ids(ds, ids)
        w = torch.from_numpy(_independent_weights(len(ids)))
        J = torch.autograd.functional.jacobian(lambda y: losses_at(y, batch), x)
        H = torch.autograd.functional.hessian(lambda y: (w * losses_at(y, batch)).sum(), x)
        g = w @ J
        n = float(g.norm())
        c = min(1.0, CLIP / (n + 1e-6))
        Jq = CLIP / (n + 1e-6) * q - CLIP * g * (g @ q) / (n * (n + 1e-6) ** 2) if c < 1 else q
        eta = float(log.lr(t)[0])
        terms.append((ids, eta * w.numpy() * (J @ Jq).numpy()))
        decay.append(1.0 - eta * float(q @ (c * H + WD * torch.eye(len(x), dtype=torch.float64)) @ q) / float(q @ q))
    out = np.zeros(N)
    for s, (ids, v) in enumerate(terms):
        out[ids] += v * float(np.prod(decay[s + 1:]))
    got = diffin(log, query, module=make(), train_data=ds, form="step", hvp="exact", loss_fn=loss_fn).scores[:, 0]
    np.testing.assert_allclose(got, out, rtol=1e-8, atol=1e-12)


def test_dit_with_adamw_and_clipping_is_the_derivative_of_the_replayed_run(tmp_path: Any) -> None:
    """Clipping composed with an adaptive optimizer's functional step: DIT's F_j equals the central difference
    of the replayed run (torch.optim, recorded weights and clipping) in sample j's weight, (f(1+ε) − f(1−ε))/(2ε)."""
    from lightning_influence.capture import call_with_params
    from lightning_influence.replay import replay

    torch.manual_seed(0)
    m = TinyClassifier(optimizer="adamw", lr=0.05, weight_decay=WD).double()
    ds = make_data(N)
    tracker = InfluenceTracker(str(tmp_path / "log"), checkpoint_every_n_steps=1)
    fit(m, loader(ds, BATCH), tracker, epochs=2, accumulate_grad_batches=ACC, gradient_clip_val=CLIP)
    log = InfluenceLog(tmp_path / "log")
    assert sum(float(log.step_column(t, "clip_coef")) < 1 for t in range(log.num_steps)) >= log.num_steps // 2
    make = lambda: TinyClassifier().double()  # noqa: E731
    s = dit(log, query, module=make(), train_data=ds, loss_fn=loss_fn, removal="linear").scores[:, 0]

    def f(j: int, mult: float) -> float:
        w = lambda t, ids: torch.tensor([mult if i == j else 1.0 for i in ids], dtype=torch.float64)  # noqa: E731
        last = list(replay(log, make(), ds, 0, None, loss_fn=loss_fn, weights=w, verify=False))[-1]
        return float(call_with_params(make(), query, last.params))

    eps = 1e-4
    for j in (0, 7, 25):  # dropping sample j is weight 1 -> 0: F_j ≈ −d f / d weight
        deriv = (f(j, 1 + eps) - f(j, 1 - eps)) / (2 * eps)
        assert abs(s[j] + deriv) <= 1e-6 * max(abs(deriv), 1e-3), (j, s[j], -deriv)


def test_diffin_published_form_uses_the_weights_and_the_clipped_learning_rate(run: Any) -> None:
    """The published form −Σ_t a_t ⟨q_t, H_B g_z + H_z Ĝ⟩, a_t = −t (η_t κ_t)²/(N m), with H_B and Ĝ of the
    weighted step loss Σ w ℓ and κ_t the clip coefficient, by dense float64 brute force (every sample, every step)."""
    from lightning_influence.estimators import diffin

    log, ds, make = run
    d = _Dense(make)
    losses_at, T = d.losses, log.num_steps

    everyone = batch_from_ids(ds, np.arange(N))
    out = np.zeros(N)
    for t in range(T):
        x = d.theta(log, t)
        ids = log.batch_ids(t)
        batch = batch_from_ids(ds, ids)
        w = torch.from_numpy(_independent_weights(len(ids)))
        HB = torch.autograd.functional.hessian(lambda y: (w * losses_at(y, batch)).sum(), x)
        g_hat = torch.autograd.functional.jacobian(lambda y: (w * losses_at(y, batch)).sum(), x)
        q = torch.autograd.functional.jacobian(lambda y: losses_at(y, VAL).mean(), x)
        Gz = torch.autograd.functional.jacobian(lambda y: losses_at(y, everyone), x)  # (N, p)
        kappa = min(1.0, CLIP / (float(g_hat.norm()) + 1e-6))
        a = -t * (float(log.lr(t)[0]) * kappa) ** 2 / (N * T)
        HzG = torch.autograd.functional.jacobian(  # (N, p): row z = H_z Ĝ (H_z symmetric)
            lambda y: torch.autograd.functional.jacobian(lambda u: losses_at(u, everyone), y, create_graph=True) @ g_hat, x)
        out += a * (Gz @ (HB @ q) + HzG @ q).numpy()
    got = diffin(log, query, module=make(), train_data=ds, form="published", hvp="exact", steps="all", samples="all",
                 loss_fn=loss_fn).scores[:, 0]
    np.testing.assert_allclose(got, -out, rtol=1e-8, atol=1e-14)
