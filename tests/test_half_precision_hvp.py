"""The tracker's HVP rows under half precision: ``ε_0`` follows the dtype the gradients are computed in.

The finite difference ``(g(θ + ε Ĝ) − g(θ − ε Ĝ)) / 2ε`` took ``ε_0 = 1e-3`` whatever the precision; under bf16
autocast (or float16 parameters) the gradients' rounding ``~u·‖g‖`` over ``ε`` swamped the difference: the logged
``H_z Ĝ`` rows were tens of times their own size off (42x on a digits MLP), and Diff-In's published form read them
as they were. The default is now ``u^{1/3}`` of that dtype (``capture.hvp.tracker_eps0``). The oracle: the exact
products in float64 (double backward) at the logged ``θ_0``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jvp

from lightning_influence import InfluenceLog, InfluenceTracker
from tests.conftest import TinyClassifier, fit, loader, make_data

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _exact_rows(log: InfluenceLog, data, module: TinyClassifier) -> np.ndarray:
    """``H_z Ĝ_0`` of every sample of step 0 in float64: ``Ĝ_0`` the batch-mean gradient, ``H_z`` each one's Hessian."""
    module = module.double()
    theta = {n: torch.from_numpy(v).double() for n, v in log.checkpoint(0).items()}
    names = log.param_names
    ids = log.batch_ids(0)
    x, y = data.tensors[0][ids].double(), data.tensors[1][ids]

    def loss(params, xi, yi):
        return F.cross_entropy(functional_call(module, params, (xi,)), yi)

    g_batch = grad(lambda p: torch.stack([loss(p, x[i:i + 1], y[i:i + 1]) for i in range(len(ids))]).mean())(theta)
    rows = []
    for i in range(len(ids)):
        g_i = lambda p: grad(loss)(p, x[i:i + 1], y[i:i + 1])  # noqa: E731
        _, hv = jvp(g_i, (theta,), (g_batch,))
        rows.append(torch.cat([hv[n].reshape(-1) for n in names]))
    return torch.stack(rows).numpy()


def _logged_and_exact(tmp_path, module: TinyClassifier, precision: str, data) -> tuple[InfluenceLog, float]:
    torch.manual_seed(0)
    tracker = InfluenceTracker(str(tmp_path / "log"), record_gradients=True, record_hvp=True, projection_dim=None)
    fit(module, loader(data), tracker, epochs=1, precision=precision)
    log = InfluenceLog(tmp_path / "log")
    logged = next(log.iter_steps(0, 1, fields=("hvp",))).hvps
    exact = _exact_rows(log, data, TinyClassifier())
    return log, float(np.linalg.norm(logged - exact) / np.linalg.norm(exact))


def test_bf16_autocast_rows_are_those_of_the_unrounded_function(tmp_path):
    """Under autocast the HVP passes run without it, on the float32 parameters, at float32's ``ε_0``: the rows are
    the float64 products up to the direction's own bfloat16 rounding (measured 9.0x off before, 0.030 with
    ``u^{1/3}`` of bfloat16 under autocast, 3.8e-3 now)."""
    torch.manual_seed(0)
    log, error = _logged_and_exact(tmp_path, TinyClassifier().float(), "bf16-mixed", make_data(24, dtype=torch.float32))
    assert log.meta["hvp"]["eps0"] == 1e-3
    assert error < 1e-2, error


def test_float16_parameters_take_the_step_of_their_dtype(tmp_path):
    """``16-true``: the parameters themselves are float16, so the passes are too; ``ε_0 = u^{1/3}`` of float16."""
    torch.manual_seed(0)
    log, error = _logged_and_exact(tmp_path, TinyClassifier().half(), "16-true", make_data(24, dtype=torch.float32))
    assert log.meta["hvp"]["eps0"] == pytest.approx(float(torch.finfo(torch.float16).eps) ** (1 / 3))
    assert error < 0.05, error  # measured 0.012 (5.4x at 1e-3 on the digits MLP)


def test_a_float64_model_under_bf16_autocast_keeps_the_full_precision_step(tmp_path):
    """Autocast casts no float64 tensor: a float64 model under ``bf16-mixed`` computes in float64, and its rows keep
    ``ε_0 = 1e-3``."""
    torch.manual_seed(0)
    log, error = _logged_and_exact(tmp_path, TinyClassifier().double(), "bf16-mixed", make_data(24))
    assert log.meta["hvp"]["eps0"] == 1e-3
    assert error < 1e-6, error


def test_training_under_bf16_autocast_with_dropout_is_unchanged_by_the_unrounded_passes(tmp_path):
    """The HVP passes leave autocast for their evaluations and restore the run's precision and random state: the
    fit's final parameters are bit-identical to a fit without the tracker."""
    def run(tracker):
        torch.manual_seed(0)
        module = TinyClassifier(dropout=0.2).float()
        fit(module, loader(make_data(24, dtype=torch.float32)), tracker, epochs=2, precision="bf16-mixed")
        return [p.detach() for p in module.parameters()]

    tracker = InfluenceTracker(str(tmp_path / "log"), record_gradients=True, record_hvp=True)
    assert all(torch.equal(a, b) for a, b in zip(run(None), run(tracker)))
