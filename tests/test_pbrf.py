"""PBRF (docs/influence-math.md §6): closed forms for a linear model with squared loss, the Gauss-Newton algebra for
cross-entropy, solvers, the gap decomposition and the refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_influence.evaluation.pbrf import (
    STAGES,
    bregman_divergence,
    gap_decomposition,
    linear_pbrf,
    pbrf,
)
from lightning_influence.log import InfluenceLog
from tests._linear import D, Lin, linear_problem
from tests._tinylog import epoch_batches, train_and_log

torch.set_num_threads(1)
N, KAPPA = 12, 0.05
gen = torch.Generator().manual_seed(0)
P = linear_problem(N, gen, n_query=4)
X, Y, XQ, YQ, PHI, PHIQ, lin_data = P.x, P.y, P.xq, P.yq, P.phi, P.phiq, P.data


def lin_query(m):  # a prediction (linear in θ) and a validation loss (quadratic)
    return torch.stack([m(XQ[:1]).reshape(()), 0.5 * (m(XQ) - YQ).pow(2).mean()])


def fq(theta: torch.Tensor) -> np.ndarray:
    pred = PHIQ @ theta
    return np.array([float(pred[0]), float((0.5 * (pred - YQ[:, 0]) ** 2).mean())])


def theta_of(log: InfluenceLog, step: int) -> torch.Tensor:
    c = log.checkpoint(step)
    return torch.cat([torch.as_tensor(c["lin.weight"]).reshape(-1), torch.as_tensor(c["lin.bias"])])


def ridge(mask: torch.Tensor) -> torch.Tensor:
    """Minimiser of (1/N) Σ_{i kept} ½(φ_iθ − y_i)² + (κ/2)‖θ‖² (denominator N kept)."""
    A = PHI[mask].T @ PHI[mask] / N + KAPPA * torch.eye(D + 1, dtype=torch.float64)
    return torch.linalg.solve(A, PHI[mask].T @ Y[mask, 0] / N)


@pytest.fixture(scope="module")
def converged_log(tmp_path_factory) -> InfluenceLog:
    """Full-batch GD to the ridge minimiser (3 'epochs' of 100 steps)."""
    torch.manual_seed(0)
    model = Lin().double()
    path = tmp_path_factory.mktemp("ridge")
    T = 300
    train_and_log(str(path), model, lambda m, b: m.per_sample_loss(b), lin_data, [np.arange(N)] * T, [0.5] * T,
                  torch.optim.SGD(model.parameters(), lr=0.5, weight_decay=KAPPA), checkpoint_every=None,
                  record_gradients=False, dataset_size=N, epochs=[t // 100 for t in range(T)])
    return InfluenceLog(path)


@pytest.fixture(scope="module")
def sgd_log(tmp_path_factory) -> InfluenceLog:
    """Minibatch SGD, far from converged."""
    torch.manual_seed(1)
    model = Lin().double()
    path = tmp_path_factory.mktemp("sgd")
    batches, epochs = epoch_batches(N, 4, 2, seed=0)
    train_and_log(str(path), model, lambda m, b: m.per_sample_loss(b), lin_data, batches, [0.2] * len(batches),
                  torch.optim.SGD(model.parameters(), lr=0.2, weight_decay=KAPPA), checkpoint_every=None,
                  record_gradients=False, dataset_size=N, epochs=epochs)
    return InfluenceLog(path)


def closed_form_pbrf(theta_s: torch.Tensor, m: int, lam: float) -> torch.Tensor:
    """θ^s(ε) − θ^s for the quadratic PBRF: (ΦᵀΦ/N + (κ+λ) − φ_mφ_mᵀ/N) d = φ_m r_m / N."""
    phi = PHI[m]
    r = float(phi @ theta_s - Y[m, 0])
    A = PHI.T @ PHI / N + (KAPPA + lam) * torch.eye(D + 1, dtype=torch.float64) - torch.outer(phi, phi) / N
    return torch.linalg.solve(A, phi * r / N)


# ------------------------------------------------------------------------- closed forms
@pytest.mark.parametrize("lam", [0.0, 0.1])
def test_pbrf_matches_closed_form_away_from_a_minimiser(sgd_log, lam):
    theta_s = theta_of(sgd_log, sgd_log.num_steps)
    res = pbrf(sgd_log, Lin().double(), lin_data, lin_query, samples=range(N), damping=lam, output_loss="squared_error")
    expected = np.stack([fq(theta_s + closed_form_pbrf(theta_s, m, lam)) - fq(theta_s) for m in range(N)])
    assert np.abs(res.scores - expected).max() <= 1e-12 * max(1.0, np.abs(expected).max())
    assert res.converged.all() and (res.iterations == 1).all()  # Gauss-Newton of the whole objective = Newton
    assert res.info["weight_decay_max"] == pytest.approx(KAPPA)  # the logged L2 joins the proximity
    # L-BFGS reaches the same answer
    lb = pbrf(sgd_log, Lin().double(), lin_data, lin_query, samples=[0, 5], damping=lam, output_loss="squared_error",
              solver="lbfgs", tol=1e-9)
    # (L-BFGS stops where float64 objective values stop resolving progress: ~1e-8 relative)
    assert np.abs(lb.scores - expected[[0, 5]]).max() <= 1e-7 * np.abs(expected).max()


def test_pbrf_without_damping_is_exact_loo_at_the_minimiser(converged_log):
    theta_s = theta_of(converged_log, converged_log.num_steps)
    assert torch.allclose(theta_s, ridge(torch.ones(N, dtype=torch.bool)), atol=1e-14)
    loo = np.stack([fq(ridge(torch.arange(N) != m)) - fq(theta_s) for m in range(N)])
    res = pbrf(converged_log, Lin().double(), lin_data, lin_query, samples=range(N), damping=0.0,
               output_loss="squared_error")
    assert np.abs(res.scores - loo).max() <= 1e-12 * np.abs(loo).max()


def test_linear_pbrf_closed_form(sgd_log):
    theta_s = theta_of(sgd_log, sgd_log.num_steps)
    lam = 0.1
    A = PHI.T @ PHI / N + (KAPPA + lam) * torch.eye(D + 1, dtype=torch.float64)
    pred = PHIQ @ theta_s
    q = torch.stack([PHIQ[0], ((pred - YQ[:, 0])[:, None] * PHIQ).mean(0)])  # ∇f of both queries
    grads = PHI * (PHI @ theta_s - Y[:, 0])[:, None]  # ∇ℓ_m
    expected = (grads @ torch.linalg.solve(A, q.T) / N).numpy()  # −ε ⟨(G+μ)⁻¹q, ∇ℓ_m⟩, ε = −1/N
    for solver in ("cholesky", "cg"):
        res = linear_pbrf(sgd_log, Lin().double(), lin_data, lin_query, damping=lam, output_loss="squared_error",
                          linear_solver=solver)
        assert np.abs(res.scores - expected).max() <= 1e-12 * np.abs(expected).max()
        assert res.converged.all() and res.info["solver"] == solver
    # "mse" (mean over output entries; one output here) = twice "squared_error": G doubles, ∇ℓ doubles
    res = linear_pbrf(sgd_log, Lin().double(), lin_data, lin_query, damping=2 * lam,
                      weight_decay=2 * KAPPA, output_loss="mse",
                      loss_fn=lambda m, b: (m(b[0]) - b[1]).pow(2).mean(1))
    assert np.abs(res.scores - expected).max() <= 1e-12 * np.abs(expected).max()


def test_gap_decomposition_closes_for_a_converged_quadratic(converged_log):
    """At the ridge minimiser with λ = 0 every stage up to the PBRF is exact LOO; only linearisation remains."""
    theta_s = theta_of(converged_log, converged_log.num_steps)
    loo = np.stack([fq(ridge(torch.arange(N) != m)) - fq(theta_s) for m in range(N)])
    gd = gap_decomposition(converged_log, Lin().double(), lin_data, lin_query, samples=range(N), damping=0.0,
                           output_loss="squared_error", warm_epochs=2)
    assert list(gd.stages) == list(STAGES)
    scale = np.abs(loo).max()
    for stage in ("loo", "warm", "warm_prox", "bregman", "pbrf"):
        assert np.abs(gd.stages[stage] - loo).max() <= 1e-7 * scale, stage
    lin = linear_pbrf(converged_log, Lin().double(), lin_data, lin_query, damping=0.0, output_loss="squared_error")
    np.testing.assert_allclose(gd.stages["linear"], lin.scores, rtol=0, atol=1e-14)
    terms = {t["term"]: t for t in gd.terms(1)}
    assert terms["linearisation"]["rms_over_total_gap"] == pytest.approx(1.0, abs=1e-6)
    assert all(t["rms_over_loo"] < 1e-6 for k, t in terms.items() if k.startswith(("warm", "prox", "training", "solver")))
    json.dumps(gd.to_dict())
    assert "linearisation" in gd.table(1)


def test_warm_stage_is_the_logged_optimizer_from_theta_T(sgd_log):
    """The warm stage equals a hand-written replay of the logged steps from θ_T without the sample."""
    theta_s = theta_of(sgd_log, sgd_log.num_steps)

    def run(drop: int | None) -> torch.Tensor:
        th = theta_s.clone()
        for t in range(sgd_log.num_steps):
            ids = sgd_log.batch_ids(t)
            w = torch.as_tensor(ids != (-1 if drop is None else drop), dtype=torch.float64)
            r = PHI[ids] @ th - Y[ids, 0]
            th = th - float(sgd_log.lr(t)[0]) * ((w * r) @ PHI[ids] / len(ids) + KAPPA * th)
        return th

    gd = gap_decomposition(sgd_log, Lin().double(), lin_data, lin_query, samples=[1, 7], damping=0.3,
                           output_loss="squared_error", loo=np.zeros((2, 2)))
    base = fq(run(None))
    expected = np.stack([fq(run(m)) - base for m in (1, 7)])
    assert np.abs(gd.stages["warm"] - expected).max() <= 1e-13
    assert gd.info["warm_steps"] == sgd_log.num_steps


# ------------------------------------------------------------------ cross-entropy network
C, H = 3, 4
XC = torch.randn(10, D, generator=gen, dtype=torch.float64)
YC = torch.randint(0, C, (10,), generator=gen)
XV = torch.randn(5, D, generator=gen, dtype=torch.float64)
YV = torch.randint(0, C, (5,), generator=gen)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, C))

    def forward(self, x):
        return self.net(x)

    def per_sample_loss(self, batch):
        return F.cross_entropy(self(batch[0]), batch[1], reduction="none")


def ce_data(ids):
    ids = torch.as_tensor(ids)
    return XC[ids], YC[ids]


def ce_query(m):
    return F.cross_entropy(m(XV), YV)


@pytest.fixture(scope="module")
def ce_log(tmp_path_factory):
    torch.manual_seed(3)
    model = MLP().double()
    path = tmp_path_factory.mktemp("ce")
    batches, epochs = epoch_batches(10, 4, 3, seed=2)
    train_and_log(str(path), model, lambda m, b: m.per_sample_loss(b), ce_data, batches, [0.5] * len(batches),
                  torch.optim.SGD(model.parameters(), lr=0.5, weight_decay=0.01), checkpoint_every=None,
                  record_gradients=False, dataset_size=10, epochs=epochs)
    return InfluenceLog(path)


def _flat_final(log):
    m = MLP().double()
    ck = log.checkpoint(log.num_steps)
    names = [n for n, _ in m.named_parameters()]
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    return m, names, shapes, torch.cat([torch.as_tensor(ck[n]).reshape(-1) for n in names])


def test_cross_entropy_bregman_and_gauss_newton_by_hand(ce_log):
    """Linear PBRF against an explicit Jacobian, the softmax Hessian diag(p) − ppᵀ and a dense solve."""
    from lightning_influence.capture.hvp import unflatten

    m, names, shapes, theta = _flat_final(ce_log)

    def outputs(th):
        return torch.func.functional_call(m, unflatten(th, shapes), (XC,))

    J = torch.autograd.functional.jacobian(outputs, theta)  # (10, C, p)
    P = torch.softmax(outputs(theta), 1)
    Hs = torch.diag_embed(P) - P[:, :, None] * P[:, None, :]
    G = torch.einsum("ncp,ncd,ndq->pq", J, Hs, J) / 10
    lam = 0.05
    A = G + (lam + 0.01) * torch.eye(theta.numel(), dtype=torch.float64)
    th = theta.clone().requires_grad_(True)
    qgrad = torch.autograd.grad(F.cross_entropy(torch.func.functional_call(m, unflatten(th, shapes), (XV,)), YV), th)[0]
    per = torch.autograd.functional.jacobian(
        lambda t: F.cross_entropy(torch.func.functional_call(m, unflatten(t, shapes), (XC,)), YC, reduction="none"), theta)
    expected = (per @ torch.linalg.solve(A, qgrad) / 10).numpy()
    for solver in ("cholesky", "cg"):
        res = linear_pbrf(ce_log, MLP().double(), ce_data, ce_query, damping=lam, linear_solver=solver)
        np.testing.assert_allclose(res.scores[:, 0], expected, rtol=1e-9, atol=1e-13)
    # the divergence itself: KL(softmax(h_ref) ‖ softmax(h))
    h, h_ref = torch.randn(6, C, dtype=torch.float64), torch.randn(6, C, dtype=torch.float64)
    kl = (torch.softmax(h_ref, 1) * (torch.log_softmax(h_ref, 1) - torch.log_softmax(h, 1))).sum(1)
    torch.testing.assert_close(bregman_divergence("cross_entropy")(h, h_ref), kl, rtol=0, atol=1e-15)
    y = torch.randint(0, C, (6,))
    brute = F.cross_entropy(h, y, reduction="none") - F.cross_entropy(h_ref, y, reduction="none") \
        - ((torch.softmax(h_ref, 1) - F.one_hot(y, C)) * (h - h_ref)).sum(1)  # ℓ(h) − ℓ(h_ref) − ⟨∇ℓ(h_ref), h − h_ref⟩
    torch.testing.assert_close(kl, brute, rtol=0, atol=1e-13)
    torch.testing.assert_close(bregman_divergence("mse")(h, h_ref), ((h - h_ref) ** 2).mean(1))
    torch.testing.assert_close(bregman_divergence("squared_error")(h, h_ref), 0.5 * ((h - h_ref) ** 2).sum(1))


def test_pbrf_is_first_order_the_linear_pbrf(ce_log):
    """With a tiny ε the PBRF response is ε-linear and equals the linearised PBRF to O(ε)."""
    lam = 0.1
    eps = -1e-4 / 10
    res = pbrf(ce_log, MLP().double(), ce_data, ce_query, samples=range(10), damping=lam, epsilon=eps, tol=1e-10)
    lin = linear_pbrf(ce_log, MLP().double(), ce_data, ce_query, damping=lam, epsilon=eps)
    assert res.converged.all()
    np.testing.assert_allclose(res.scores, lin.scores, rtol=2e-4, atol=1e-4 * np.abs(lin.scores).max())


def test_solvers_agree_and_report_convergence(ce_log):
    kw = dict(damping=0.1, tol=1e-9)
    gn = pbrf(ce_log, MLP().double(), ce_data, ce_query, samples=[0, 3, 8], record_at=(1,), **kw)
    lb = pbrf(ce_log, MLP().double(), ce_data, ce_query, samples=[0, 3, 8], solver="lbfgs", **kw)
    ad = pbrf(ce_log, MLP().double(), ce_data, ce_query, samples=[3], solver="adam", lr=1e-3, steps=5, **kw)
    assert gn.info["solver"] == "gauss-newton" and gn.converged.all() and (gn.rel_grad_norm <= 1e-9).all()
    np.testing.assert_allclose(lb.scores, gn.scores, rtol=1e-6)
    assert 1 in gn.intermediate and gn.intermediate[1].shape == gn.scores.shape
    assert not ad.converged.any() and ad.iterations[0] == 5  # 5 Adam steps are not a solve, and say so
    d = gn.to_dict()
    json.dumps(d)
    assert d["summary"]["converged_fraction"] == 1.0
    full = gn.full(10)
    assert np.isnan(full[1]).all() and full[3, 0] == gn.scores[1, 0]
    assert "converged: 100%" in gn.table()


def test_weight_decay_sources(ce_log):
    res = pbrf(ce_log, MLP().double(), ce_data, ce_query, samples=[0], damping=0.1)
    assert res.info["weight_decay_max"] == pytest.approx(0.01)
    zero = pbrf(ce_log, MLP().double(), ce_data, ce_query, samples=[0], damping=0.11, weight_decay=0.0)
    np.testing.assert_allclose(zero.scores, res.scores, rtol=1e-8)  # κ and λ enter only as their sum
    per_param = pbrf(ce_log, MLP().double(), ce_data, ce_query, samples=[0], damping=0.1,
                     weight_decay={n: 0.01 for n, _ in MLP().named_parameters()})
    np.testing.assert_allclose(per_param.scores, res.scores, rtol=1e-12)


def test_refusals(ce_log):
    with pytest.raises(ValueError, match="output_loss='hinge' is not supported.*cross_entropy"):
        pbrf(ce_log, MLP().double(), ce_data, ce_query, samples=[0], output_loss="hinge")
    with pytest.raises(ValueError, match="never appear in the log"):
        pbrf(ce_log, MLP().double(), ce_data, ce_query, samples=[10])
    with pytest.raises(ValueError, match="solver must be one of"):
        pbrf(ce_log, MLP().double(), ce_data, ce_query, samples=[0], solver="newton")
    with pytest.raises(ValueError, match="max_dense_params"):
        pbrf(ce_log, MLP().double(), ce_data, ce_query, samples=[0], solver="gauss-newton", max_dense_params=5)
    with pytest.raises(ValueError, match="needs lr"):
        pbrf(ce_log, MLP().double(), ce_data, ce_query, samples=[0], solver="sgd")
    with pytest.raises(ValueError, match="damping"):
        pbrf(ce_log, MLP().double(), ce_data, ce_query, samples=[0], damping=-1.0)
    with pytest.raises(ValueError, match="same samples"):
        res = pbrf(ce_log, MLP().double(), ce_data, ce_query, samples=[0], damping=0.1)
        gap_decomposition(ce_log, MLP().double(), ce_data, ce_query, samples=[1], damping=0.1, pbrf_result=res,
                          loo=np.zeros((1, 1)))


def test_chunking_inputs_fn_and_sample_subsets(ce_log):
    """Chunked full-batch passes, a custom inputs_fn and a subset of samples change nothing."""
    ref = pbrf(ce_log, MLP().double(), ce_data, ce_query, samples=[2, 7], damping=0.1)
    chunked = pbrf(ce_log, MLP().double(), ce_data, ce_query, samples=[2, 7], damping=0.1, chunk_size=3,
                   inputs_fn=lambda batch: batch[0])
    np.testing.assert_allclose(chunked.scores, ref.scores, rtol=1e-9)
    lin_all = linear_pbrf(ce_log, MLP().double(), ce_data, ce_query, damping=0.1)
    lin_sub = linear_pbrf(ce_log, MLP().double(), ce_data, ce_query, samples=[7, 2], damping=0.1, chunk_size=4)
    np.testing.assert_allclose(lin_sub.scores, lin_all.scores[[7, 2]], rtol=1e-10)
    assert lin_all.samples.tolist() == list(range(10))


def test_batches_with_non_tensor_leaves_use_the_per_sample_solver(ce_log):
    """A batch the stacked solver cannot vmap over (a string leaf) falls back to one solve per sample."""

    def dict_data(ids):
        x, y = ce_data(ids)
        return {"x": x, "y": y, "source": "digits"}

    def dict_loss(m, b):
        return F.cross_entropy(m(b["x"]), b["y"], reduction="none")

    ref = pbrf(ce_log, MLP().double(), ce_data, ce_query, samples=[1, 4], damping=0.1, tol=1e-10)
    got = pbrf(ce_log, MLP().double(), dict_data, ce_query, samples=[1, 4], damping=0.1, tol=1e-10, loss_fn=dict_loss,
               inputs_fn=lambda b: b["x"])
    np.testing.assert_allclose(got.scores, ref.scores, rtol=1e-7)
    assert got.converged.all()


def test_warm_stages_use_the_recorded_weights_of_an_incomplete_accumulation(tmp_path):
    """Accumulation 2 over 5 batches an epoch: every third step is one micro-batch of 2 whose rows weigh
    1/(2·2), not 1/2. The warm and Bregman stages equal an independent torch.optim.SGD run from θ_T (its own
    momentum and coupled weight decay) on the step losses Σ_i w_{i,t} ℓ_i with the recorded weights."""
    from lightning_influence import InfluenceTracker
    from tests.conftest import fit, loader, make_data, tiny

    ds = make_data(26)
    wd, lam = 0.01, 0.2
    tracker = InfluenceTracker(str(tmp_path / "log"), checkpoint_every_n_steps=1)
    fit(tiny(lr=0.5, momentum=0.9, weight_decay=wd), loader(ds, 6), tracker, epochs=2, accumulate_grad_batches=2)
    log = InfluenceLog(tmp_path / "log")
    T = log.num_steps
    short = [t for t in range(T) if len(log.batch_ids(t)) == 2]
    assert short == [2, 5] and np.allclose(log.weights(2), 0.25)  # not a plain batch mean
    xv, yv = make_data(8, seed=1).tensors
    model = tiny()

    def query(m):
        return F.cross_entropy(m(xv), yv)

    def loss_fn(m, b):
        return m.per_sample_loss(b)

    samples = [int(log.batch_ids(2)[0]), int(log.batch_ids(5)[1]), int(log.batch_ids(0)[3])]
    gd = gap_decomposition(log, model, ds, query, samples=samples, damping=lam, loss_fn=loss_fn, loo=np.zeros((3, 1)))
    names = [n for n, _ in model.named_parameters()]
    theta_T = {n: torch.from_numpy(v) for n, v in log.checkpoint(T).items()}
    with torch.no_grad():
        model.load_state_dict(theta_T, strict=False)
        h_ref = {t: model(ds.tensors[0][log.batch_ids(t)]) for t in range(T)}

    def run(drop: int, bregman: bool) -> float:
        m = tiny()
        m.load_state_dict(theta_T, strict=False)
        params = dict(m.named_parameters())
        opt = torch.optim.SGD([params[n] for n in names], lr=0.5, momentum=0.9, weight_decay=wd)
        state = log.optimizer_state(T)
        for n in names:
            opt.state[params[n]]["momentum_buffer"] = torch.from_numpy(state[n]["momentum_buffer"]).clone()
        for t in range(T):
            ids, w = log.batch_ids(t), torch.from_numpy(log.weights(t))
            x, y = ds.tensors[0][ids], ds.tensors[1][ids]
            opt.param_groups[0]["lr"] = float(log.lr(t)[0])
            opt.zero_grad()
            losses = F.cross_entropy(m(x), y, reduction="none")
            out = torch.as_tensor(ids == drop, dtype=torch.float64)
            if bregman:  # Σ w (KL(p_ref ‖ p) − [removed] ℓ) + λ/2 ‖θ − θ_T‖² + κ/2 ‖θ − θ_T‖² (= wd θ − κ θ_T)
                kl = F.kl_div(F.log_softmax(m(x), 1), F.log_softmax(h_ref[t], 1), reduction="none", log_target=True).sum(1)
                obj = (w * (kl - out * losses)).sum() + sum(
                    0.5 * lam * (params[n] - theta_T[n]).pow(2).sum() - wd * (theta_T[n] * params[n]).sum() for n in names)
            else:
                obj = (w * (1 - out) * losses).sum()
            obj.backward()
            opt.step()
        with torch.no_grad():
            return float(query(m))

    for stage, bregman in (("warm", False), ("bregman", True)):
        expected = np.array([[run(z, bregman) - run(-1, bregman)] for z in samples])
        np.testing.assert_allclose(gd.stages[stage], expected, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("trainer_kwargs,dropout,match", [
    ({"gradient_clip_val": 0.1}, 0.0, r"gradient clipping"),
    ({}, 0.3, r"random numbers drawn in the forward \(dropout\)"),
])
def test_gap_decomposition_refuses_steps_its_warm_stages_cannot_rerun(tmp_path, trainer_kwargs, dropout, match):
    """Clipped or dropout steps: the warm stages would rerun a different optimizer than the logged one."""
    from lightning_influence import InfluenceTracker
    from tests.conftest import fit, loader, make_data, tiny

    ds = make_data(12)
    module = tiny(lr=0.5, dropout=dropout)
    fit(module, loader(ds, 4), InfluenceTracker(str(tmp_path / "log"), checkpoint_every_n_steps=1), epochs=1,
        **trainer_kwargs)
    log = InfluenceLog(tmp_path / "log")
    model = tiny(dropout=dropout)
    with pytest.raises(ValueError, match=rf"gap_decomposition cannot model this log's training steps \({match}"):
        gap_decomposition(log, model, ds, lambda m: m(ds.tensors[0][:2]).sum(), samples=[0], damping=0.1,
                          loss_fn=lambda m, b: m.per_sample_loss(b), loo=np.zeros((1, 1)))


# ------------------------------------------------------------------ fused attention (float32, CPU)
class CausalAttention(nn.Module):
    """One causal self-attention head and a linear read-out of the mean position: ``F.scaled_dot_product_attention``
    (float32 on the CPU: the fused flash kernel, which has no forward-mode AD) or, ``written_out``, the masked
    softmax by hand (the float64 reference)."""

    def __init__(self, written_out: bool = False) -> None:
        super().__init__()
        self.qkv, self.out, self.written_out = nn.Linear(4, 12), nn.Linear(4, C), written_out

    def forward(self, x):
        q, k, v = (t.unsqueeze(1) for t in self.qkv(x).chunk(3, -1))  # (batch, 1 head, positions, 4)
        if self.written_out:
            s = (q @ k.transpose(-1, -2) / 2.0).masked_fill(torch.ones(5, 5).triu(1).bool(), float("-inf"))
            a = s.softmax(-1) @ v
        else:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(a.squeeze(1).mean(1))


def test_linear_pbrf_through_fused_causal_attention_in_float32(tmp_path):
    """``linear_pbrf`` takes ``J v`` (CG) and every score ``⟨u, ∇ℓ_m⟩`` by forward-mode AD: through a causal
    ``scaled_dot_product_attention`` in float32 on the CPU both failed in torch ('forward AD with
    _scaled_dot_product_flash_attention_for_cpu'). They run through the math kernel (``exact_kernels``) and equal,
    for both solvers, ``−ε ∇ℓ_mᵀ (G + λI)⁻¹ ∇f`` formed in float64 from explicit Jacobians of the attention written
    out (softmax of the masked scores) at the logged θ_T."""
    from lightning_influence.capture.hvp import unflatten

    g = torch.Generator().manual_seed(5)
    xs, ys = torch.randn(8, 5, 4, generator=g), torch.randint(0, C, (8,), generator=g)
    xq, yq = torch.randn(3, 5, 4, generator=g), torch.randint(0, C, (3,), generator=g)

    def data(ids):
        ids = torch.as_tensor(ids)
        return xs[ids], ys[ids]

    def loss_fn(m, b):
        return F.cross_entropy(m(b[0]), b[1], reduction="none")

    torch.manual_seed(0)
    model = CausalAttention()
    batches, epochs = epoch_batches(8, 4, 2, seed=0)
    train_and_log(str(tmp_path), model, loss_fn, data, batches, [0.5] * len(batches),
                  torch.optim.SGD(model.parameters(), lr=0.5), checkpoint_every=None, record_gradients=False,
                  dataset_size=8, epochs=epochs)
    log = InfluenceLog(tmp_path)
    ref = CausalAttention(written_out=True).double()
    ck = log.checkpoint(log.num_steps)
    shapes = {n: tuple(p.shape) for n, p in ref.named_parameters()}
    theta = torch.cat([torch.as_tensor(ck[n], dtype=torch.float64).reshape(-1) for n in shapes])

    def outputs(th, x):
        return torch.func.functional_call(ref, unflatten(th, shapes), (x.double(),))

    lam = 0.1
    J = torch.autograd.functional.jacobian(lambda t: outputs(t, xs), theta)  # (8, C, p)
    P = torch.softmax(outputs(theta, xs), 1)
    G = torch.einsum("ncp,ncd,ndq->pq", J, torch.diag_embed(P) - P[:, :, None] * P[:, None, :], J) / 8
    qgrad = torch.autograd.functional.jacobian(lambda t: F.cross_entropy(outputs(t, xq), yq), theta)
    per = torch.autograd.functional.jacobian(lambda t: F.cross_entropy(outputs(t, xs), ys, reduction="none"), theta)
    expected = (per @ torch.linalg.solve(G + lam * torch.eye(len(theta), dtype=torch.float64), qgrad) / 8).numpy()
    for solver in ("cholesky", "cg"):
        res = linear_pbrf(log, CausalAttention(), data, lambda m: F.cross_entropy(m(xq), yq), damping=lam,
                          loss_fn=loss_fn, linear_solver=solver, cg_tol=1e-6)
        assert res.info["solver"] == solver
        np.testing.assert_allclose(res.scores[:, 0], expected, rtol=0, atol=2e-5 * np.abs(expected).max())


class MLPDropout(MLP):
    """``MLP`` (the same parameters) with dropout before its last layer, given in train mode."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.net[2](self.drop(self.net[1](self.net[0](x))))


def test_the_pbrf_of_a_network_with_dropout_is_that_of_its_deterministic_network(ce_log):
    """The PBRF is a function of θ, as the query: dropout off. A module with dropout given in train mode stopped with
    vmap's "random operation" error (CLI: internal error); its PBRF is now that of the same network without dropout."""
    kw = dict(damping=0.1, tol=1e-10)
    with_dropout = pbrf(ce_log, MLPDropout().double().train(), ce_data, ce_query, samples=[1, 4, 7], **kw)
    plain = pbrf(ce_log, MLP().double(), ce_data, ce_query, samples=[1, 4, 7], **kw)
    assert with_dropout.converged.all()
    np.testing.assert_array_equal(with_dropout.scores, plain.scores)
    lin = linear_pbrf(ce_log, MLPDropout().double().train(), ce_data, ce_query, damping=0.1)
    np.testing.assert_array_equal(lin.scores, linear_pbrf(ce_log, MLP().double(), ce_data, ce_query, damping=0.1).scores)
