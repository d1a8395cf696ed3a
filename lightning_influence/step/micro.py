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
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from lightning_influence.capture.per_sample import (batched_grad, call_with_params, per_sample_grad_blocks,
                                                   per_sample_grads_backward)
from lightning_influence.capture.projection import KroneckerProjector
from lightning_influence.step import rng
from lightning_influence.step.buffers import cloned
from lightning_influence.step.modes import exact_modes
from lightning_influence.step.precision import FULL, Precision

__all__ = ["MicroBatch", "Step", "exact_kernels", "per_sample_grads_masked", "training_mode"]

LossFn = Callable[[nn.Module, Any], Tensor]


@dataclass
class MicroBatch:
    """One micro-batch: its sample ids, its inputs as fed to ``training_step``, its random state."""

    ids: np.ndarray
    batch: Any
    random: rng.RandomState = field(default_factory=lambda: rng.NONE)
    train: bool = False  # its forward ran a train-mode BatchNorm (meta ``train_batchnorm``): train mode (no ``modes``)
    # its forward's buffer updates (running statistics) are the run's: under DDP rank 0's only, whose buffers DDP
    # broadcasts before every forward and whose the log stores (the others' forwards run on copies, step.buffers)
    updates_buffers: bool = True
    # the modules training ran its forward with in eval mode (log meta ``eval_modules``, step.modes), set exactly on the
    # module it is evaluated with; ``None``: not recorded (an older log, an own pass on the live module): training_mode
    modes: tuple[str, ...] | None = None
    # the module's buffers before its forward, where that forward changes them otherwise than a train-mode BatchNorm's
    # statistics (spectral_norm's power iteration): the tracker's own passes start from them, as training's forward did
    buffers: Mapping[str, Tensor] | None = None

    @property
    def drew(self) -> bool:
        """Its forward drew random numbers (dropout): per-sample passes must keep its masks."""
        return self.random.drew

    @contextlib.contextmanager
    def context(self, precision: Precision, module: nn.Module | None = None) -> Iterator[None]:
        """Random state and autocast of this micro-batch's forward (the caller's generators are kept), and ``module``
        in the modes training ran it with: those recorded (``modes``, :func:`.modes.exact_modes`), else, if the
        forward drew random numbers in training or ran a train-mode BatchNorm, in train mode (:func:`training_mode`)."""
        modes = (exact_modes(module, self.modes) if self.modes is not None
                 else training_mode(module if self.drew or self.train else None))
        with rng.restored(self.random), precision.autocast(), modes:
            yield


@contextlib.contextmanager
def training_mode(module: nn.Module | None) -> Iterator[None]:
    """The rule for a log that does not record the modes (``eval_modules``, :mod:`.modes`; older logs): a module
    given in eval mode (``model.eval()`` after training) is re-run in train mode, as Lightning runs
    ``training_step``: otherwise its dropout would be off and the step not the one trained. (Called only for
    micro-batches whose training forward drew random numbers or ran a train-mode BatchNorm, whose batch statistics
    it would otherwise replace by its running ones: a run trained in eval mode did neither.) A module in
    train mode is used as it is (submodules a user keeps in eval mode stay so); the mode is restored afterwards.
    Wrong where training kept submodules in eval mode (frozen BatchNorm) and the module is given in eval mode, or
    where the module is given with other submodule modes than training's: what the recorded modes fix."""
    if module is None or module.training:
        yield
        return
    modes = [(m, m.training) for m in module.modules()]
    module.train()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@dataclass
