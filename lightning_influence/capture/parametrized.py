"""The engine of layers with parametrized tensors (``torch.nn.utils.parametrize``: ``parametrizations.weight_norm``,
``spectral_norm``, ``orthogonal``, any ``register_parametrization``) on a layer type an engine covers
(``docs/per-sample-gradients.md``, the table of layers).

A parametrized layer computes with an effective tensor ``W = f(originals)`` that its parametrization makes at each read
of ``mod.weight``; the tracked parameters are the originals (``weight.parametrizations.weight.original0``, ...). The
layer's own engine gives each sample's gradient with respect to ``W`` (computed whole here: a projector without
projection); the chain rule takes it to the originals, sample by sample, by one batched vector-Jacobian product through
the parametrization's own graph, ``torch.autograd.grad(W, originals, G_W, is_grads_batched=True)``
(:func:`.vjp.batched_grad`, shared with the raw-parameter engine), in the layer output's gradient hook: the
parametrization's nodes run after the layer's in the backward, so the tensors they saved are still there. Those
gradients are then projected as any other engine's. ``W`` is the very tensor the forward used: a forward hook on the
parametrization (its ``ParametrizationList``) keeps it while the layer runs, so nothing is recomputed (a spectral norm's
power iteration in train mode updates its buffers at each read: a second read would change training), and under
``parametrize.cached()`` the cached tensor. The originals are read at each call, so the engine follows substituted
tensors (``functional_call``: the tracker's own passes).

Cost: ``G_W`` is formed whole, ``B · W.numel()`` values a call (``vmap`` forms it too, with a whole forward and backward
per sample besides), and the batched product runs the parametrization's backward once for the batch (one backward per
sample where a formula has no batching rule).

``weight_norm`` of a Linear or convolution's weight (norms per output channel, ``dim=0``, or of the whole tensor,
``dim=None``) has a factored form instead, without ``G_W`` (:func:`_weight_norm_blocks`): with ``s = g / ‖v‖`` and
``v̂ = v / ‖v‖`` per row, ``∂ℓ/∂g = a = (G_W ⊙ v̂)`` summed along the row and ``∂ℓ/∂v = diag(s) G_W − diag(s ⊙ a) v̂``.
``diag(s) G_W`` is the layer's own gradient for the output gradient scaled by ``s`` (the layer engine's projected block,
``P_rᵀ diag(s) G_W P_c``), ``a`` the sum over positions of ``g ⊙ (v̂ x)`` (the layer applied to its input with the
weight ``v̂``, no bias: one more forward of the layer), and the last term ``P_rᵀ diag(s ⊙ a) (v̂ P_c)`` a product of
``(B, rows)`` by a ``rows × k_cols`` matrix made once a call.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _WeightNorm

from .layers import Blocks, ConvEngine, LayerEngine, LinearEngine, _wide
from .projection import KroneckerProjector, dense
from .vjp import batched_grad

__all__ = ["ParametrizedEngine", "original_attrs"]


def original_attrs(mod: nn.Module) -> list[str]:
    """The attribute paths of a parametrized module's originals (``parametrizations.weight.original``, or
    ``original0``, ``original1``, ... where the parametrization takes several tensors)."""
    out = []
    for name, plist in mod.parametrizations.items():
        count = 1 if plist.is_tensor else plist.ntensors
        out += [f"parametrizations.{name}.original" + ("" if plist.is_tensor else str(i)) for i in range(count)]
    return out


def _tensor_of(attr: str) -> str:
    """``parametrizations.weight.original0`` -> ``weight``; a plain attribute is itself."""
    return attr.split(".")[1] if attr.startswith("parametrizations.") else attr


class ParametrizedEngine(LayerEngine):
    """A parametrized layer: its base type's engine on the effective tensors, chained to the originals (module doc)."""

    def __init__(self, base: LayerEngine) -> None:
        self.base = base
        self._seen: dict[str, list[Tensor]] | None = None  # one module's (attach): the effective tensors of this call
        self._shapes: dict[tuple, KroneckerProjector] = {}

    def supports(self, mod: nn.Module, attr: str) -> bool:
        return self.base.supports(mod, _tensor_of(attr))

    def attach(self, mod, records, active, targets, projector, memo=None):
        own = ParametrizedEngine(self.base)  # this module's: it holds what its parametrizations made in the current call
        tensors = {_tensor_of(a) for a in targets if a.startswith("parametrizations.")}

        def pre(module: nn.Module, args: tuple) -> None:
            own._seen = {} if active() else None

        def made(name: str):
            def hook(plist: nn.Module, args: tuple, out: Tensor) -> None:
                if own._seen is not None:
                    own._seen.setdefault(name, []).append(out)
            return hook

        handles = [mod.register_forward_pre_hook(pre)]
        handles += [mod.parametrizations[t].register_forward_hook(made(t)) for t in sorted(tensors)]
        return handles + LayerEngine.attach(own, mod, records, active, targets, projector)

    def save(self, mod, inp, targets, projector, output=None):
        seen, self._seen = self._seen or {}, None
        if _weight_norm_dim(mod, self.base) is not None:  # factored: no effective weight needed
            plain = {a: n for a, n in targets.items() if a == _tensor_of(a)}
            v = targets.get(_V)
            saved = self.base.save(mod, inp, {**plain, **({"weight": v} if v else {})}, projector, output)
            originals = {a: functools.reduce(getattr, a.split("."), mod).detach() for a in (_G, _V)}
            return _Factored(saved, inp.detach(), originals)
        effective, shapes = {}, {}
        for attr in targets:
            name = _tensor_of(attr)
            if name == attr:
                shapes[name] = tuple(getattr(mod, name).shape)
                continue
            made = seen.get(name) or ([parametrize._cache[(id(mod), name)]] if (id(mod), name) in parametrize._cache else [])
            if not made:  # the forward did not read it: no gradient to give (HookGradientCapture.verify would tell)
                continue
            effective[name] = made[-1]
            shapes[name] = tuple(made[-1].shape)
        key = tuple(sorted(shapes.items()))
        if key not in self._shapes:  # whole: the base engine's blocks are the per-sample gradients themselves
            self._shapes[key] = KroneckerProjector(dict(key), dim=None)
        whole = self._shapes[key]
        originals = {a: functools.reduce(getattr, a.split("."), mod) for a in targets if _tensor_of(a) in effective}
        base_targets = {name: name for name in shapes}
        return self.base.save(mod, inp, base_targets, whole, output), effective, originals, whole

    def blocks(self, mod, saved, g_out, targets, projector) -> Blocks:
        if isinstance(saved, _Factored):
            return _weight_norm_blocks(mod, self.base, saved, g_out, targets, projector)
        inner, effective, originals, whole = saved
        batch = g_out.shape[0]
        out: Blocks = {}
        for name, block in self.base.blocks(mod, inner, g_out, {n: n for n in whole.block_of}, whole).items():
            grad = dense(block).reshape(batch, *whole.spec(name).shape)
            if name not in effective:  # a plain tensor of the layer (a bias beside a parametrized weight)
                out[targets[name]] = projector.project_tensor(targets[name], grad)
                continue
            attrs = [a for a in originals if _tensor_of(a) == name]
            found = batched_grad(effective[name], [originals[a] for a in attrs], grad.to(effective[name].dtype),
                                 allow_unused=True)
            for attr, g in zip(attrs, found):
                if g is not None:
                    out[targets[attr]] = projector.project_tensor(targets[attr], _wide(g))
        return out


