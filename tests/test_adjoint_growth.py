"""Exact DIT measures how far its adjoint grew (the growth measurement Gauss-Newton DIT has, one implementation:
:mod:`lightning_influence.estimators.growth`), checked against the Jacobian of the training steps by autograd."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_influence import InfluenceLog, dit, dit_local, timeline
from tests._tinylog import epoch_batches, train_and_log

MOMENTUM = 0.5


class _Centre(nn.Module):
    """``½ ‖θ − x_z‖²`` per sample: the Hessian is ``I``, so the linearised run is the run itself."""

    def __init__(self) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(3, dtype=torch.float64))


def _loss(m: nn.Module, batch) -> torch.Tensor:
    return 0.5 * ((m.theta - batch[0]) ** 2).sum(1)


def _query(m: nn.Module) -> torch.Tensor:
    return (m.theta * torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)).sum()


def _run(path, lr: float, epochs: int):
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    batches, epoch_of = epoch_batches(8, 4, epochs)
    m = _Centre()
    train_and_log(str(path), m, _loss, TensorDataset(x), batches, [lr] * len(batches),
                  torch.optim.SGD(m.parameters(), lr=lr, momentum=MOMENTUM), checkpoint_every=None, epochs=epoch_of)
    return InfluenceLog(path), _Centre(), TensorDataset(x), len(batches)


def _reference_growth(lr: float, steps: int) -> float:
    """``max_t ‖∂f(θ_T)/∂θ_t‖ / ‖∇f‖`` by autograd through momentum SGD from each ``θ_t`` (buffer held): the
    adjoint ``λ_θ(t)`` the sweep carries, independently of it (the Hessian is ``I``: the data do not enter)."""
    q = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    largest = 1.0
    for t in range(steps):
        theta = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        x, buf = theta, torch.zeros(3, dtype=torch.float64)
        for s in range(t, steps):
            g = x  # ∇ of ½‖θ − x̄‖² up to a constant
            buf = g if s == 0 else MOMENTUM * buf + g
            x = x - lr * buf
        (grad,) = torch.autograd.grad((q * x).sum(), theta)
        largest = max(largest, float(grad.norm() / q.norm()))
    return largest


def test_exact_dit_reports_its_adjoint_growth_and_warns_when_it_is_large(tmp_path):
    """Exact DIT scored -5.4e5 where replay leave-one-out changed the loss by -0.02 (a hidden-16 MLP, SGD momentum 0.9,
    many epochs), without any diagnostic. It now reports ``info['adjoint_growth']`` (equal to the autograd Jacobian's
    growth), warns and tags the method beyond a million-fold, stays quiet on a stable run (the refusal of an
    overflow is the same code, tested on Gauss-Newton DIT in test_scale_use.py)."""
    log, module, data, T = _run(tmp_path / "stable", lr=0.5, epochs=15)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ok = dit(log, _query, module=module, train_data=data, loss_fn=_loss)
    assert ok.info["adjoint_growth"] == pytest.approx(_reference_growth(0.5, T), rel=1e-10)
    assert ok.info["adjoint_growth"] < 10 and "grew" not in ok.method

    # lr 3.5 with momentum 0.5: the linearised step's eigenvalues have modulus 1.71 (training itself diverges)
    log, module, data, T = _run(tmp_path / "grows", lr=3.5, epochs=15)
    with pytest.warns(RuntimeWarning, match=r"dit: the adjoint grew .* replay leave-one-out"):
        grown = dit(log, _query, module=module, train_data=data, loss_fn=_loss)
    assert grown.info["adjoint_growth"] == pytest.approx(_reference_growth(3.5, T), rel=1e-10)
    assert grown.info["adjoint_growth"] > 1e6 and "adjoint grew" in grown.method
    with pytest.warns(RuntimeWarning, match="dit: the adjoint grew"):
        local = dit_local(log, _query, module=module, train_data=data, loss_fn=_loss, window=(0, T))
    assert "adjoint grew" in local.method
    with pytest.warns(RuntimeWarning, match="dit: the adjoint grew"):
        tl = timeline(log, _query, module=module, train_data=data, loss_fn=_loss, grid=[T])
    assert tl.info["adjoint_growth"] == grown.info["adjoint_growth"] and "adjoint grew" in tl.method

