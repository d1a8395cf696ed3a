"""The engine of layers with parametrized tensors (``torch.nn.utils.parametrize``: ``parametrizations.weight_norm``,
``spectral_norm``, ``orthogonal``, any ``register_parametrization``; the older hook-based ``torch.nn.utils.weight_norm``
and ``spectral_norm``) on a layer type an engine covers (``docs/per-sample-gradients.md``, the table of layers).

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
``parametrize.cached()`` the cached tensor; a hook-based norm's forward pre-hook sets it as a plain attribute, read in
the forward hook. The originals are read at each call, so the engine follows substituted
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
``(B, rows)`` by a ``rows × k_cols`` matrix made once a call. ``spectral_norm`` (of rows) of a Linear or convolution
likewise (:func:`_spectral_norm_blocks`), and a transposed convolution's ``weight_norm`` with the roles of its input
and output gradient swapped (:func:`_weight_norm_blocks`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm, _WeightNorm
from torch.nn.utils.spectral_norm import SpectralNorm as HookedSpectralNorm
from torch.nn.utils.weight_norm import WeightNorm as HookedWeightNorm

from .conv_transpose import ConvTransposeEngine
from .layers import Blocks, ConvEngine, LayerEngine, LinearEngine, _wide
from .projection import KroneckerProjector, dense
from .vjp import batched_grad

__all__ = ["ParametrizedEngine", "original_attrs", "parametrized_engine"]


def original_attrs(mod: nn.Module) -> dict[str, str]:
    """``{attribute path of an original: the tensor it makes}`` of ``mod``'s parametrizations: ``parametrize``'s
    (``parametrizations.weight.original``, or ``original0``, ``original1``, ... where the parametrization takes several
    tensors) and the older hook-based ``torch.nn.utils.weight_norm`` (``weight_g``, ``weight_v``) and ``spectral_norm``
    (``weight_orig``), whose forward pre-hook sets the effective tensor as a plain attribute before each forward."""
    out = {}
    if parametrize.is_parametrized(mod):
        for name, plist in mod.parametrizations.items():
            count = 1 if plist.is_tensor else plist.ntensors
            out.update({f"parametrizations.{name}.original" + ("" if plist.is_tensor else str(i)): name
                        for i in range(count)})
    for hook in mod._forward_pre_hooks.values():
        if isinstance(hook, HookedWeightNorm):
            out.update({f"{hook.name}_g": hook.name, f"{hook.name}_v": hook.name})
        elif isinstance(hook, HookedSpectralNorm):
            out[f"{hook.name}_orig"] = hook.name
    return out


class ParametrizedEngine(LayerEngine):
    """A parametrized layer: its base type's engine on the effective tensors, chained to the originals (module doc)."""

    def __init__(self, base: LayerEngine) -> None:
        self.base = base
        self._seen: dict[str, list[Tensor]] | None = None  # one module's (attach): the effective tensors of this call
        self._shapes: dict[tuple, KroneckerProjector] = {}

    def supports(self, mod: nn.Module, attr: str) -> bool:
        return self.base.supports(mod, original_attrs(mod).get(attr, attr))

    def attach(self, mod, records, active, targets, projector, memo=None):
        inner, extra = self.base.own(mod)  # the base engine's object for this module (a second input's pre-hook)
        own = ParametrizedEngine(inner)  # this module's: it holds what its parametrizations made in the current call
        tensors = {a.split(".")[1] for a in targets if a.startswith("parametrizations.")}

        def pre(module: nn.Module, args: tuple) -> None:
            own._seen = {} if active() else None

        def made(name: str):
            def hook(plist: nn.Module, args: tuple, out: Tensor) -> None:
                if own._seen is not None:
                    own._seen.setdefault(name, []).append(out)
            return hook

        handles = [mod.register_forward_pre_hook(pre), *extra]
        handles += [mod.parametrizations[t].register_forward_hook(made(t)) for t in sorted(tensors)]
        return handles + LayerEngine.attach(own, mod, records, active, targets, projector)

    def save(self, mod, inp, targets, projector, output=None):
        seen, self._seen = self._seen or {}, None
        made_by = original_attrs(mod)
        form = _factored(mod, self.base)
        if form is not None:  # factored: no effective weight needed
            plain = {a: n for a, n in targets.items() if a not in made_by}
            w = targets.get(form.attrs[-1])  # the original shaped as the weight: v, or a spectral norm's
            saved = self.base.save(mod, inp, {**plain, **({"weight": w} if w else {})}, projector, output)
            originals = {a: functools.reduce(getattr, a.split("."), mod).detach() for a in form.attrs}
            vectors = None if form.vectors is None else tuple(t.detach().clone() for t in form.vectors())
            return _Factored(saved, inp.detach(), originals, vectors)
        effective, shapes = {}, {}
        for attr in targets:
            name = made_by.get(attr)
            if name is None:
                shapes[attr] = tuple(getattr(mod, attr).shape)
            elif name not in effective:
                made = _effective(mod, name, seen)
                if made is not None:  # else the forward did not read it: no gradient (HookGradientCapture.verify tells)
                    effective[name], shapes[name] = made, tuple(made.shape)
        key = tuple(sorted(shapes.items()))
        if key not in self._shapes:  # whole: the base engine's blocks are the per-sample gradients themselves
            self._shapes[key] = KroneckerProjector(dict(key), dim=None)
        whole = self._shapes[key]
        originals = {a: functools.reduce(getattr, a.split("."), mod) for a in targets if made_by.get(a) in effective}
        return self.base.save(mod, inp, {n: n for n in shapes}, whole, output), effective, originals, whole, made_by

    def blocks(self, mod, saved, g_out, targets, projector) -> Blocks:
        if isinstance(saved, _Factored):
            form = _factored(mod, self.base)
            if form.kind == "spectral_norm":
                return _spectral_norm_blocks(mod, self.base, form, saved, g_out, targets, projector)
            return _weight_norm_blocks(mod, self.base, form, saved, g_out, targets, projector)
        inner, effective, originals, whole, made_by = saved
        batch = g_out.shape[0]
        out: Blocks = {}
        for name, block in self.base.blocks(mod, inner, g_out, {n: n for n in whole.block_of}, whole).items():
            grad = dense(block).reshape(batch, *whole.spec(name).shape)
            if name not in effective:  # a plain tensor of the layer (a bias beside a parametrized weight)
                out[targets[name]] = projector.project_tensor(targets[name], grad)
                continue
            attrs = [a for a in originals if made_by[a] == name]
            found = batched_grad(effective[name], [originals[a] for a in attrs], grad.to(effective[name].dtype),
                                 allow_unused=True)
            for attr, g in zip(attrs, found):
                if g is not None:
                    out[targets[attr]] = projector.project_tensor(targets[attr], _wide(g))
        return out


