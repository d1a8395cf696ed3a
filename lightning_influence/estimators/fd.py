"""The finite-difference products of DIT and Diff-In (``hvp="fd"``), evaluated in float64 (docs/replay.md,
"Finite-difference HVPs"; docs/diffin.md).

``H_t r`` and the per-sample ``⟨∇ℓ_j, r⟩`` come from first-order gradients of the weighted batch loss at
``θ ± ε r̂`` (docs/influence-math.md §3; :func:`~lightning_influence.capture.hvp.fd_directional_derivative`), with
no double-backward graph. In float32 no step is right: rounding wants ``ε`` large, while every ReLU unit that
crosses its kink between ``θ − ε r̂`` and ``θ + ε r̂`` (about ``∝ ε`` of them, each a jump ``∝ 1`` in the
gradient) adds an ``O(1)`` bias to the quotient, so on a ReLU transformer DIT stayed ~1% from the exact sweep
at every ``ε_0`` in 1e-3..3e-1. Here the two gradient passes run on a float64 copy of the module (parameters,
buffers and floating inputs upcast; the micro-batches' random states and autocast as in training, so dropout
masks match; float64 tensors are not cast by autocast): rounding is ~1e-16 and ``ε_0 = 1e-6`` crosses a kink
in few products, which the kink guard catches (a crossing's jump dwarfs ``ε H r`` there). Cost: per column
two float64 gradient passes (``θ ± ε r̂``), plus one at ``θ`` per step shared by the columns, and one float64
copy of the module.

Before the first product the float64 evaluation is checked against the native one at ``θ`` (a model that keeps
a float32 tensor outside its parameters and buffers fails; a loss or kernel that depends on the dtype, or a device
whose dropout masks do, computes another function); if it fails or disagrees, the products fall back to the
native dtype with its old step (:func:`native_eps0`), and ``info`` and a ``RuntimeWarning`` say so. A cast to a
lower precision inside the loss shows instead as noise: the one-sided halves of the differences disagree
(:data:`NOISE_LIMIT`) and the sweep flags its scores. Under autocast the float64 evaluation differentiates the
unrounded function, where the exact sweep differentiates through the autocast dtype's rounding (their products
differ by ~5e-3 under bf16, docs/replay.md). Parameters already in float64 are used as they are. Diff-In takes its
batch products ``H_B v`` through the same ``__call__`` and its per-sample rows ``H_z v`` through
:meth:`FiniteDifferenceProducts.directional` (any gradient function, kink-guarded per row; a batch outside the
training steps gets the same random draws in every evaluation). No Lightning imports.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import warnings
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from lightning_influence.capture.hvp import KINK_GUARD, KINK_SHARE_LIMIT, default_eps0, fd_directional_derivative, unflatten
from lightning_influence.queries import LossFn
from lightning_influence.step.micro import Step
from lightning_influence.step.precision import Precision
from lightning_influence.step.shard import BatchShard

__all__ = ["FD_DTYPE", "FD_EPS0", "CastInputs", "Evaluate", "FiniteDifferenceProducts", "native_eps0", "upcast"]

FD_DTYPE = torch.float64
FD_EPS0 = 1e-6  # ε_0 of the float64 evaluation (measured: benchmarks/fd_accuracy.py, docs/replay.md)
# float64 vs native batch gradient at θ, relative L2, beyond which the two evaluations are different functions.
# Measured (digits MLP / transformer of benchmarks/random_runs.py, batch 20): float32 1.1e-7 / 4.3e-7; bf16 autocast
# 3.7e-3 / 5.6e-3; other dropout masks (what a dtype-dependent generator would draw) 0.46 / 0.16.
AGREEMENT = 1e-3
AGREEMENT_AUTOCAST = 3e-2  # also for half-precision parameters
# median one-sided disagreement ‖f − b‖/max(‖f‖, ‖b‖) of the unguarded products beyond which they are noise, not
# curvature: O(ε) for a smooth loss in float64 (measured ≤ 1e-6 at ε_0 = 1e-6 on the float32 benchmark runs); a
# float32 cast inside the loss makes it ~0.1-1 there (tests/test_dit_fd.py)
NOISE_LIMIT = 1e-2


def native_eps0(dtype: torch.dtype, precision: Precision) -> float:
    """``ε_0`` of products evaluated in the parameters' own dtype (the fallback): 3e-2 in float32, where rounding no
    longer dominates (max |DIT fd − DIT exact| / max |DIT exact| on a float32 dropout MLP: 6.8e-4 at 1e-3, 2.2e-5 at
    3e-2), ``u^{1/3}`` of the autocast dtype under mixed precision, :func:`default_eps0` otherwise."""
    if precision.autocast_dtype is not None:
        return default_eps0(getattr(torch, precision.autocast_dtype))
    return 3e-2 if dtype == torch.float32 else default_eps0(dtype)


def upcast(batch: Any, dtype: torch.dtype) -> Any:
    """``batch`` (a :class:`Step` or any batch) with its floating input tensors in ``dtype`` (a step's random states,
    weights and autocast kept)."""
    def up(x: Any) -> Any:
        return x.to(dtype) if isinstance(x, Tensor) and x.is_floating_point() else x

    if not isinstance(batch, Step):
        return pytree.tree_map(up, batch)
    return dataclasses.replace(batch, micro=[dataclasses.replace(m, batch=pytree.tree_map(up, m.batch))
                                             for m in batch.micro])


class CastInputs:
    """A batch (and step weights) cast to each dtype the finite differences evaluate in, once per dtype; in
    ``native`` (the parameters' own dtype, if given) as they are."""

    def __init__(self, batch: Any, w: Tensor | None = None, native: torch.dtype | None = None) -> None:
        self.native = (batch, w)
        self.cast: dict[torch.dtype, tuple[Any, Tensor | None]] = {} if native is None else {native: self.native}

    def __call__(self, dtype: torch.dtype) -> tuple[Any, Tensor | None]:
        batch, w = self.native
        if dtype not in self.cast:
            self.cast[dtype] = (upcast(batch, dtype), None if w is None else w.to(dtype))
        return self.cast[dtype]


def _cast(d: Mapping[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    return {n: v.to(dtype) for n, v in d.items()}


@contextlib.contextmanager
def _same_draws(params: Mapping[str, Tensor]) -> Iterator[Callable[[], None]]:
    """A function that puts the random generators back to their state at entry, so that every evaluation draws the
    same dropout masks (a batch outside a training step draws fresh ones); the caller's stream is untouched."""
    cuda = sorted({t.device.index or 0 for t in params.values() if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        cpu, states = torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in cuda]

        def reset() -> None:
            torch.set_rng_state(cpu)
            for d, state in zip(cuda, states):
                torch.cuda.set_rng_state(state, d)

        yield reset


# ``evaluate(module, θ, dtype)``: the function whose directional derivative is taken (a flat gradient, per-sample
# gradient rows), on ``module`` at the parameters ``θ`` of ``dtype``; it casts its own inputs (:func:`upcast`).
Evaluate = Callable[[nn.Module, Mapping[str, Tensor], torch.dtype], Tensor]


class FiniteDifferenceProducts:
    """Kink-guarded central differences of first-order gradients in float64: ``(H_t R, J_t R)`` of the DIT sweep
    (``__call__``) and any directional derivative of a gradient function (:meth:`directional`: Diff-In's batch and
    per-sample products, docs/diffin.md), with one float64 copy, check, fallback and noise measure for all.

    Args:
        module, loss_fn: the architecture and the per-sample training loss.
        names, shapes: the flat parameter layout of ``R``.
        dtype: the parameters' dtype (results come back in it).
        precision: the run's autocast (kept in every evaluation).
        eps0: ``ε_0`` (default: :data:`FD_EPS0` in float64, :func:`native_eps0` on fallback).
        estimator: named in the fallback's warning.
    """

    def __init__(self, module: nn.Module, loss_fn: LossFn, names: Sequence[str], shapes: Mapping[str, Sequence[int]],
                 dtype: torch.dtype, precision: Precision, eps0: float | None = None, estimator: str = "DIT") -> None:
        self.module, self.loss_fn, self.names, self.shapes = module, loss_fn, list(names), dict(shapes)
        self.dtype, self.precision, self.user_eps0, self.estimator = dtype, precision, eps0, estimator
        self.eval_dtype = dtype if dtype == FD_DTYPE else FD_DTYPE
        self.eval_module: nn.Module | None = module if self.eval_dtype == dtype else None
        self.fallback: str | None = None
        self.checked = self.eval_dtype == dtype
        self.p = sum(math.prod(sh) for sh in self.shapes.values())
        self.kinks = 0  # product rows (a column of H R, a sample's H_z v) whose one-sided differences disagreed (guarded)
        self.products = 0  # product rows
        self.agreement: float | None = None  # float64 vs native gradient at θ (relative), once checked
        self.asymmetries: list[Tensor] = []  # per column ‖f − b‖/max(‖f‖, ‖b‖) (see NOISE_LIMIT)

    @property
    def eps0(self) -> float:
        if self.user_eps0 is not None:
            return float(self.user_eps0)
        return FD_EPS0 if self.eval_dtype == torch.float64 else native_eps0(self.dtype, self.precision)

    def _local(self, module: nn.Module, batch: Step, w: Tensor, p: Mapping[str, Tensor], dtype: torch.dtype,
               n_rows: int) -> Tensor:
        """``[∇_θ Σ w_i ℓ_i, ℓ]`` flat at ``p``, every micro-batch under its training random state and autocast; with
        ``batch.rows`` (one process's part, :mod:`~lightning_influence.step.shard`) this process's gradient part and its
        losses at their positions among the step's ``n_rows``."""
        if not batch.micro:  # a process without rows of this step
            return torch.zeros(self.p + n_rows, dtype=dtype, device=next(iter(p.values())).device)
        leaves = {n: v.detach().requires_grad_(True) for n, v in p.items()}
        with torch.enable_grad():
            losses = batch.losses(module, self.loss_fn, leaves)
            g = torch.autograd.grad((w * losses).sum(), [leaves[n] for n in self.names], allow_unused=True)
        flat = torch.cat([(torch.zeros_like(leaves[n]) if gi is None else gi).reshape(-1)
                          for n, gi in zip(self.names, g)])
        losses = losses.detach().reshape(-1).to(flat)
        if batch.rows is None:
            return torch.cat([flat, losses])
        every = flat.new_zeros(n_rows)
        every[torch.as_tensor(batch.rows, device=flat.device)] = losses
        return torch.cat([flat, every])

    def _fall_back(self, reason: str) -> None:
        self.fallback, self.eval_dtype, self.eval_module, self.checked = reason, self.dtype, self.module, True
        warnings.warn(f"{self.estimator} with hvp='fd': the float64 evaluation of the finite differences {reason}; the products "
                      f"are taken in {str(self.dtype).replace('torch.', '')} with eps0={self.eps0:g}, whose rounding "
                      "and ReLU-kink bias can reach 1e-2 of the scores. Use hvp='exact' (the default)",
                      RuntimeWarning, stacklevel=5)

    def _agree(self, evaluate: Evaluate, params: Mapping[str, Tensor], step: int, shard: BatchShard | None) -> None:
        """Set up the float64 copy and compare ``evaluate`` there with the native one at ``θ`` (once; ``step`` names
        ``θ`` in the message, ``-1`` for a batch outside the training steps; with ``shard`` every process decides on
        the same sums)."""
        self.checked = True
        reduce = (lambda x: x) if shard is None else shard.all_reduce
        failure = None
        hi: Tensor | None = None
        with _same_draws(params) as reset:
            try:
                self.eval_module = copy.deepcopy(self.module).to(FD_DTYPE)
                reset()
                hi = evaluate(self.eval_module, _cast(params, FD_DTYPE), FD_DTYPE)
            except (RuntimeError, TypeError, ValueError) as err:
                failure = f"failed ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
            reset()
            lo = evaluate(self.module, params, self.dtype) if failure is None else None
        if shard is not None:  # every process falls back if one failed (none may skip a collective)
            flag = torch.full((1,), float(failure is not None), dtype=FD_DTYPE,
                              device=next(iter(params.values())).device)
            if float(shard.all_reduce(flag)[0]) and failure is None:
                failure = "failed on another process"
        if failure is not None or hi is None:
            self._fall_back(failure or "failed")
            return
        assert lo is not None
        hi, lo = reduce(hi), reduce(lo).to(FD_DTYPE)
        gap = float(torch.linalg.vector_norm(hi - lo) / torch.linalg.vector_norm(hi).clamp_min(1e-300))
        self.agreement = gap
        rounded = self.precision.autocast_dtype is not None or torch.finfo(self.dtype).eps > 1e-6  # bf16/fp16 math
        tol = AGREEMENT_AUTOCAST if rounded else AGREEMENT
        if not gap <= tol:
            at = f"θ_{step}" if step >= 0 else "θ"
            self._fall_back(f"differs from the native one at {at} by {gap:.1e} (relative, over {tol:g}: a "
                            "loss function or kernel that depends on the dtype, or dropout masks that do)")

    def directional(self, evaluate: Evaluate, params: Mapping[str, Tensor], directions: Sequence[Mapping[str, Tensor]],
                    step: int, shard: BatchShard | None = None) -> list[Tensor]:
        """``‖v‖ (f(θ + ε v̂) − f(θ − ε v̂)) / 2ε`` of ``f = evaluate`` for each direction ``v`` (a subset of
        ``params``' names), kink-guarded per row (the rows of ``f``: one for a flat vector, one per sample for
        per-sample rows), in the float64 copy once :meth:`_agree` accepted it (else natively); ``f(θ)`` is shared.
        With ``shard`` every evaluation is summed over the processes. Results in the parameters' dtype."""
        if not self.checked:
            self._agree(evaluate, params, step, shard)
        dt, module = self.eval_dtype, self.eval_module
        assert module is not None
        reduce = (lambda x: x) if shard is None else shard.all_reduce

        params = _cast(params, dt)
        out = []
        with _same_draws(params) as reset:
            def fn(q: dict[str, Tensor]) -> Tensor:
                reset()
                return reduce(evaluate(module, q, dt))

            at = fn(dict(params))
            for v in directions:
                col, _ = fd_directional_derivative(fn, params, _cast(v, dt), self.eps0, at=at, kink_guard=KINK_GUARD,
                                                   on_kink=self._count, on_asymmetry=self.asymmetries.append)
                self.products += col.shape[0] if col.ndim > 1 else 1
                out.append(col.to(self.dtype))
        return out

    def __call__(self, params: Mapping[str, Tensor], batch: Step, R: Tensor, w: Tensor,
                 shard: BatchShard | None = None, n_rows: int = 0) -> tuple[Tensor, Tensor]:
        """``(H_t R, J_t R)``: ``(p, C)`` and ``(C, |B_t|)``, in the parameters' dtype. With ``shard`` every evaluation
        is summed over the processes (the gradient, and the ``n_rows`` losses of the step at their positions), so the
        kink guard, which compares whole columns, decides on the vector one process would see; ``J_t R`` is then this
        process's rows'."""
        inputs = CastInputs(batch, w, native=self.dtype)

        def evaluate(module: nn.Module, q: Mapping[str, Tensor], dt: torch.dtype) -> Tensor:
            return self._local(module, *inputs(dt), q, dt, n_rows)

        cols = self.directional(evaluate, params, [unflatten(R[:, c], self.shapes) for c in range(R.shape[1])],
                                batch.step, shard)
        HR = torch.stack([c[:self.p] for c in cols], dim=1) if cols else torch.empty_like(R)
        JR = torch.stack([c[self.p:] for c in cols]) if cols else R.new_zeros(0, n_rows)
        return HR, (JR if batch.rows is None else JR[:, torch.as_tensor(batch.rows, device=JR.device)])

    def _count(self, kink: Tensor) -> None:
        self.kinks += int(kink.sum())

    def asymmetry(self) -> float:
        """Median one-sided disagreement of the products the kink guard kept central (0 if none)."""
        a = torch.cat(self.asymmetries).double().cpu() if self.asymmetries else torch.zeros(0)
        a = a[a <= KINK_GUARD]
        return float(a.median()) if len(a) else 0.0

    def unreliable(self) -> str | None:
        """Why the products cannot be trusted (too many kinks, noise, or both), or ``None``."""
        reasons = []
        if self.kinks > KINK_SHARE_LIMIT * self.products:
            reasons.append(f"{self.kinks} of {self.products} finite-difference products crossed a kink (over "
                           f"{KINK_SHARE_LIMIT:.0%}: ε is too large for this model)")
        if self.asymmetry() > NOISE_LIMIT:
            reasons.append(f"the finite differences' one-sided halves disagree by {self.asymmetry():.1e} (median, over "
                           f"{NOISE_LIMIT:g}): rounding noise (a cast to a lower precision inside the model or "
                           "loss_fn?) or a step too large for the curvature")
        return "; ".join(reasons) or None

    def info(self) -> dict[str, Any]:
        """What the sweep reports: ``eps0``, ``fd_dtype``, ``fd_kinks``, ``fd_products``, ``fd_asymmetry`` (and
        ``fd_agreement``, ``fd_fallback``)."""
        out: dict[str, Any] = {"eps0": self.eps0, "fd_dtype": str(self.eval_dtype).replace("torch.", ""),
                               "fd_kinks": self.kinks, "fd_products": self.products, "fd_asymmetry": self.asymmetry()}
        if self.fallback is not None:
            out["fd_fallback"] = self.fallback
        if self.agreement is not None:
            out["fd_agreement"] = self.agreement
        return out

