"""Hessian-vector products: finite differences of first-order gradients, and exact.

The finite-difference form (docs/influence-math.md §3)::

    H v ≈ ‖v‖ · (∇L(θ + ε v̂) − ∇L(θ − ε v̂)) / (2ε),   v̂ = v/‖v‖,   ε = ε_0 (1 + ‖θ‖)/√p

needs only first-order gradients, so it applies to anything that maps parameters to
gradients: a flat batch gradient gives ``H v``; per-sample projected gradients give every
sample's projected ``H_z v`` in one pass. Its truncation error is ``O(ε²)``. The forward
difference ``‖v‖ (∇L(θ + ε v̂) − ∇L(θ))/ε`` has an ``O(ε)`` truncation error and twice the
rounding error at the same ``ε``, but when ``∇L(θ)`` is already known (the training step's
own per-sample gradients) it costs one gradient pass instead of two. Parameters are passed
as ``{name: tensor}`` dicts and never edited in place.

In float32 the rounding error ``~u/ε`` usually dominates at ``ε_0 = 1e-3`` (measured on a
784-512-512-10 tanh MLP, batch 32, per-sample ``H_z Ĝ``: 0.6% relative error central, 1.2%
forward; 0.2% / 0.4% at ``ε_0 = 3e-3``). With piecewise-linear activations (ReLU) a
perturbation that moves a unit across its kink changes a sample's gradient by a jump, not
by ``ε H_z v``, and that sample's product is off by ``O(1/ε)``; larger ``ε`` makes it more
frequent. The same MLP with ReLU, batch 64: at ``ε_0 = 1e-3`` no sample was hit (central
median error 2%), at ``3e-3`` 2% of the samples were (errors up to 870x), at ``1e-2`` 17%.
The two one-sided differences disagree exactly on the samples hit: ``kink_guard`` keeps the
one that did not cross (0.5 in the tracker; measured there: 17% of the rows flagged at
``ε_0 = 1e-2``, worst error 0.4% after the guard; no row flagged at ``1e-3`` or ``3e-4``).
Diff-In's offline products use it too (per-sample and batch, with :func:`guarded_difference`), and
DIT's batch products, which take their differences in float64 at a step small enough that few
products cross a kink at all (:mod:`lightning_influence.estimators.fd`, docs/replay.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor
from torch.func import grad, jvp

SCHEMES = ("central", "forward")
KINK_GUARD = 0.5  # default threshold of ``kink_guard`` (tracker rows, Diff-In's and DIT's offline products)
KINK_SHARE_LIMIT = 0.2  # more offline products than this crossing a kink: ε is too large, the scores are flagged
# (measured on a ReLU CNN, float32: 8% of Diff-In's products at the default ε, 35% at 10x; docs/diffin.md)

__all__ = ["SCHEMES", "KINK_GUARD", "KINK_SHARE_LIMIT", "asymmetry", "default_eps0", "guarded_difference", "tracker_eps0", "flatten", "unflatten", "parameter_epsilon", "fd_directional_derivative", "norm_of_norms",
           "exact_hvp"]


def flatten(d: Mapping[str, Tensor], names: Iterable[str]) -> Tensor:
    """Concatenate ``d[name].reshape(-1)`` over ``names`` into one vector."""
    return torch.cat([d[n].reshape(-1) for n in names])


def unflatten(vec: Tensor, shapes: Mapping[str, Sequence[int]]) -> dict[str, Tensor]:
    """Inverse of :func:`flatten`: split ``vec`` into tensors of ``shapes`` (in order)."""
    out, start = {}, 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        out[name] = vec[start : start + n].reshape(tuple(shape))
        start += n
    if start != vec.numel():
        raise ValueError(f"vector has {vec.numel()} entries, shapes need {start}")
    return out


def _norm_tensor(d: Mapping[str, Tensor]) -> Tensor:
    """``‖d‖`` as a float64 0-d tensor on the tensors' device (no host synchronisation)."""
    # native precision per tensor: float64 parameters give float64 norms; float32 ones lose ~1e-7 relative, far
    # below what the finite differences themselves introduce, at a fraction of the cost of upcasting
    return norm_of_norms(torch.stack([torch.linalg.vector_norm(t.detach()) for t in d.values()]))


def norm_of_norms(norms: Tensor) -> Tensor:
    """``‖d‖`` (float64 0-d) from the stacked norms of its tensors, e.g. ones a caller computed already."""
    return torch.linalg.vector_norm(norms.double())


def _norm(d: Mapping[str, Tensor]) -> float:
    return float(_norm_tensor(d))


def _epsilon(params: Mapping[str, Tensor], eps0: float) -> Tensor:
    p = sum(t.numel() for t in params.values())
    return eps0 * (1.0 + _norm_tensor(params)) / math.sqrt(p)