def _effective(mod: nn.Module, name: str, seen: dict[str, list[Tensor]]) -> Tensor | None:
    """The effective tensor ``name`` this forward of ``mod`` used: the one its ``ParametrizationList`` made while the
    layer ran, else the cached one (``parametrize.cached()``); a hook-based norm's plain attribute, set by its
    pre-hook for this forward."""
    if not (parametrize.is_parametrized(mod) and name in mod.parametrizations):
        return getattr(mod, name)
    made = seen.get(name)
    return made[-1] if made else parametrize._cache.get((id(mod), name))


def parametrized_engine(mod: nn.Module, engine_of: Any) -> LayerEngine | None:
    """The engine of a ``mod`` with parametrized tensors (:func:`original_attrs`) whose base type (the class
    ``parametrize`` derived its own from, or its own type) has a :attr:`~.layers.LayerEngine.chainable` engine
    (``engine_of(type)``), else ``None``."""
    if not original_attrs(mod):
        return None
    base = engine_of(type(mod).__bases__[0] if parametrize.is_parametrized(mod) else type(mod))
    if base is None or not base.chainable:  # an engine with hooks of its own (attention, recurrent layers)
        return None
    return _ENGINES.setdefault(id(base), ParametrizedEngine(base))


_ENGINES: dict[int, ParametrizedEngine] = {}




