"""How far a DIT adjoint sweep's adjoint grew over the query gradients that entered it (exact and Gauss-Newton DIT).

The adjoint ``λ_θ(t) = (∂θ_{t2}/∂θ_t)ᵀ q`` carries a query gradient back over the linearised steps. Where it grows a
million-fold, the run amplifies a perturbation so much that a first-order (linear) propagation of a removal cannot
stand for retraining: exact DIT on a hidden-16 MLP with SGD momentum 0.9 over many epochs scored -5.4e5 where replay
leave-one-out changed the loss by -0.02; Gauss-Newton DIT's recursion with the logged curvature grew 1e59-fold on a
digits MLP. Both sweeps measure it here (one implementation), report it (``info["adjoint_growth"]``, a ``[adjoint grew
...x]`` tag on the method), warn beyond :data:`GROWTH_WARN` and refuse a non-finite adjoint at the step it appears.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

__all__ = ["GROWTH_WARN", "AdjointGrowth"]

GROWTH_WARN = 1e6  # a linearised run that amplifies a perturbation a million-fold cannot stand for the run


class AdjointGrowth:
    """Largest ratio ``‖λ_θ(t)‖_F / ‖q‖_F`` seen over the sweep, ``q`` all query columns that entered it so far.

    Args:
        estimator: the estimator's name, for messages (``"dit"``, ``"dit_gauss_newton"``).
        advice: what to use instead, for messages.
        t2: the step the sweep starts from.
        path: the log's path, for messages.
    """

    def __init__(self, estimator: str, advice: str, t2: int, path: Any) -> None:
        self.estimator, self.advice, self.path = estimator, advice, path
        self.entered, self.largest, self.at, self.t2 = 0.0, 1.0, t2, t2

    def added(self, q: torch.Tensor) -> None:
        """Query columns ``q`` joined the adjoint."""
        self.entered = math.hypot(self.entered, float(torch.linalg.norm(q.double())))

    def check(self, U: torch.Tensor, t: int) -> None:
        """The adjoint ``U`` after the sweep passed step ``t``; raise ``FloatingPointError`` if it is not finite."""
        norm = float(torch.linalg.norm(U.double()))
        if not math.isfinite(norm):
            raise FloatingPointError(f"{self.estimator} on {self.path}: the adjoint overflowed at step {t}, "
                                     f"{self.what()}: the linearised run is unstable over this window and its scores "
                                     f"would be inf or NaN. {self.advice}")
        if self.entered > 0 and norm / self.entered > self.largest:
            self.largest, self.at = norm / self.entered, t

    def what(self) -> str:
        return f"the adjoint grew {self.largest:.1e}x over the query gradients from step {self.t2} back to step {self.at}"

    def report(self, method: str, info: dict[str, Any], stacklevel: int = 3) -> str:
        """Put the growth in ``info``; beyond :data:`GROWTH_WARN` warn once and return ``method`` tagged."""
        info["adjoint_growth"] = self.largest
        if self.largest <= GROWTH_WARN:
            return method
        warnings.warn(f"{self.estimator}: {self.what()}; scores this large are the linearisation's, not the run's "
                      f"(replay leave-one-out changes a loss by far less). {self.advice}; info['adjoint_growth'] has "
                      "the factor", RuntimeWarning, stacklevel=stacklevel + 1)
        return f"{method} [adjoint grew {self.largest:.0e}x]"
