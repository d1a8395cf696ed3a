"""Per-sample gradients of a per-sample loss, projected with a :class:`KroneckerProjector`.

The user supplies ``loss_fn(model, batch) -> Tensor[B]`` of per-sample losses; ``batch``
is a pytree (tensor, tuple, list, dict) whose tensor leaves all have the batch as first
dimension, non-tensor leaves are passed through.

Two exact methods:

- :class:`HookGradientCapture`: for ``nn.Linear`` and ``nn.Conv2d`` parameters, rebuilds
  per-sample gradients from the layer inputs and output gradients of one ordinary
  backward pass, projecting each side before the outer product. Cheap enough to run
  on every training step.
- :func:`per_sample_grads_vmap`: ``torch.func`` ``vmap(grad)`` over samples, for any
  parameter; the general fallback.

Both assume samples do not interact in the forward pass (no BatchNorm in train mode).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils import _pytree as pytree

from .projection import KroneckerProjector

__all__ = [
    "LossFn",
    "select_params",
    "HookGradientCapture",
    "per_sample_grads_vmap",
    "per_sample_grads_hooks",
    "call_with_params",
]

LossFn = Callable[[nn.Module, Any], Tensor]
"""``loss_fn(model, batch) -> Tensor[B]``: per-sample losses."""

_SUPPORTED = (nn.Linear, nn.Conv2d)


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


class _LossModule(nn.Module):
    """Lets ``functional_call`` run ``fn(m, *args)`` with overridden parameters of ``m``."""

    def __init__(self, model: nn.Module, fn: Callable[..., Tensor]):
        super().__init__()
        self.m = model
        self.fn = fn

    def forward(self, *args: Any) -> Tensor:
        return self.fn(self.m, *args)


def call_with_params(model: nn.Module, fn: Callable[..., Tensor], params: Mapping[str, Tensor] | None,
                     *args: Any) -> Tensor:
    """``fn(model, *args)`` evaluated with ``params`` overriding (some of) the model's parameters.

    The live model is not changed: parameters are swapped only for the call and buffers
    are cloned. ``params=None`` calls ``fn`` on the model as it is.
    """
    if params is None:
        return fn(model, *args)
    return functional_call(_LossModule(model, fn), _override_dict(model, params), args)


def _override_dict(model: nn.Module, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``functional_call`` dict for a :class:`_LossModule`: ``params`` plus cloned buffers.

    Buffers are cloned so that in-place updates (BatchNorm running stats) do not reach
    the live model.
    """
    known = {n for n, _ in model.named_parameters()}
    unknown = set(params) - known
    if unknown:
        raise KeyError(f"unknown parameter names: {sorted(unknown)}")
    out = {"m." + n: b.clone() for n, b in model.named_buffers()}
    out.update({"m." + n: t for n, t in params.items()})
    return out


def _param_owners(model: nn.Module) -> dict[str, tuple[str, nn.Module, str]]:
    """Parameter name -> (module name, owning module, attribute name)."""
    owners = {}
    for mod_name, mod in model.named_modules():
        for attr, _ in mod.named_parameters(recurse=False):
            owners[f"{mod_name}.{attr}" if mod_name else attr] = (mod_name, mod, attr)
    return owners


