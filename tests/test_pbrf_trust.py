"""The PBRF says when it has not converged, and does not call a float32 solve unconverged for the rounding floor of
its gradient (docs/trust.md §1: on the digits demo in float32, 0 % of the solves had converged by the gradient
criterion at 100 iterations, relative gradients 1e-6 to 9e-5, the floor of float32 arithmetic)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_influence.evaluation.pbrf import pbrf
from lightning_influence.log import InfluenceLog
from tests._tinylog import epoch_batches, train_and_log

N, D, H, C = 40, 5, 8, 3
gen = torch.Generator().manual_seed(0)
X = torch.randn(N, D, generator=gen, dtype=torch.float64)
Y = torch.randint(0, C, (N,), generator=gen)
XV, YV = torch.randn(6, D, generator=gen, dtype=torch.float64), torch.randint(0, C, (6,), generator=gen)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, C))

    def forward(self, x):
        return self.net(x.to(self.net[0].weight.dtype))

    def per_sample_loss(self, batch):
        return F.cross_entropy(self(batch[0]), batch[1], reduction="none")


def data(ids):
    ids = torch.as_tensor(ids)
    return X[ids], Y[ids]


def query(m):
    return F.cross_entropy(m(XV), YV)


def _train(path, model: nn.Module, lr: float, epochs: int) -> InfluenceLog:
    batches, epoch_of = epoch_batches(N, 8, epochs, seed=2)
    train_and_log(str(path), model, lambda m, b: m.per_sample_loss(b), data, batches, [lr] * len(batches),
                  torch.optim.SGD(model.parameters(), lr=lr, weight_decay=0.01), checkpoint_every=None,
                  record_gradients=False, dataset_size=N, epochs=epoch_of)
    return InfluenceLog(path)


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    """A float32 run, and a float64 log of the same θ_T (its float32 values, one epoch at learning rate 0)."""
    torch.manual_seed(1)
    model = MLP()
    log32 = _train(tmp_path_factory.mktemp("f32"), model, 0.5, 20)
    same = MLP().double()
    same.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    return log32, _train(tmp_path_factory.mktemp("f64"), same, 0.0, 1)


@pytest.fixture(scope="module")
def log32(logs):
    return logs[0]


def test_a_float32_pbrf_converges_to_the_float64_answer_and_says_so(logs):
    """Before: every float32 solve ran its 100 iterations and was reported unconverged (relative gradient stuck near
    1e-5 against tol 1e-8), although its response had stopped moving. Now a solve has converged when one more
    Gauss-Newton step would move the response by less than 1e-4 of it; the float32 responses equal the float64 solve of
    the same θ_T (the reference) within the error each one reports."""
    samples = np.arange(0, N, 3)
    got = pbrf(logs[0], MLP(), data, query, samples=samples, damping=0.05)
    ref = pbrf(logs[1], MLP().double(), data, query, samples=samples, damping=0.05)
    assert ref.converged.all() and (ref.rel_grad_norm <= 1e-8).all()
    assert (got.rel_grad_norm > 1e-8).any()  # the gradient criterion alone is out of float32's reach
    assert got.converged.all(), got.table()
    scale = np.abs(ref.scores[:, 0])
    assert (np.abs(got.scores[:, 0] - ref.scores[:, 0]) <= 1e-3 * scale + 4 * got.response_error).all()
    assert (got.response_error <= 1e-4 * scale).all() and np.isfinite(ref.response_error).all()
    assert "NOT converged" not in got.table()


def test_an_unconverged_solve_is_named_per_sample(log32):
    """Two iterations of a solve are not a solve: the result names each unconverged sample (summary, table, JSON),
    with a predicted remaining change (one Gauss-Newton step) that matches how far the response still moves."""
    samples = np.arange(0, N, 4)
    short = pbrf(log32, MLP(), data, query, samples=samples, damping=1e-2, steps=1)
    full = pbrf(log32, MLP(), data, query, samples=samples, damping=1e-2, steps=200)
    assert full.converged.all()
    moved = np.abs(full.scores[:, 0] - short.scores[:, 0])
    bad = moved > 1e-3 * np.abs(full.scores[:, 0])
    assert bad.any()
    assert not short.converged[bad].any()  # every sample whose answer was still 0.1 % off is flagged
    assert set(short.summary()["unconverged_samples"]) >= set(samples[bad].tolist())
    assert "NOT converged" in short.table() and short.to_dict()["converged"] == short.converged.tolist()


def test_negative_curvature_flags_exactly_the_samples_whose_objective_is_indefinite_at_theta(logs):
    """The flag against the exact eigenvalues: the Hessian at ``θ_T`` of each sample's objective, written out here
    (``(1/N) Σ KL(softmax(h_T) ‖ softmax(h)) − ℓ_m/N + ½(λ + κ)‖θ − θ_T‖²``, κ = the run's weight decay 0.01) and
    differentiated twice by autograd, has a negative eigenvalue for 0, 2 and 34 of the 40 samples at λ = 0.2, 0.1,
    0.01; the flag says so for exactly those. Before, the flag was the solver's witness (``cos(s, y) < −0.1`` on a step
    it took) and named 2 of the 34 at λ = 0.01."""
    log = logs[1]
    model = MLP().double()
    names = [n for n, _ in model.named_parameters()]
    ck = log.checkpoint(log.num_steps)
    theta = torch.cat([torch.as_tensor(ck[n]).reshape(-1) for n in names])
    shapes = [tuple(np.shape(ck[n])) for n in names]

    def logits(x, inputs):
        sizes = [int(np.prod(s)) for s in shapes]
        params = {n: t.reshape(s) for n, t, s in zip(names, x.split(sizes), shapes)}
        return torch.func.functional_call(model, params, (inputs,))

    h_ref = logits(theta, X).detach()

    def objective(x, m, lam):
        kl = (F.softmax(h_ref, 1) * (F.log_softmax(h_ref, 1) - F.log_softmax(logits(x, X), 1))).sum() / N
        removed = F.cross_entropy(logits(x, X[m:m + 1]), Y[m:m + 1], reduction="sum") / N
        return kl - removed + 0.5 * (lam + 0.01) * (x - theta).pow(2).sum()

    for lam, count in ((0.2, 0), (0.1, 2), (0.01, 34)):
        lowest = np.array([float(torch.linalg.eigvalsh(torch.func.hessian(objective)(theta, m, lam))[0])
                           for m in range(N)])
        assert (lowest < 0).sum() == count and np.abs(lowest).min() > 1e-4  # signs far from rounding
        res = pbrf(log, MLP().double(), data, query, samples=np.arange(N), damping=lam)
        assert res.info["weight_decay_max"] == 0.01
        np.testing.assert_array_equal(res.negative_curvature, lowest < 0)
    assert res.info["curvature_checked_at_theta"]


def test_a_model_above_the_dense_limit_says_its_curvature_was_not_checked(logs):
    """Above ``max_dense_params`` only the solver's witness flags negative curvature: the table says the curvature at
    ``θ_T`` was not checked exactly (an empty flag reads as convex otherwise), with the sizes and what to raise; at or
    under the limit it says nothing of the kind."""
    log = logs[1]
    p = sum(t.numel() for t in MLP().parameters())
    above = pbrf(log, MLP().double(), data, query, samples=np.arange(2), damping=0.2, max_dense_params=p - 1)
    assert above.info["curvature_checked_at_theta"] is False
    assert (f"curvature at θ_T not checked exactly (p = {p} parameters > max_dense_params = {p - 1})"
            in above.table()), above.table()
    under = pbrf(log, MLP().double(), data, query, samples=np.arange(2), damping=0.2, max_dense_params=p)
    assert under.info["curvature_checked_at_theta"] is True and "not checked exactly" not in under.table()
