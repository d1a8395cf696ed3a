"""One engine per layer type: projected per-sample gradients of a layer's parameters from hooks.

Formulas, limits and costs: ``docs/per-sample-gradients.md``.

Each engine knows which parameters of its layer type it captures, what the forward hook keeps
of the input, and how that and the output gradient give every sample's projected gradient
``P_r^T G_b P_c`` (:mod:`.projection`) without forming ``G_b`` where a factored form exists.
The work is done while the tensors are fresh in the cache: the input side in the forward hook,
the output side (and the product of the two) in the output's gradient hook during the
backward pass, which leaves only ``(B, k)`` blocks to sum (a Linear's one token per sample: the
two factors of an outer product, written by ``collect`` straight into the rows). A convolution
whose projected input would be larger than the input itself keeps the input and projects it in
the gradient hook (:class:`KeptInput`).

- ``nn.Linear`` on inputs ``(B, ..., in)``: ``G_b = sum_l g_{b,l} x_{b,l}^T``; each side is
  projected before the sum over tokens, which is one batched matrix product.
- ``nn.Conv1d/2d/3d`` (stride, padding in any mode, dilation, groups): the column side
  ``unfold(x) P_c`` is the convolution of ``x`` with ``P_c`` as its kernel (``k_cols`` output
  channels, per group), so the unfolded input is never materialised (a 1x1 kernel's unprojected column side is its
  strided input); then one batched product with the output gradient, the row side first where that is cheaper.
- A bias of a Linear or Conv layer folded into its weight's block (:func:`foldable_biases`,
  :mod:`.projection`) rides on the column side: the input is ``[x, 1]``, whose projection adds
  the bias's row of ``P_c`` to every token's ``x P_c``; no bias product is left to do.
- ``nn.Embedding``: ``G_b = sum_l e_{id_{b,l}} g_{b,l}^T``, so the row side is a gather of
  ``P_r`` at the sample's token ids (``padding_idx`` rows get no gradient).
- ``nn.Bilinear`` (:mod:`.bilinear`): a Linear on ``x1 ⊗ x2``, its column side made without the outer product.
- ``nn.RNNCell``, ``nn.GRUCell``, ``nn.LSTMCell`` (:mod:`.rnn_cells`): Linear blocks of the gradients at the two pre-activations.
- ``nn.RNN``, ``nn.GRU``, ``nn.LSTM`` (:mod:`.recurrent`): the same, over time, from a replay of the layers in the
  gradient hook.
- ``nn.EmbeddingBag`` (:mod:`.embedding_bag`): ``sum``/``mean``: the row side is the bag layer with ``P_r`` as its table;
  ``max``: the rows of the maxima gathered from ``P_r``, a column at a time.
- ``nn.LayerNorm``, ``nn.GroupNorm``, ``nn.RMSNorm``: the weight gradient is
  ``sum g * x_hat`` and the bias gradient ``sum g`` over all but the parameter's dims; ``x_hat``
  comes from the mean and rstd the forward saved for autograd (LayerNorm, GroupNorm: a GroupNorm's sums are
  its own fused backward over the batch as one sample of ``B·C`` channels) or is recomputed (RMSNorm).
- ``nn.ConvTranspose1d/2d/3d`` (:mod:`.conv_transpose`): the weight gradient of the convolution it is the adjoint of,
  with the input and the output gradient in swapped roles: the column side is the output gradient convolved with ``P_c``.
- ``nn.PReLU`` (:mod:`.prelu`): ``sum g * min(0, x)``.
- A parametrized tensor of these layers but attention and the recurrent ones (:attr:`LayerEngine.chainable`;
  :mod:`.parametrized`: ``weight_norm``, ``spectral_norm``, ...): the layer's engine gives the effective tensor's per-sample gradient, a batched VJP takes it to the originals.
- ``nn.BatchNorm1d/2d/3d`` and ``nn.InstanceNorm1d/2d/3d`` (:mod:`.batchnorm`): ``sum g * x_hat`` and ``sum g`` per channel, ``x_hat`` by the
  statistics the forward used (the batch's in train mode, the running ones in eval mode).
- ``nn.MultiheadAttention`` (``in_proj_weight/bias``, ``out_proj.weight/bias``): its forward
  calls ``F.multi_head_attention_forward``, which never runs ``out_proj``'s module hooks. While
  the module runs, ``F.linear`` is routed through a recorder that treats each call whose weight
  is (a row block of) a tracked parameter as a Linear call, in the sequence-first layout that
  function uses.

Every engine assumes the batch is the first dimension of its layer's input and output
(the sequence-first internals of MultiheadAttention are converted) and that samples do not
interact inside the layer. Computations run in ``float32`` or wider.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.utils.hooks import RemovableHandle

from . import conv_layout
from .projection import KroneckerProjector, Outer, contract

__all__ = ["InputMemo", "LayerEngine", "Record", "engine_for", "capture_owners", "foldable_biases"]

Blocks = dict[str, Tensor | Outer]  # parameter name -> (B, k) projected per-sample gradient block (or its factors)
Record = list  # [what the forward kept, the call's Blocks (None until the backward), the output's gradient edge
#                 (until then: taken at the call, it stays the layer's output when an in-place op follows)]


def _wide(t: Tensor) -> Tensor:
    """``t`` in float32 or wider (half-precision activations are projected in float32)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.to(torch.promote_types(t.dtype, torch.float32))


