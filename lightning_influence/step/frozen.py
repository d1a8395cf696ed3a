"""Frozen parameters: the module's parameters that do not train (``requires_grad=False``), stored once per log.

A frozen backbone, a frozen embedding or a LoRA adapter's base weights are parameters the optimizer never moves
(no gradient), so the checkpoints, which hold the trainable ``θ_t``, do not hold them. Their values still shape every
forward: a module rebuilt for the CLI (from its class and ``save_hyperparameters()``) has a fresh random
initialisation there, or lacks the pretrained weights the training script loaded after constructing it. The tracker
stores them with a new log (``frozen.pt``, ``docs/log-format.md``); the CLI loads them into the module it rebuilds
(:func:`restore_frozen`), and replay and every estimator refuse a module whose frozen parameters differ from the
log's (:func:`check_frozen`, from ``replay.checkpoint_params``): every forward they run uses the module's own frozen
parameters, which must be training's. Pure torch.
"""

from __future__ import annotations

import os
import warnings
import weakref
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from lightning_influence.log.format import FROZEN_FILE

__all__ = ["changed_frozen", "check_frozen", "check_module_class", "frozen_parameters", "load_frozen", "logged_frozen",
           "restore_frozen", "store_frozen"]

_LOADED: "weakref.WeakKeyDictionary[Any, dict[str, Tensor] | None]" = weakref.WeakKeyDictionary()
# module -> (log, (id, version) of its frozen parameters) when last found equal to the log's: checkpoint_params calls
# check_frozen for every checkpoint a sweep reads, and a frozen backbone is the model's largest part
_CHECKED: "weakref.WeakKeyDictionary[nn.Module, tuple[int, tuple[tuple[int, int], ...]]]" = weakref.WeakKeyDictionary()


def frozen_parameters(module: nn.Module) -> dict[str, Tensor]:
    """The parameters of ``module`` that do not train (``requires_grad=False``), by name."""
    return {n: p for n, p in module.named_parameters() if not p.requires_grad}


def store_frozen(log_dir: str | os.PathLike, module: nn.Module) -> dict[str, Any] | None:
    """Write ``module``'s frozen parameters to the log's ``frozen.pt`` (atomically); returns the ``meta.h5`` entry
    (``{"file", "names", "bytes"}``), ``None`` when every parameter trains (nothing written)."""
    frozen = frozen_parameters(module)
    if not frozen:
        return None
    root = Path(log_dir)
    root.mkdir(parents=True, exist_ok=True)
    values = {n: p.detach().cpu().clone() for n, p in frozen.items()}
    tmp = root / (FROZEN_FILE + ".tmp")
    torch.save(values, tmp)
    os.replace(tmp, root / FROZEN_FILE)
    return {"file": FROZEN_FILE, "names": list(values), "bytes": sum(v.numel() * v.element_size() for v in values.values())}


def load_frozen(log_dir: str | os.PathLike, entry: Mapping[str, Any] | None) -> dict[str, Tensor] | None:
    """The frozen parameters a log stores (``entry``: its ``meta.h5`` ``frozen`` entry; ``None``: none stored)."""
    if not entry:
        return None
    path = Path(log_dir) / str(entry.get("file", FROZEN_FILE))
    if not path.exists():
        raise FileNotFoundError(f"{path}: the log's frozen parameters ({len(entry.get('names', []))} tensors, which "
                                "training used but never changed) are missing; restore the file from a backup")
    values = torch.load(path, map_location="cpu", weights_only=True)
    missing = sorted(set(entry.get("names", [])) - set(values))
    if missing:
        raise ValueError(f"{path} lacks the frozen parameters {missing[:5]} that meta.h5 lists: the file is damaged")
    return values


def changed_frozen(log_dir: str | os.PathLike, module: nn.Module) -> list[str]:
    """The frozen parameters of ``module`` that differ from the log's ``frozen.pt`` (at the fit's end: an EMA teacher or
    another update outside the optimizer changed them), by name, with a warning; ``[]`` for a log that stores none."""
    path = Path(log_dir) / FROZEN_FILE
    if not path.exists():
        return []
    stored = torch.load(path, map_location="cpu", weights_only=True)
    live = frozen_parameters(module)
    changed = [n for n, v in stored.items() if n not in live or not torch.equal(live[n].detach().to("cpu", v.dtype), v)]
    if changed:
        warnings.warn(f"InfluenceTracker: the fit changed frozen (requires_grad=False) parameters {changed[:5]}, which "
                      "the log stores once: the estimators will refuse this log")
    return changed