def parametrized_engine(mod: nn.Module, engine_of: Any) -> LayerEngine | None:
    """The engine of a parametrized ``mod`` whose base type (the class ``parametrize`` derived its own from) has an
    engine with the default hooks (``engine_of(type)``), else ``None``."""
    if not parametrize.is_parametrized(mod):
        return None
    base = engine_of(type(mod).__bases__[0])
    if base is None or type(base).attach is not LayerEngine.attach:  # an engine with hooks of its own (attention)
        return None
    return _ENGINES.setdefault(id(base), ParametrizedEngine(base))


_ENGINES: dict[int, ParametrizedEngine] = {}


_G, _V = "parametrizations.weight.original0", "parametrizations.weight.original1"  # weight_norm's g and v


class _Factored(NamedTuple):
    """What the forward kept for the factored ``weight_norm`` (module doc): the layer engine's own, the input, and the
    originals ``g``, ``v`` of this call (detached)."""

    inner: Any
    x: Tensor
    originals: dict[str, Tensor]


def _weight_norm_dim(mod: nn.Module, base: LayerEngine) -> int | None:
    """The ``dim`` (0 or -1: the whole tensor) of a ``weight_norm`` that is the only parametrization of a Linear or
    convolution's weight, else ``None`` (the generic chain)."""
    plist = mod.parametrizations["weight"] if "weight" in mod.parametrizations else None
    if plist is None or len(plist) != 1 or type(plist[0]) is not _WeightNorm or type(base) not in (LinearEngine, ConvEngine):
        return None
    return plist[0].dim if plist[0].dim in (0, -1) else None


