"""One engine per layer type: projected per-sample gradients from a module call's saved inputs.

Each engine knows which parameters of its layer type it captures, what the forward hook saves,
and how the saved values and the output gradient of one backward pass give every sample's
projected gradient, ``P_r^T G_b P_c`` (:mod:`.projection`), without forming ``G_b`` where a
factored form exists:

- ``nn.Linear`` on inputs ``(B, ..., in)``: ``G_b = sum_l g_{b,l} x_{b,l}^T``; each side is
  projected before the sum over tokens, which is one batched matrix product.
- ``nn.Conv1d/2d/3d`` (stride, padding in any mode, dilation, groups): the column side
  ``unfold(x) P_c`` is the convolution of ``x`` with ``P_c`` as its kernel (``k_cols`` output
  channels, per group), so the unfolded input is never materialised.
- ``nn.Embedding``: ``G_b = sum_l e_{id_{b,l}} g_{b,l}^T``, so the row side is a gather of
  ``P_r`` at the sample's token ids (``padding_idx`` rows get no gradient).
- ``nn.LayerNorm``, ``nn.GroupNorm``, ``nn.RMSNorm``: the weight gradient is
  ``sum g * x_hat`` and the bias gradient ``sum g`` over all but the parameter's dims; ``x_hat``
  is recomputed from the saved input with the module's own normalisation.
- ``nn.MultiheadAttention`` (``in_proj_weight/bias``, ``out_proj.weight/bias``): its forward
  calls ``F.multi_head_attention_forward``, which never runs ``out_proj``'s module hooks. While
  the module runs, ``F.linear`` is routed through a recorder that saves the input and output
  gradient of each call whose weight is (a row block of) a tracked parameter, in the
  sequence-first layout that function uses; the Linear formula does the rest.

Every engine assumes the batch is the first dimension of its layer's input and output
(the sequence-first internals of MultiheadAttention are converted) and that samples do not
interact inside the layer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .projection import KroneckerProjector, contract

__all__ = ["LayerEngine", "engine_for", "capture_owner"]

Record = list  # [saved, grad_output or None], filled by the forward hook and the output's tensor hook


class LayerEngine:
    """Projected per-sample gradients of one layer type's parameters (see the module doc)."""

    types: tuple[type[nn.Module], ...] = ()
    attrs: tuple[str, ...] = ("weight", "bias")

    def supports(self, mod: nn.Module, attr: str) -> bool:
        """Whether parameter ``attr`` of ``mod`` (an instance of one of :attr:`types`) is captured."""
        return attr in self.attrs

    def attach(self, mod: nn.Module, records: list[Record], active: Callable[[], bool],
               targets: Mapping[str, str]) -> list[RemovableHandle]:
        """Hooks that append one record per call while ``active()``; default: the module's output."""

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> None:
            if not active() or not isinstance(output, Tensor) or not output.requires_grad:
                return
            record: Record = [self.save(module, args[0] if args else kwargs["input"], targets), None]
            records.append(record)
            output.register_hook(lambda g: record.__setitem__(1, g))

        return [mod.register_forward_hook(hook, with_kwargs=True)]

    def save(self, mod: nn.Module, inp: Tensor, targets: Mapping[str, str]) -> Any:
        """What the gradient formula needs from the forward: the detached input by default."""
        return inp.detach()

    def accumulate(self, mod: nn.Module, records: list[Record], targets: Mapping[str, str],
                   projector: KroneckerProjector, out: Tensor) -> None:
        """Add the projected per-sample gradients of ``records`` to ``out[:, slices[name]]``."""
        raise NotImplementedError


