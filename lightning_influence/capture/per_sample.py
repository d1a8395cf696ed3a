"""Per-sample gradients of a per-sample loss, projected with a :class:`KroneckerProjector`.

The user supplies ``loss_fn(model, batch) -> Tensor[B]`` of per-sample losses; ``batch``
is a pytree (tensor, tuple, list, dict) whose tensor leaves all have the batch as first
dimension, non-tensor leaves are passed through.

Two exact engines, mixed per parameter by :func:`per_sample_grads`:

- :class:`HookGradientCapture`: for the parameters of common layers (:mod:`.layers`),
  rebuilds per-sample gradients from the layer inputs and output gradients of one ordinary
  backward pass, projecting each side before the outer product; raw parameters the model adds,
  multiplies or expands to the batch itself likewise (:mod:`.raw_params`). Cheap enough to run
  on every training step.
- :func:`per_sample_grads_vmap`: ``torch.func`` ``vmap(grad)`` over samples, for any
  parameter; the fallback for the parameters no hook covers. Where ``vmap`` has no batching rule
  (an ``nn.LSTM`` left to it, packed sequences), :func:`per_sample_grads_backward`: one batched forward and
  a backward pass per sample.

Both assume samples do not interact in the forward pass (no BatchNorm in train mode).
"""

from __future__ import annotations

import contextlib
import fnmatch
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils import _pytree as pytree

from ..data import batch_size_of
from .layers import InputMemo, _edge, _wide, capture_owners, engine_for
from .projection import KroneckerProjector, Outer, dense
from .raw_params import RawWatch
from .vjp import batched_grad
from .functional import _LossModule, _carried, _override_dict, call_with_params

__all__ = [
    "LossFn",
    "select_params",
    "HookGradientCapture",
    "per_sample_grads_vmap",
    "per_sample_grads_backward",
    "per_sample_grad_blocks",
    "batched_grad",
    "per_sample_grads_hooks",
    "per_sample_grads",
    "call_with_params",
    "hooks_paused",
]

LossFn = Callable[[nn.Module, Any], Tensor]
"""``loss_fn(model, batch) -> Tensor[B]``: per-sample losses."""

_WIDE = (torch.float32, torch.float64)  # rows' dtypes as they are (promote_types is a dispatched call: one per step)

def select_params(
    model: nn.Module, include: Sequence[str] | None = None, exclude: Sequence[str] | None = None
) -> list[str]:
    """Names of trainable parameters matching any ``include`` and no ``exclude`` pattern.

    Patterns are ``fnmatch`` globs on ``named_parameters`` names; ``include=None`` means
    all. Raises ``ValueError`` listing the available names if nothing is selected.
    """
    available = [n for n, p in model.named_parameters() if p.requires_grad]
    names = [
        n
        for n in available
        if (include is None or any(fnmatch.fnmatchcase(n, pat) for pat in include))
        and not any(fnmatch.fnmatchcase(n, pat) for pat in (exclude or ()))
    ]
    if not names:
        raise ValueError(
            f"no trainable parameter matches include={include!r} exclude={exclude!r}; available: {available}"
        )
    return names


