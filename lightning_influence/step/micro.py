"""One optimizer step's inputs as Lightning ran them, and its per-sample losses evaluated again exactly.

A step ``t`` is a list of micro-batches (``accumulate_grad_batches`` of them, and one per rank
under DDP), each with the random state its forward started from (:mod:`.rng`), evaluated
under the run's autocast (:mod:`.precision`). :meth:`Step.losses` evaluates the per-sample
losses of every micro-batch at given parameters, each under its own random state and
autocast, so dropout masks and rounding match training; every re-evaluation of a step
(replay, DIT, Diff-In, replay leave-one-out, the tracker's own passes) goes through it.

Per-sample gradients of a micro-batch that drew random numbers cannot come from
``vmap(grad)`` over samples (each sample would draw a new mask): :func:`per_sample_grads_masked`
runs the batched forward once, under the micro-batch's state, and vectorises only the
backward passes over the unit cotangents (exact, any architecture, ``O(B)`` backward passes).
Pure torch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

from lightning_influence.capture.per_sample import _LossModule, _override_dict, call_with_params
from lightning_influence.capture.projection import KroneckerProjector
from lightning_influence.step import rng
from lightning_influence.step.precision import FULL, Precision

__all__ = ["MicroBatch", "Step", "exact_kernels", "per_sample_grads_masked"]

LossFn = Callable[[nn.Module, Any], Tensor]


@dataclass
class MicroBatch:
    """One micro-batch: its sample ids, its inputs as fed to ``training_step``, its random state."""

    ids: np.ndarray
    batch: Any
    random: rng.RandomState = field(default_factory=lambda: rng.NONE)

    @property
    def drew(self) -> bool:
        """Its forward drew random numbers (dropout): per-sample passes must keep its masks."""
        return self.random.drew

    @contextlib.contextmanager
    def context(self, precision: Precision) -> Iterator[None]:
        """Random state and autocast of this micro-batch's forward (the caller's generators are kept)."""
        with rng.restored(self.random), precision.autocast():
            yield


@dataclass
class Step:
    """The inputs of optimizer step ``step``.

    Attributes:
        step: ``t``.
        micro: the micro-batches, in the order Lightning ran them (ranks in rank order).
        precision: the run's autocast and GradScaler.
        grad_scale: the GradScaler factor ``S_t`` (``None`` without a scaler).
        skipped: the GradScaler skipped the optimizer step (non-finite gradients): ``θ_{t+1} = θ_t``.
    """

    step: int
    micro: list[MicroBatch]
    precision: Precision = FULL
    grad_scale: float | None = None
    skipped: bool = False

    @property
    def ids(self) -> np.ndarray:
        return np.concatenate([m.ids for m in self.micro]) if self.micro else np.zeros(0, np.int64)

    @property
    def drew(self) -> bool:
        return any(m.drew for m in self.micro)

    def losses(self, module: nn.Module, loss_fn: LossFn, params: Mapping[str, Tensor] | None,
               exact: bool = False) -> Tensor:
        """Per-sample losses ``(|B_t|,)`` at ``params``, every micro-batch under its own random state and autocast.

        ``exact``: attention through a kernel with forward-mode AD (for HVPs, :func:`exact_kernels`).
        """
        out = []
        with exact_kernels() if exact else contextlib.nullcontext():
            for m in self.micro:
                with m.context(self.precision):
                    out.append(call_with_params(module, loss_fn, params, m.batch))
        return torch.cat(out) if len(out) > 1 else out[0]


    def curvature_products(self, module: nn.Module, loss_fn: LossFn, params: Mapping[str, Tensor], w: Tensor,
                           directions: Sequence[Mapping[str, Tensor]]) -> tuple[list[dict[str, Tensor]], Tensor]:
        """For each direction ``r`` (over some parameters): ``H_w r``, the Hessian of ``Σ_i w_i ℓ_i`` restricted to
        those parameters times ``r``, and the per-sample directional derivatives ``(⟨∇ℓ_i, r⟩)_i`` ``(C, B)``.

        Exact, by reverse-over-reverse from one plain forward: every micro-batch draws exactly the dropout masks
        training drew (a forward inside ``torch.func.jvp``/``vmap`` may not: see :func:`per_sample_grads_masked`),
        attention through the math kernel (double backward). ``u = w`` enters the first backward as a leaf, so
        one more backward of ``⟨∇_θ Σ u_i ℓ_i, r⟩`` gives ``H_w r`` (w.r.t. θ) and ``⟨∇ℓ_i, r⟩`` (w.r.t. ``u_i``).
        """
        names = list(directions[0])
        leaves = {n: params[n].detach().requires_grad_(True) for n in names}
        full = {**{n: t.detach() for n, t in params.items()}, **leaves}
        with torch.enable_grad():
            losses = self.losses(module, loss_fn, full, exact=True)
            u = w.detach().to(losses).clone().requires_grad_(True)
            g = torch.autograd.grad(losses, list(leaves.values()), grad_outputs=u, create_graph=True, allow_unused=True)
            hr, jr = [], []
            for k, r in enumerate(directions):
                inner = sum((gi * r[n].to(gi)).sum() for gi, n in zip(g, names) if gi is not None)
                if not isinstance(inner, Tensor) or not inner.requires_grad:  # the loss does not depend on these
                    hr.append({n: torch.zeros_like(leaves[n]) for n in names})
                    jr.append(torch.zeros_like(u))
                    continue
                out = torch.autograd.grad(inner, [*leaves.values(), u], retain_graph=k < len(directions) - 1,
                                          allow_unused=True)
                hr.append({n: torch.zeros_like(leaves[n]) if o is None else o.detach() for n, o in zip(names, out)})
                jr.append(torch.zeros_like(u) if out[-1] is None else out[-1].detach())
        return hr, torch.stack(jr)


@contextlib.contextmanager
def exact_kernels() -> Iterator[None]:
    """Attention through the math kernel of ``scaled_dot_product_attention``, which supports forward-mode AD
    (the fused CPU/GPU kernels do not) and double backward: used by every Hessian-vector product pass."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


