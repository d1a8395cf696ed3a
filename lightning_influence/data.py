"""Sample ids: the dataset wrapper that adds them, and their extraction from a batch.

Influence is reported per training sample, so every sample of every step must carry a
stable integer id (its index in the training set, not its position in the batch).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Callable

import torch
from torch.utils.data import Dataset

IdsFn = Callable[[Any], torch.Tensor]


class WithIds(Dataset):
    """Wrap a map-style dataset so each item also carries its index as the sample id.

    Tuples gain a last element ``(x, y) -> (x, y, id)``; dicts gain ``ids_key``; any other
    item ``x`` becomes ``(x, id)``. The default collate turns the ids into an int64 tensor.
    """

    def __init__(self, dataset: Dataset, ids_key: str = "ids") -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError("WithIds needs a map-style dataset (with __getitem__ and __len__)")
        self.dataset = dataset
        self.ids_key = ids_key

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        if isinstance(item, tuple):
            return (*item, index)
        if isinstance(item, Mapping):
            return {**item, self.ids_key: index}
        return item, index


def batch_size_of(batch: Any) -> int:
    """Leading dimension of the first tensor in a batch (tuple, list, dict or tensor)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, Sequence) else ()
    for v in values:
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    raise TypeError(f"cannot find a batched tensor in a batch of type {type(batch).__name__}")


def _hint(ids_key: str) -> str:
    return ("Give each sample a stable integer id: wrap the training dataset with "
            "lightning_influence.WithIds(dataset) so batches are (x, y, ids), or return a dict with "
            f"an {ids_key!r} key, or pass ids_fn=... to InfluenceTracker.")


def extract_ids(batch: Any, ids_key: str = "ids", ids_fn: IdsFn | None = None, on_device: bool = False) -> torch.Tensor:
    """The int64 sample ids of a batch, validated.

    Looks, in order, at ``ids_fn(batch)``, ``batch[ids_key]`` for a dict, or the last element
    of a tuple/list batch ``(x, y, ids)``. ``on_device``: ids on an accelerator stay there and
    their values are not checked (that would make the host wait for the device): the caller
    checks them with :func:`check_ids` once they are on the host.

    Raises:
        ValueError: the ids are missing, not integers, of the wrong length, or duplicated.
    """
    hint = _hint(ids_key)
    if ids_fn is not None:
        ids = ids_fn(batch)
    elif isinstance(batch, Mapping):
        if ids_key not in batch:
            raise ValueError(f"batch dict has no {ids_key!r} key (keys: {sorted(batch)}). {hint}")
        ids = batch[ids_key]
    elif isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) >= 2:
        ids = batch[-1]
    else:
        raise ValueError(f"cannot find sample ids in a batch of type {type(batch).__name__}. {hint}")
    if not isinstance(ids, torch.Tensor):
        try:
            ids = torch.as_tensor(ids)
        except (TypeError, ValueError):
            raise ValueError(f"sample ids must be integers, got {type(ids).__name__}. {hint}") from None
    if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
        raise ValueError(f"sample ids must be a 1-D integer tensor, got shape {tuple(ids.shape)} dtype {ids.dtype}. {hint}")
    n = batch_size_of(batch)
    if len(ids) != n:
        raise ValueError(f"{len(ids)} sample ids for a batch of {n} samples. {hint}")
    if on_device and ids.device.type != "cpu":
        return ids.detach().to(torch.int64)
    ids = ids.detach().to("cpu", torch.int64)
    check_ids(ids, ids_key)
    return ids


def check_ids(ids: torch.Tensor, ids_key: str = "ids") -> None:
    """Refuse duplicated or negative ids (host tensor ``ids`` of one batch or one optimizer step).

    Raises:
        ValueError: naming the offending ids and what to do.
    """
    if len(torch.unique(ids)) != len(ids):
        raise ValueError(f"duplicated sample ids in one batch: {_duplicates(ids)}; ids must be unique per sample "
                         f"(are these labels rather than ids?). {_hint(ids_key)}")
    if len(ids) and int(ids.min()) < 0:
        raise ValueError(f"sample ids must be non-negative, got {int(ids.min())}. {_hint(ids_key)}")


def _duplicates(ids: torch.Tensor) -> list[int]:
    values, counts = torch.unique(ids, return_counts=True)
    return values[counts > 1].tolist()[:10]
