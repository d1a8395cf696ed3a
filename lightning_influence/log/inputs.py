"""The stored inputs of a micro-batch (``InfluenceTracker(store_inputs=True)``): its batch as ``torch.save`` bytes.

Read back with ``torch.load(weights_only=True)``, which opens tensors, numbers, strings and the built-in containers
but no other class: a dataclass batch (which Lightning accepts) is stored as a marked dict, ``{"__dataclass__":
"module.QualName", "fields": {...}}`` (``recipe.class_path``: a class of the training script by the script's module
name), and rebuilt on reading by importing its class again.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import io
from typing import Any

import torch

__all__ = ["decode_batch", "encode_batch"]

_MARK = "__dataclass__"


def encode_batch(batch: Any) -> bytes:
    """``batch`` (tensors on the CPU) as bytes :func:`decode_batch` reads back."""
    buffer = io.BytesIO()
    torch.save(_plain(batch), buffer)
    return buffer.getvalue()


def decode_batch(data: bytes) -> Any:
    """The batch :func:`encode_batch` stored; a dataclass's class is imported again.

    Raises:
        ValueError: a dataclass batch whose class cannot be imported in this process.
    """
    return _rebuilt(torch.load(io.BytesIO(data), weights_only=True))


def _plain(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        from lightning_influence.recipe import class_path

        return {_MARK: class_path(obj),
                "fields": {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}}
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [_plain(v) for v in obj]
        return items if type(obj) is list else tuple(items)
    return obj


def _rebuilt(obj: Any) -> Any:
    if isinstance(obj, dict):
        if _MARK in obj and set(obj) == {_MARK, "fields"}:
            return _dataclass(obj[_MARK])(**{k: _rebuilt(v) for k, v in obj["fields"].items()})
        return {k: _rebuilt(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rebuilt(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_rebuilt(v) for v in obj)
    return obj


@functools.lru_cache(maxsize=None)
def _dataclass(path: str) -> type:
    module, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"the stored inputs are batches of the dataclass {path}, which cannot be imported here "
                         f"({type(err).__name__}: {err}); import its module first, or put its directory on the "
                         "import path (the CLI does so for the training script's directory)") from err
    if not dataclasses.is_dataclass(cls):
        raise ValueError(f"the stored inputs are batches of the dataclass {path}, but {path} is not a dataclass here")
    return cls
