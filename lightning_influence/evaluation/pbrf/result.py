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
        response_error: ``(S,)`` how far one more Gauss-Newton step would move the response,
            ``max_q |∇f_qᵀ P⁻¹ ∇J|`` (the Gauss-Newton solver; ``nan`` where not measured).
        negative_curvature: ``(S,)`` the sample's objective is not convex near ``θ_T``: its Hessian at ``θ_T``,
            ``G + λ + κ + ε ∇²ℓ_m``, has a negative eigenvalue (exact, a dense factorisation, where ``p <=
            max_dense_params``: ``info["curvature_checked_at_theta"]``), or the solver met negative curvature along a
            step it took (``cos(s, y) < −0.1``). ``θ_T`` is then a saddle, and with too little damping the objective has
            no minimum near it (raise ``damping``).
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
    response_error: np.ndarray | None = None
    negative_curvature: np.ndarray | None = None

    def __post_init__(self) -> None:
        S = len(self.samples)
        if self.response_error is None:
            self.response_error = np.full(S, np.nan)
        if self.negative_curvature is None:
            self.negative_curvature = np.zeros(S, bool)

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
            "unconverged_samples": self.samples[~self.converged].tolist(),
            "negative_curvature_samples": self.samples[self.negative_curvature].tolist(),
            "max_rel_response_error": _max_rel(self.response_error, self.scores),
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
            "response_error": [None if not np.isfinite(e) else float(e) for e in self.response_error],
            "negative_curvature": self.negative_curvature.tolist(),
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
                 f"  RMS response {s['rms_response']:.3e}; largest last-segment change {s['max_response_change']:.2e}; "
                 + (f"largest predicted remaining change {s['max_rel_response_error']:.1e} of the response"
                  if s["max_rel_response_error"] is not None else "remaining change not measured")]
        if s["unconverged_samples"]:
            bad = s["unconverged_samples"]
            lines.append(f"  NOT converged ({len(bad)} of {s['samples']}): samples {bad[:20]}{' ...' if len(bad) > 20 else ''}"
                         ": their responses are not the PBRF's; more steps, or more damping")
        if s["negative_curvature_samples"]:
            neg = s["negative_curvature_samples"]
            lines.append(f"  negative curvature ({len(neg)} samples: {neg[:20]}{' ...' if len(neg) > 20 else ''}): the "
                         f"objective is not convex at θ_T (the removal term's curvature exceeds λ={self.damping:g} plus "
                         "weight decay); raise damping for a local response")
        if self.info.get("curvature_checked_at_theta") is False:  # above the dense limit: only the solver's witness
            lines.append(f"  curvature at θ_T not checked exactly (p = {self.info.get('p')} parameters > max_dense_params = "
                         f"{self.info.get('max_dense_params')}): negative curvature is flagged only where the solver met "
                         "it along a step; raise max_dense_params to check every sample")
        if self.info.get("weight_decay_note"):
            lines.append(f"  weight decay in the proximity: {self.info['weight_decay_note']}")
        return "\n".join(lines)


def _max_rel(error: np.ndarray, scores: np.ndarray) -> float | None:
    """The largest ``response_error / max_q |response|`` over the measured samples (``None`` if none)."""
    size = np.abs(scores).max(axis=1) if scores.size else np.zeros(len(error))
    ok = np.isfinite(error)
    if not ok.any():
        return None
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(size[ok] > 0, error[ok] / size[ok], np.where(error[ok] > 0, np.inf, 0.0))
    return float(rel.max())