def _weight_norm_blocks(mod: nn.Module, base: LayerEngine, saved: _Factored, g_out: Tensor, targets: dict[str, str],
                        projector: KroneckerProjector) -> Blocks:
    """Blocks of ``g``, ``v`` (and a plain bias) of a weight-normed Linear or convolution, factored (module doc)."""
    g_w, v = (_wide(saved.originals[a]) for a in (_G, _V))
    rows, dim = v.shape[0], _weight_norm_dim(mod, base)
    v_mat = v.reshape(rows, -1)
    norm = v_mat.norm(dim=1) if dim == 0 else v_mat.norm().expand(rows)
    s, v_hat = g_w.reshape(-1).expand(rows) / norm, (v_mat / norm[:, None]).reshape(v.shape)
    g = _wide(g_out)
    linear = isinstance(mod, nn.Linear)  # channels last; a convolution's at dimension 1
    out: Blocks = {}
    plain = {a: n for a, n in targets.items() if a == _tensor_of(a)}
    if plain:
        out.update(base.blocks(mod, saved.inner, g, plain, projector))
    x = _wide(saved.x)
    applied = F.linear(x, v_hat) if linear else mod._conv_forward(x, v_hat, None)  # v̂ x at every position
    a = (g * applied).reshape(g.shape[0], -1, rows).sum(1) if linear else (g * applied).flatten(2).sum(2)
    if dim == -1:
        a = a.sum(1, keepdim=True).expand(-1, rows)
    if _G in targets:
        out[targets[_G]] = projector.project_tensor(targets[_G], (a if dim == 0 else a[:, :1]).reshape(-1, *g_w.shape))
    if _V in targets:
        name = targets[_V]
        scale = s if linear else s.reshape(rows, *([1] * (g.dim() - 2)))
        scaled = base.blocks(mod, saved.inner, g * scale, {"weight": name}, projector)[name]
        p_r, p_c = projector.side_matrices(name, g.dtype, g.device)
        c = v_hat.reshape(rows, -1) if p_c is None else v_hat.reshape(rows, -1) @ p_c  # (rows, k_cols)
        f = a * s  # (B, rows)
        # P_rᵀ diag(f_b) c = f_b (P_r ⊙ c row by row), the row-wise Kronecker product made once (rows x k_r k_c): one
        # (B, rows) x (rows, k) product (an einsum of the three took 8.6 ms a step on the weight-normed MLP)
        last = f[:, :, None] * c if p_r is None else f @ (p_r[:, :, None] * c[:, None, :]).reshape(rows, -1)
        out[name] = dense(scaled) - last.reshape(g.shape[0], -1)
    return out