class HookGradientCapture:
    """Exact per-sample gradients of ``nn.Linear`` / ``nn.Conv2d`` parameters from hooks.

    Forward hooks (registered once, inactive until :meth:`enable`) save each call's
    detached input and put a tensor hook on the output that saves its gradient. After the
    backward pass, :meth:`collect` forms ``sum_l grad_out[b,l] ⊗ input[b,l]`` per sample,
    projected per side. Linear inputs may have any leading dims ``(B, ..., in)``; Conv2d
    supports stride, padding (any mode), dilation, ``groups=1``. Assumes each selected
    parameter is used only through its module's forward.
    """

    @staticmethod
    def unsupported(model: nn.Module, param_names: Sequence[str]) -> list[str]:
        """The names in ``param_names`` this class cannot capture.

        Supported: weight/bias of modules of exact type ``nn.Linear`` or ``nn.Conv2d``
        (``groups=1``), not shared with another module. Subclasses are refused because
        they may not call their own forward (e.g. ``MultiheadAttention.out_proj``).
        """
        owners = _param_owners(model)
        counts: dict[int, int] = {}
        for _, p in model.named_parameters(remove_duplicate=False):
            counts[id(p)] = counts.get(id(p), 0) + 1
        params = dict(model.named_parameters())
        bad = []
        for name in param_names:
            if name not in owners:
                bad.append(name)
                continue
            _, mod, attr = owners[name]
            ok = (
                type(mod) in _SUPPORTED
                and attr in ("weight", "bias")
                and counts[id(params[name])] == 1
                and not (isinstance(mod, nn.Conv2d) and mod.groups != 1)
            )
            if not ok:
                bad.append(name)
        return bad

    def __init__(self, model: nn.Module, param_names: Sequence[str], projector: KroneckerProjector):
        bad = self.unsupported(model, param_names)
        if bad:
            raise ValueError(f"parameters not supported by hook capture (use per_sample_grads_vmap): {bad}")
        if {s.name for s in projector.specs} != set(param_names):
            raise ValueError("projector must have exactly one spec per captured parameter")
        self.model = model
        self.param_names = list(param_names)
        self.projector = projector
        self.enabled = False
        owners = _param_owners(model)
        # module name -> {"weight": param name, "bias": param name} (only the selected ones)
        self._targets: dict[str, dict[str, str]] = {}
        self._modules: dict[str, nn.Module] = {}
        for name in self.param_names:
            mod_name, mod, attr = owners[name]
            self._targets.setdefault(mod_name, {})[attr] = name
            self._modules[mod_name] = mod
        # module name -> one [input or None, grad_output or None] record per call
        self._records: dict[str, list[list[Tensor | None]]] = {m: [] for m in self._modules}
        self._handles = [
            mod.register_forward_hook(self._make_hook(mod_name), with_kwargs=True)
            for mod_name, mod in self._modules.items()
        ]

    def _make_hook(self, mod_name: str) -> Callable[..., None]:
        keep_input = "weight" in self._targets[mod_name]

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> None:
            if not self.enabled or not output.requires_grad:
                return
            inp = args[0] if args else kwargs["input"]
            record: list[Tensor | None] = [inp.detach() if keep_input else None, None]
            self._records[mod_name].append(record)

            def save_grad(g: Tensor) -> None:
                record[1] = g

            output.register_hook(save_grad)

        return hook

    @property
    def pending(self) -> int:
        """Number of captured module calls not yet consumed by :meth:`collect`."""
        return sum(len(r) for r in self._records.values())

    def enable(self) -> None:
        """Start capturing (drops anything captured and not collected)."""
        self.clear()
        self.enabled = True

    def disable(self) -> None:
        """Stop capturing new forward calls; already captured calls can still be collected."""
        self.enabled = False

    def clear(self) -> None:
        """Drop captured state."""
        for records in self._records.values():
            records.clear()

    def remove(self) -> None:
        """Remove the hooks from the model."""
        self.disable()
        self.clear()
        for h in self._handles:
            h.remove()
        self._handles = []

    def collect(self, loss_grad: Tensor) -> Tensor:
        """Projected per-sample gradients ``(B, out_dim)`` of the per-sample losses.

        ``loss_grad[i]`` is the derivative of the differentiated total w.r.t. ``loss_i``
        (e.g. ``1/(B*accumulation)`` for a mean, times an AMP scale); the captured
        gradients are divided by it, so it must be non-zero. Contributions of repeated
        calls of a module are summed; parameters of modules not reached get zeros.
        Clears the captured state.
        """
        if loss_grad.ndim != 1:
            raise ValueError(f"loss_grad must be 1-D (B,), got shape {tuple(loss_grad.shape)}")
        if loss_grad.device.type == "cpu" and bool((loss_grad == 0).any()):  # on a GPU: non-finite rows, refused by the writer
            raise ValueError("loss_grad has zeros: per-sample gradients cannot be recovered")
        batch = loss_grad.shape[0]
        dtype = torch.promote_types(loss_grad.dtype, torch.float32)
        out = torch.zeros(batch, self.projector.out_dim, dtype=dtype, device=loss_grad.device)
        for mod_name, records in self._records.items():
            mod, targets = self._modules[mod_name], self._targets[mod_name]
            for inp, g_out in records:
                if g_out is None:  # output did not reach the loss
                    continue
                if g_out.shape[0] != batch or (inp is not None and inp.shape[0] != batch):
                    raise ValueError(
                        f"module {mod_name!r}: first dim of input/output is not the batch size {batch}"
                    )
                g_rows = self._output_rows(mod, g_out.to(dtype))
                if "weight" in targets:
                    name = targets["weight"]
                    cols = self._input_cols(mod, inp.to(dtype))
                    out[:, self.projector.slices[name]] += self.projector.project_factored(name, g_rows, cols)
                if "bias" in targets:
                    name = targets["bias"]
                    out[:, self.projector.slices[name]] += self.projector.project_tensor(name, g_rows.sum(1))
        self.clear()
        return out / loss_grad.to(dtype)[:, None]

    @staticmethod
    def _output_rows(mod: nn.Module, g_out: Tensor) -> Tensor:
        """Output gradient as ``(B, L, out_features)``."""
        if isinstance(mod, nn.Conv2d):
            return g_out.reshape(g_out.shape[0], g_out.shape[1], -1).transpose(1, 2)
        return g_out.reshape(g_out.shape[0], -1, g_out.shape[-1])

    @staticmethod
    def _input_cols(mod: nn.Module, inp: Tensor) -> Tensor:
        """Layer input as ``(B, L, cols)`` matching the weight's matrix view."""
        if isinstance(mod, nn.Conv2d):
            # Pad as Conv2d.forward does (covers padding modes and padding="same"),
            # then unfold without padding: columns are ordered (in, kh, kw) like the weight.
            mode = "constant" if mod.padding_mode == "zeros" else mod.padding_mode
            padded = F.pad(inp, mod._reversed_padding_repeated_twice, mode=mode)
            cols = F.unfold(padded, mod.kernel_size, dilation=mod.dilation, stride=mod.stride)
            return cols.transpose(1, 2)
        return inp.reshape(inp.shape[0], -1, inp.shape[-1])


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

    Works for any parameter. Each sample is evaluated as a batch of one
    (``loss_fn(model, sample)[0]``) with independent randomness per sample. ``params``
    overrides some or all parameters (e.g. perturbed copies) without touching the live
    model; ``chunk_size`` bounds memory as in ``torch.func.vmap``.
    """
    overrides = {n: t.detach() for n, t in (params or {}).items()}
    live = dict(model.named_parameters())
    diff = {n: overrides.pop(n) if n in overrides else live[n].detach() for n in param_names}
    wrapper = _LossModule(model, loss_fn)
    fixed = _override_dict(model, overrides)
    leaves, spec = pytree.tree_flatten(batch)
    is_tensor = [isinstance(x, Tensor) for x in leaves]
    tensors = tuple(x for x, t in zip(leaves, is_tensor) if t)

    def sample_loss(p: dict[str, Tensor], sample: tuple[Tensor, ...]) -> Tensor:
        it = iter(sample)
        one = pytree.tree_unflatten([next(it).unsqueeze(0) if t else x for x, t in zip(leaves, is_tensor)], spec)
        call = {**fixed, **{"m." + n: t for n, t in p.items()}}
        return functional_call(wrapper, call, (one,))[0]

    grads = vmap(grad(sample_loss), in_dims=(None, 0), randomness="different", chunk_size=chunk_size)(
        diff, tensors
    )
    return projector.project(grads)


def per_sample_grads_hooks(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    capture: HookGradientCapture,
    params: Mapping[str, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Projected per-sample gradients and losses from one own forward+backward pass.

    Runs ``loss_fn`` through ``functional_call`` with ``params`` overriding some or all
    parameters, differentiates ``losses.sum()`` w.r.t. copies of the captured parameters
    only, and collects from ``capture``. Leaves no ``.grad`` on the live model and does
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
    call = _override_dict(model, overrides)
    was_enabled = capture.enabled
    capture.enable()
    try:
        with torch.enable_grad():
            losses = functional_call(_LossModule(model, loss_fn), call, (batch,))
            torch.autograd.grad(losses.sum(), list(diff.values()), allow_unused=True)
    except BaseException:
        capture.clear()
        raise
    finally:
        capture.enabled = was_enabled
    return capture.collect(torch.ones_like(losses.detach())), losses.detach()
