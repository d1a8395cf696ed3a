"""Diff-In (estimators/diffin.py) against independent float64 references.

The references build every Hessian explicitly (``torch.autograd.functional.hessian`` of a
51-parameter MLP) and evaluate the formulas of ``docs/diffin.md`` term by term; the logs come
from a real ``lightning.Trainer`` with the ``InfluenceTracker`` (so the logged ``H_z Ĝ`` rows
are the callback's own finite differences).
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import InfluenceLog, InfluenceTracker, WithIds
from lightning_influence.capture import parameter_epsilon
from lightning_influence.estimators.diffin import _Context, batch_hvp, diffin, diffin_self_influence
from lightning_influence.queries import mean_loss

N, IN, HID, OUT = 24, 4, 6, 3
LR, WD, GAMMA, HVP_EPS = 0.3, 0.01, 0.7, 1e-4


def ce(module: nn.Module, batch) -> torch.Tensor:
    return F.cross_entropy(module(batch[0]), batch[1], reduction="none")


def make_net():
    import lightning.pytorch as pl

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(IN, HID), nn.Tanh(), nn.Linear(HID, OUT))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def per_sample_loss(self, batch) -> torch.Tensor:
            return ce(self, batch)

        def training_step(self, batch, batch_idx: int) -> torch.Tensor:
            return self.per_sample_loss(batch).mean()

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=LR, weight_decay=WD)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, GAMMA)}

    return Net


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, IN, generator=g, dtype=torch.float64)
    y = torch.randint(0, OUT, (N,), generator=g)
    xv = torch.randn(5, IN, generator=g, dtype=torch.float64)
    yv = torch.randint(0, OUT, (5,), generator=g)
    return x, y, xv, yv


def train(path: str, batch_size: int, epochs: int, hvp_scheme: str = "central"):
    import lightning.pytorch as pl

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    x, y, xv, yv = data()
    ds = WithIds(TensorDataset(x, y))
    Net = make_net()
    torch.manual_seed(0)
    module = Net().double()
    tracker = InfluenceTracker(path, record_gradients=True, record_hvp=True, checkpoint_every_n_steps=1,
                               storage_dtype="float64", hvp_eps=HVP_EPS, hvp_scheme=hvp_scheme, overwrite=True)
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[tracker], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                         limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, DataLoader(ds, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0)))
    return InfluenceLog(path), Net, ds, (xv, yv)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Mini-batches of 8: 3 steps per epoch, 2 epochs (T = 6)."""
    log, Net, ds, val = train(str(tmp_path_factory.mktemp("diffin") / "log"), batch_size=8, epochs=2)
    yield log, Net, ds, val
    log.close()


@pytest.fixture(scope="module")
def full_batch_run(tmp_path_factory):
    """Full-batch gradient descent: B_t = every sample (T = 4)."""
    log, Net, ds, val = train(str(tmp_path_factory.mktemp("diffin-fb") / "log"), batch_size=N, epochs=4)
    yield log, Net, ds, val
    log.close()