class _Factored(NamedTuple):
    """What the forward kept for a factored form (module doc): the layer engine's own, the input, the originals of this
    call (detached) and a spectral norm's vectors ``u``, ``v`` as its forward used them."""

    inner: Any
    x: Tensor
    originals: dict[str, Tensor]
    vectors: tuple[Tensor, Tensor] | None


class _Form(NamedTuple):
    """A parametrization with a factored form: ``weight_norm`` (``attrs``: ``g``'s and ``v``'s, ``dim`` 0 or -1) or
    ``spectral_norm`` (``attrs``: the original's; ``vectors()``: its ``u``, ``v`` now)."""

    kind: str
    attrs: tuple[str, ...]
    dim: int = 0
    vectors: Callable[[], tuple[Tensor, Tensor]] | None = None


def _factored(mod: nn.Module, base: LayerEngine) -> _Form | None:
    """The factored form of ``mod``'s weight parametrization, if it is the only one and has one here: a ``weight_norm``
    (``dim`` 0 or ``None``) of a Linear or (transposed) convolution, a ``spectral_norm`` (of rows: ``dim`` 0) of a
    Linear or convolution, ``parametrize``'s or the hook-based one; else ``None`` (the generic chain)."""
    kind = type(base)
    if parametrize.is_parametrized(mod):
        plist = mod.parametrizations["weight"] if "weight" in mod.parametrizations else None
        if plist is None or len(plist) != 1 or len(mod.parametrizations) != 1:
            return None
        p, orig = plist[0], "parametrizations.weight.original"
        if type(p) is _WeightNorm and p.dim in (0, -1) and kind in _NORMED:
            return _Form("weight_norm", (orig + "0", orig + "1"), p.dim)
        if type(p) is _SpectralNorm and p.dim == 0 and plist.original.dim() > 1 and kind in _SPECTRAL:
            return _Form("spectral_norm", (orig,), vectors=lambda: (p._u, p._v))
        return None
    hooks = [h for h in mod._forward_pre_hooks.values() if isinstance(h, (HookedWeightNorm, HookedSpectralNorm))]
    if len(hooks) != 1 or hooks[0].name != "weight":
        return None
    h = hooks[0]
    if type(h) is HookedWeightNorm and h.dim in (0, -1) and kind in _NORMED:
        return _Form("weight_norm", ("weight_g", "weight_v"), h.dim)
    if type(h) is HookedSpectralNorm and h.dim == 0 and mod.weight_orig.dim() > 1 and kind in _SPECTRAL:
        return _Form("spectral_norm", ("weight_orig",), vectors=lambda: (mod.weight_u, mod.weight_v))
    return None


_NORMED = (LinearEngine, ConvEngine, ConvTransposeEngine)
_SPECTRAL = (LinearEngine, ConvEngine)


def _spectral_norm_blocks(mod: nn.Module, base: LayerEngine, form: _Form, saved: _Factored, g_out: Tensor,
                          targets: dict[str, str], projector: KroneckerProjector) -> Blocks:
    """Blocks of a spectral-normed Linear or convolution's original ``W`` (and a plain bias), factored: with the
    forward's ``u``, ``v`` (constants of the normalisation) and ``σ = uᵀ W v``, ``∂ℓ_b/∂W = G_b / σ − c_b u vᵀ``,
    ``c_b = ⟨G_b, W⟩ / σ² = Σ_l g_l · (W x_l) / σ²`` (one more forward of the layer with ``W``, no bias); projected:
    the layer engine's block of ``g / σ`` minus ``c_b (P_rᵀ u) ⊗ (P_cᵀ v)``."""
    (attr,) = form.attrs
    w = _wide(saved.originals[attr])
    u, v = (_wide(t) for t in saved.vectors)
    rows = w.shape[0]
    sigma = u @ (w.reshape(rows, -1) @ v)
    g, x = _wide(g_out), _wide(saved.x)
    out: Blocks = {}
    plain = {a: n for a, n in targets.items() if a != attr}
    if plain:
        out.update(base.blocks(mod, saved.inner, g, plain, projector))
    if attr in targets:
        name = targets[attr]
        applied = F.linear(x, w) if isinstance(mod, nn.Linear) else mod._conv_forward(x, w, None)
        c = (g * applied).reshape(g.shape[0], -1).sum(1) / sigma.square()
        scaled = base.blocks(mod, saved.inner, g / sigma, {"weight": name}, projector)[name]
        p_r, p_c = projector.side_matrices(name, g.dtype, g.device)
        left, right = (u if p_r is None else u @ p_r), (v if p_c is None else v @ p_c)
        out[name] = dense(scaled) - c[:, None] * (left[:, None] * right[None, :]).reshape(1, -1)
    return out