class Step:
    """The inputs of optimizer step ``step``.

    Attributes:
        step: ``t``.
        micro: the micro-batches, in the order Lightning ran them (ranks in rank order).
        precision: the run's autocast and GradScaler.
        grad_scale: the GradScaler factor ``S_t`` (``None`` without a scaler).
        skipped: the GradScaler skipped the optimizer step (non-finite gradients): ``θ_{t+1} = θ_t``.
        rows: ``None`` for the whole step, or the positions in the step of the rows ``micro`` holds (one process's
            part of the batch, :mod:`.shard`; micro-batches left without rows are not in ``micro``).
    """

    step: int
    micro: list[MicroBatch]
    precision: Precision = FULL
    grad_scale: float | None = None
    skipped: bool = False
    rows: np.ndarray | None = None

    @property
    def ids(self) -> np.ndarray:
        return np.concatenate([m.ids for m in self.micro]) if self.micro else np.zeros(0, np.int64)

    @property
    def drew(self) -> bool:
        return any(m.drew for m in self.micro)

    def losses(self, module: nn.Module, loss_fn: LossFn, params: Mapping[str, Tensor] | None,
               exact: bool = False, buffers: Mapping[str, Tensor] | None = None) -> Tensor:
        """Per-sample losses ``(|B_t|,)`` at ``params``, every micro-batch under its own random state and autocast.

        ``exact``: attention through a kernel with forward-mode AD (for HVPs, :func:`exact_kernels`). ``buffers``:
        the module's buffers to run with, taking the forwards' updates (``step.buffers``; default the module's, cloned).
        """
        out = []
        with exact_kernels() if exact else contextlib.nullcontext():
            for m in self.micro:
                with m.context(self.precision, module):
                    out.append(call_with_params(module, loss_fn, params, m.batch,
                                                buffers=buffers if m.updates_buffers else cloned(buffers)))
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
            C = len(directions)
            inner = torch.stack([sum(((gi * r[n].to(gi)).sum() for gi, n in zip(g, names) if gi is not None),
                                     torch.zeros((), dtype=losses.dtype, device=losses.device)) for r in directions])
            if not inner.requires_grad:  # the loss does not depend on these parameters
                return [{n: torch.zeros_like(leaves[n]) for n in names} for _ in range(C)], u.new_zeros(C, len(u))
            eye = torch.eye(C, dtype=inner.dtype, device=inner.device)  # the C directions in one batched backward
            out = batched_grad(inner, [*leaves.values(), u], eye, allow_unused=True)
        hr = [{n: torch.zeros_like(leaves[n]) if o is None else o[c].detach() for n, o in zip(names, out)} for c in range(C)]
        jr = u.new_zeros(C, len(u)) if out[-1] is None else out[-1].detach()
        return hr, jr


    def per_sample_curvature(self, module: nn.Module, loss_fn: LossFn, params: Mapping[str, Tensor],
                             v: Mapping[str, Tensor], names: Sequence[str]) -> dict[str, Tensor]:
        """Per-sample ``H_i v`` ``{name: (B, *shape)}`` for ``names``, exactly, with the training dropout masks.

        Reverse-over-reverse from one plain forward, sample by sample: ``∇ℓ_i`` (kept differentiable), then
        ``∇_θ ⟨∇ℓ_i, v⟩``: two backward passes of the batch per sample. (Batching the first backward over the samples'
        unit cotangents and the second over the first's rows nests one batch in the other: ``B`` times the work and
        memory, 35-70x the time on a 512-wide MLP at ``B = 32``, ``B²·p`` floats.) ``v`` covers any parameters
        (others: zero).
        """
        leaves = {n: t.detach().requires_grad_(True) for n, t in params.items()}
        dirs = [n for n in leaves if n in v]
        rows: dict[str, list[Tensor]] = {n: [] for n in names}
        with torch.enable_grad():
            losses = self.losses(module, loss_fn, leaves, exact=True)
            for i in range(len(losses)):
                g = torch.autograd.grad(losses[i], [leaves[n] for n in dirs], create_graph=True, retain_graph=True,
                                        allow_unused=True)
                d = sum(((gi * v[n].to(gi)).sum() for gi, n in zip(g, dirs) if gi is not None),
                        torch.zeros((), dtype=losses.dtype, device=losses.device))  # ⟨∇ℓ_i, v⟩
                out = (torch.autograd.grad(d, [leaves[n] for n in names], retain_graph=True, allow_unused=True)
                       if d.requires_grad else [None] * len(names))
                for n, o in zip(names, out):
                    rows[n].append(torch.zeros_like(leaves[n]) if o is None else o.detach())
        return {n: torch.stack(r) for n, r in rows.items()}


