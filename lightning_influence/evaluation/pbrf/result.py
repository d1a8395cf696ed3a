"""What a PBRF solve reports: responses per sample with the solver's convergence (:class:`PBRFResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lightning_influence.queries import query_column

__all__ = ["PBRFResult"]


@dataclass
class PBRFResult:
    """PBRF responses of chosen samples, with the solver's convergence report.

    Attributes:
        samples: ``(S,)`` sample ids.
        scores: ``(S, Q)`` responses ``f(θ^s(ε)) − f(θ^s)`` (positive = removing raises ``f``).
        query_names: names of the ``Q`` query outputs.
        method: ``"pbrf"`` or ``"linear-pbrf"``.
        damping: ``λ``.
        epsilon: ``ε`` (``−1/N``).
        converged: ``(S,)`` the solver reached its tolerance.
        iterations: ``(S,)`` solver iterations (LBFGS/Adam/SGD steps; CG iterations for the linear form).
        rel_grad_norm: ``(S,)`` ``‖∇J‖_∞ / ‖∇J(θ_T)‖_∞`` at the end (CG: relative residual).
        response_change: ``(S,)`` ``max_q |response − response at the previous record point|``
            (the last-segment movement of the answer: a practical non-convergence signal).
        intermediate: ``{steps: (S, Q)}`` responses after that many solver steps (``record_at``).
        info: settings (solver, output loss, weight decay, N, time).
    """

    samples: np.ndarray
    scores: np.ndarray
    query_names: list[str]
    method: str
    damping: float
    epsilon: float
    converged: np.ndarray
    iterations: np.ndarray
    rel_grad_norm: np.ndarray
    response_change: np.ndarray
    intermediate: dict[int, np.ndarray] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def column(self, query: int | str = 0) -> np.ndarray:
        """The ``(S,)`` scores of one query (by index or name), for the samples solved."""
        return self.scores[:, query_column(self.query_names, query)]

    def full(self, n: int) -> np.ndarray:
        """``(n, Q)`` scores by sample id, ``nan`` for samples not solved."""
        out = np.full((n, self.scores.shape[1]), np.nan)
        out[self.samples] = self.scores
        return out

    def summary(self) -> dict[str, Any]:
        """The run in numbers: samples, damping, ``ε``, how many converged, iterations, residual gradient norms."""
        return {
            "method": self.method,
            "samples": int(len(self.samples)),
            "damping": self.damping,
            "epsilon": self.epsilon,
            "converged_fraction": float(np.mean(self.converged)) if len(self.converged) else float("nan"),
            "median_iterations": float(np.median(self.iterations)) if len(self.iterations) else float("nan"),
            "max_rel_grad_norm": float(np.max(self.rel_grad_norm)) if len(self.rel_grad_norm) else float("nan"),
            "max_response_change": float(np.nanmax(self.response_change)) if len(self.response_change) else float("nan"),
            "rms_response": float(np.sqrt(np.mean(self.scores ** 2))) if self.scores.size else float("nan"),
            **{k: v for k, v in self.info.items() if isinstance(v, (int, float, str, bool))},
        }

    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON-ready lists (per-sample responses, convergence traces, the summary)."""
        return {
            "summary": self.summary(),
            "query_names": list(self.query_names),
            "samples": self.samples.tolist(),
            "scores": self.scores.tolist(),
            "converged": self.converged.tolist(),
            "iterations": self.iterations.tolist(),
            "rel_grad_norm": self.rel_grad_norm.tolist(),
            "response_change": self.response_change.tolist(),
            "intermediate": {str(k): v.tolist() for k, v in self.intermediate.items()},
            "info": {k: v for k, v in self.info.items() if isinstance(v, (int, float, str, bool, list))},
        }

    def table(self) -> str:
        """The summary as a few printable lines."""
        s = self.summary()
        lines = [f"{self.method}: {s['samples']} samples, damping λ={self.damping:g}, ε={self.epsilon:.3g}, "
                 f"output loss {self.info.get('output_loss')}",
                 f"  converged: {s['converged_fraction']:.0%} (tolerance {self.info.get('tol')}), median iterations "
                 f"{s['median_iterations']:g}, worst relative gradient/residual {s['max_rel_grad_norm']:.2e}",
                 f"  RMS response {s['rms_response']:.3e}; largest last-segment change {s['max_response_change']:.2e}"]
        if self.info.get("weight_decay_note"):
            lines.append(f"  weight decay in the proximity: {self.info['weight_decay_note']}")
        return "\n".join(lines)