def _weight_norm_blocks(mod: nn.Module, base: LayerEngine, form: _Form, saved: _Factored, g_out: Tensor,
                        targets: dict[str, str], projector: KroneckerProjector) -> Blocks:
    """Blocks of ``g``, ``v`` (and a plain bias) of a weight-normed Linear or convolution, factored (module doc). A
    transposed convolution's rows are its input channels: ``diag(s) G_W`` is its engine's block of the input scaled by
    ``s``, and ``v̂`` applied at every input position is the convolution of the output gradient with ``v̂`` (the one it
    is the adjoint of, cropped to the input's positions as its engine's columns)."""
    (g_name, v_name), dim = form.attrs, form.dim
    g_w, v = _wide(saved.originals[g_name]), _wide(saved.originals[v_name])
    rows = v.shape[0]
    v_mat = v.reshape(rows, -1)
    norm = v_mat.norm(dim=1) if dim == 0 else v_mat.norm().expand(rows)
    s, v_hat = g_w.reshape(-1).expand(rows) / norm, (v_mat / norm[:, None]).reshape(v.shape)
    g = _wide(g_out)
    linear = isinstance(mod, nn.Linear)  # channels last; a convolution's at dimension 1
    out: Blocks = {}
    plain = {a: n for a, n in targets.items() if a not in (g_name, v_name)}
    if plain:
        out.update(base.blocks(mod, saved.inner, g, plain, projector))
    x = _wide(saved.x)
    transposed = isinstance(mod, nn.modules.conv._ConvTransposeNd)
    if transposed:  # Σ_l x_l ⊙ (v̂ unfold(g))_l
        applied = ConvEngine._conv[x.dim() - 2](g, v_hat, None, mod.stride, mod.padding, mod.dilation, mod.groups)
        applied = applied[(slice(None), slice(None), *(slice(0, n) for n in x.shape[2:]))]
        a = (x * applied).flatten(2).sum(2)
    else:  # Σ_l g_l ⊙ (v̂ x)_l
        applied = F.linear(x, v_hat) if linear else mod._conv_forward(x, v_hat, None)
        a = (g * applied).reshape(g.shape[0], -1, rows).sum(1) if linear else (g * applied).flatten(2).sum(2)
    if dim == -1:
        a = a.sum(1, keepdim=True).expand(-1, rows)
    if g_name in targets:
        out[targets[g_name]] = projector.project_tensor(targets[g_name], (a if dim == 0 else a[:, :1]).reshape(-1, *g_w.shape))
    if v_name in targets:
        name = targets[v_name]
        scale = s if linear else s.reshape(rows, *([1] * (g.dim() - 2)))
        if transposed:
            scaled = base.blocks(mod, saved.inner * scale, g, {"weight": name}, projector)[name]
        else:
            scaled = base.blocks(mod, saved.inner, g * scale, {"weight": name}, projector)[name]
        p_r, p_c = projector.side_matrices(name, g.dtype, g.device)
        c = v_hat.reshape(rows, -1) if p_c is None else v_hat.reshape(rows, -1) @ p_c  # (rows, k_cols)
        f = a * s  # (B, rows)
        # P_rᵀ diag(f_b) c = f_b (P_r ⊙ c row by row), the row-wise Kronecker product made once (rows x k_r k_c): one
        # (B, rows) x (rows, k) product (an einsum of the three took 8.6 ms a step on the weight-normed MLP)
        last = f[:, :, None] * c if p_r is None else f @ (p_r[:, :, None] * c[:, None, :]).reshape(rows, -1)
        out[name] = dense(scaled) - last.reshape(g.shape[0], -1)
    return out