def default_eps0(dtype: torch.dtype) -> float:
    """The finite-difference ``ε_0`` for parameters of ``dtype``: 1e-5 in float64, 1e-3 in float32 (measured above),
    and ``u^{1/3}`` (the central difference's balance of truncation and rounding) for half precisions."""
    if dtype == torch.float64:
        return 1e-5
    if dtype == torch.float32:
        return 1e-3
    return float(torch.finfo(dtype).eps) ** (1 / 3)


def tracker_eps0(dtype: torch.dtype) -> float:
    """The tracker's default ``ε_0`` for per-sample gradients computed in ``dtype`` (the tracked parameters'; under
    autocast its HVP passes run without it, ``OwnPasses.hvp_products``): 1e-3 in float32 and float64 (measured above),
    :func:`default_eps0` (``u^{1/3}``) for float16 parameters (``"16-true"``), whose rounding ``~u/ε`` swamps the
    difference at 1e-3: on a digits tanh MLP, against float64 products at the same ``θ``, 5.4x off at 1e-3, 0.044 at
    ``u^{1/3}`` (docs/replay.md, "Mixed precision")."""
    return 1e-3 if dtype in (torch.float32, torch.float64) else default_eps0(dtype)


def parameter_epsilon(params: Mapping[str, Tensor], eps0: float = 1e-3) -> float:
    """Step size ``ε = eps0 · (1 + ‖θ‖) / √p`` scaled to the parameters (θ = all of ``params``)."""
    return float(_epsilon(params, eps0))


def fd_directional_derivative(
    fn: Callable[[dict[str, Tensor]], Tensor],
    params: Mapping[str, Tensor],
    direction: Mapping[str, Tensor],
    eps0: float = 1e-3,
    scheme: str = "central",
    at: Tensor | None = None,
    kink_guard: float | None = None,
    on_kink: Callable[[Tensor], None] | None = None,
    on_asymmetry: Callable[[Tensor], None] | None = None,
    direction_norm: Tensor | None = None,
    workspace: dict[str, Tensor] | None = None,
) -> tuple[Tensor, float]:
    """Finite difference of ``fn`` along ``direction``, scaled by ``‖v‖``.

    ``"central"``: ``(fn(θ+εv̂) − fn(θ−εv̂))/(2ε) · ‖v‖``; ``"forward"``: ``(fn(θ+εv̂) −
    fn(θ))/ε · ‖v‖``, with ``fn(θ)`` taken from ``at`` when given (it must be ``fn`` at
    ``params`` with the current RNG state, e.g. the step's own per-sample gradients).
    With ``fn`` mapping parameters to gradients this is a Hessian-vector product (per
    sample if ``fn`` returns per-sample gradients). ``kink_guard`` (central only; ``fn(θ)``
    from ``at`` or one more evaluation): a row whose one-sided differences
    ``(fn(θ+εv̂) − fn(θ))/ε`` and ``(fn(θ) − fn(θ−εv̂))/ε`` differ by more than ``kink_guard``
    times the larger of their norms takes the one of smaller norm: the other side crossed a
    kink (ReLU) and holds a jump (``on_kink(mask)`` receives the ``(rows,)`` mask of those rows). ``direction_norm``:
    ``‖direction‖`` as :func:`_norm_tensor` computes it, when the caller has it. ``direction`` may cover a subset of ``params``; the others
    stay fixed. ``workspace``: a dict, kept by the caller across calls, in which the perturbed parameters are written
    (filled on first use; both sides share it, so ``fn`` must not keep its inputs): without it every call allocates a
    parameter-sized tensor per side, which on a CPU costs page faults (a third of the perturbation's time on the
    benchmark MLP). ``fn`` gets detached tensors, ``params`` are never written, and every
    evaluation starts from the same RNG state (dropout masks agree), which is restored
    afterwards so the caller's random stream is untouched. A zero direction gives zeros.
    Returns ``(result, ε)``, ``ε`` a float64 0-d tensor on the parameters' device: nothing here
    makes the host wait for the device.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if kink_guard is not None and scheme != "central":
        raise ValueError("kink_guard compares the two one-sided differences: it needs scheme='central'")
    unknown = set(direction) - set(params)
    if unknown:
        raise KeyError(f"direction has names not in params: {sorted(unknown)}")
    eps = _epsilon(params, eps0)
    base = {n: t.detach() for n, t in params.items()}
    v_norm = _norm_tensor(direction) if direction_norm is None else direction_norm
    # a zero direction: every evaluation is at θ, the differences are exact zeros (times a finite scale)
    unit = eps / torch.clamp(v_norm, min=torch.finfo(torch.float64).tiny)
    cuda = sorted({t.device.index or 0 for t in base.values() if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        cpu_state = torch.get_rng_state()
        cuda_states = [torch.cuda.get_rng_state(d) for d in cuda]

        out = {} if workspace is None else workspace
        for n in direction:  # (re)made only when missing or of another shape, dtype or device
            if n not in out or out[n].shape != base[n].shape or out[n].dtype != base[n].dtype or out[n].device != base[n].device:
                out[n] = torch.empty_like(base[n], memory_format=torch.contiguous_format)

        def at_offset(sign: float) -> Tensor:
            torch.set_rng_state(cpu_state)
            for d, state in zip(cuda, cuda_states):
                torch.cuda.set_rng_state(state, d)
            if sign == 0.0:
                return fn(base)
            # θ ± (ε/‖v‖) v in one fused pass per tensor (no ε v̂ temporary): θ − ε v̂ is bit for bit θ + v · (−ε/‖v‖)
            step = {dtype: unit.to(dtype) * sign for dtype in {base[n].dtype for n in direction}}
            point = dict(base)
            for n, v in direction.items():
                point[n] = torch.addcmul(base[n], v.detach().to(base[n].dtype), step[base[n].dtype], out=out[n])
            return fn(point)

        plus = at_offset(1.0)
        # each result is scaled in place: one row-sized temporary fewer (allocations cost page faults on a CPU)
        if scheme == "forward":
            return torch.sub(plus, at_offset(0.0) if at is None else at).mul_(v_norm / eps), eps
        minus = at_offset(-1.0)
        if kink_guard is None:
            return torch.sub(plus, minus).mul_(v_norm / (2.0 * eps)), eps
        at = at_offset(0.0) if at is None else at
    out, kink = guarded_difference(plus - at, at - minus, kink_guard, on_asymmetry)
    if on_kink is not None:
        on_kink(kink)  # the rows whose one-sided differences disagreed (counted by the estimators, docs/diffin.md)
    return out.mul_(v_norm / eps), eps


def _rows(fwd: Tensor, bwd: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Two one-sided differences as ``(rows, ·)`` matrices, with their row norms."""
    rows = fwd.shape[0] if fwd.ndim > 1 else 1
    f, b = fwd.reshape(rows, -1), bwd.reshape(rows, -1)
    return f, b, torch.linalg.vector_norm(f, dim=1), torch.linalg.vector_norm(b, dim=1)


