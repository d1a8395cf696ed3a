"""Streaming the gradient rows of many steps at once, for reductions over the log (TracIn, self-influence).

:meth:`InfluenceLog.iter_steps` hands out one step at a time, which costs a few HDF5 calls, CRC
calls and array allocations per step. A reduction that only sums per-row terms does not need the
steps apart: :func:`iter_row_blocks` reads the rows of consecutive steps of each rank's segment in
one HDF5 call per dataset (into buffers reused from block to block, about ``max_bytes`` of
gradient rows per rank), verifies every step's CRC-32 on its slice of the block before anything
is handed out (the same per-step checksums as ``iter_steps``: a corrupted byte is still refused),
and returns the rows with the step each belongs to, so the caller can vectorise its per-step
bookkeeping (learning rates, weights, accumulation) over the whole block.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import h5py
import numpy as np

from lightning_influence.log.format import ROW_DATASETS, reading

if TYPE_CHECKING:
    from lightning_influence.log.reader import InfluenceLog

_BLOCK_BYTES = 16 << 20  # gradient rows per rank and block (about one read-ahead block of the reader)
_READ_AHEAD_BYTES = 128 << 20  # segment bytes per rank asked from the disk ahead of the one being reduced


@dataclass
class RowBlock:
    """The gradient rows of consecutive steps with gradients (all ranks; rows of rank 0 first, then rank 1, ...).

    Attributes:
        steps: ``(S,)`` the steps of the block, increasing.
        lrs: ``(S, n_groups)`` their learning rates.
        row_step: ``(R,)`` index into ``steps`` of each row.
        ids: ``(R,)`` sample id of each row.
        weights: ``(R,)`` float64 ``w_{i,t}`` of each row (``1/|B_t|`` for a log that does not store them).
        grads: ``(R, K)`` the rows in their storage dtype; a view into a buffer that the next block overwrites.
    """

    steps: np.ndarray
    lrs: np.ndarray
    row_step: np.ndarray
    ids: np.ndarray
    weights: np.ndarray
    grads: np.ndarray


def iter_row_blocks(log: "InfluenceLog", t1: int, t2: int, breaks: Sequence[int] = (),
                    max_bytes: int = _BLOCK_BYTES) -> Iterator[RowBlock]:
    """The steps of ``[t1, t2)`` that have gradient rows, in blocks of about ``max_bytes`` of rows per rank.

    A block never spans a segment boundary of any rank, nor a step of ``breaks`` (it starts a new block
    there: e.g. the checkpoints whose query gradient changes). Steps without gradient rows are skipped.

    Raises:
        LogFormatError: a step's rows fail their CRC-32, or its ids are not indices into the training set.
    """
    if not log.recorded.get("gradients"):
        raise ValueError(f"{log.path}: the run did not record gradients; re-run with it enabled in InfluenceTracker")
    cut = set(int(b) for b in breaks)
    row_bytes = max(1, 4 * (log._width or 1))
    buffers: dict[tuple[int, str], np.ndarray] = {}
    mapped: dict[tuple[str, str], int | None] = {}  # (file, dataset) -> file offset of its row 0 (None: not mappable)
    pending: list[tuple[int, list[tuple[int, int]]]] = []  # (step, locs)
    rows = 0
    entered: set[int] = set()
    for t in range(int(t1), int(t2)):
        if not log.has_grads(t):
            continue
        locs = log._locs(t)
        for seg, _ in locs:
            if seg not in entered:  # the kernel reads the rank's next segments while this one is reduced
                entered.add(seg)
                _read_ahead(log, seg)
        n = sum(int(log._segs[seg].table["sample_count"][row]) for seg, row in locs)
        if pending and (t in cut or [s for s, _ in locs] != [s for s, _ in pending[-1][1]]
                        or (rows + n) * row_bytes > max_bytes * len(locs)):
            yield _read_block(log, pending, buffers, mapped)
            pending, rows = [], 0
        pending.append((t, locs))
        rows += n
    if pending:
        yield _read_block(log, pending, buffers, mapped)


def _read_ahead(log: "InfluenceLog", seg: int) -> None:
    """Ask the kernel to read ``seg`` and the next segments of its rank, up to ``_READ_AHEAD_BYTES`` beyond it, in the
    background (``posix_fadvise(WILLNEED)``), so the disk is kept busy while the CPU reduces the rows already read."""
    from lightning_influence.log.reader import will_need

    ahead, nxt = 0, seg
    while nxt < len(log._segs) and log._segs[nxt].rank == log._segs[seg].rank and ahead <= _READ_AHEAD_BYTES:
        path = log._segs[nxt].path
        size = will_need(path)  # again for a segment already asked for: pages in the cache are skipped
        if size is None:
            return
        ahead += size if nxt > seg else 0
        nxt += 1


def _read_block(log: "InfluenceLog", pending: list[tuple[int, list[tuple[int, int]]]],
                buffers: dict[tuple[int, str], np.ndarray], mapped: dict[tuple[str, str], int | None]) -> RowBlock:
    steps = np.array([t for t, _ in pending], dtype=np.int64)
    parts: dict[str, list[np.ndarray]] = {"id": [], "weight": [], "grad": [], "row_step": []}
    counts = np.zeros(len(steps), dtype=np.int64)  # |B_t| over all ranks
    for r in range(len(pending[0][1])):
        seg = pending[0][1][r][0]
        table = log._segs[seg].table
        rows = np.array([locs[r][1] for _, locs in pending], dtype=np.int64)
        n = table["sample_count"][rows]
        counts += n
        parts["row_step"].append(np.repeat(np.arange(len(steps)), n))
        for field_, offsets in (("id", table["sample_offset"][rows]), ("weight", table["sample_offset"][rows]),
                                ("grad", table["grad_offset"][rows])):
            got = _rows_of_steps(log, seg, rows, field_, offsets, n, buffers, mapped)
            if got is not None:
                parts[field_].append(got)
    ids = parts["id"][0] if len(parts["id"]) == 1 else np.concatenate(parts["id"])
    row_step = parts["row_step"][0] if len(parts["row_step"]) == 1 else np.concatenate(parts["row_step"])
    size = log.meta.get("dataset_size")
    if len(ids) and (int(ids.min()) < 0 or (size is not None and int(ids.max()) >= int(size))):
        bad = int(np.argmax((ids < 0) | (ids >= (size if size is not None else np.iinfo(np.int64).max))))
        log._check_ids(pending[0][1][0][0], int(steps[row_step[bad]]), ids)
    if len(parts["weight"]) == len(parts["id"]):
        weights = np.concatenate(parts["weight"]).astype(np.float64)
    else:  # version 1: a plain batch mean over all ranks
        weights = 1.0 / np.maximum(counts, 1)[row_step]
    grads = parts["grad"][0] if len(parts["grad"]) == 1 else np.concatenate(parts["grad"])
    lrs = log.lrs[steps - int(log.steps[0])]
    return RowBlock(steps, lrs, row_step, ids, weights, grads)


def _rows_of_steps(log: "InfluenceLog", seg: int, rows: np.ndarray, field_: str, offsets: np.ndarray,
                   n: np.ndarray, buffers: dict[tuple[int, str], np.ndarray],
                   mapped: dict[tuple[str, str], int | None]) -> np.ndarray | None:
    """The ``field_`` rows of the steps at table ``rows`` of segment ``seg``, read in one HDF5 call and verified
    step by step (``None`` when the segment does not store ``field_``). Steps skipped in between (no gradient
    rows) are left out."""
    s = log._segs[seg]
    name = ROW_DATASETS[field_]
    f = log._file(seg)
    with reading(s.path, f"{field_!r} of steps {int(s.table['step'][rows[0]])}..{int(s.table['step'][rows[-1]])}"):
        if name not in f:
            return None
        ds = f[name]
        lo, hi = int(offsets[0]), int(offsets[-1] + n[-1])
        out = _mapped(s.path, ds, lo, hi, mapped) if field_ == "grad" and hi > lo else None
        if out is None:
            key = (s.rank, name)
            buf = buffers.get(key)
            if buf is None or buf.dtype != ds.dtype or buf.shape[1:] != ds.shape[1:] or len(buf) < hi - lo:
                buf = buffers[key] = np.empty((hi - lo, *ds.shape[1:]), ds.dtype)
            if hi > lo:
                ds.read_direct(buf, np.s_[lo:hi], np.s_[0:hi - lo])
            out = buf[: hi - lo]
    starts = offsets - lo
    for row, a, k in zip(rows.tolist(), starts.tolist(), n.tolist()):
        log._verify(seg, row, field_, out[a:a + k])
    if hi - lo != int(n.sum()):  # steps without gradient rows lie between: keep the rows of the steps asked for
        out = np.concatenate([out[a:a + k] for a, k in zip(starts.tolist(), n.tolist())])
    return out


def _mapped(path: Path, ds: h5py.Dataset, lo: int, hi: int, layouts: dict[tuple[str, str], int | None]
            ) -> np.ndarray | None:
    """Rows ``[lo, hi)`` of ``ds`` as a read-only memory map of the file, without copying them (``None``: the dataset's
    rows are not stored as one plain run of bytes; the caller reads them through HDF5).

    Mapped only when HDF5's (checksummed) chunk index says every chunk is stored unfiltered, in row order and back
    to back inside the file, so the rows are bytes ``[base + lo·row, base + hi·row)``. Segment files are immutable
    once closed (a resume replaces them by rename, which leaves a mapping intact), and the caller verifies each
    step's CRC-32 on the mapped rows before anything uses them.
    """
    key = (str(path), ds.name)
    if key not in layouts:
        layouts[key] = _plain_run(path, ds)
    base = layouts[key]
    if base is None:
        return None
    row = ds.dtype.itemsize * int(np.prod(ds.shape[1:], dtype=np.int64))
    start = base + lo * row
    aligned = start - start % mmap.ALLOCATIONGRANULARITY
    with open(path, "rb") as fh:
        m = mmap.mmap(fh.fileno(), start - aligned + (hi - lo) * row, access=mmap.ACCESS_READ, offset=aligned)
    with contextlib.suppress(AttributeError, OSError):  # a hint: read the rest of the run ahead
        m.madvise(mmap.MADV_SEQUENTIAL)
    return np.frombuffer(m, ds.dtype, count=(hi - lo) * (row // ds.dtype.itemsize), offset=start - aligned
                         ).reshape(hi - lo, *ds.shape[1:])


def _plain_run(path: Path, ds: h5py.Dataset) -> int | None:
    """The file offset of row 0 of ``ds`` if all its rows are stored as one run of raw native bytes, else ``None``."""
    dcpl = ds.id.get_create_plist()
    if not ds.dtype.isnative or ds.dtype.hasobject or dcpl.get_nfilters() or len(ds.shape) < 1 or not ds.shape[0]:
        return None
    row = ds.dtype.itemsize * int(np.prod(ds.shape[1:], dtype=np.int64))
    if dcpl.get_layout() == h5py.h5d.CONTIGUOUS:
        base = ds.id.get_offset()
        chunks = [] if base is None else [(0, base, ds.shape[0] * row)]
    elif dcpl.get_layout() == h5py.h5d.CHUNKED and tuple(ds.chunks[1:]) == tuple(ds.shape[1:]):
        infos = [ds.id.get_chunk_info(i) for i in range(ds.id.get_num_chunks())]
        chunks = sorted((i.chunk_offset[0], i.byte_offset, i.size) for i in infos if i.byte_offset is not None)
        base = chunks[0][1] if chunks else None
    else:
        return None
    rows_per_chunk = ds.chunks[0] if ds.chunks else ds.shape[0]
    expected = [(k * rows_per_chunk, (base or 0) + k * rows_per_chunk * row, rows_per_chunk * row)
                for k in range(-(-ds.shape[0] // rows_per_chunk))]
    if base is None or chunks != expected or base + ds.shape[0] * row > os.path.getsize(path):
        return None
    return base
