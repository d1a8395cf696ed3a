"""Linear regression with squared loss ``½(φ·θ − y)²``: the closed-form fixture of the PBRF,
datamodel and group tests (replayed SGD on it has closed forms in ``φ = [x, 1]``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

D = 3


class Lin(nn.Module):
    """``nn.Linear(D, 1)`` with the squared per-sample loss."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)

    def per_sample_loss(self, batch) -> torch.Tensor:
        return 0.5 * (self(batch[0]) - batch[1]).pow(2).sum(1)


@dataclass(frozen=True)
class LinearProblem:
    """Training samples ``(x, y)``, query points ``(xq, yq)`` and their features ``φ = [x, 1]``."""

    x: torch.Tensor
    y: torch.Tensor
    xq: torch.Tensor
    yq: torch.Tensor

    @property
    def phi(self) -> torch.Tensor:
        return torch.cat([self.x, torch.ones(len(self.x), 1, dtype=self.x.dtype)], 1)

    @property
    def phiq(self) -> torch.Tensor:
        return torch.cat([self.xq, torch.ones(len(self.xq), 1, dtype=self.xq.dtype)], 1)

    def data(self, ids) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of samples ``ids`` (the ``data`` argument of the replays)."""
        ids = torch.as_tensor(ids)
        return self.x[ids], self.y[ids]

    def prediction(self, m: nn.Module) -> torch.Tensor:
        """The query ``f(θ)`` = the prediction at the first query point."""
        return m(self.xq[:1]).reshape(())


def linear_problem(n: int, gen: torch.Generator, n_query: int = 1) -> LinearProblem:
    """``y = x·(1, −2, 0.5) + 0.3·noise`` in float64, drawn from ``gen`` (x, noise, xq, yq in that order)."""
    x = torch.randn(n, D, generator=gen, dtype=torch.float64)
    y = (x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.3 * torch.randn(n, generator=gen, dtype=torch.float64))
    xq = torch.randn(n_query, D, generator=gen, dtype=torch.float64)
    yq = torch.randn(n_query, 1, generator=gen, dtype=torch.float64)
    return LinearProblem(x, y[:, None], xq, yq)
