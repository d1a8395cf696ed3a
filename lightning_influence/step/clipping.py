"""Gradient clipping as Lightning applies it, forward (bit-exact) and as a pure function for the adjoint.

Lightning's ``Trainer(gradient_clip_val=c, gradient_clip_algorithm=...)`` (and the default
``LightningModule.configure_gradient_clipping``) clips the summed gradient of every parameter
the optimizer holds, after ``on_before_optimizer_step`` and before ``optimizer.step``:

- ``"norm"``: ``torch.nn.utils.clip_grad_norm_(params, c)``: ``ĝ ← ĝ · min(1, c / (‖ĝ‖₂ + 1e-6))``;
- ``"value"``: ``torch.nn.utils.clip_grad_value_(params, c)``: ``ĝ ← clamp(ĝ, −c, c)``.

:func:`apply_clipping` makes the same torch calls on the same parameter list (replay: bit-identical);
:func:`clip_gradient` is the same map on a flat vector as a pure, differentiable function, and
:func:`clip_vjp` its transposed Jacobian ``J_Cᵀ R`` (docs/influence-math.md §3: ``(c/‖ĝ‖)(I − ĝĝᵀ/‖ĝ‖²)``
where the norm clip binds, the mask of unclipped entries for value clipping) by ``torch.func.vjp``, to
compose with the optimizer update's VJP in the DIT adjoint.

The recorded *clip coefficient* of a step is the factor applied: ``min(1, c/(‖ĝ‖ + 1e-6))`` for
norm clipping, ``min(1, c/max|ĝ|)`` (the factor of the largest entry) for value clipping.
Derivation of the Jacobians and how each estimator applies them: ``docs/step-semantics.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["ALGORITHMS", "ClipSpec", "apply_clipping", "apply_clipping_stacked", "clip_coefficient", "clip_gradient",
           "clip_vjp", "logged_clip_adjoint", "logged_clip_spec", "rows_are_projected", "step_clip_adjoint"]

ALGORITHMS = ("norm", "value")
_NORM_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s guard


@dataclass(frozen=True)
class ClipSpec:
    """One step's clipping: ``algorithm`` (``"norm"`` or ``"value"``) at threshold ``value`` > 0."""

    algorithm: str
    value: float

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"clipping algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        if not (self.value > 0 and math.isfinite(self.value)):
            raise ValueError(f"clipping threshold must be a finite number > 0, got {self.value!r}")

    @classmethod
    def from_record(cls, algorithm: Any, value: Any) -> "ClipSpec | None":
        """The spec of a logged step (``None`` when the step was not clipped: no algorithm or NaN value)."""
        if algorithm is None or value is None or not math.isfinite(float(value)) or float(value) <= 0:
            return None
        return cls(str(algorithm), float(value))


def _norm_factor(norm: Tensor, value: float) -> Tensor:
    """Norm clipping's factor ``min(1, c / (‖g‖ + 1e-6))``, as ``torch.nn.utils.clip_grad_norm_`` computes it."""
    return torch.clamp(value / (norm + _NORM_EPS), max=1.0)


def clip_coefficient(grads: Sequence[Tensor], spec: ClipSpec) -> Tensor:
    """The factor :func:`apply_clipping` applies to ``grads`` (without changing them), as a 0-d tensor on
    their device: the tracker copies it to the host with the step's other rows, without a synchronisation."""
    grads = [g for g in grads if g is not None and g.numel()]
    if not grads:
        return torch.tensor(1.0)
    if spec.algorithm == "norm":
        total = torch.nn.utils.get_total_norm(grads, 2.0)
        return _norm_factor(total, spec.value)
    largest = torch.stack([g.abs().max().to(grads[0].device, torch.float64) for g in grads]).max()
    return torch.clamp(spec.value / largest, max=1.0)  # no entry above c (or all zero): 1


def apply_clipping(params: Sequence[Tensor], spec: ClipSpec | None) -> None:
    """Clip the ``.grad`` of ``params`` in place exactly as Lightning does.

    ``params`` must be the optimizer's parameters in its param-group order (Lightning's
    ``main_params``): the norm is reduced in that order, so the result is bit-identical.
    """
    if spec is None:
        return
    params = list(params)
    if spec.algorithm == "norm":
        torch.nn.utils.clip_grad_norm_(params, spec.value)
    else:
        torch.nn.utils.clip_grad_value_(params, spec.value)