def _own_precision(t: Tensor) -> contextlib.AbstractContextManager:
    """Autocast off on ``t``'s device where the run's is on: an engine's forward-side products (projected columns) are
    in float32 or wider, as :func:`_wide` means them; under autocast they came out in its dtype (a convolution's
    columns, bfloat16 against the float32 output gradient, failed the block's product in the HVP passes)."""
    device = "cpu" if t.is_cpu else t.device.type  # (is_cpu: a third of the cost of device.type, at every hooked call)
    return torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else _UNCHANGED


_UNCHANGED = contextlib.nullcontext()


def _tokens(t: Tensor) -> Tensor:
    """``(B, ..., d)`` as ``(B, L, d)``, float32 or wider."""
    return _wide(t).reshape(t.shape[0], -1, t.shape[-1])


def _edge(t: Tensor) -> GradientEdge:
    """``get_gradient_edge(t)`` of an output, at a sixth of its cost (2 against 11 µs, at every hooked call): the node
    that made ``t`` and its output number. A node of a Python autograd Function (its Python object does not keep the
    graph alive) and a leaf (no node: its AccumulateGrad) go through ``get_gradient_edge``."""
    node = t.grad_fn
    if node is None or isinstance(node, torch._C._FunctionBase):
        return get_gradient_edge(t)
    return GradientEdge(node, t.output_nr)


def _plain(t: Tensor) -> bool:
    """A dense tensor of no subclass: its memory is what ``data_ptr``, shape and strides say."""
    return type(t) is Tensor and t.layout == torch.strided


class InputMemo:
    """What ``save`` kept of each module's last input that needs no gradient (the batch itself), for the HVP passes of
    the same step: a layer fed the batch has the same column side at every parameter point, and the same tensor,
    unchanged since (its ``_version``), gives the same numbers, so reusing it is exact (``docs/per-sample-gradients.md``,
    HVP products). Filled only while :attr:`keep` is set, read only while :attr:`reuse` is set."""

    def __init__(self) -> None:
        self.keep = False  # fill: passes at other parameters will follow the captured forwards
        self.reuse = False  # read: inside those passes
        self._entries: dict[int, tuple[Tensor, int, Any]] = {}  # id(module) -> (input, its version, what save kept)

    def get(self, mod: nn.Module, inp: Tensor) -> Any:
        """What ``save`` kept of ``inp`` at ``mod``'s last call on it, or ``None``. ``inp`` may be another view of the
        same memory (a model reshaping its batch makes a new tensor at every call): same address, shape, strides and
        dtype, nothing written into it since (the version counter its views share); the memo holds the input, so its
        memory cannot have been handed to another tensor."""
        entry = self._entries.get(id(mod)) if self.reuse else None
        if entry is None or not _plain(inp):
            return None
        held, version, saved = entry
        same = inp is held or (inp.data_ptr() == held.data_ptr() and inp.shape == held.shape
                               and inp.stride() == held.stride() and inp.dtype == held.dtype and inp.device == held.device)
        return saved if same and held._version == version and inp._version == version else None

    def wants(self, inp: Tensor) -> bool:
        """Whether :meth:`put` would keep what ``save`` kept of ``inp`` (never an activation: it would stay alive)."""
        return self.keep and not inp.requires_grad and _plain(inp)

    def put(self, mod: nn.Module, inp: Tensor, saved: Any) -> None:
        if saved is not None and self.wants(inp):
            self._entries[id(mod)] = (inp, inp._version, saved)

    def clear(self) -> None:
        self._entries.clear()


