"""Sample ids: the dataset wrapper that adds them, and their extraction from a batch.

Influence is reported per training sample, so every sample of every step must carry a
stable integer id (its index in the training set, not its position in the batch).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch.utils.data import Dataset, RandomSampler, Sampler, Subset, WeightedRandomSampler, default_collate, default_convert

IdsFn = Callable[[Any], torch.Tensor]


class _Wrapped(Dataset):
    """A dataset wrapped item by item: a map-style one (refused otherwise, naming the wrapper), as long as it."""

    def __init__(self, dataset: Dataset) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(f"{type(self).__name__} needs a map-style dataset (with __getitem__ and __len__)")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]


class WithIds(_Wrapped):
    """Wrap a map-style dataset so each item also carries its index as the sample id.

    Tuples gain a last element ``(x, y) -> (x, y, id)``; dicts gain ``ids_key``; any other
    item ``x`` becomes ``(x, id)``. The default collate turns the ids into an int64 tensor.
    """

    def __init__(self, dataset: Dataset, ids_key: str = "ids") -> None:
        super().__init__(dataset)
        self.ids_key = ids_key

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        if isinstance(item, tuple):
            return (*item, index)
        if isinstance(item, Mapping):
            return {**item, self.ids_key: index}
        return item, index


class WithCollate(_Wrapped):
    """The training set by id together with the ``collate_fn`` its DataLoader made batches with (padding to the
    batch's longest sequence, masks, dict batches): replay and the estimators rebuild a step's batch as
    ``collate_fn([ds[i] for i in ids])``, as training did, where a plain dataset gets ``default_collate``.
    Pass it as ``train_data=WithCollate(train_set, collate)``; the CLI takes the collate function from the
    rebuilt DataLoader itself."""

    def __init__(self, dataset: Dataset, collate_fn: Callable[[list[Any]], Any]) -> None:
        super().__init__(dataset)
        self.collate_fn = collate_fn

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]


def collate_of(dataset: Any) -> Callable[[list[Any]], Any]:
    """How samples of ``dataset`` become a batch: a :class:`WithCollate`'s function, else ``default_collate``."""
    return dataset.collate_fn if isinstance(dataset, WithCollate) else default_collate


def loader_collate(loader: Any) -> Callable[[list[Any]], Any] | None:
    """A DataLoader's own ``collate_fn`` where it is not PyTorch's default (nor its batching-free conversion), else
    ``None``."""
    fn = getattr(loader, "collate_fn", None)
    return None if fn is None or fn is default_collate or fn is default_convert else fn


def by_id(loader: Any) -> Any:
    """A DataLoader's dataset as the estimators take it: wrapped in :class:`WithCollate` where the loader has its
    own ``collate_fn``."""
    fn = loader_collate(loader)
    return loader.dataset if fn is None else WithCollate(loader.dataset, fn)


def batch_size_of(batch: Any) -> int:
    """Leading dimension of the first tensor in a batch (tuple, list, dict, dataclass or tensor; nested: the first
    container level that has one)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if type(batch) in (tuple, list) and batch and isinstance(batch[0], torch.Tensor) and batch[0].dim() > 0:
        return int(batch[0].shape[0])  # the common case, without the abstract-class checks (at every step)
    values = _children(batch)
    for v in values:
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    for v in values:
        if _children(v):
            with contextlib.suppress(TypeError):
                return batch_size_of(v)
    raise TypeError(f"cannot find a batched tensor in a batch of type {type(batch).__name__}")


def _children(batch: Any) -> list[Any]:
    if isinstance(batch, Mapping):
        return list(batch.values())
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)):
        return list(batch)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return [getattr(batch, f.name) for f in dataclasses.fields(batch)]
    return []


def as_pytree(batch: Any) -> Any:
    """``batch``, with every dataclass type in it registered as a node of torch's pytrees (once per type): the maps
    over a batch's tensors (a sample's slice, vmap's flattening, a device move) then reach those inside the
    dataclass batches Lightning accepts, which would otherwise be one opaque leaf."""
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type) and type(batch) not in pytree.SUPPORTED_NODES:
        pytree.register_dataclass(type(batch))
    for v in _children(batch):
        as_pytree(v)
    return batch


_ID_KEYS = ("ids", "id", "idx", "index", "indices", "sample_id", "sample_ids", "sample_idx", "uid", "uids")  # named


def _hint(ids_key: str) -> str:
    return ("Give each sample a stable integer id: wrap the training dataset with "
            "lightning_influence.WithIds(dataset) so batches are (x, y, ids), or return a dict with "
            f"an {ids_key!r} key, or pass ids_fn=... to InfluenceTracker.")


def extract_ids(batch: Any, ids_key: str = "ids", ids_fn: IdsFn | None = None, checked: bool = True,
                with_ids: bool = False, dataset_size: int | None = None) -> torch.Tensor:
    """The int64 sample ids of a batch, validated.

    Looks, in order, at ``ids_fn(batch)``, ``batch[ids_key]`` for a dict, or the last element
    of a tuple/list batch: of ``(x, y, ids)`` (three or more elements), or of ``(x, ids)`` only
    when ``with_ids`` says the batches come from a :class:`WithIds` dataset; a plain ``(x, y)``
    batch is refused, its labels are never taken for ids. ``checked=False``: only the form is
    checked here (a 1-D integer tensor, one id per sample); the values are not (ids on an
    accelerator stay there: reading them would make the host wait for the device), the caller
    checks them with :func:`check_ids` (the tracker: a few steps at a time, on the host).

    Raises:
        ValueError: the ids are missing, not a 1-D integer tensor, of the wrong length, or
            (``checked``) fail :func:`check_ids`.
    """
    if ids_fn is None and type(batch) in (tuple, list) and (len(batch) > 2 or (with_ids and len(batch) == 2)):
        ids, first = batch[-1], batch[0]  # the common case, (x, y, ids) from WithIds: the fewest calls
        if (type(ids) is torch.Tensor and ids.dtype is torch.int64 and ids.dim() == 1 and not ids.requires_grad
                and type(first) is torch.Tensor and first.dim() > 0 and first.shape[0] == ids.shape[0]):
            if checked:
                ids = ids.cpu()
                check_ids(ids, ids_key, dataset_size)
            return ids
    plain = type(batch) in (tuple, list)  # no abstract-class checks (this runs at every step)
    sequence = plain or (isinstance(batch, Sequence) and not isinstance(batch, str))
    if ids_fn is not None:
        ids = ids_fn(batch)
    elif not plain and isinstance(batch, Mapping):
        if ids_key not in batch:
            likely = [k for k in batch if isinstance(k, str) and k.lower() in _ID_KEYS and k != ids_key]
            first = (f"If batch[{likely[0]!r}] holds the sample ids, pass InfluenceTracker(ids_key={likely[0]!r}). "
                     if likely else "")
            raise ValueError(f"batch dict has no {ids_key!r} key (keys: {sorted(batch)}). {first}{_hint(ids_key)}")
        ids = batch[ids_key]
    elif sequence and len(batch) == 2 and not with_ids:
        raise ValueError(
            "the batch has two elements: (x, y) inputs and labels, or (x, ids)? Labels are never taken for sample ids. "
            f"{_hint(ids_key)} If the second element really holds the ids, pass ids_fn=lambda batch: batch[1].")
    elif sequence and len(batch) >= 2:
        ids = batch[-1]
    else:
        raise ValueError(f"cannot find sample ids in a batch of type {type(batch).__name__}. {_hint(ids_key)}")
    ids = _as_tensor(ids, ids_key)
    if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
        raise ValueError(f"sample ids must be a 1-D integer tensor (one id per sample), got shape {tuple(ids.shape)} "
                         f"dtype {ids.dtype}. {_hint(ids_key)}")
    n = batch_size_of(batch)
    if len(ids) != n:
        raise ValueError(f"{len(ids)} sample ids for a batch of {n} samples. {_hint(ids_key)}")
    if not checked:
        return ids.detach().to(torch.int64)
    if ids.dtype != torch.int64 or ids.device.type != "cpu" or ids.requires_grad:
        ids = ids.detach().to("cpu", torch.int64)
    check_ids(ids, ids_key, dataset_size)
    return ids


def check_ids(ids: torch.Tensor, ids_key: str = "ids", dataset_size: int | None = None) -> None:
    """Refuse duplicated, negative or out-of-range ids (host tensor or array ``ids`` of one batch or one optimizer step).

    ``dataset_size``: the ids must index the training set ``[0, dataset_size)``.

    Raises:
        ValueError: naming the offending ids and what to do (a ``Subset`` keeping the original
            indices; sampling with replacement, which is not supported).
    """
    values = ids.tolist()  # Python ints, sorted (min and max: its ends) and a set: at every step, between two training
    values.sort()  # steps, where np.sort or ids.min()/max() cost 1.5-2.5 times as much (docs/per-sample-gradients.md)
    if len(set(values)) != len(values):
        raise ValueError(
            f"sample ids {_duplicates(ids)} appear more than once in one batch. Sampling with replacement "
            "(RandomSampler(replacement=True), WeightedRandomSampler) is not supported: the log and the estimators "
            "count each sample once per step. Sample without replacement (DataLoader(shuffle=True)), or, if these "
            f"are not sample ids (labels?), give the real ids. {_hint(ids_key)}")
    if values and values[0] < 0:
        raise ValueError(f"sample ids must be non-negative, got {values[0]}. {_hint(ids_key)}")
    if dataset_size is not None and values and values[-1] >= dataset_size:
        bad = [v for v in ids.tolist() if v >= dataset_size][:10]  # in the batch's order
        raise ValueError(
            f"sample ids {bad} are not indices into the training set, which has {dataset_size} samples "
            "(len(train_dataloader.dataset)): estimators index the training set by id. If the training set is a "
            "Subset or another view of a larger dataset, wrap the dataset you train on, WithIds(Subset(data, rows)), "
            "not Subset(WithIds(data), rows), so ids run 0..len-1 (or return ids that index the training set from "
            "ids_fn).")


def ids_source(dataset: Any) -> tuple[bool, str | None]:
    """``(with_ids, problem)`` for a training dataset: does it (or a dataset it wraps) add ids with :class:`WithIds`?

    ``problem`` is set when a ``Subset`` wraps a ``WithIds`` (its ids index the inner
    dataset, not the training set).
    """
    seen = 0
    outer: Any = None
    while dataset is not None and seen < 8:
        if isinstance(dataset, WithIds):
            if outer is not None:
                return True, (f"the training set is a {type(outer).__name__} of a WithIds dataset, so its ids index the "
                              "inner dataset, not the training set. Wrap the dataset you train on: "
                              "WithIds(Subset(data, rows)) instead of Subset(WithIds(data), rows)")
            return True, None
        if isinstance(dataset, Subset):
            outer = dataset
        dataset = getattr(dataset, "dataset", None)
        seen += 1
    return False, None


def samples_with_replacement(loader: Any) -> bool:
    """Whether a DataLoader (or a sampler it wraps, as DDP wrappers do) draws samples with replacement."""
    todo, seen = [loader], 0
    while todo and seen < 16:
        obj = todo.pop()
        seen += 1
        if isinstance(obj, (RandomSampler, WeightedRandomSampler)) and getattr(obj, "replacement", False):
            return True
        for attr in ("sampler", "batch_sampler", "dataset"):
            child = getattr(obj, attr, None)
            if isinstance(child, Sampler) or (attr == "dataset" and isinstance(obj, Sampler)):
                todo.append(child)
    return False


def _as_tensor(ids: Any, ids_key: str) -> torch.Tensor:
    if isinstance(ids, torch.Tensor):
        return ids
    if isinstance(ids, Sequence) and ids and all(isinstance(v, torch.Tensor) for v in ids):  # collated per-item lists
        try:
            return torch.stack(list(ids))
        except RuntimeError:
            pass
    try:
        return torch.as_tensor(ids)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"sample ids must be a 1-D integer tensor (one id per sample), got a {type(ids).__name__} "
                         f"that is not a tensor of integers. {_hint(ids_key)}") from None


def _duplicates(ids: Any) -> list[int]:
    values, counts = torch.unique(torch.as_tensor(ids), return_counts=True)
    return values[counts > 1].tolist()[:10]