def apply_clipping_stacked(params: Sequence[Tensor], spec: ClipSpec | None) -> None:
    """Clip the ``.grad`` of stacked copies (leading dimension = copy) in place, each copy on its own norm."""
    if spec is None:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    if spec.algorithm == "value":
        for g in grads:
            g.clamp_(-spec.value, spec.value)
        return
    # each copy's norm as torch.nn.utils.clip_grad_norm_ reduces it (a norm per tensor, then theirs): the reference
    # copy is then clipped bit for bit as training was (a one-ulp factor grows to percents under a bf16 forward)
    norms = torch.stack([torch.nn.utils.get_total_norm([g[c] for g in grads], 2.0) for c in range(grads[0].shape[0])])
    coef = _norm_factor(norms, spec.value)
    for g in grads:
        g.mul_(coef.reshape(-1, *([1] * (g.dim() - 1))))


def logged_clip_spec(log: Any, step: int) -> ClipSpec | None:
    """The clipping of ``step`` in an influence log (``None``: not clipped, or a log that does not record clipping)."""
    algorithm = (log.meta.get("gradient_clipping") or {}).get("algorithm")
    return ClipSpec.from_record(algorithm, log.step_column(step, "clip_value")) if algorithm else None


def clip_gradient(g: Tensor, spec: ClipSpec | None) -> Tensor:
    """The clipped gradient ``C(g)`` of a flat gradient ``g`` (pure and differentiable; identity without ``spec``)."""
    if spec is None:
        return g
    if spec.algorithm == "norm":
        return g * _norm_factor(torch.linalg.vector_norm(g), spec.value)
    return torch.clamp(g, -spec.value, spec.value)


def clip_vjp(g: Tensor, spec: ClipSpec | None, R: Tensor) -> Tensor:
    """``J_C(g)ᵀ R`` for adjoint columns ``R`` ``(p, C)``: the adjoint of the applied gradient pulled back
    through the clipping to the adjoint of the unclipped gradient ``g`` ``(p,)``."""
    if spec is None:
        return R
    _, pullback = torch.func.vjp(lambda x: clip_gradient(x, spec), g.to(R.dtype))
    if R.shape[1] == 1:
        return pullback(R[:, 0])[0].unsqueeze(1)
    return torch.func.vmap(lambda r: pullback(r)[0], in_dims=1, out_dims=1)(R)


def rows_are_projected(log: Any) -> bool:
    """The log's gradient rows are not the full gradient (a random projection, or not every parameter tracked)."""
    return log.meta["projection"].get("dim") is not None or len(log.param_names) < len(log.param_shapes)


def logged_clip_adjoint(spec: ClipSpec | None, coef: float, applied: Tensor, R: Tensor, projected: bool) -> Tensor:
    """``J_Cᵀ R`` in the space of the logged gradient rows (TracIn, Gauss-Newton DIT), for adjoint columns ``R`` ``(K, C)``.

    ``applied`` ``(K,)`` is ``Σ_i w_i g_i`` from the logged rows (the unclipped batch gradient,
    projected like them) and ``coef`` the recorded clip coefficient (from the exact norm).
    Norm clipping: ``coef (I − s u uᵀ) R`` with ``u = applied/‖applied‖`` and ``s = ‖ĝ‖/(‖ĝ‖ + 1e-6)``
    where it bound (exact without projection, the projected direction otherwise); value clipping
    zeroes the clipped entries,
    which needs unprojected rows of every parameter.

    Raises:
        ValueError: value clipping on projected rows (the clipped coordinates are lost in the projection).
    """
    if spec is None or not np.isfinite(coef) or coef >= 1.0:
        return R
    if spec.algorithm == "value":
        if projected:
            raise ValueError("value clipping cannot be applied to projected gradient rows (the clipped coordinates are "
                             "mixed by the projection); record full gradients (projection_dim=None) or use dit(...) "
                             "with the model")
        return R * (applied.abs() < spec.value).to(R.dtype).unsqueeze(1)
    u = applied / torch.linalg.vector_norm(applied).clamp_min(1e-300)
    shrink = 1.0 - _NORM_EPS * coef / spec.value  # ‖ĝ‖/(‖ĝ‖ + 1e-6), from coef = c/(‖ĝ‖ + 1e-6)
    return coef * (R - shrink * u.unsqueeze(1) * (u @ R).unsqueeze(0))


def step_clip_adjoint(log: Any, step: int, weights: np.ndarray, rows: np.ndarray) -> Callable[[Tensor], Tensor]:
    """``R ↦ J_{C,t}ᵀ R`` for step ``step`` of a log, in the space of its gradient ``rows`` ``(B, K)`` (weighted by
    ``weights``): :func:`logged_clip_adjoint` with the step's recorded clipping, the identity without."""
    spec = logged_clip_spec(log, step)
    if spec is None:
        return lambda R: R
    applied, coef = torch.from_numpy(weights @ rows), float(log.step_column(step, "clip_coef"))
    projected = rows_are_projected(log)
    return lambda R: logged_clip_adjoint(spec, coef, applied, R, projected)