class LayerEngine:
    """Projected per-sample gradients of one layer type's parameters (see the module doc)."""

    types: tuple[type[nn.Module], ...] = ()
    attrs: tuple[str, ...] = ("weight", "bias")
    subclasses = True  # also a subclass of one of ``types`` that keeps its forward (:func:`engine_for`)
    pure_save = False  # ``save`` depends on the input alone (not on the output or the parameters): memoisable
    chainable = True  # the parametrized engine may run it on a layer's effective tensors (:mod:`.parametrized`)

    def supports(self, mod: nn.Module, attr: str) -> bool:
        """Whether parameter ``attr`` of ``mod`` (an instance of one of :attr:`types`) is captured."""
        return attr in self.attrs

    def attach(self, mod: nn.Module, records: list[Record], active: Callable[[], bool], targets: Mapping[str, str],
               projector: KroneckerProjector, memo: InputMemo | None = None) -> list[RemovableHandle]:
        """Hooks that append one record per call while ``active()``; default: on the module's output. ``memo``: where
        an engine with :attr:`pure_save` finds (and leaves) what it kept of an input that needs no gradient."""
        memo = memo if self.pure_save else None

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> None:
            if not active() or not isinstance(output, Tensor) or not output.requires_grad:
                return
            inp = args[0] if args else kwargs["input"]
            saved = memo.get(module, inp) if memo is not None and memo.reuse else None  # (the flags: no call per step)
            if saved is None:
                with _own_precision(inp):
                    saved = self.save(module, inp, targets, projector, output)
                    if memo is not None and memo.keep and memo.wants(inp):  # reused by the passes that follow: once
                        saved = self.settle(module, saved, targets, projector)
                        memo.put(module, inp, saved)
            record: Record = [saved, None, _edge(output)]
            records.append(record)

            def on_grad(g: Tensor) -> None:
                record[1] = self.blocks(module, record[0], g, targets, projector)
                record[0] = record[2] = None

            output.register_hook(on_grad)

        return [mod.register_forward_hook(hook, with_kwargs=True)]

    def own(self, mod: nn.Module) -> tuple[LayerEngine, list[RemovableHandle]]:
        """The engine object of ``mod``'s calls and the hooks it needs besides :meth:`attach`'s (a pre-hook keeping a
        second input): this one and none by default."""
        return self, []

    def save(self, mod: nn.Module, inp: Tensor, targets: Mapping[str, str], projector: KroneckerProjector,
             output: Tensor | None = None) -> Any:
        """What the gradient formula needs from the forward (``output``: the call's output): the detached input by
        default."""
        return inp.detach()

    def settle(self, mod: nn.Module, saved: Any, targets: Mapping[str, str], projector: KroneckerProjector) -> Any:
        """``saved`` with any work ``save`` left to the gradient hook done now (for an input memo: its passes reuse
        it); by default ``saved`` itself."""
        return saved

    def blocks(self, mod: nn.Module, saved: Any, g_out: Tensor, targets: Mapping[str, str],
               projector: KroneckerProjector) -> Blocks:
        """The call's projected per-sample gradient of each target, from ``saved`` and the output gradient."""
        raise NotImplementedError


class SecondInputEngine(LayerEngine):
    """An engine of a layer called with a second input (``nn.Bilinear``'s ``input2``, a cell's ``hx``): a forward
    pre-hook keeps it for :meth:`save` of the same call (:meth:`second`), one engine object per module."""

    second_kwarg = ""  # the keyword of the second input

    def __init__(self) -> None:
        self._second: Tensor | None = None  # the second input of the call in flight

    def own(self, mod):
        own = type(self)()

        def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
            own._second = args[1] if len(args) > 1 else kwargs.get(self.second_kwarg)

        return own, [mod.register_forward_pre_hook(pre, with_kwargs=True)]

    def attach(self, mod, records, active, targets, projector, memo=None):
        own, handles = self.own(mod)
        return handles + LayerEngine.attach(own, mod, records, active, targets, projector)

    def second(self) -> Tensor | None:
        """The call's second input (``None`` where it was not given), forgotten here."""
        second, self._second = self._second, None
        return second