class HookGradientCapture:
    """Exact per-sample gradients of the parameters of common layers, from hooks.

    One engine per layer type (:mod:`.layers`: Linear on inputs of any rank, Conv1d/2d/3d,
    ConvTranspose1d/2d/3d, Bilinear, RNNCell, GRUCell, LSTMCell, RNN/GRU/LSTM, Embedding, EmbeddingBag, LayerNorm/GroupNorm/RMSNorm, BatchNorm, InstanceNorm, PReLU, MultiheadAttention) saves what it needs from
    each forward call (hooks registered once, inactive until :meth:`enable`) and, with the
    output gradient of the backward pass, forms every sample's projected gradient in
    :meth:`collect`. ``param_names`` may be a subset of the projector's tensors (the others
    get zero columns: another engine fills them). Assumes each captured parameter is used
    only through its module's forward. ``raw``: those of ``param_names`` no layer engine covers, used by the model
    directly (a ViT's ``pos_embed``, a layer scale): :class:`~.raw_params.RawWatch` follows them through the
    forwards between :meth:`watch` and :meth:`unwatch`, and demotes those it meets in an op it does not know.
    """

    @staticmethod
    def unsupported(model: nn.Module, param_names: Sequence[str]) -> list[str]:
        """The names in ``param_names`` no layer engine captures.

        Supported: the parameters :func:`.layers.engine_for` knows for modules of its types
        (and of subclasses that keep their base's forward); a tensor tied between
        modules (an embedding shared with the output layer) when every module using it is.
        """
        owners = capture_owners(model)
        bad = []
        for name in param_names:
            places = owners.get(name, [])
            if not places or not all(engine_for(mod) is not None and engine_for(mod).supports(mod, attr)
                                     for _, mod, attr in places):
                bad.append(name)
        return bad

    def __init__(self, model: nn.Module, param_names: Sequence[str], projector: KroneckerProjector,
                 raw: Sequence[str] = ()):
        bad = [n for n in self.unsupported(model, param_names) if n not in raw]
        if bad:
            raise ValueError(f"parameters not supported by hook capture (use per_sample_grads_vmap): {bad}")
        missing = set(param_names) - set(projector.block_of)
        if missing:
            raise ValueError(f"projector has no spec for captured parameters {sorted(missing)}")
        self.model = model
        self.param_names = list(param_names)
        self.projector = projector
        self.enabled = False
        owners = capture_owners(model)
        # module name -> {attribute: param name} (only the selected ones)
        self._targets: dict[str, dict[str, str]] = {}
        self._modules: dict[str, nn.Module] = {}
        raw = [n for n in raw if n in self.param_names]
        for name in self.param_names:
            if name in raw:
                continue
            for mod_name, mod, attr in owners[name]:
                self._targets.setdefault(mod_name, {})[attr] = name
                self._modules[mod_name] = mod
        # module name -> one record [what the forward kept, projected blocks after the backward] per call
        self._records: dict[str, list[list[Any]]] = {m: [] for m in self._modules}
        # the column sides of the layers fed the batch, for passes at other parameters (OwnPasses.hvp_products)
        self.inputs = InputMemo()
        self._handles = {
            mod_name: engine_for(mod).attach(mod, self._records[mod_name], lambda: self.enabled, self._targets[mod_name],
                                             projector, self.inputs)
            for mod_name, mod in self._modules.items()
        }
        self.demoted: list[str] = []  # parameters handed back: their module ran without the batch dimension
        self.raw = RawWatch(raw, projector, lambda: self.enabled, _edge, _wide) if raw else None

    @property
    def outputs(self) -> list[Any]:
        """Gradient edges of the outputs of the captured calls whose gradient has not arrived yet."""
        edges = [r[2] for records in self._all_records() for r in records if r[2] is not None]
        # a layer with several outputs (recurrent.MultiOutputEngine) keeps one edge each
        return [e for edge in edges for e in (edge if type(edge) is tuple else (edge,))] if any(
            type(e) is tuple for e in edges) else edges

    @property
    def pending(self) -> int:
        """Number of captured module calls not yet consumed by :meth:`collect`."""
        return sum(len(r) for r in self._all_records())

    def _all_records(self) -> list[list[list[Any]]]:
        return [*self._records.values(), *([self.raw.records] if self.raw is not None else [])]

    def watch(self, batch: int, tensors: Mapping[str, Tensor] | None = None) -> None:
        """Follow the raw parameters through the forward of ``batch`` samples that starts now (``tensors``: the
        parameters by name, if not the model's own: ``functional_call``'s); nothing without raw parameters left.
        Pair with :meth:`unwatch` (a ``try``/``finally``, or the callback's hooks and ``on_exception``)."""
        if self.raw is not None and self.raw.names:
            live = tensors is None
            self.raw.start(batch, {n: self.model.get_parameter(n) for n in self.raw.names} if live else tensors)

    def unwatch(self) -> None:
        """End :meth:`watch` (idempotent): the uses recorded so far get their blocks in the backward."""
        if self.raw is not None:
            self.raw.stop()

    def enable(self) -> None:
        """Start capturing (drops anything captured and not collected, and, outside :attr:`inputs`' reuse, the memo)."""
        self.clear()
        if not self.inputs.reuse:
            self.inputs.clear()
        self.enabled = True

    def disable(self) -> None:
        """Stop capturing new forward calls; already captured calls can still be collected."""
        self.enabled = False
        self.unwatch()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No capturing inside (a pass of another engine: vmap, a reference pass), the state as before after."""
        was_enabled, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = was_enabled

    def clear(self) -> None:
        """Drop captured state."""
        for records in self._all_records():
            records.clear()

    def remove(self) -> None:
        """Remove the hooks from the model."""
        self.disable()
        self.clear()
        self.inputs.clear()
        for handles in self._handles.values():
            for h in handles:
                h.remove()
        self._handles = {}

    def demote(self, names: set[str], why: str = "its module ran on a tensor without the batch as first dimension "
                "(e.g. a positional embedding of arange(T))") -> None:
        """Stop capturing ``names`` (in every module using them): they leave :attr:`param_names` for another engine.

        A folded weight and bias (one block) go together."""
        names = {t for n in names for t in self.projector.spec(self.projector.block_of[n]).tensors} & set(self.param_names)
        self.inputs.clear()  # kept for the targets as they were
        for mod_name in [m for m, t in self._targets.items() if names & set(t.values())]:
            targets = self._targets[mod_name]
            for attr in [a for a, n in targets.items() if n in names]:
                del targets[attr]  # in place: the module's hooks see it
            if not targets:
                for h in self._handles.pop(mod_name):
                    h.remove()
                del self._targets[mod_name], self._modules[mod_name], self._records[mod_name]
        if self.raw is not None:
            self.raw.drop(names)
        self.param_names = [n for n in self.param_names if n not in names]
        self.demoted += sorted(names)
        warnings.warn(f"{why}: parameters {sorted(names)} are not captured by hooks from now on (vmap computes "
                      "them; a module input expanded to the batch keeps them on hooks)", stacklevel=3)

    def verify(self, model: nn.Module, loss_fn: LossFn, batch: Any, rows: Tensor | None = None, sample: int = 0,
               rtol: float = 1e-3) -> list[str]:
        """Check one sample's hooked row against autograd on that sample alone; demote the modules that differ.

        Catches what shapes cannot: a module run on a tensor without the batch dimension whose
        first dimension happens to equal the batch size (``wpe(arange(T))`` with ``T == B``), a
        loss that mixes samples. Runs in eval mode (dropout off; the modules' modes and the RNG
        are restored) one own hooked pass on ``batch`` and one pass on sample ``sample``; a
        parameter whose projected gradients differ by more than ``rtol`` of their norm demotes
        its module (:attr:`demoted`, a warning) and gets zero columns in ``rows`` (in place),
        for another engine to fill. Returns the demoted names.
        """
        if not self.param_names:  # every hooked tensor demoted already (raw parameters in an unknown use): vmap's
            return []
        modes = {m: m.training for m in model.modules()}
        devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
        try:
            with torch.random.fork_rng(devices=devices):
                model.eval()
                hooked, _ = per_sample_grads_hooks(model, loss_fn, batch, self)
                one = pytree.tree_map(lambda x: x[sample:sample + 1] if isinstance(x, Tensor) else x, batch)
                params = dict(model.named_parameters())
                with self.paused(), torch.enable_grad():  # the sample's own pass is the reference: not captured
                    grads = torch.autograd.grad(loss_fn(model, one)[0], [params[n] for n in self.param_names],
                                                allow_unused=True)
        finally:
            for m, mode in modes.items():
                m.training = mode
        found = {n: g.detach()[None].to(hooked.dtype) for n, g in zip(self.param_names, grads) if g is not None}
        expected_row = self.projector.project(found, partial=True)[0] if found else torch.zeros_like(hooked[sample])
        bad = set()
        for block in dict.fromkeys(self.projector.block_of[n] for n in self.param_names):
            row, expected = hooked[sample, self.projector.slices[block]], expected_row[self.projector.slices[block]]
            scale = max(float(torch.linalg.vector_norm(row)), float(torch.linalg.vector_norm(expected)))
            if float(torch.linalg.vector_norm(row - expected)) > rtol * scale:
                bad.update(set(self.projector.spec(block).tensors) & set(self.param_names))
        if bad:
            self.demote(bad, "hooked per-sample gradients differ from autograd on the sample alone")
        demoted = sorted(bad)
        if rows is not None:
            for name in demoted:
                rows[:, self.projector.slices[self.projector.block_of[name]]] = 0
        return demoted

    def collect(self, loss_grad: Tensor) -> Tensor:
        """Projected per-sample gradients ``(B, out_dim)`` of the per-sample losses (:meth:`_gather`)."""
        return self._assemble(*self._gather(loss_grad))

    def collect_factored(self, loss_grad: Tensor) -> tuple[Tensor, tuple[tuple[int, int, int], ...]]:
        """:meth:`collect`'s rows with each outer-product block (a Linear on ``(B, in)``) left as its two factors, the
        row factor divided by the sample's weight (``docs/log-format.md``, factored rows): the stored rows ``(B, S)``
        and ``(start, k_rows, k_cols)`` of each factored block, ``start`` its first column in ``collect``'s layout
        (``log.outer.OuterColumns``). No block factored (none is an outer product, or a layer ran twice): ``collect``'s
        rows and ``()``."""
        parts, batch, dtype, device, scale = self._gather(loss_grad)
        specs, slices = self.projector.specs, self.projector.slices
        if not self._one_part_each(parts, dtype) or not any(isinstance(parts[s.name][0], Outer) for s in specs):
            return self._assemble(parts, batch, dtype, device, scale), ()
        blocks, pieces = [], []  # one cat of the pieces: a few dispatches on a path that runs at every step
        for s in specs:
            block = parts[s.name][0]
            if isinstance(block, Outer):
                blocks.append((slices[s.name].start, block.a.shape[1], block.b.shape[1]))
                pieces += (torch.div(block.a, scale), block.b)
            else:
                pieces.append(torch.div(block, scale))
        return torch.cat(pieces, 1), tuple(blocks)

    def _gather(self, loss_grad: Tensor) -> tuple[dict[str, list[Tensor | Outer]], int, torch.dtype, torch.device, Tensor]:
        """The captured blocks of the per-sample losses, by block name, with what assembling them needs.

        ``loss_grad[i]`` is the derivative of the differentiated total w.r.t. ``loss_i``
        (e.g. ``1/(B*accumulation)`` for a mean, times an AMP scale); the captured
        gradients are divided by it, so it must be non-zero. Contributions of repeated
        calls of a module are summed; parameters of modules not reached, and the
        projector's tensors not captured here, get zeros. A module that ran on a tensor
        without the batch as first dimension is demoted (:attr:`demoted`, a warning): its
        parameters get zeros and leave :attr:`param_names`, so that the caller computes them
        by another engine. Clears the captured state.
        """
        if loss_grad.ndim != 1:
            raise ValueError(f"loss_grad must be 1-D (B,), got shape {tuple(loss_grad.shape)}")
        # on a GPU: non-finite rows, refused by the writer; on the CPU a Python list (half the cost of a reduction here)
        if loss_grad.device.type == "cpu" and 0.0 in loss_grad.tolist():
            raise ValueError("loss_grad has zeros: per-sample gradients cannot be recovered")
        batch = loss_grad.shape[0]
        dtype = loss_grad.dtype if loss_grad.dtype in _WIDE else torch.promote_types(loss_grad.dtype, torch.float32)
        parts: dict[str, list[Tensor | Outer]] = {}  # block name -> its blocks (one per module call reaching the loss)
        demoted = len(self.demoted)
        try:
            if self.raw is not None:
                if self.raw.bad:  # met in an op the raw engine does not know: their columns stay zero here
                    self.demote(set(self.raw.bad), "used with the batch in an operation the raw-parameter engine does "
                                "not know (docs/per-sample-gradients.md, Raw parameters)")
                for record in self.raw.records:
                    for name, block in (record[1] or {}).items():
                        parts.setdefault(name, []).append(block)
            for mod_name, records in list(self._records.items()):
                if mod_name not in self._records:  # removed by a demotion of a tied tensor in this loop
                    continue
                done = [r[1] for r in records if r[1] is not None]  # an output that did not reach the loss has none
                if any(block.shape[0] != batch for blocks in done for block in blocks.values()):
                    # its columns stay zero here: the caller's other engine fills them
                    self.demote(set(self._targets[mod_name].values()) & set(self.param_names))
                    continue
                for blocks in done:
                    for name, block in blocks.items():
                        parts.setdefault(name, []).append(block)
        finally:
            self.clear()
        if len(self.demoted) != demoted:  # keep those not demoted in this loop (a tied tensor's other module may have been)
            live = set(self.param_names)
            parts = {name: blocks for name, blocks in parts.items() if name in live}
        scale = loss_grad if loss_grad.dtype == dtype else loss_grad.to(dtype)
        return parts, batch, dtype, loss_grad.device, scale.unsqueeze(1)

    def _one_part_each(self, parts: dict[str, list[Tensor | Outer]], dtype: torch.dtype) -> bool:
        """Every block has exactly one part, of ``dtype`` (each layer called once: the common case)."""
        specs = self.projector.specs
        return len(parts) == len(specs) and all(len(parts.get(s.name, ())) == 1 and parts[s.name][0].dtype == dtype
                                                for s in specs)

    def _assemble(self, parts: dict[str, list[Tensor | Outer]], batch: int, dtype: torch.dtype,
                  device: torch.device, scale: Tensor) -> Tensor:
        """``(B, out_dim)`` divided row by row by ``scale`` ``(B, 1)``: each block's columns the sum of its parts, zeros
        where it has none. When every block has exactly one part of the right dtype (each layer called once: the common
        case), each is written straight into its columns, divided on the way (one pass over a dense block, not a copy
        and a second pass; an :class:`~.projection.Outer` is computed there and then divided, its rounding as before),
        with no zero fill, no block of its own and no concatenation."""
        specs, slices = self.projector.specs, self.projector.slices
        if self._one_part_each(parts, dtype):
            out = torch.empty(batch, self.projector.out_dim, dtype=dtype, device=device)
            outer = [s for s in specs if isinstance(parts[s.name][0], Outer)]
            for s in specs:
                block = parts[s.name][0]
                if isinstance(block, Outer):
                    block.write(out[:, slices[s.name]])
                else:
                    torch.div(block, scale, out=out[:, slices[s.name]])
            if len(outer) == len(specs):  # all outer products (an MLP): one pass over the rows
                return out.div_(scale)
            for s in outer:
                out[:, slices[s.name]].div_(scale)
            return out
        out = torch.zeros(batch, self.projector.out_dim, dtype=dtype, device=device)
        for name, blocks in parts.items():
            for block in blocks:
                out[:, slices[name]] += dense(block)
        return out.div_(scale)


def per_sample_grads_vmap(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    param_names: Sequence[str],
    projector: KroneckerProjector,
    params: Mapping[str, Tensor] | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Projected per-sample gradients ``(B, out_dim)`` by ``vmap(grad)`` over samples.

    Works for any parameter; the projector's tensors not in ``param_names`` get zero columns. Each sample is evaluated as a batch of one
    (``loss_fn(model, sample)[0]``) with independent randomness per sample. ``params``
    overrides some or all parameters (e.g. perturbed copies) without touching the live
    model; ``chunk_size`` bounds memory as in ``torch.func.vmap``.
    """
    if model in _NO_VMAP:
        return per_sample_grads_backward(model, loss_fn, batch, param_names, projector, params)
    overrides = {n: t.detach() for n, t in (params or {}).items()}
    live = dict(model.named_parameters())
    diff = {n: overrides.pop(n) if n in overrides else live[n].detach() for n in param_names}
    wrapper = _LossModule(model, loss_fn)
    fixed = _override_dict(model, overrides, _carried(params))
    leaves, spec = pytree.tree_flatten(batch)
    is_tensor = [isinstance(x, Tensor) for x in leaves]
    tensors = tuple(x for x, t in zip(leaves, is_tensor) if t)

    def sample_loss(p: dict[str, Tensor], sample: tuple[Tensor, ...]) -> Tensor:
        it = iter(sample)
        one = pytree.tree_unflatten([next(it).unsqueeze(0) if t else x for x, t in zip(leaves, is_tensor)], spec)
        call = {**fixed, **{"m." + n: t for n, t in p.items()}}
        return functional_call(wrapper, call, (one,))[0]

    state = torch.get_rng_state()
    try:
        with torch.no_grad():  # grad differentiates inside; no graph to the live parameters outside (rows are data)
            grads = vmap(grad(sample_loss), in_dims=(None, 0), randomness="different", chunk_size=chunk_size)(
                diff, tensors
            )
            return projector.project(grads, partial=len(diff) != len(projector.block_of))
    except (RuntimeError, NotImplementedError) as err:  # no batching rule (nn.LSTM/GRU, packed sequences, ...)
        _NO_VMAP.add(model)  # from now on straight to the backward passes (a genuine error fails again there)
        warnings.warn(f"torch.func.vmap cannot evaluate {type(model).__name__} one sample at a time ({str(err)[:120]}); "
                      "its per-sample gradients come from one batched forward and a backward pass per sample instead "
                      "(exact, docs/per-sample-gradients.md)", stacklevel=2)
    torch.set_rng_state(state)
    return per_sample_grads_backward(model, loss_fn, batch, param_names, projector, params)