def _tokens(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``(B, ..., d)`` as ``(B, L, d)``."""
    return t.to(dtype).reshape(t.shape[0], -1, t.shape[-1])


def _linear_into(projector: KroneckerProjector, out: Tensor, name: str, g: Tensor, x: Tensor,
                 rows: slice | None = None) -> None:
    """Weight ``name`` (or its row block ``rows``): add ``P_r^T (sum_l g_l x_l^T) P_c`` per sample."""
    out[:, projector.slices[name]] += projector.project_factored(name, g, x, rows)


def _bias_into(projector: KroneckerProjector, out: Tensor, name: str, g_sum: Tensor, rows: slice | None = None) -> None:
    """Bias ``name`` (or its block ``rows``): add the projection of the per-sample sums ``g_sum`` ``(B, n)``."""
    if rows is not None:
        full = torch.zeros(g_sum.shape[0], projector.spec(name).rows, dtype=g_sum.dtype, device=g_sum.device)
        full[:, rows] = g_sum
        g_sum = full
    out[:, projector.slices[name]] += projector.project_tensor(name, g_sum)


class LinearEngine(LayerEngine):
    types = (nn.Linear,)

    def save(self, mod: nn.Module, inp: Tensor, targets: Mapping[str, str]) -> Any:
        return inp.detach() if "weight" in targets else None

    def accumulate(self, mod, records, targets, projector, out):
        # one record at a time: concatenating the calls of a shared module would copy them
        for x, g_out in records:
            g = _tokens(g_out, out.dtype)
            if "weight" in targets:
                _linear_into(projector, out, targets["weight"], g, _tokens(x, out.dtype))
            if "bias" in targets:
                _bias_into(projector, out, targets["bias"], g.sum(1))


class EmbeddingEngine(LayerEngine):
    types = (nn.Embedding,)
    attrs = ("weight",)

    def supports(self, mod, attr):
        # max_norm renormalises rows in place; scale_grad_by_freq scales by counts over the whole batch
        return attr == "weight" and mod.max_norm is None and not mod.scale_grad_by_freq

    def accumulate(self, mod, records, targets, projector, out):
        for ids, g_out in records:
            self._weight_into(mod, projector, out, targets["weight"], ids.reshape(ids.shape[0], -1),
                              _tokens(g_out, out.dtype))

    @staticmethod
    def _weight_into(mod, projector, out, name, ids, g):
        """``ids`` ``(B, L)``, ``g`` ``(B, L, dim)``."""
        p_r, p_c = projector.side_matrices(name, g.dtype, g.device)
        b = g if p_c is None else g @ p_c
        if mod.padding_idx is not None:  # the padding row gets no gradient (masked after the projection: cheaper)
            b = b * (ids != mod.padding_idx).unsqueeze(2).to(b.dtype)
        if p_r is None:  # rows kept whole: scatter the token gradients into their rows
            full = torch.zeros(g.shape[0], mod.num_embeddings, b.shape[2], dtype=g.dtype, device=g.device)
            full.scatter_add_(1, ids.unsqueeze(2).expand(-1, -1, b.shape[2]), b)
            out[:, projector.slices[name]] += full.reshape(g.shape[0], -1)
        else:
            out[:, projector.slices[name]] += contract(p_r[ids], b)


class ConvEngine(LayerEngine):
    types = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    _conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

    def save(self, mod, inp, targets):
        return inp.detach() if "weight" in targets else None

    def accumulate(self, mod, records, targets, projector, out):
        dims = len(mod.kernel_size)
        for x, g_out in records:
            g = g_out.to(out.dtype).flatten(2)  # (B, out_channels, L)
            if "weight" in targets:
                self._weight_into(mod, projector, out, targets["weight"], x.to(out.dtype), g, dims)
            if "bias" in targets:
                _bias_into(projector, out, targets["bias"], g.sum(2))

    def _weight_into(self, mod, projector, out, name, x, g, dims):
        """``P_r^T (sum_l g_l unfold(x)_l^T) P_c``: ``unfold(x) P_c`` as a convolution with kernel ``P_c``."""
        spec = projector.spec(name)
        p_r, p_c = projector.side_matrices(name, x.dtype, x.device)
        groups, batch = mod.groups, x.shape[0]
        if p_c is None:
            p_c = torch.eye(spec.cols, dtype=x.dtype, device=x.device)
        kernel = p_c.t().reshape(spec.k_cols, mod.in_channels // groups, *mod.kernel_size).repeat(
            groups, *([1] * (dims + 1)))
        if mod.padding_mode == "zeros":
            padding = mod.padding
        else:
            x, padding = F.pad(x, mod._reversed_padding_repeated_twice, mode=mod.padding_mode), 0
        cols = self._conv[dims](x, kernel, None, mod.stride, padding, mod.dilation, groups)
        cols = cols.reshape(batch, groups, spec.k_cols, -1)  # (B, groups, k_cols, L)
        g = g.reshape(batch, groups, -1, cols.shape[3])  # (B, groups, out/groups, L)
        per_group = torch.einsum("bgol,bgkl->bgok", g, cols).reshape(batch, spec.rows, spec.k_cols)
        if p_r is not None:
            per_group = (per_group.transpose(1, 2) @ p_r).transpose(1, 2)
        out[:, projector.slices[name]] += per_group.reshape(batch, -1)


class NormEngine(LayerEngine):
    """LayerNorm, GroupNorm, RMSNorm affine parameters: ``sum g * x_hat`` and ``sum g``."""

    types = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)

    def save(self, mod, inp, targets):
        return inp.detach()

    @staticmethod
    def _normalised(mod: nn.Module, x: Tensor) -> Tensor:
        if isinstance(mod, nn.LayerNorm):
            return F.layer_norm(x, mod.normalized_shape, None, None, mod.eps)
        if isinstance(mod, nn.GroupNorm):
            return F.group_norm(x, mod.num_groups, None, None, mod.eps)
        return F.rms_norm(x, mod.normalized_shape, None, mod.eps)

    def accumulate(self, mod, records, targets, projector, out):
        for x, g_out in records:
            g = g_out.to(out.dtype)
            if isinstance(mod, nn.GroupNorm):  # (B, C, *): parameters per channel
                reduce = tuple(range(2, g.ndim))
            else:  # (B, *, *normalized_shape)
                reduce = tuple(range(1, g.ndim - len(mod.normalized_shape)))
            total = (lambda t: t.sum(reduce)) if reduce else (lambda t: t)  # sum(()) would sum everything
            if "weight" in targets:
                grad = total(g * self._normalised(mod, x.to(out.dtype)))
                out[:, projector.slices[targets["weight"]]] += projector.project_tensor(targets["weight"], grad)
            if "bias" in targets:
                out[:, projector.slices[targets["bias"]]] += projector.project_tensor(targets["bias"], total(g))


class AttentionEngine(LayerEngine):
    """``nn.MultiheadAttention``'s packed input projection and its output projection."""

    types = (nn.MultiheadAttention,)
    attrs = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")

    def attach(self, mod, records, active, targets):
        state: dict[str, Any] = {}

        def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not active():
                return
            query = args[0] if args else kwargs["query"]
            if query.ndim != 3:
                raise ValueError("MultiheadAttention hook capture needs batched inputs (B, L, E) or (L, B, E)")
            batch = query.shape[0] if module.batch_first else query.shape[1]
            state["saved"] = F.linear
            F.linear = self._recorder(module, state["saved"], records, targets, batch)

        def post(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if "saved" in state:
                F.linear = state.pop("saved")

        return [mod.register_forward_pre_hook(pre, with_kwargs=True),
                mod.register_forward_hook(post, with_kwargs=True, always_call=True)]

    @staticmethod
    def _recorder(mod: nn.Module, linear: Callable[..., Tensor], records: list[Record],
                  targets: Mapping[str, str], batch: int) -> Callable[..., Tensor]:
        # resolved at call time: under functional_call the attributes are the substituted tensors
        tracked = {attr: functools.reduce(getattr, attr.split("."), mod) for attr in targets}

        def block_of(t: Tensor | None) -> tuple[str, slice] | None:
            """Which tracked parameter ``t`` is, or a row block of, and which rows."""
            if t is None:
                return None
            for attr, p in tracked.items():
                if t is p or t._base is p:
                    start = (t.storage_offset() - p.storage_offset()) // (p.stride(0) if p.ndim > 1 else 1)
                    return attr, slice(start, start + t.shape[0])
            return None

        def recording_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
            y = linear(x, weight, bias)
            w_block, b_block = block_of(weight), block_of(bias)
            if (w_block or b_block) and y.requires_grad:
                # in-projections see (L, B, E); the out-projection (L*B, E), l-major
                seq_first = (lambda t: t.reshape(-1, batch, t.shape[-1]).transpose(0, 1))
                record: Record = [(seq_first(x.detach()) if w_block else None, w_block, b_block), None]
                records.append(record)
                y.register_hook(lambda g: record.__setitem__(1, seq_first(g)))
            return y

        return recording_linear

    def accumulate(self, mod, records, targets, projector, out):
        for (x, w_block, b_block), g_out in records:
            g = g_out.to(out.dtype)
            if w_block is not None:
                _linear_into(projector, out, targets[w_block[0]], g, x.to(out.dtype), _proper(w_block[1], projector,
                                                                                             targets[w_block[0]]))
            if b_block is not None:
                _bias_into(projector, out, targets[b_block[0]], g.sum(1), _proper(b_block[1], projector,
                                                                                  targets[b_block[0]]))


def _proper(rows: slice, projector: KroneckerProjector, name: str) -> slice | None:
    """``None`` when the row block is the whole parameter."""
    return None if rows.start == 0 and rows.stop == projector.spec(name).rows else rows


_ENGINES: tuple[LayerEngine, ...] = (LinearEngine(), EmbeddingEngine(), ConvEngine(), NormEngine(), AttentionEngine())


def engine_for(mod: nn.Module) -> LayerEngine | None:
    """The engine of ``mod``'s exact type (subclasses may not run their own forward), or ``None``."""
    for engine in _ENGINES:
        if type(mod) in engine.types:
            return engine
    return None


def capture_owner(model: nn.Module) -> dict[str, tuple[str, nn.Module, str]]:
    """Parameter name -> (name of the module whose engine captures it, that module, attribute path).

    A parameter is owned by its module, except ``out_proj.*`` of a MultiheadAttention, which
    the attention module captures (its forward bypasses ``out_proj``).
    """
    owners: dict[str, tuple[str, nn.Module, str]] = {}
    for mod_name, mod in model.named_modules():
        for attr, _ in mod.named_parameters(recurse=False):
            owners[f"{mod_name}.{attr}" if mod_name else attr] = (mod_name, mod, attr)
    for mod_name, mod in model.named_modules():
        if type(mod) is nn.MultiheadAttention:
            for attr, _ in mod.out_proj.named_parameters(recurse=False):
                full = f"{mod_name}.out_proj.{attr}" if mod_name else f"out_proj.{attr}"
                owners[full] = (mod_name, mod, f"out_proj.{attr}")
    return owners