class LinearEngine(LayerEngine):
    types = (nn.Linear,)
    pure_save = True

    # an input (B, in) keeps its shape (one token per sample, without the token dimension): fewer calls at every step
    def save(self, mod, inp, targets, projector, output=None):
        x = _wide(inp.detach()) if inp.dim() == 2 else _tokens(inp.detach())
        return projector.project_cols(targets["weight"], x) if "weight" in targets else None

    def blocks(self, mod, saved, g_out, targets, projector):
        g = _wide(g_out) if g_out.dim() == 2 else _tokens(g_out)
        return _linear_blocks(projector, targets.get("weight"), targets.get("bias"), g, saved)


def _linear_blocks(projector: KroneckerProjector, weight: str | None, bias: str | None, g: Tensor, cols: Tensor | None,
                   w_rows: slice | None = None, b_rows: slice | None = None) -> Blocks:
    """Weight block from ``g`` ``(B, L, out)`` (or ``(B, out)``) and the projected input ``cols``; bias block from
    ``sum_l g``.

    ``w_rows``/``b_rows``: ``g`` covers only these rows of the parameter (a packed attention block).
    """
    out: Blocks = {}
    if weight is not None:
        out[weight] = projector.combine(weight, g, cols, w_rows)
    if bias is not None and projector.block_of[bias] == bias:  # else folded: in the weight's block
        g_sum = g if g.dim() == 2 else g.sum(1)
        if b_rows is not None:
            full = g_sum.new_zeros(g_sum.shape[0], projector.spec(bias).rows)
            full[:, b_rows] = g_sum
            g_sum = full
        out[bias] = projector.project_tensor(bias, g_sum)
    return out


class EmbeddingEngine(LayerEngine):
    types = (nn.Embedding,)
    attrs = ("weight",)

    def supports(self, mod, attr):
        # max_norm renormalises rows in place; scale_grad_by_freq scales by counts over the whole batch
        return attr == "weight" and mod.max_norm is None and not mod.scale_grad_by_freq

    def blocks(self, mod, ids, g_out, targets, projector):
        name = targets["weight"]
        ids, g = ids.reshape(ids.shape[0], -1), _tokens(g_out)
        p_r = projector.side_matrices(name, g.dtype, g.device)[0]
        b = projector.project_cols(name, g)
        if mod.padding_idx is not None:  # the padding row gets no gradient (masked after the projection: cheaper)
            b = b * (ids != mod.padding_idx).unsqueeze(2).to(b.dtype)
        if p_r is not None:
            return {name: contract(F.embedding(ids, p_r), b)}  # the rows at the ids (a gather 2-5x faster than p_r[ids])
        full = b.new_zeros(b.shape[0], mod.num_embeddings, b.shape[2])  # rows kept whole: scatter into them
        full.scatter_add_(1, ids.unsqueeze(2).expand(-1, -1, b.shape[2]), b)
        return {name: full.reshape(b.shape[0], -1)}


class KeptInput(NamedTuple):
    """A convolution's (padded) input, kept instead of its projected columns ``unfold(x) P_c``, which would be larger
    (``k_cols`` per group and output position against the input's own size: a first layer on a few channels): the
    gradient hook makes the columns right before their product (:class:`ConvEngine`)."""

    x: Tensor