_NO_VMAP: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
"""Models ``vmap`` failed on (:func:`per_sample_grads_vmap` falls back to :func:`per_sample_grads_backward`)."""


def per_sample_grads_backward(model: nn.Module, loss_fn: LossFn, batch: Any, param_names: Sequence[str],
                              projector: KroneckerProjector | None = None, params: Mapping[str, Tensor] | None = None,
                              chunk_size: int = 32, forward: Callable[[], Any] = contextlib.nullcontext) -> Tensor:
    """Per-sample gradients ``(B, K)`` of ``param_names`` from one plain batched forward (inside ``forward()``, a
    context: the caller's random state, autocast and modes) and the backward passes of the unit cotangents ``e_i``,
    vectorised ``chunk_size`` at a time (:func:`batched_grad`). Exact for any architecture whose samples do not
    interact in the forward: the fallback where ``vmap`` has no batching rule, and the way to keep the training
    forward's dropout masks (``step.micro.per_sample_grads_masked``). Projected by ``projector`` if given (columns
    of parameters outside ``param_names`` zero), else flattened in ``param_names`` order."""
    return torch.cat(list(per_sample_grad_blocks(model, loss_fn, batch, param_names, projector, params, chunk_size,
                                                 forward)))


def per_sample_grad_blocks(model: nn.Module, loss_fn: LossFn, batch: Any, param_names: Sequence[str],
                           projector: KroneckerProjector | None = None, params: Mapping[str, Tensor] | None = None,
                           chunk_size: int = 32, forward: Callable[[], Any] = contextlib.nullcontext,
                           block: int | None = None) -> Iterator[Tensor]:
    """:func:`per_sample_grads_backward`'s rows ``block`` samples at a time (``None``: all), from its one forward: a
    caller that consumes each block before the next holds ``block`` rows, not ``B`` (DIT's step removal)."""
    overrides = {n: t.detach() for n, t in (params or {}).items()}
    live = dict(model.named_parameters())
    leaves = {n: (overrides.pop(n) if n in overrides else live[n].detach()).requires_grad_(True) for n in param_names}
    fixed = _override_dict(model, overrides, _carried(params))
    wrapper = _LossModule(model, loss_fn)
    with torch.enable_grad():
        with forward():
            out = functional_call(wrapper, {**fixed, **{"m." + n: t for n, t in leaves.items()}}, (batch,))
    n_rows = out.shape[0]
    eye = torch.eye(n_rows, dtype=out.dtype, device=out.device)
    block = n_rows if block is None else max(1, int(block))
    for b0 in range(0, n_rows, block):
        rows = []
        with torch.enable_grad():
            for c0 in range(b0, min(n_rows, b0 + block), chunk_size):
                e = eye[c0:min(c0 + chunk_size, b0 + block)]
                g = batched_grad(out, list(leaves.values()), e, allow_unused=True)
                rows.append([torch.zeros(len(e), *leaves[n].shape, dtype=out.dtype, device=out.device) if gi is None
                             else gi for n, gi in zip(leaves, g)])
        grads = {n: torch.cat([r[i] for r in rows]).detach() for i, n in enumerate(leaves)}
        del rows
        if projector is not None:
            yield projector.project(grads, partial=True)
        else:
            yield torch.cat([grads[n].reshape(grads[n].shape[0], -1) for n in param_names], dim=1)


