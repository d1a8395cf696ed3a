"""Projected per-sample gradients of raw parameters used directly in the forward, from the step's own backward.

A tracked ``nn.Parameter`` that no layer engine (:mod:`.layers`) covers and that a model uses by itself: a ViT's
position table ``x + self.pos_embed`` (or a slice ``self.pos_embed[:, :T]``), its class token
``self.cls_token.expand(B, -1, -1)`` (then ``torch.cat``: ordinary autograd), LayerScale's ``x * self.gamma``
(``self.gamma[:, None, None] * x``). While the hooked forward runs, a :class:`~torch.overrides.TorchFunctionMode`
(:class:`RawWatch`, installed only while some such parameter is tracked) follows every operation that takes a
watched parameter ``P`` or a tensor derived from watched parameters alone (any op whose tensor arguments are all
such tensors: views, slices, casts, ``P * 2``). A *use* is an op that meets the batch:

- ``x + V``, ``x - V``, ``V - x`` (``alpha`` too), ``x * V``, ``x / V``, with ``x`` batch-first (``x.shape[0] == B``,
  as many dimensions as the output) and ``V`` not covering the batch dimension (fewer dimensions, or size 1 there):
  the output's gradient hook gets ``G`` and sample ``b``'s gradient with respect to ``V`` is ``G_b`` (``G_b * x_b``
  for a product, ``-G_b * x_b / V²`` for a quotient) summed over the dimensions ``V`` is broadcast along;
- ``V.expand(B, ...)`` (``broadcast_to``, ``expand_as``) to the batch: the same with an implicit ``x = 0``.

The gradient with respect to ``V`` goes back to the parameters ``V`` derives from by the derivation chain's VJP,
``torch.autograd.grad(V, P, G_V, is_grads_batched=True)`` (:func:`.vjp.batched_grad`; nothing to do where ``V`` is ``P``), then is
projected as any other engine's block. Any other op that takes such a tensor together with anything else, a use
whose output needs no gradient while its operand does, or an in-place change of ``V`` demotes the parameter
(:attr:`RawWatch.bad`): vmap computes it, as for a layer run without the batch first. Math:
``docs/per-sample-gradients.md`` (Raw parameters).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

from .projection import KroneckerProjector
from .vjp import batched_grad

__all__ = ["RawWatch", "raw_candidates"]

_ADD = {torch.add, Tensor.add, Tensor.add_}
_SUB = {torch.sub, torch.subtract, Tensor.sub, Tensor.subtract, Tensor.sub_}
_MUL = {torch.mul, torch.multiply, Tensor.mul, Tensor.multiply}
_DIV = {torch.div, torch.divide, torch.true_divide, Tensor.div, Tensor.divide, Tensor.true_divide}
_EXPAND = {Tensor.expand, Tensor.expand_as, torch.broadcast_to, Tensor.broadcast_to}
_IN_PLACE_SUMS = {Tensor.add_, Tensor.sub_}
_PRODUCTS = {torch.matmul, Tensor.matmul, torch.nn.functional.linear}  # x @ V, F.linear(x, V[, b]): V a (in, out) or
# (out, in) matrix, a LoRA factor given as a raw parameter


def _in_place(func: Callable, kwargs: dict) -> bool:
    """Whether ``func`` writes into its first argument (``add_``, ``x += ...``, ``copy_``) or into ``out=``."""
    name = getattr(func, "__name__", "")
    return (name.endswith("_") and not name.endswith("__")) or kwargs.get("out") is not None


def raw_candidates(model: nn.Module, names: Sequence[str]) -> list[str]:
    """The names in ``names`` (no layer engine covers them) that :class:`RawWatch` may take: parameters of modules
    other than torch.nn's own (whose forwards use them through functions it does not know: an ``LSTMCell``'s stay on
    vmap from the start)."""
    owner = {}
    for mod in model.modules():
        for _, p in mod.named_parameters(recurse=False):
            owner.setdefault(id(p), mod)
    params = dict(model.named_parameters())
    return [n for n in names if not type(owner[id(params[n])]).__module__.startswith("torch.nn")]


class RawWatch(TorchFunctionMode):
    """Watches the forward for uses of raw parameters (module doc) and turns their gradients into projected blocks.

    ``records``: one ``[(roots, their tensors, V, kind, scale, x), blocks, output edge]`` per use (``blocks`` filled
    by the output's gradient hook); ``bad``: parameters met in an op this engine does not know (the caller demotes
    them).
    """

    def __init__(self, names: Sequence[str], projector: KroneckerProjector, active: Callable[[], bool],
                 edge: Callable[[Tensor], Any], wide: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.names, self.projector, self.active = list(names), projector, active
        self._edge, self._wide = edge, wide
        self.records: list[list[Any]] = []
        self.bad: set[str] = set()
        self.batch = 0
        self._derived: dict[int, tuple[Tensor, tuple[str, ...]]] = {}  # id -> (tensor, the parameters it derives from)
        self._roots: dict[str, Tensor] = {}
        self._pushed = False

    # ------------------------------------------------------------------ the stack
    def start(self, batch: int, tensors: Mapping[str, Tensor]) -> None:
        """Push the mode for a forward of ``batch`` samples in which ``tensors[name]`` is the parameter ``name``."""
        self.stop()
        self.batch = batch
        self._roots = {n: tensors[n] for n in self.names}
        self._derived = {id(t): (t, (n,)) for n, t in self._roots.items()}
        torch._C._push_on_torch_function_stack(self)
        self._pushed = True

    def stop(self) -> None:
        """Take the mode off the stack (wherever it is: modes pushed above it stay, in their order); idempotent."""
        if not self._pushed:
            return
        self._pushed = False
        self._derived, self._roots = {}, {}
        if not any(m is self for m in _get_current_function_mode_stack()):
            return
        above = []
        while True:
            mode = torch._C._pop_torch_function_stack()
            if mode is self:
                break
            above.append(mode)
        for mode in reversed(above):
            torch._C._push_on_torch_function_stack(mode)

    def drop(self, names: set[str]) -> None:
        """Stop watching ``names`` (demoted)."""
        self.names = [n for n in self.names if n not in names]
        self.bad -= names
        self.records = [r for r in self.records if not set(r[0][0]) & names]

    # ------------------------------------------------------------------ the forward
    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self._derived or not self.active():
            return out
        mine, others = [], []
        for a in itertools.chain(args, kwargs.values()):
            for t in (a if type(a) in (list, tuple) else (a,)):
                if isinstance(t, Tensor):
                    entry = self._derived.get(id(t))
                    (mine if entry is not None and entry[0] is t else others).append(t)
        if mine:
            self._note(func, args, kwargs, out, mine, others)
        return out

    def _roots_of(self, tensors: list[Tensor]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(n for t in tensors for n in self._derived[id(t)][1]))

    def _note(self, func: Callable, args: tuple, kwargs: dict, out: Any, mine: list[Tensor],
              others: list[Tensor]) -> None:
        roots = self._roots_of(mine)
        if _in_place(func, kwargs) and (any(args[0] is t for t in mine) or func not in _IN_PLACE_SUMS):
            self._demote(roots)  # a derived tensor (or P) changed in place: the VJP of its uses would change
        elif func in _EXPAND and len(mine) == 1 and self._use(func, args, kwargs, out, mine[0], others):
            pass  # expanded to the batch
        elif not others:  # a function of the parameters alone: derived (a tensor with no gradient is a constant)
            for t in (out if type(out) in (list, tuple) else (out,)):
                if isinstance(t, Tensor) and t.requires_grad:
                    self._derived[id(t)] = (t, roots)
        elif not self._use(func, args, kwargs, out, mine[0] if len(mine) == 1 else None, others):
            self._demote(roots)

    def _demote(self, roots: tuple[str, ...]) -> None:
        self.bad.update(roots)
        self._derived = {k: v for k, v in self._derived.items() if not set(v[1]) & set(roots)}

    def _use(self, func: Callable, args: tuple, kwargs: dict, out: Any, v: Tensor | None, others: list[Tensor]) -> bool:
        """Record a known use of ``v`` with the batch (module doc); ``False`` where it is not one."""
        if v is None or not isinstance(out, Tensor) or not out.requires_grad or out.ndim == 0 or out.shape[0] != self.batch:
            return False
        if func in _PRODUCTS:
            return self._product(func, args, kwargs, out, v, others)
        if v.ndim == out.ndim and v.shape[0] != 1:
            return False
        if func in _EXPAND:  # to the batch: ``x = 0``
            if args[0] is not v:
                return False
            return self._record(v, out, "add", 1.0, None)
        if len(others) != 1 or len(args) < 2 or not any(a is v for a in args[:2]):
            return False
        x = others[0]
        if not any(a is x for a in args[:2]) or x.ndim != out.ndim or x.shape[0] != self.batch:
            return False
        if func in _MUL:
            return self._record(v, out, "mul", 1.0, x.detach())
        if func in _DIV:  # x / V (a temperature): d/dV = -x / V²
            if args[1] is not v or kwargs.get("rounding_mode") is not None:
                return False
            return self._record(v, out, "div", -1.0, x.detach())
        alpha = kwargs.get("alpha", args[2] if len(args) > 2 else 1)
        if func not in _ADD | _SUB or isinstance(alpha, Tensor) or (func in _IN_PLACE_SUMS and args[0] is not x):
            return False
        sign = -1.0 if func in _SUB and args[1] is v else 1.0  # d(x - αV)/dV = -α; d(V - αx)/dV = 1
        return self._record(v, out, "add", sign * (alpha if args[1] is v else 1), None)

    def _product(self, func: Callable, args: tuple, kwargs: dict, out: Tensor, v: Tensor, others: list[Tensor]) -> bool:
        """``x @ V`` or ``F.linear(x, V, b)`` with ``x`` batch-first and ``V`` a matrix: the per-sample gradient is
        ``Σ_l x_{b,l}ᵀ g_{b,l}`` (``(in, out)``; its transpose for ``F.linear``'s ``(out, in)`` weight)."""
        x = args[0] if args else None
        bias = (args[2] if len(args) > 2 else kwargs.get("bias")) if func is torch.nn.functional.linear else None
        if len(args) < 2 or args[1] is not v or v.ndim != 2 or not isinstance(x, Tensor) or x.ndim < 2 \
                or x.shape[0] != self.batch or not all(o is x or o is bias for o in others):
            return False
        return self._record(v, out, "linear" if func is torch.nn.functional.linear else "matmul", 1.0, x.detach())

    def _record(self, v: Tensor, out: Tensor, kind: str, scale: float, x: Tensor | None) -> bool:
        roots = self._derived[id(v)][1]
        params = tuple(self._roots[n] for n in roots)
        record: list[Any] = [(roots, params, v, kind, scale, x), None, self._edge(out)]
        self.records.append(record)

        def on_grad(g: Tensor) -> None:
            record[1] = self._blocks(*record[0], g)
            record[0] = (roots,)
            record[2] = None

        out.register_hook(on_grad)
        return True

    # ------------------------------------------------------------------ the backward
    def _blocks(self, roots: tuple[str, ...], params: tuple[Tensor, ...], v: Tensor, kind: str, scale: float,
                x: Tensor | None, g_out: Tensor) -> dict[str, Tensor]:
        """``{parameter: (B, k) projected block}`` of one use from its output gradient ``g_out``."""
        g = self._wide(g_out)
        if kind in ("matmul", "linear"):  # tokens summed: (B, L, in) and (B, L, out)
            xs, gs = self._wide(x).reshape(x.shape[0], -1, x.shape[-1]), g.reshape(g.shape[0], -1, g.shape[-1])
            g_v = torch.einsum("bli,blo->bio" if kind == "matmul" else "bli,blo->boi", xs, gs)
        else:
            if kind == "mul":
                g = g * x
            elif kind == "div":
                g = g * x / self._wide(v.detach()).square()
            g_v = per_sample_sum(g, v.shape)
        if scale != 1.0:
            g_v = g_v * scale
        if len(roots) == 1 and _plain_view(v, params[0]):  # (``p`` itself: nothing to do)
            grads = {roots[0]: view_vjp(g_v, v, params[0])}
        else:  # the derivation chain's VJP, one per sample
            found = batched_grad(v, params, g_v.to(v.dtype), allow_unused=True)
            grads = {n: self._wide(t) for n, t in zip(roots, found) if t is not None}
        return {n: self.projector.project_tensor(n, t) for n, t in grads.items()}


def per_sample_sum(g: Tensor, shape: torch.Size) -> Tensor:
    """``(B, *shape)``: each sample's ``g_b`` (``g`` ``(B, ...)``) summed over the dimensions a tensor of ``shape``
    (aligned to the right, not covering the batch dimension, or of size 1 there) is broadcast along."""
    batch, own = g.shape[0], tuple(shape)
    inner = own[1:] if len(own) == g.ndim else own  # size 1 at the batch dimension: per sample, nothing
    target = (batch, *([1] * (g.ndim - 1 - len(inner))), *inner)
    return g.sum_to_size(target).reshape(batch, *own)


def _plain_view(v: Tensor, p: Tensor) -> bool:
    """``v`` is ``p`` or a view of the contiguous ``p`` (same dtype) whose elements are distinct elements of ``p``: no
    dimension of stride 0 (an expand) and none overlapping another (``unfold``): each stride beyond the farthest
    element the smaller ones reach (sufficient)."""
    if v is p:
        return True
    if v._base is not p or v.dtype != p.dtype or not p.is_contiguous():
        return False
    reach = 0
    for stride, size in sorted((st, n) for n, st in zip(v.shape, v.stride()) if n > 1):
        if stride <= reach:
            return False
        reach += stride * (size - 1)
    return True


def view_vjp(g_v: Tensor, v: Tensor, p: Tensor) -> Tensor:
    """``(B, *p.shape)``: the VJP of the view ``v`` of ``p`` (:func:`_plain_view`) for each sample's ``g_v[b]``: zeros,
    with ``g_v[b]`` at the elements ``v`` covers; ``g_v`` itself for a view of the whole of ``p``."""
    batch = g_v.shape[0]
    if v.shape == p.shape and v.stride() == p.stride() and v.storage_offset() == p.storage_offset():
        return g_v
    out = g_v.new_zeros(batch, p.numel())
    out.as_strided((batch, *v.shape), (p.numel(), *v.stride()), v.storage_offset() - p.storage_offset()).copy_(g_v)
    return out.view(batch, *p.shape)