def mark_changed(meta: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """``meta.h5`` saying which frozen parameters the fit changed (:func:`changed_frozen`): the estimators refuse it."""
    return {**meta, "frozen": {**(meta.get("frozen") or {}), "changed": list(names)}}


def _refuse_changed(log: Any) -> None:
    changed = (log.meta.get("frozen") or {}).get("changed")
    if changed:
        raise ValueError(
            f"the run changed its frozen (requires_grad=False) parameters {changed[:5]} during the fit (an EMA teacher "
            "or another update outside the optimizer): the log stores them once, as at the fit's start, so replay and "
            "the estimators cannot reproduce its steps. Keep frozen parameters fixed during a tracked fit")


def logged_frozen(log: Any) -> dict[str, Tensor] | None:
    """The frozen parameters of ``log`` (an :class:`~lightning_influence.log.reader.InfluenceLog`), read once per log
    object; ``None`` for a log that stores none (every parameter trained, or a log written before they were stored)."""
    if log not in _LOADED:
        _LOADED[log] = load_frozen(log.path, log.meta.get("frozen"))
    return _LOADED[log]


def _matching(log: Any, module: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(the log's frozen parameters, the module's parameters of those names)``; refuses a name the module lacks, and a
    run that changed them."""
    _refuse_changed(log)
    stored = logged_frozen(log) or {}
    live = dict(module.named_parameters())
    missing = sorted(set(stored) - set(live))
    if missing:
        raise ValueError(f"the module does not match the log: the run's frozen parameters {missing[:5]} are not "
                         "parameters of the module given")
    return stored, {n: live[n] for n in stored}


def restore_frozen(log: Any, module: nn.Module) -> nn.Module:
    """Copy ``log``'s frozen parameters into ``module`` (in place, in the module's dtype and device) and freeze them
    (``requires_grad=False``), as training had them; returns ``module``. Nothing to do for a log that stores none."""
    stored, live = _matching(log, module)
    with torch.no_grad():
        for n, p in live.items():
            if tuple(p.shape) != tuple(stored[n].shape):
                raise ValueError(f"frozen parameter {n!r} has shape {tuple(p.shape)} in the module but "
                                 f"{tuple(stored[n].shape)} in the log: the module does not match the log")
            p.copy_(stored[n].to(p.device, p.dtype))
            p.requires_grad_(False)
    return module


def check_frozen(log: Any, module: nn.Module) -> None:
    """Refuse a module whose frozen parameters are not the values training used (the log's): every forward of replay
    and of the estimators would run another model (a freshly built module's random initialisation, say)."""
    stored, live = _matching(log, module)
    seen = (id(log), tuple((id(p), p._version) for p in live.values()))  # unchanged since checked: not compared again
    if not live or _CHECKED.get(module) == seen:
        return
    for n, p in live.items():
        ref = stored[n]
        if tuple(p.shape) != tuple(ref.shape) or not torch.equal(p.detach().to("cpu", ref.dtype), ref):
            raise ValueError(
                f"the module's frozen parameter {n!r} differs from the one training used (the log stores the run's "
                f"frozen parameters, {len(stored)} tensors): a freshly built module? Pass the trained module, or load "
                "them first: lightning_influence.restore_frozen(log, module)")
    _CHECKED[module] = seen


def check_module_class(log: Any, module: nn.Module) -> None:
    """Warn where ``module``'s class is not named as the class the run trained (``meta["module_class"]``; the name
    alone, so the same class imported from elsewhere or defined again in a notebook passes). A model of other layers
    with the same parameter shapes (a Tanh for a ReLU) loads the checkpoints; replay then fails its drift check, but
    what replays nothing (TracIn, Gauss-Newton DIT, a query at a checkpoint) would score with it silently."""
    recorded = str(log.meta.get("module_class") or "")
    given = type(getattr(module, "_orig_mod", module)).__qualname__  # torch.compile's wrapper: the module it compiled
    if recorded and recorded.rpartition(".")[2] != given.rpartition(".")[2]:
        warnings.warn(f"{log.path}: the run trained a {recorded}, the module given is a {given}: with the same parameter "
                      "shapes its checkpoints load, but scores are those of the model given (different layers give "
                      "different scores); pass the class the run trained", UserWarning, stacklevel=3)
