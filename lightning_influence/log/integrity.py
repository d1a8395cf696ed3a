"""Integrity checks of a log's segments, run by :class:`~lightning_influence.log.reader.InfluenceLog` on open.

A segment's step table, attributes and dataset shapes must agree (:func:`check_segment`); a
rank's segments must cover its steps from the log's first step without gaps or overlaps, in
file-name order (:func:`check_rank`); datasets read whole are checked against their stored
CRC-32 (:func:`read_checked`). Each failure is a :class:`~lightning_influence.log.format.LogFormatError`
naming the file and saying how to repair it (``docs/log-format.md``, crash safety).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np

from lightning_influence.log.format import CRC_ATTR, ROW_CRC_COLUMNS, SCALAR_ATTR, LogFormatError, crc32, restore_hint

__all__ = ["check_rank", "check_segment", "read_checked", "read_member"]


def check_rank(segs: Sequence[Any], first_step: int = 0) -> None:
    """The step ranges of a rank's segments must start at the log's first step and follow each other without gaps
    or overlaps, in the order of their file names."""
    stepped = [s for s in segs if len(s.table["step"])]
    if not stepped:
        return
    by_step = sorted(stepped, key=lambda s: (s.first, s.last))
    if by_step != stepped and all(b.first == a.last + 1 for a, b in zip(by_step, by_step[1:])):
        moved = ", ".join(f"{s.path.name} holds steps {s.first}..{s.last}" for s in stepped)
        raise LogFormatError(stepped[0].path.parent, f"segment files are out of order ({moved}): the steps are all there "
                             "but the files were renamed or swapped. Restore their original names (segment numbers "
                             "increase with the steps), or restore the folder from a backup")
    if stepped[0].first < first_step:
        raise LogFormatError(stepped[0].path, f"starts at step {stepped[0].first}, before the log's first step "
                                              f"{first_step} (meta.h5): it belongs to another log; remove it")
    if stepped[0].first > first_step:
        s = stepped[0]
        raise LogFormatError(s.path, f"the log starts at step {first_step} (meta.h5) but the first segment of its rank, "
                                     f"{s.path.name}, starts at step {s.first}: the segment(s) holding steps "
                                     f"{first_step}..{s.first - 1} are missing (deleted?); restore them from a backup")
    prev: Any = None
    for s in stepped:
        if prev is not None and s.first != prev.last + 1:
            if s.first <= prev.last:
                problem = (f"holds steps {s.first}..{s.last}, but steps {s.first}..{min(s.last, prev.last)} are "
                           f"already in {prev.path.name} (steps {prev.first}..{prev.last}): two files record the same "
                           "steps (files copied between logs, or two writers). Restore the folder from a backup")
            else:
                problem = (f"starts at step {s.first} but {prev.path.name} ends at step {prev.last}: the segment(s) "
                           f"holding steps {prev.last + 1}..{s.first - 1} are missing; restore them from a backup")
            raise LogFormatError(s.path, problem)
        prev = s


def read_checked(path: Path, ds: h5py.Dataset) -> np.ndarray:
    """A dataset read whole and checked against its stored CRC-32 (0-d arrays restored)."""
    return _read_checked(path, ds.name, ds.id)


def read_member(path: Path, group: h5py.Group, name: str) -> np.ndarray:
    """:func:`read_checked` of the dataset ``name`` of ``group``, opened without h5py's high-level objects (opening a
    log reads ~25 step-table columns per segment: this way costs about a third of the time)."""
    return _read_checked(path, f"{group.name}/{name}", h5py.h5d.open(group.id, name.encode()))


def _read_checked(path: Path, name: str, dsid: h5py.h5d.DatasetID) -> np.ndarray:
    shape = dsid.get_space().shape
    value = np.empty(shape, dsid.dtype)
    if value.size:
        dsid.read(h5py.h5s.ALL, h5py.h5s.ALL, value)
    crc = _attribute(dsid, CRC_ATTR)
    if crc is None:
        raise LogFormatError(path, f"{name} has no {CRC_ATTR} attribute, so it cannot be checked; the file is "
                                   "corrupted or was written by a pre-release writer")
    if crc32(value) != int(crc):
        raise LogFormatError(path, f"{name} fails its CRC-32: the file is corrupted. {restore_hint(path)}")
    if not shape:
        return value[()]  # as h5py reads a 0-d dataset: a NumPy scalar
    scalar = _attribute(dsid, SCALAR_ATTR)
    return value.reshape(()) if scalar is not None and scalar else value


def _attribute(dsid: h5py.h5d.DatasetID, name: str) -> Any:
    """The value of the attribute ``name`` of a dataset (``None`` if it has none)."""
    if not h5py.h5a.exists(dsid, name.encode()):
        return None
    attr = h5py.h5a.open(dsid, name.encode())
    out = np.empty(attr.shape, attr.dtype)
    attr.read(out)
    return out[()]


def check_segment(path: Path, rank: int, attrs: dict[str, Any], table: dict[str, np.ndarray],
                   shapes: dict[str, tuple[int, ...]], width: int | None) -> int | None:
    """The step table, the attributes and the dataset shapes of a segment must agree; returns the row width ``K``."""

    def bad(problem: str) -> LogFormatError:
        return LogFormatError(path, f"segment is inconsistent: {problem}. The file is corrupted or was written by a "
                                    "broken writer; restore it, or delete it and every later segment of its rank")

    if int(attrs["rank"]) != rank:
        raise bad(f"it says rank {int(attrs['rank'])} but lies in the folder of rank {rank}")
    steps = table["step"]
    n = len(steps)
    if any(len(v) != n for v in table.values()):
        raise bad("step table columns have different lengths")
    if n != int(attrs["n_steps"]) or (n and (steps[0] != int(attrs["first_step"]) or steps[-1] != int(attrs["last_step"]))):
        raise bad("step table disagrees with the segment's first_step/last_step/n_steps")
    if n and not np.array_equal(steps, np.arange(steps[0], steps[0] + n)):
        raise bad("steps are not consecutive")
    counts, offsets = table["sample_count"], table["sample_offset"]
    n_samples = int(attrs["n_samples"])
    if (counts < 0).any() or not np.array_equal(offsets, np.concatenate([[0], np.cumsum(counts)[:-1]]) if n else offsets) \
            or int(counts.sum()) != n_samples:
        raise bad("sample offsets/counts do not tile the sample table")
    if shapes.get("samples/id") != (n_samples,) or any(shapes.get(f"samples/{name}", (n_samples,)) != (n_samples,)
                                                       for name in ("loss", "weight")):
        raise bad(f"sample datasets do not hold n_samples = {n_samples} rows")
    n_grad = int(attrs["n_grad_rows"])
    has = table["grad_offset"] >= 0
    if int(counts[has].sum()) != n_grad or not np.array_equal(
            table["grad_offset"][has], np.concatenate([[0], np.cumsum(counts[has])[:-1]]) if has.any() else table["grad_offset"][has]):
        raise bad("gradient offsets do not tile the gradient rows")
    for name in ("grads/grad", "grads/hvp"):
        if name in shapes:
            rows, *cols = shapes[name]
            if rows != n_grad or len(cols) != 1 or (width is not None and cols[0] != width):
                raise bad(f"{name} has shape {shapes[name]}, expected ({n_grad}, {width or 'K'}) like the other segments")
            width = cols[0]
    if n_grad and "grads/grad" not in shapes:
        raise bad(f"the step table has {n_grad} gradient rows but there is no grads/grad dataset")
    for field_, stored in (("id", np.ones(n, bool)), ("loss", np.full(n, "samples/loss" in shapes)),
                           ("weight", np.full(n, "samples/weight" in shapes)),
                           ("grad", has), ("hvp", has & ("grads/hvp" in shapes))):
        if not np.array_equal(table[ROW_CRC_COLUMNS[field_]] >= 0, stored):
            raise bad(f"the {ROW_CRC_COLUMNS[field_]} column does not match the stored {field_!r} rows")
    micro, per_step = table["micro_offset"], table["micro_batches"]
    if n and (micro >= 0).any() and (not (micro >= 0).all() or not np.array_equal(
            micro, np.concatenate([[0], np.cumsum(per_step)[:-1]])) or shapes.get("micro/size") != (int(per_step.sum()),)):
        raise bad("micro-batch offsets/counts do not tile the micro-batch table")
    if table["lr"].ndim != 2 or table["lr"].shape[0] != n:
        raise bad("learning-rate table has the wrong shape")
    return width