def per_sample_grads_hooks(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    capture: HookGradientCapture,
    params: Mapping[str, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Projected per-sample gradients and losses from one own forward+backward pass.

    Runs ``loss_fn`` through ``functional_call`` with ``params`` overriding some or all
    parameters (copies of the captured ones, requiring grad), differentiates ``losses.sum()``
    w.r.t. the captured layers' outputs only, and collects from ``capture``. Leaves no ``.grad`` on the live model and does
    not change it (buffers are cloned). Must not be called while ``capture`` holds
    uncollected calls of a training step.
    Returns ``(grads (B, out_dim), losses (B,))``.
    """
    if capture.model is not model:
        raise ValueError("capture was built for a different model")
    if capture.pending:
        raise RuntimeError("capture holds uncollected calls; collect them first")
    overrides = {n: t.detach() for n, t in (params or {}).items()}
    live = dict(model.named_parameters())
    diff = {n: overrides.get(n, live[n].detach()).detach().requires_grad_(True) for n in capture.param_names}
    overrides.update(diff)
    call = _override_dict(model, overrides, _carried(params))
    was_enabled = capture.enabled
    capture.enable()
    try:
        with torch.enable_grad():
            capture.watch(batch_size_of(batch), {n: call["m." + n] for n in capture.param_names})
            try:
                losses = functional_call(_LossModule(model, loss_fn), call, (batch,))
            finally:
                capture.unwatch()
            # differentiate w.r.t. the captured layers' outputs, not the parameters: the backward then
            # skips every weight-gradient product (a third of its work) and still runs the hooks
            outputs = capture.outputs
            if outputs:
                torch.autograd.grad(losses.sum(), outputs, allow_unused=True)
    except BaseException:
        capture.clear()
        raise
    finally:
        capture.enabled = was_enabled
    return capture.collect(torch.ones_like(losses.detach())), losses.detach()




def hooks_paused(capture: HookGradientCapture | None) -> contextlib.AbstractContextManager[None]:
    """``capture.paused()`` (another engine's pass must not feed the hooks), or nothing without a capture."""
    return contextlib.nullcontext() if capture is None else capture.paused()


def per_sample_grads(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    param_names: Sequence[str],
    projector: KroneckerProjector,
    capture: HookGradientCapture | None = None,
    params: Mapping[str, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Projected per-sample gradients and losses, each parameter by the cheapest exact engine.

    The parameters ``capture`` covers come from one hooked forward+backward, the others of
    ``param_names`` from ``vmap`` (started from the same RNG state). ``params`` overrides
    parameters as in :func:`per_sample_grads_hooks`. Returns ``(grads (B, out_dim), losses (B,))``.
    """
    state = torch.get_rng_state()
    if capture is not None and capture.param_names:
        grads, losses = per_sample_grads_hooks(model, loss_fn, batch, capture, params=params)
    else:
        with torch.no_grad():
            losses = call_with_params(model, loss_fn, params, batch).detach()
        grads = None
    rest = [n for n in param_names if capture is None or n not in capture.param_names]  # after a demotion
    if rest:
        torch.set_rng_state(state)
        with hooks_paused(capture):  # the hooks off under vmap
            vmapped = per_sample_grads_vmap(model, loss_fn, batch, rest, projector, params=params)
        grads = vmapped if grads is None else grads + vmapped
    return grads, losses