def per_sample_grads_masked(module: nn.Module, loss_fn: LossFn, micro: MicroBatch, precision: Precision,
                            names: Sequence[str], params: Mapping[str, Tensor] | None = None,
                            projector: KroneckerProjector | None = None, chunk_size: int | None = 32) -> Tensor:
    """Per-sample gradients ``(B, K)`` of ``names`` with the micro-batch's own dropout masks.

    One plain batched forward under the micro-batch's random state and autocast, exactly as training ran it;
    the gradients of each ``ℓ_i`` come from the backward passes of the unit cotangents ``e_i``, vectorised
    (``chunk_size`` at a time): the backward draws no random number, so no random op runs inside ``vmap``.
    (A forward inside a ``torch.func`` transform may draw different masks than training: a dropout on a
    non-contiguous activation, as in ``TransformerEncoderLayer``, fills its mask in another order.) Assumes
    samples do not interact in the forward (no train-mode BatchNorm). Projected by ``projector`` if given,
    else flattened in ``names`` order. Called inside a transform (``jvp``, for exact ``H_z v``), the forward
    runs inside it.
    """
    overrides = dict(params or {})  # not detached: a caller may differentiate through them (jvp: exact H_z v)
    live = dict(module.named_parameters())
    diff = {n: overrides.pop(n) if n in overrides else live[n].detach() for n in names}
    fixed = _override_dict(module, overrides)
    wrapper = _LossModule(module, loss_fn)

    def losses(p: dict[str, Tensor]) -> Tensor:
        return functional_call(wrapper, {**fixed, **{"m." + n: t for n, t in p.items()}}, (micro.batch,))

    if torch._C._functorch.maybe_current_level() is None:  # plain: the forward as in training
        leaves = {n: t.detach().requires_grad_(True) for n, t in diff.items()}
        with torch.enable_grad():
            with micro.context(precision):
                out = losses(leaves)
            eye = torch.eye(out.shape[0], dtype=out.dtype, device=out.device)
            rows = []
            for c0 in range(0, out.shape[0], chunk_size or out.shape[0]):
                g = torch.autograd.grad(out, list(leaves.values()), grad_outputs=eye[c0:c0 + (chunk_size or out.shape[0])],
                                        is_grads_batched=True, retain_graph=True, allow_unused=True)
                rows.append([torch.zeros(len(eye[c0:c0 + (chunk_size or out.shape[0])]), *leaves[n].shape, dtype=out.dtype,
                                         device=out.device) if gi is None else gi for n, gi in zip(leaves, g)])
        grads = {n: torch.cat([r[i] for r in rows]).detach() for i, n in enumerate(leaves)}
    else:
        with micro.context(precision):
            out, pullback = vjp(losses, diff)
        eye = torch.eye(out.shape[0], dtype=out.dtype, device=out.device)
        grads = vmap(pullback, chunk_size=chunk_size)(eye)[0]
    if projector is not None:  # columns of parameters outside ``names`` stay zero (another engine fills them)
        return projector.project(grads, partial=True)
    return torch.cat([grads[n].reshape(out.shape[0], -1) for n in names], dim=1)
