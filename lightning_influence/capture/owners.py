"""Which engine captures which parameter: the engine of a module (:func:`engine_for`), the modules using each
parameter (:func:`capture_owners`) and the biases foldable into their weight's block (:func:`foldable_biases`)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

from torch import Tensor, nn
from torch.nn.utils.parametrize import ParametrizationList, is_parametrized

from .layers import _ENGINES, ConvEngine, LayerEngine, LinearEngine
from .parametrized import original_attrs, parametrized_engine

__all__ = ["engine_for", "capture_owners", "foldable_biases"]


def engine_for(mod: nn.Module) -> LayerEngine | None:
    """The engine of ``mod``'s type, or ``None``; a module with a parametrized tensor (:mod:`.parametrized`): its base
    type's engine chained to the originals, or none where that engine is not chainable (a recurrent engine reads the
    weights at each call: a parametrized one would be made again, a spectral norm's power iteration run once more)."""
    return parametrized_engine(mod, _engine_of) if original_attrs(mod) else _engine_of(type(mod))


_FORWARD = ("forward", "_conv_forward")  # what a layer's call runs of its own class


def _engine_of(cls: type) -> LayerEngine | None:
    """The engine of ``cls``: one of an engine's types, or a subclass of one that overrides none of its
    :data:`_FORWARD` methods (``NonDynamicallyQuantizableLinear``, a user's ``nn.Linear`` with another ``__init__``: it
    computes as its base does). A subclass with a forward of its own goes to vmap (its forward may do anything);
    what the methods it keeps could still hide (a property ``weight``) ``HookGradientCapture.verify`` catches."""
    for engine in _ENGINES:
        if cls in engine.types:
            return engine
    for engine in _ENGINES:
        if engine.subclasses and any(issubclass(cls, base) and all(getattr(cls, m, None) is getattr(base, m, None)
                                                                   for m in _FORWARD) for base in engine.types):
            return engine
    return None


def capture_owners(model: nn.Module) -> dict[str, list[tuple[str, nn.Module, str]]]:
    """Parameter name -> every (module name, module, attribute path) whose engine captures it.

    Names are those of ``named_parameters()`` (a tied tensor under its first name); a tied
    tensor (an embedding shared with the output layer) has one entry per module using it,
    whose blocks add up. ``out_proj.*`` of a MultiheadAttention is captured by the attention
    module (its forward bypasses ``out_proj``); the originals of a parametrized tensor by the parametrized module
    (``parametrizations.weight.original``: :mod:`.parametrized`), not by the ``ParametrizationList`` holding them.
    """
    canonical = {id(p): n for n, p in model.named_parameters()}
    owners: dict[str, list[tuple[str, nn.Module, str]]] = {}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, ParametrizationList):
            continue
        if type(mod) is nn.MultiheadAttention:
            places = [(mod_name, mod, a) for a, _ in mod.named_parameters(recurse=False)]
            places += [(mod_name, mod, f"out_proj.{a}") for a, _ in mod.out_proj.named_parameters(recurse=False)]
        else:
            places = [(mod_name, mod, a) for a, _ in mod.named_parameters(recurse=False)]
            if is_parametrized(mod):  # parametrize's originals are its ParametrizationList's parameters
                places += [(mod_name, mod, a) for a in original_attrs(mod) if a.startswith("parametrizations.")]
        for place in places:
            p = functools.reduce(getattr, place[2].split("."), place[1])
            owners.setdefault(canonical[id(p)], []).append(place)
    # out_proj's own module entry duplicates the attention module's: drop it
    for name, places in owners.items():
        attn = {pl[1] for pl in places if type(pl[1]) is nn.MultiheadAttention}
        owners[name] = [pl for pl in places if not any(pl[1] is a.out_proj for a in attn)]
    return owners


def foldable_biases(model: nn.Module, param_names: Sequence[str],
                    param_groups: Sequence[Sequence[Tensor]] | None = None) -> dict[str, str]:
    """``{weight: bias}`` of the ``nn.Linear`` and ``nn.Conv1d/2d/3d`` layers (exact types) whose weight and bias
    are both in ``param_names``, used by that layer alone (a tied tensor's other users know no folded bias)
    and in one of ``param_groups`` (the optimizer's: a block's columns share one learning rate).

    Candidates for the projector's ``fold`` (:mod:`.projection`: folded where the weight is projected).
    """
    group = {id(p): i for i, params in enumerate(param_groups or []) for p in params}
    names = set(param_names)
    owners = capture_owners(model)
    out = {}
    for mod_name, mod in model.named_modules():
        if type(mod) not in LinearEngine.types + ConvEngine.types or getattr(mod, "bias", None) is None:
            continue
        weight, bias = (f"{mod_name}.{a}" if mod_name else a for a in ("weight", "bias"))
        if ({weight, bias} <= names and all(len(owners.get(n, [])) == 1 for n in (weight, bias))
                and group.get(id(mod.weight)) == group.get(id(mod.bias))):
            out[weight] = bias
    return out