class _MathKernelFlags:
    """``sdpa_kernel(SDPBackend.MATH)`` held while any thread is inside :func:`exact_kernels`: the flags are
    process-wide, so two threads entering and leaving their own ``sdpa_kernel`` at once could leave the fused
    kernels switched off for good; here the first entry sets them and the last exit restores them (another
    thread's attention runs through the math kernel meanwhile: the same values, more slowly)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._held: Any = None

    def enter(self) -> None:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with self._lock:
            if self._depth == 0:
                self._held = sdpa_kernel(SDPBackend.MATH)
                self._held.__enter__()
            self._depth += 1

    def exit(self) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                held, self._held = self._held, None
                held.__exit__(None, None, None)


_MATH_KERNEL = _MathKernelFlags()


class _CompositeWeightNorm(torch.overrides.TorchFunctionMode):
    """``torch._weight_norm(v, g, dim)`` (``parametrizations.weight_norm``, ``utils.weight_norm``) as PyTorch's own
    composite ``v * (g / norm_except_dim(v, 2, dim))``: torch 2.13's fused kernel has no forward AD and a wrong double
    backward in ``v`` (80% off on a small layer; ``tests/test_module_variants.py``), so every HVP through it was
    wrong. The mode is thread-local: other threads keep the fused kernel."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch._weight_norm:
            v, g, dim = args[0], args[1], args[2] if len(args) > 2 else kwargs.get("dim", 0)
            return v * (g / torch.norm_except_dim(v, 2, dim))
        return func(*args, **kwargs)


@contextlib.contextmanager
def exact_kernels() -> Iterator[None]:
    """Attention through the math kernel of ``scaled_dot_product_attention``, which supports forward-mode AD
    (the fused CPU/GPU kernels do not) and double backward, and weight norm through its composite form
    (:class:`_CompositeWeightNorm`): used by every Hessian-vector product pass."""
    _MATH_KERNEL.enter()
    try:
        with _CompositeWeightNorm():
            yield
    finally:
        _MATH_KERNEL.exit()


def per_sample_grads_masked(module: nn.Module, loss_fn: LossFn, micro: MicroBatch, precision: Precision,
                            names: Sequence[str], params: Mapping[str, Tensor] | None = None,
                            projector: KroneckerProjector | None = None, chunk_size: int = 32) -> Tensor:
    """Per-sample gradients ``(B, K)`` of ``names`` with the micro-batch's own dropout masks.

    One plain batched forward under the micro-batch's random state and autocast, exactly as training ran it;
    the gradients of each ``ℓ_i`` come from the backward passes of the unit cotangents ``e_i``, vectorised
    (``chunk_size`` at a time): the backward draws no random number. (A forward inside a ``torch.func``
    transform may draw different masks than training: a dropout on a non-contiguous activation, as in
    ``TransformerEncoderLayer``, fills its mask in another order; ``docs/replay.md``.) Assumes samples do not
    interact in the forward (no train-mode BatchNorm). Projected by ``projector`` if given, else flattened in
    ``names`` order.
    """
    return per_sample_grads_backward(module, loss_fn, micro.batch, names, projector, params, chunk_size,
                                     lambda: micro.context(precision, module))


def per_sample_grad_blocks_masked(module: nn.Module, loss_fn: LossFn, micro: MicroBatch, precision: Precision,
                                  names: Sequence[str], params: Mapping[str, Tensor] | None, block: int
                                  ) -> Iterator[Tensor]:
    """:func:`per_sample_grads_masked`'s rows (flat, ``names`` order) ``block`` samples at a time from its one forward
    (:func:`~lightning_influence.capture.per_sample.per_sample_grad_blocks`)."""
    return per_sample_grad_blocks(module, loss_fn, micro.batch, names, None, params,
                                  forward=lambda: micro.context(precision, module), block=block)