# ============================================================================ references
class Reference:
    """Explicit float64 gradients and Hessians of the logged run (every sample, every step, cached)."""

    def __init__(self, log: InfluenceLog, Net, ds, val) -> None:
        self.log, self.module = log, Net().double()
        self.names = log.param_names
        self.shapes = log.param_shapes
        self.x, self.y = ds.dataset.tensors
        self.val = val
        self.T = log.num_steps
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def theta(self, t: int) -> torch.Tensor:
        ck = self.log.checkpoint(t)
        return torch.cat([torch.from_numpy(ck[n]).reshape(-1) for n in self.names])

    def _params(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        out, i = {}, 0
        for n in self.names:
            k = int(np.prod(self.shapes[n]))
            out[n] = v[i : i + k].reshape(self.shapes[n])
            i += k
        return out

    def _loss(self, v: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(self.module, self._params(v), (x[None],)), y[None])

    def at(self, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(g (N, p), H (N, p, p), q (p,))``: per-sample gradients and Hessians, query gradient, at θ_t."""
        if t not in self._cache:
            th = self.theta(t)
            g = torch.func.vmap(torch.func.grad(self._loss), in_dims=(None, 0, 0))(th, self.x, self.y)
            H = torch.func.vmap(torch.func.hessian(self._loss), in_dims=(None, 0, 0))(th, self.x, self.y)
            xv, yv = self.val
            q = torch.func.grad(lambda v: torch.func.vmap(self._loss, in_dims=(None, 0, 0))(v, xv, yv).mean())(th)
            self._cache[t] = (g, H, q)
        return self._cache[t]

    def batch(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Ĝ_t, H_{B_t})``: batch-mean gradient and Hessian."""
        g, H, _ = self.at(t)
        ids = torch.from_numpy(self.log.batch_ids(t))
        return g[ids].mean(0), H[ids].mean(0)


@pytest.fixture(scope="module")
def ref(run):
    return Reference(*run)


def ref_published(R: Reference, steps, self_influence=False, batch_rows=False) -> np.ndarray:
    """``−Σ_t a_t ⟨q, H_B g_z + H_z Ĝ⟩``, ``a_t = −t η_t² / (N m)``, with every matrix explicit."""
    out = np.zeros(N)
    m = len(steps)
    for t in steps:
        g, H, q = R.at(t)
        G, HB = R.batch(t)
        a = -t * float(R.log.lr(t)[0]) ** 2 / (N * m)
        ids = R.log.batch_ids(t) if batch_rows else range(N)
        w = N / len(ids) if batch_rows else 1.0
        for z in ids:
            qz = g[z] if self_influence else q
            out[z] -= w * a * float(qz @ (HB @ g[z] + H[z] @ G))
    return out


def ref_step(R: Reference, t1: int, t2: int) -> np.ndarray:
    """``G_z(t2) − G_z(t1)`` with ``κ_r = η_r qᵀ(H_r + λ)q / ‖q‖²`` from explicit Hessians."""
    out = np.zeros(N)
    for tau, sign in ((t2, 1.0), (t1, -1.0)):
        if tau == 0:
            continue
        q = R.at(tau)[2]
        dec = []
        for r in range(tau):
            H = R.batch(r)[1] + WD * torch.eye(len(q), dtype=q.dtype)
            dec.append(1.0 - float(R.log.lr(r)[0]) * float(q @ H @ q) / float(q @ q))
        for s in range(tau):
            rho = float(np.prod(dec[s + 1 : tau]))
            ids = R.log.batch_ids(s)
            eta = float(R.log.lr(s)[0])
            for z in ids:
                out[z] += sign * eta / len(ids) * rho * float(q @ R.at(s)[0][z])
    return out


def ref_step_self(R: Reference, t1: int, t2: int) -> np.ndarray:
    """Self-influence, step form: curvature along the sample's own gradient at its own steps."""
    kappa = {}  # (s, z) -> g_zᵀ(H_s + λ)g_z / ‖g_z‖²
    for s in range(t2):
        g = R.at(s)[0]
        H = R.batch(s)[1] + WD * torch.eye(g.shape[1], dtype=g.dtype)
        for z in R.log.batch_ids(s):
            kappa[(s, int(z))] = float(g[z] @ H @ g[z]) / float(g[z] @ g[z])
    out = np.zeros(N)
    for tau, sign in ((t2, 1.0), (t1, -1.0)):
        if tau == 0:
            continue
        for z in range(N):
            apps = [s for s in range(tau) if z in R.log.batch_ids(s)]
            qz = R.at(tau)[0][z]
            for s in apps:
                rho = 1.0
                for r in range(s + 1, tau):
                    last = max(a for a in apps if a <= r)
                    rho *= 1.0 - float(R.log.lr(r)[0]) * kappa[(last, z)]
                eta = float(R.log.lr(s)[0])
                out[z] += sign * eta / len(R.log.batch_ids(s)) * rho * float(qz @ R.at(s)[0][z])
    return out


def close(a: np.ndarray, b: np.ndarray, rtol: float) -> bool:
    return float(np.abs(a - b).max()) <= rtol * float(np.abs(b).max())


# ================================================================================= tests
def row_error(log: InfluenceLog, R: Reference) -> tuple[float, float]:
    """Worst relative error of the logged H_{z,t} Ĝ_t rows against the explicit H_z @ Ĝ, and ε at θ_0."""
    worst = 0.0
    for rec in log.iter_steps(fields=("hvp",)):
        H, G = R.at(rec.step)[1], R.batch(rec.step)[0]
        exact = (H[torch.from_numpy(rec.ids)] @ G).numpy()
        worst = max(worst, float(np.abs(rec.hvps - exact).max() / np.abs(exact).max()))
    return worst, parameter_epsilon({n: torch.from_numpy(v) for n, v in log.checkpoint(0).items()}, HVP_EPS)


def test_logged_hvp_rows_match_exact_products(run, ref):
    """The tracker's H_{z,t} Ĝ_t rows equal the explicit H_z @ Ĝ within the O(ε²) finite-difference error."""
    assert run[0].meta["hvp"]["scheme"] == "central" and run[0].meta["hvp"]["kink_guard"] == 0.5
    worst, eps = row_error(run[0], ref)
    assert worst < 1e-6, f"relative error {worst:.2e} with ε = {eps:.1e}"


def test_forward_scheme_rows_match_exact_products(tmp_path):
    """hvp_scheme="forward" differences one extra pass against the step's own per-sample gradients:
    the rows equal H_z @ Ĝ within its first-order error, which is ~ε·‖Ĝ‖·(third derivative) here."""
    log, Net, ds, val = train(str(tmp_path / "fwd"), batch_size=8, epochs=1, hvp_scheme="forward")
    assert log.meta["hvp"]["scheme"] == "forward" and log.meta["hvp"]["kink_guard"] is None
    worst, eps = row_error(log, Reference(log, Net, ds, val))
    assert 0.1 * eps < worst < 5 * eps, f"relative error {worst:.2e} with ε = {eps:.1e}"  # O(ε) (central: O(ε²) ≈ 1e-9)
    log.close()


@pytest.mark.parametrize("what", ["batch", "per_sample"])
def test_fd_products_converge_at_order_eps_squared(run, ref, what):
    """Halving ε0 divides the error of the finite-difference products by 4 (central differences, float64)."""
    log, Net, ds, val = run
    R = ref
    t = 3
    params = {n: torch.from_numpy(v) for n, v in log.checkpoint(t).items()}
    g, H, q = R.at(t)
    G, HB = R.batch(t)
    if what == "batch":
        exact = (HB @ q).numpy()
    else:
        exact = (H[torch.from_numpy(log.batch_ids(t))] @ G).numpy()
    errors = []
    for eps0 in (4e-2, 2e-2, 1e-2):
        ctx = _Context(log, Net().double(), ds, ce, "fd", eps0, True, 512)
        b = ctx.batch(log.batch_ids(t))
        if what == "batch":  # H_B of the step's batch as trained (DIT's products), as the estimators take it
            V = {n: v.unsqueeze(0) for n, v in R._params(q).items()}
            hv = batch_hvp(ctx, params, ctx.step_batch(t), V)
            fd = torch.cat([hv[n].reshape(-1) for n in ctx.names]).numpy()
        else:
            g_hat = ctx.batch_grad(params, b, names=list(params))
            fd = ctx.per_sample_hvp(params, b, g_hat).numpy()
        errors.append(float(np.abs(fd - exact).max()))
    ratios = [errors[0] / errors[1], errors[1] / errors[2]]
    assert all(3.5 < r < 4.5 for r in ratios), (errors, ratios)
    assert errors[-1] < 1e-3 * np.abs(exact).max()
    if what == "batch":  # every caller passes a step's batch: another batch is refused, not differenced some other way
        with pytest.raises(TypeError, match="batch_hvp takes a step's batch as trained"):
            batch_hvp(ctx, params, b, V)


@pytest.mark.parametrize("hvp,rtol", [("exact", 1e-10), ("fd", 1e-6)])
def test_published_form_equals_brute_force(run, ref, hvp, rtol):
    log, Net, ds, val = run
    R = ref
    query = mean_loss(val, ce)
    for steps in ("all", [1, 4]):
        sel = list(range(R.T)) if steps == "all" else steps
        got = diffin(log, query, module=Net().double(), train_data=ds, form="published", steps=steps, hvp=hvp,
                     loss_fn=ce, samples="all")
        assert got.info["raw_sign"] == -1 and got.info["m"] == len(sel)
        assert close(got.column(0), ref_published(R, sel), rtol)
    rows = diffin(log, query, module=Net().double(), train_data=ds, form="published", samples="batch", hvp=hvp,
                  loss_fn=ce)
    assert close(rows.column(0), ref_published(R, range(R.T), batch_rows=True), rtol)


@pytest.mark.parametrize("hvp,rtol", [("exact", 1e-10), ("fd", 1e-6)])
def test_step_form_equals_brute_force(run, ref, hvp, rtol):
    log, Net, ds, val = run
    R = ref
    query = mean_loss(val, ce)
    for window in (None, (2, 5)):
        t1, t2 = log.window(window)
        got = diffin(log, query, module=Net().double(), train_data=ds, window=window, hvp=hvp, loss_fn=ce, form="step")
        assert got.window == (t1, t2)
        assert close(got.column(0), ref_step(R, t1, t2), rtol)


def test_self_influence_equals_brute_force(run, ref):
    log, Net, ds, val = run
    R = ref
    pub = diffin_self_influence(log, module=Net().double(), train_data=ds, form="published", steps=[0, 2, 5],
                                hvp="exact", loss_fn=ce)
    assert close(pub.column(0), ref_published(R, [0, 2, 5], self_influence=True), 1e-10)
    rows = diffin_self_influence(log, module=Net().double(), train_data=ds, form="published", samples="batch",
                                 loss_fn=ce)
    assert close(rows.column(0), ref_published(R, range(R.T), self_influence=True, batch_rows=True), 1e-6)
    for window in (None, (2, 5)):
        step = diffin_self_influence(log, module=Net().double(), train_data=ds, window=window, hvp="exact", loss_fn=ce)
        assert close(step.column(0), ref_step_self(R, *log.window(window)), 1e-10)


def test_checkpoint_form_with_all_steps_equals_per_step_rows_in_full_batch(full_batch_run):
    """With B_t = every sample, the logged-rows (per-step) form is the checkpoint form with T_m = all steps:
    same terms, same a_t, weight N/|B_t| = 1. With ε0 = the tracker's, even the finite differences agree."""
    log, Net, ds, val = full_batch_run
    query = mean_loss(val, ce)
    for hvp in ("fd", "exact"):
        ckpt = diffin(log, query, module=Net().double(), train_data=ds, form="published", steps="all", hvp=hvp,
                      eps0=HVP_EPS, loss_fn=ce, samples="all")
        rows = diffin(log, query, module=Net().double(), train_data=ds, form="published", samples="batch", hvp=hvp,
                      eps0=HVP_EPS, loss_fn=ce)
        assert close(rows.column(0), ckpt.column(0), 1e-9)
        s_ckpt = diffin_self_influence(log, module=Net().double(), train_data=ds, form="published", steps="all",
                                       hvp=hvp, eps0=HVP_EPS, loss_fn=ce)
        s_rows = diffin_self_influence(log, module=Net().double(), train_data=ds, form="published", samples="batch",
                                       hvp=hvp, eps0=HVP_EPS, loss_fn=ce)
        assert close(s_rows.column(0), s_ckpt.column(0), 1e-9)


QUAD_C, QUAD_D, QUAD_WD = 1.7, 5, 0.05


class Quad(nn.Module):
    """``½ c ‖θ − x_z‖²`` per sample: isotropic quadratic losses (``H_t = c·I``)."""

    def __init__(self) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.linspace(-1, 1, QUAD_D, dtype=torch.float64))


def quad_loss(m: nn.Module, batch) -> torch.Tensor:
    return 0.5 * QUAD_C * ((m.theta - batch[0]) ** 2).sum(1)


def quad_log(path, first_step: int = 0):
    """SGD with weight decay on 12 samples, 3 epochs of batches of 4, a checkpoint every 4 steps (logged from
    ``first_step``); returns the log, the data and the linear query ``f(θ) = ⟨w, θ⟩`` with its ``w``."""
    from tests._tinylog import epoch_batches, train_and_log

    x = torch.randn(12, QUAD_D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ds = TensorDataset(x)
    batches, epochs = epoch_batches(12, 4, 3, seed=1)
    lrs = [0.2 * 0.8 ** e for e in epochs]
    m = Quad()
    opt = torch.optim.SGD(m.parameters(), lr=0.2, weight_decay=QUAD_WD)
    train_and_log(str(path), m, quad_loss, ds, batches, lrs, opt, checkpoint_every=4, epochs=epochs,
                  first_step=first_step)
    w = torch.randn(QUAD_D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def query(mod: nn.Module) -> torch.Tensor:
        return (w * mod.theta).sum()

    return InfluenceLog(str(path)), ds, query, w


def test_step_form_is_exact_when_its_closure_is(tmp_path):
    """Isotropic quadratic losses (H_t = c·I): the Rayleigh-quotient closure is exact, so the step form
    equals exact DIT on any window (θ_t replayed between sparse checkpoints)."""
    from lightning_influence.estimators import dit

    log, ds, query, _ = quad_log(tmp_path / "q")
    for window in (None, (3, 7)):
        step = diffin(log, query, module=Quad(), train_data=ds, window=window, loss_fn=quad_loss, form="step").column(0)
        ref = dit(log, query, module=Quad(), train_data=ds, window=window, loss_fn=quad_loss).column(0)
        assert close(step, ref, 1e-9)
    log.close()


def test_sign_and_orders_of_magnitude(run):
    """Project convention: positive = removal raises f. The step form agrees in sign with exact DIT here;
    the published form is its second-order part only, hence much smaller."""
    from lightning_influence.estimators import dit

    log, Net, ds, val = run
    query = mean_loss(val, ce)
    step = diffin(log, query, module=Net().double(), train_data=ds, loss_fn=ce, form="step").column(0)
    ref = dit(log, query, module=Net().double(), train_data=ds, loss_fn=ce).column(0)
    assert np.corrcoef(step, ref)[0, 1] > 0.5
    pub = diffin(log, query, module=Net().double(), train_data=ds, form="published", loss_fn=ce,
                 samples="all").column(0)
    assert np.abs(pub).max() < 0.5 * np.abs(ref).max()


def test_errors_say_what_to_do(run, tmp_path):
    log, Net, ds, val = run
    query = mean_loss(val, ce)
    with pytest.raises(ValueError, match="form must be one of"):
        diffin(log, query, module=Net().double(), train_data=ds, form="paper", loss_fn=ce, samples="all")
    with pytest.raises(ValueError, match="hvp must be one of"):
        diffin(log, query, module=Net().double(), train_data=ds, hvp="approx", loss_fn=ce, form="step")
    with pytest.raises(ValueError, match="outside the run"):
        diffin(log, query, module=Net().double(), train_data=ds, window=(0, 99), loss_fn=ce, form="step")
    with pytest.raises(ValueError, match="not inside the window"):
        diffin(log, query, module=Net().double(), train_data=ds, window=(0, 3), form="published", steps=[4],
               loss_fn=ce, samples="all")
    with pytest.raises(ValueError, match="every logged step"):
        diffin(log, query, module=Net().double(), train_data=ds, form="published", samples="batch", steps=2, loss_fn=ce)
    with pytest.raises(ValueError, match="published form"):
        diffin(log, query, module=Net().double(), train_data=ds, steps=3, loss_fn=ce, form="step")
    with pytest.raises(ValueError, match="train_data"):
        diffin(log, query, module=Net().double(), train_data=None, loss_fn=ce, form="step")
    with pytest.raises(ValueError, match="eps0 must be > 0"):
        diffin(log, query, module=Net().double(), train_data=ds, eps0=0.0, loss_fn=ce, form="step")


def test_estimators_on_a_log_that_starts_after_step_0(tmp_path):
    """A log started at step 4 (a fit resumed into a fresh directory): the step form sums from the log's first
    step. Isotropic quadratic losses make its closure exact: it equals the first-order response of θ_T to removing
    each sample over the logged steps from θ_4, propagated in closed form (and the self form ⟨∇ℓ_z(θ_T), dθ_T⟩)."""
    from lightning_influence.estimators import dit, dit_gauss_newton, timeline

    c, wd, first = QUAD_C, QUAD_WD, 4
    log, ds, query, w = quad_log(tmp_path / "q", first_step=first)
    x = ds.tensors[0]
    assert log.steps.tolist() == list(range(first, 9))
    # θ_{t+1} = θ_t − η_t (c (θ_t − mean x_B) + λ θ_t); removing z (weight 1/|B|) moves it by
    # dθ_{t+1} = (1 − η_t (c + λ)) dθ_t + η_t c (θ_t − x_z) / |B| where z ∈ B_t
    th = torch.from_numpy(log.checkpoint(first)["theta"]).clone()
    moved = torch.zeros(12, QUAD_D, dtype=torch.float64)
    for t in range(first, log.num_steps):
        ids, eta = log.batch_ids(t), float(log.lr(t)[0])
        moved = (1 - eta * (c + wd)) * moved
        moved[ids] += eta * c * (th - x[ids]) / len(ids)
        th = th - eta * (c * (th - x[ids].mean(0)) + wd * th)
    assert torch.allclose(th, torch.from_numpy(log.checkpoint(log.num_steps)["theta"]), rtol=0, atol=1e-13)
    expected = (moved @ w).numpy()
    step = diffin(log, query, module=Quad(), train_data=ds, loss_fn=quad_loss, form="step")
    assert step.window == (first, log.num_steps)
    assert close(step.column(0), expected, 1e-10)
    own_grad = c * (th[None] - x)  # ∇ℓ_z(θ_T)
    self_step = diffin_self_influence(log, module=Quad(), train_data=ds, loss_fn=quad_loss)
    assert close(self_step.column(0), (own_grad * moved).sum(1).numpy(), 1e-10)
    # exact DIT (the first-order response itself), its timeline and the Gauss-Newton sweep read from θ_4 on too
    assert close(dit(log, query, module=Quad(), train_data=ds, loss_fn=quad_loss).column(0), expected, 1e-10)
    tl = timeline(log, query, module=Quad(), train_data=ds, loss_fn=quad_loss, grid=[first + 2, log.num_steps])
    assert not tl.values[:, tl.grid <= first].any()  # before the log's first step nothing has accumulated
    assert close(tl.values[:, -1, 0], expected, 1e-10)
    gn = dit_gauss_newton(log, query, module=Quad())
    gn_local = dit_gauss_newton(log, query, module=Quad(), window=(first, log.num_steps), local=True)
    np.testing.assert_array_equal(gn.column(0), gn_local.column(0))  # the whole log is the window from θ_4
    log.close()


def test_published_form_over_all_samples_on_fused_attention(tmp_path):
    """A model calling ``F.scaled_dot_product_attention``: the published form with ``samples="all"`` takes exact
    per-sample HVPs (forward-over-reverse) away from the step's batches, which CPU's fused attention kernel cannot
    differentiate ("Trying to use forward AD with _scaled_dot_product_flash_attention_for_cpu"); they now run through
    the math kernel as every other HVP pass (``exact_kernels``). Reference: the same call with the math kernel held by
    the caller. In float32: float64 attention takes the math kernel anyway."""
    import lightning.pytorch as pl
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from conftest import fit, loader

    class Attn(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.qkv, self.head = nn.Embedding(7, 4), nn.Linear(4, 12), nn.Linear(2, 3)

        def per_sample_loss(self, batch):
            b, t = batch[0].shape
            q, k, v = self.qkv(self.emb(batch[0])).view(b, t, 3, 2, 2).permute(2, 0, 3, 1, 4)  # 2 heads
            h = F.scaled_dot_product_attention(q, k, v, is_causal=True).mean((1, 2))
            return F.cross_entropy(self.head(h), batch[1], reduction="none")

        def training_step(self, batch, batch_idx):
            return self.per_sample_loss(batch).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randint(0, 7, (8, 5), generator=g), torch.randint(0, 3, (8,), generator=g))
    torch.manual_seed(0)
    fit(Attn(), loader(ds, batch_size=4), InfluenceTracker(str(tmp_path), record_gradients=True,
                                                                     checkpoint_every_n_steps=1), epochs=1)
    log = InfluenceLog(tmp_path)
    query = mean_loss(ds.tensors)
    torch.manual_seed(0)
    got = diffin(log, query, module=Attn(), train_data=ds, form="published", samples="all").column(0)
    with sdpa_kernel(SDPBackend.MATH):
        expected = diffin(log, query, module=Attn(), train_data=ds, form="published", samples="all").column(0)
    assert np.isfinite(got).all() and np.abs(got).max() > 0
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=0)  # float32: the rest of the call used the fused kernel