class ConvEngine(LayerEngine):
    types = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    pure_save = True
    _conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

    def save(self, mod, inp, targets, projector, output=None):
        """``unfold(x) P_c`` ``(B, groups, k_cols, L)`` (:meth:`_columns`), or the input (:class:`KeptInput`) where
        the columns would be larger."""
        if "weight" not in targets:
            return None
        x, name = _wide(inp.detach()), targets["weight"]
        if mod.padding_mode != "zeros":
            x = F.pad(x, mod._reversed_padding_repeated_twice, mode=mod.padding_mode)
        if output is not None and projector.spec(name).k_cols * mod.groups * output[0, 0].numel() > x[0].numel():
            return KeptInput(x)
        return self._columns(mod, x, name, projector)

    def settle(self, mod, saved, targets, projector):
        return self._columns(mod, saved.x, targets["weight"], projector) if isinstance(saved, KeptInput) else saved

    def _columns(self, mod: nn.Module, x: Tensor, name: str, projector: KroneckerProjector) -> Tensor:
        """``unfold(x) P_c`` ``(B, groups, k_cols, L)`` of the (padded) input ``x`` as a convolution of ``x`` with
        kernel ``P_c`` (:func:`conv_columns`); a 1x1 kernel's unprojected column side is the input itself
        (:func:`_pointwise_columns`)."""
        spec = projector.spec(name)
        if spec.k_cols == spec.cols and math.prod(mod.kernel_size) == 1:
            return _pointwise_columns(mod, x, spec.bias is not None)
        padding = mod.padding if mod.padding_mode == "zeros" else 0  # else padded by save
        return conv_columns(x, projector, name, mod.in_channels // mod.groups, mod.kernel_size, mod.stride, padding,
                            mod.dilation, mod.groups, rows=mod.out_channels)

    def blocks(self, mod, cols, g_out, targets, projector):
        g = _wide(g_out).flatten(2)  # (B, out_channels, L)
        out: Blocks = {}
        if "weight" in targets:
            name, batch = targets["weight"], g.shape[0]
            spec = projector.spec(name)
            p_r = projector.side_matrices(name, g.dtype, g.device)[0]
            cols = self.settle(mod, cols, targets, projector)
            out[name] = _conv_block(g, cols, p_r, spec.rows, spec.k_cols).reshape(batch, -1)
        if "bias" in targets and projector.block_of[targets["bias"]] == targets["bias"]:  # else folded
            out[targets["bias"]] = projector.project_tensor(targets["bias"], g.sum(2))
        return out


def conv_columns(x: Tensor, projector: KroneckerProjector, name: str, channels: int, kernel_size: Sequence[int],
                 stride: Any, padding: Any, dilation: Any, groups: int, size: Sequence[int] | None = None,
                 rows: int | None = None) -> Tensor:
    """``unfold(x) P_c`` ``(B, groups, k_cols, L)`` of block ``name`` for a convolution of ``x`` (``channels`` a group)
    with this geometry, computed as the convolution of ``x`` with ``P_c`` as its kernel (``k_cols`` output channels a
    group): the unfolded input is never formed. A folded bias's row of ``P_c`` is that convolution's own bias
    (``[unfold(x); 1] P_c`` at every position). Shared by :class:`ConvEngine` (``x`` its input) and the transposed
    convolutions' engine (``x`` the output gradient, :mod:`.conv_transpose`).

    A 2-D input is convolved in the memory format :func:`.conv_layout.channels_last` chooses: measured on this CPU for a
    large convolution (with its product by an output gradient of ``rows`` rows, when given), else channels-last for a
    few channels a group (the columns then come out ``(B, L, k_cols)``-contiguous, the layout of their product).
    ``size``: the output positions to keep (the first ones along each dimension), where the convolution gives more."""
    spec, dims = projector.spec(name), len(kernel_size)
    p_c, p_bias = projector.column_side(name, x.dtype, x.device)
    if p_c is None and p_bias is None and dims <= 2 and not isinstance(padding, str):
        return _unfolded(x, channels, kernel_size, stride, padding, dilation, groups, size)
    kernel, bias = projector.column_kernel(name, x.dtype, x.device, channels, kernel_size, groups)

    def conv(inp: Tensor) -> Tensor:
        return ConvEngine._conv[dims](inp, kernel, bias, stride, padding, dilation, groups)

    if dims == 2:
        stand_in: list[Tensor] = []  # an output gradient's shape for the product measured with the convolution

        def product(cols: Tensor) -> Tensor:
            cols = cols.reshape(x.shape[0], spec.k_cols, -1)
            if not stand_in:
                stand_in.append(torch.ones(x.shape[0], rows, cols.shape[2], dtype=cols.dtype, device=cols.device))
            return conv_layout.times_columns(stand_in[0], cols)

        if conv_layout.channels_last(x, kernel, (stride, padding, dilation, groups), conv,
                                     product if rows is not None and groups == 1 else None):
            x = x.contiguous(memory_format=torch.channels_last)
    cols = conv(x)
    if size is not None and tuple(cols.shape[2:]) != tuple(size):
        cols = cols[(slice(None), slice(None), *(slice(0, n) for n in size))]
    return cols.reshape(x.shape[0], groups, spec.k_cols, -1)  # a view in either memory format