def _asymmetry(diff: Tensor, nf: Tensor, nb: Tensor) -> Tensor:
    """``‖f − b‖ / max(‖f‖, ‖b‖)`` per row from ``diff = f − b`` and the rows' norms."""
    scale = torch.maximum(nf, nb)
    return torch.linalg.vector_norm(diff, dim=1) / scale.clamp_min(torch.finfo(scale.dtype).tiny)


def asymmetry(fwd: Tensor, bwd: Tensor) -> Tensor:
    """``‖f − b‖ / max(‖f‖, ‖b‖)`` per row of two one-sided differences (0 where both vanish)."""
    f, b, nf, nb = _rows(fwd, bwd)
    return _asymmetry(f - b, nf, nb)


def guarded_difference(fwd: Tensor, bwd: Tensor, tau: float,
                       on_asymmetry: Callable[[Tensor], None] | None = None) -> tuple[Tensor, Tensor]:
    """Mean of the one-sided differences per row, or the smaller one where they disagree (see kink_guard);
    also the ``(rows,)`` bool mask of the rows that disagreed (a kink was crossed). ``on_asymmetry`` receives
    the rows' :func:`asymmetry`, computed once with the norms the guard needs."""
    f, b, nf, nb = _rows(fwd, bwd)
    out = f - b  # the one row-sized buffer: f − b for the asymmetry, then the result (inputs never written)
    asym = _asymmetry(out, nf, nb)
    if on_asymmetry is not None:
        on_asymmetry(asym)
    kink = asym > tau
    # per row f·w_f + b·w_b: (½, ½) is (f + b)/2 bit for bit (halving is exact), a kink row takes (1, 0) or (0, 1),
    # exactly f or b (both are finite there: the asymmetry is); two passes over the rows instead of four
    smaller = (nf <= nb).to(out.dtype)
    half = torch.full_like(smaller, 0.5)
    w_f, w_b = torch.where(kink, smaller, half)[:, None], torch.where(kink, 1 - smaller, half)[:, None]
    torch.mul(f, w_f, out=out).addcmul_(b, w_b)
    return out.reshape(fwd.shape), kink


def exact_hvp(
    loss: Callable[[dict[str, Tensor]], Tensor], params: Mapping[str, Tensor], v: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Exact ``H v`` of scalar ``loss(params)`` by forward-over-reverse (``jvp`` of ``grad``), attention through its
    math kernel (``step.micro.exact_kernels``, as every HVP pass: the fused ones have no forward AD).

    ``v`` may cover a subset of ``params`` (missing entries are zero).
    """
    from lightning_influence.step.micro import exact_kernels  # step imports capture: here, not at the top

    primals = {n: t.detach() for n, t in params.items()}
    tangents = {n: v[n].detach().to(t.dtype) if n in v else torch.zeros_like(t) for n, t in primals.items()}
    with exact_kernels():
        _, hv = jvp(grad(loss), (primals,), (tangents,))
    return hv