def _unfolded(x: Tensor, channels: int, kernel_size: Sequence[int], stride: Any, padding: Any, dilation: Any,
              groups: int, size: Sequence[int] | None) -> Tensor:
    """The unfolded input ``(B, groups, channels·kernel, L)`` itself, by ``F.unfold`` (a 1-D input as one row of a 2-D
    one), for columns kept whole: the identity convolution :func:`conv_columns` would run otherwise costs ``cols``
    multiply-adds a value (a parametrized layer's whole per-sample gradient, :mod:`.parametrized`)."""
    one = len(kernel_size) == 1  # as one row of a 2-D input: kernel (1, k), stride (1, s), dilation (1, d), padding (0, p)
    lift = (lambda v, pad=1: (pad, *_ints(v, 1))) if one else (lambda v, pad=1: _ints(v, 2))
    k, st, dl, pd = lift(tuple(kernel_size)), lift(stride), lift(dilation), lift(padding, 0)
    x2 = x.unsqueeze(2) if one else x
    cols = F.unfold(x2, k, dilation=dl, padding=pd, stride=st)  # (B, C·K, L): per channel, the kernel's offsets
    out = [(n + 2 * p - d * (kk - 1) - 1) // s + 1 for n, p, d, kk, s in zip(x2.shape[2:], pd, dl, k, st)]
    if size is not None and tuple(out[-len(size):]) != tuple(size):
        keep = (1, *size) if one else tuple(size)
        cols = cols.reshape(*cols.shape[:2], *out)[(slice(None), slice(None), *(slice(0, n) for n in keep))]
    return cols.reshape(x.shape[0], groups, channels * math.prod(kernel_size), -1)


def _ints(v: Any, n: int) -> tuple[int, ...]:
    return (v,) * n if isinstance(v, int) else tuple(v)


def _pointwise_columns(mod: nn.Module, x: Tensor, ones: bool) -> Tensor:
    """The unfolded input of a 1x1 kernel, ``(B, groups, in/groups (+1), L)``: the (padded) input at the strided output
    positions, with a row of ones for a folded bias; no identity convolution."""
    if mod.padding_mode == "zeros":  # else padded by save
        x = F.pad(x, mod._reversed_padding_repeated_twice)
    x = x[(slice(None), slice(None), *(slice(None, None, s) for s in mod.stride))]
    cols = x.reshape(x.shape[0], mod.groups, mod.in_channels // mod.groups, -1)
    return torch.cat([cols, cols.new_ones(cols.shape[0], mod.groups, 1, cols.shape[3])], 2) if ones else cols


def _conv_block(g: Tensor, cols: Tensor, p_r: Tensor | None, rows: int, k_cols: int) -> Tensor:
    """``P_r^T G_b P_c`` ``(B, k_rows, k_cols)`` of a convolution from its output gradient ``g`` ``(B, rows, L)`` and
    columns ``unfold(x) P_c`` ``(B, groups, k_cols, L)``; ``p_r`` ``None``: the rows kept whole.

    One group: one batched product, the row side applied first where that costs fewer multiply-adds
    (``k_rows (rows L + L k_cols)`` against ``k_cols (rows L + rows k_rows)`` a sample); groups: ``G_b P_c`` per group,
    then the row side."""
    batch, groups, length = g.shape[0], cols.shape[1], g.shape[2]
    if groups == 1:
        if p_r is not None and p_r.shape[1] * (rows * length + length * k_cols) < k_cols * (
                rows * length + rows * p_r.shape[1]):
            return conv_layout.times_columns(torch.matmul(p_r.t(), g), cols[:, 0])
        gc = conv_layout.times_columns(g, cols[:, 0])
    else:
        gc = torch.einsum("bgol,bgkl->bgok", g.reshape(batch, groups, -1, length), cols).reshape(batch, rows, k_cols)
    return gc if p_r is None else (gc.transpose(1, 2) @ p_r).transpose(1, 2)


class AttentionEngine(LayerEngine):
    """``nn.MultiheadAttention``'s packed input projection and its output projection."""

    types = (nn.MultiheadAttention,)
    attrs = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
    subclasses = False  # capture_owners places out_proj by the exact type
    chainable = False  # F.linear routed while the module runs: the parametrized engine's hooks do not see those calls

    def attach(self, mod, records, active, targets, projector, memo=None):
        state: dict[str, Any] = {}

        def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not active():
                return
            query = args[0] if args else kwargs["query"]
            if query.ndim != 3:
                raise ValueError("MultiheadAttention hook capture needs batched inputs (B, L, E) or (L, B, E)")
            batch = query.shape[0] if module.batch_first else query.shape[1]
            state["saved"] = F.linear
            F.linear = self._recorder(module, state["saved"], records, targets, projector, batch)

        def post(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if "saved" in state:
                F.linear = state.pop("saved")

        return [mod.register_forward_pre_hook(pre, with_kwargs=True),
                mod.register_forward_hook(post, with_kwargs=True, always_call=True)]

    @staticmethod
    def _recorder(mod: nn.Module, linear: Callable[..., Tensor], records: list[Record], targets: Mapping[str, str],
                  projector: KroneckerProjector, batch: int) -> Callable[..., Tensor]:
        # resolved at call time: under functional_call the attributes are the substituted tensors
        tracked = {targets[attr]: functools.reduce(getattr, attr.split("."), mod) for attr in targets}

        def block_of(t: Tensor | None) -> tuple[str, slice | None] | None:
            """Which tracked parameter ``t`` is, or a row block of, and which rows (``None``: all)."""
            for name, p in tracked.items():
                if t is not None and (t is p or t._base is p):
                    start = (t.storage_offset() - p.storage_offset()) // (p.stride(0) if p.ndim > 1 else 1)
                    return name, None if t.shape[0] == p.shape[0] else slice(start, start + t.shape[0])
            return None

        def seq_first(t: Tensor) -> Tensor:  # in-projections see (L, B, E); the out-projection (L*B, E), l-major
            return _wide(t).reshape(-1, batch, t.shape[-1]).transpose(0, 1)

        def recording_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
            y = linear(x, weight, bias)
            w, b = block_of(weight), block_of(bias)
            if (w or b) and y.requires_grad:
                with _own_precision(x):
                    cols = projector.project_cols(w[0], seq_first(x.detach())) if w else None
                record: Record = [cols, None, _edge(y)]
                records.append(record)

                def on_grad(g: Tensor) -> None:
                    record[1] = _linear_blocks(projector, w and w[0], b and b[0], seq_first(g), record[0],
                                               w and w[1], b and b[1])
                    record[0] = record[2] = None

                y.register_hook(on_grad)
            return y

        return recording_linear


from .norms import NormEngine  # noqa: E402 - these build on LayerEngine above
from .batchnorm import BatchNormEngine  # noqa: E402
from .conv_transpose import ConvTransposeEngine  # noqa: E402
from .prelu import PReLUEngine  # noqa: E402
from .embedding_bag import EmbeddingBagEngine  # noqa: E402
from .bilinear import BilinearEngine  # noqa: E402
from .rnn_cells import LSTMCellEngine, RNNCellEngine  # noqa: E402
from .recurrent import RecurrentEngine  # noqa: E402

_ENGINES: tuple[LayerEngine, ...] = (LinearEngine(), EmbeddingEngine(), ConvEngine(), NormEngine(), AttentionEngine(),
                                     BatchNormEngine(), ConvTransposeEngine(), PReLUEngine(), EmbeddingBagEngine(),
                                     BilinearEngine(), RNNCellEngine(), LSTMCellEngine(),
                                     RecurrentEngine())

from .owners import capture_owners, engine_for, foldable_biases  # noqa: E402 - they read _ENGINES
