"""Streaming the gradient rows of many steps at once, for reductions over the log (TracIn, self-influence).

:meth:`InfluenceLog.iter_steps` hands out one step at a time, which costs a few HDF5 calls, CRC
calls and array allocations per step. A reduction that only sums per-row terms does not need the
steps apart: :func:`iter_row_blocks` takes the rows (ids, weights, gradients) of consecutive steps of
each rank's segment as one block (about ``max_bytes`` of gradient rows per rank), verifies every step's
CRC-32 on its slice of the block before anything is handed out (the same per-step checksums as
``iter_steps``: a corrupted byte is still refused), and returns the rows with the step each belongs to,
so the caller can vectorise its per-step bookkeeping (learning rates, weights, accumulation) over the
whole block.

Where HDF5's chunk index shows the rows stored as raw bytes (unfiltered chunks of whole rows:
:func:`_row_map`), a background thread reads the next blocks straight from the file and checksums them
while the caller reduces the current one (:mod:`lightning_influence.log.prefetch`); other rows
(compressed, or a layout the map does not cover) are read through HDF5 when their block is reached.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import h5py
import numpy as np

from lightning_influence.log.format import ROW_CRC_COLUMNS, ROW_DATASETS, reading
from lightning_influence.log import prefetch
from lightning_influence.log.outer import OuterColumns
from lightning_influence.log.prefetch import Prefetcher, ReadJob

if TYPE_CHECKING:
    from lightning_influence.log.reader import InfluenceLog

_BLOCK_BYTES = 16 << 20  # gradient rows per rank and block (about one read-ahead block of the reader)
_DEPTH = 2  # blocks read ahead by the prefetch thread (its ring holds _DEPTH + 1 blocks)
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
                    max_bytes: int = _BLOCK_BYTES, depth: int = _DEPTH) -> Iterator[RowBlock]:
    """The steps of ``[t1, t2)`` that have gradient rows, in blocks of about ``max_bytes`` of rows per rank.

    A block never spans a segment boundary of any rank, nor a step of ``breaks`` (it starts a new block
    there: e.g. the checkpoints whose query gradient changes). Steps without gradient rows are skipped.
    The gradient rows of the next ``depth`` blocks are read (and checksummed) by a background thread while
    the caller reduces the current block (:mod:`lightning_influence.log.prefetch`), where they are stored as
    plain bytes; compressed or otherwise filtered rows are read through HDF5 when their block is reached.

    Raises:
        LogFormatError: a step's rows fail their CRC-32, or its ids are not indices into the training set.
    """
    if not log.recorded.get("gradients"):
        raise ValueError(f"{log.path}: the run did not record gradients; re-run with it enabled in InfluenceTracker")
    buffers: dict[tuple[int, str], np.ndarray] = {}
    layouts: dict[tuple[int, str], _Layout] = {}  # (segment, field) -> see _layout
    asked: set[int] = set()  # segments whose small rows the kernel was asked for (_ask_small)
    ahead: deque[tuple[list[tuple[int, list[tuple[int, int]]]], _Queued | None]] = deque()
    with Prefetcher(depth) as prefetcher:
        for pending in _plan(log, t1, t2, breaks, max_bytes):
            ahead.append((pending, _submit(log, pending, layouts, asked, prefetcher)))
            if len(ahead) > depth:  # the buffer of the block handed out before is reused from here on
                yield _read_block(log, *ahead.popleft(), buffers, prefetcher)
        while ahead:
            yield _read_block(log, *ahead.popleft(), buffers, prefetcher)


def _plan(log: "InfluenceLog", t1: int, t2: int, breaks: Sequence[int], max_bytes: int
          ) -> Iterator[list[tuple[int, list[tuple[int, int]]]]]:
    """The blocks of :func:`iter_row_blocks` as lists of ``(step, [(segment, table row) per rank])``."""
    cut = set(int(b) for b in breaks)
    row_bytes = max(1, 4 * (log._width or 1))
    pending: list[tuple[int, list[tuple[int, int]]]] = []
    rows = 0
    for t in range(int(t1), int(t2)):
        if not log.has_grads(t):
            continue
        locs = log._locs(t)
        n = sum(int(log._segs[seg].table["sample_count"][row]) for seg, row in locs)
        if pending and (t in cut or [s for s, _ in locs] != [s for s, _ in pending[-1][1]]
                        or (rows + n) * row_bytes > max_bytes * len(locs)):
            yield pending
            pending, rows = [], 0
        pending.append((t, locs))
        rows += n
    if pending:
        yield pending


_FIELDS = ("id", "weight", "grad")  # the row datasets a block holds ("weight": from format version 2)
_ABSENT = -1  # layouts: the segment does not store the dataset
_Layout = "tuple[_RowMap, np.dtype, tuple[int, ...]] | int | None"


@dataclass
class _Queued:
    """A block's rows as queued for the prefetch thread: the job; per field its dtype, row shape and runs; per
    step and field its piece ``(run, first byte, end byte)``, the step table entry ``(field, segment, row)``
    holding its CRC-32, and that CRC-32."""

    job: ReadJob
    fields: dict[str, tuple[np.dtype, tuple[int, ...], range]]
    pieces: list[list[tuple[int, int, int]]]
    checks: list[tuple[str, int, int]]
    expected: np.ndarray
    outer: OuterColumns | None  # the gradient rows' factored blocks (one rank)


def _submit(log: "InfluenceLog", pending: list[tuple[int, list[tuple[int, int]]]],
            layouts: dict[tuple[int, str], _Layout], asked: set[int], prefetcher: Prefetcher) -> _Queued | None:
    """Queue the rows of the block ``pending`` for the prefetch thread (``None``: some rank's rows are not stored
    as plain bytes, or the system has no ``os.preadv``; the block reads them through HDF5 when it is reached)."""
    if not prefetch.AVAILABLE:
        return None
    runs: list[tuple[Path, int, int]] = []
    pieces: list[list[tuple[int, int, int]]] = []
    checks: list[tuple[str, int, int]] = []
    expected: list[np.ndarray] = []
    fields: dict[str, tuple[np.dtype, tuple[int, ...], range]] = {}
    segs = [seg for seg, _ in pending[0][1]]
    outer = {log._segs[seg].outer for seg in segs}
    if len(outer) > 1 or (None not in outer and len(segs) > 1):  # ranks stored their rows unlike: through HDF5
        return None
    for seg in segs:
        _ask_small(log, seg, layouts, asked)
    for field_ in _FIELDS:
        first = len(runs)
        kinds = set()
        for r in range(len(pending[0][1])):
            seg = pending[0][1][r][0]
            lay = _layout(log, seg, field_, layouts)
            if lay is None or (lay == _ABSENT and field_ != "weight"):
                return None
            kinds.add(lay if lay == _ABSENT else lay[1:])
            if lay == _ABSENT:
                continue
            where, dtype, shape = lay
            s = log._segs[seg]
            rows = np.array([locs[r][1] for _, locs in pending], dtype=np.int64)
            offsets = s.table["grad_offset" if field_ == "grad" else "sample_offset"][rows]
            for trow, off, n in zip(rows.tolist(), offsets.tolist(), s.table["sample_count"][rows].tolist()):
                piece = []
                for start, size in where.byte_runs(off, off + n):
                    if not (len(runs) > first and runs[-1][0] == s.path and sum(runs[-1][1:]) == start):
                        runs.append((s.path, start, 0))
                    path, at, length = runs[-1]
                    runs[-1] = (path, at, length + size)
                    piece.append((len(runs) - 1, length, length + size))
                pieces.append(piece)
                checks.append((field_, seg, trow))
            expected.append(s.table[ROW_CRC_COLUMNS[field_]][rows])
        if len(kinds) > 1:  # ranks differ in dtype or in storing the field: read through HDF5
            return None
        if kinds != {_ABSENT}:
            dtype, shape = kinds.pop()
            fields[field_] = (dtype, shape, range(first, len(runs)))
    job = prefetcher.submit(ReadJob(runs, pieces))
    return _Queued(job, fields, pieces, checks, np.concatenate(expected) if expected else np.zeros(0, np.int64),
                   outer.pop())


def _layout(log: "InfluenceLog", seg: int, field_: str, layouts: dict[tuple[int, str], _Layout]) -> _Layout:
    """``(row map, dtype, row shape)`` of the ``field_`` rows of segment ``seg`` when stored as plain bytes,
    ``_ABSENT`` when not stored, ``None`` otherwise (cached in ``layouts``)."""
    key = (seg, field_)
    if key not in layouts:
        s = log._segs[seg]
        f = log._file(seg)
        name = ROW_DATASETS[field_]
        with reading(s.path, f"the layout of the {field_!r} rows"):
            if name not in f:
                layouts[key] = _ABSENT
            else:
                ds = f[name]
                where = _row_map(s.path, ds)
                layouts[key] = None if where is None else (where, ds.dtype, tuple(ds.shape[1:]))
        if layouts[key] is None:  # read through HDF5: the kernel reads the rank's next segments meanwhile
            _read_ahead(log, seg)
    return layouts[key]


def _ask_small(log: "InfluenceLog", seg: int, layouts: dict[tuple[int, str], _Layout], asked: set[int]) -> None:
    """Ask the kernel for all of the small rows (ids, weights: a few bytes per row) of segment ``seg`` and of the rank's
    next segment, in the background, once per segment: each block's small runs then come from the page cache instead
    of costing a disk round trip of their own between the large direct reads of the gradient rows."""
    from lightning_influence.log.rows import will_need

    for s in (seg, seg + 1):
        if s >= len(log._segs) or log._segs[s].rank != log._segs[seg].rank or s in asked:
            continue
        asked.add(s)
        for field_ in ("id", "weight"):
            lay = _layout(log, s, field_, layouts)
            if lay is not None and lay != _ABSENT:
                where = lay[0]
                start = int(where.offsets.min())
                will_need(log._segs[s].path, start, int(where.offsets.max()) + where.per_chunk * where.row - start)


def _read_ahead(log: "InfluenceLog", seg: int) -> None:
    """Ask the kernel to read ``seg`` and the next segments of its rank, up to ``_READ_AHEAD_BYTES`` beyond it, in the
    background (``posix_fadvise(WILLNEED)``), so the disk is kept busy while the CPU reduces the rows already read."""
    from lightning_influence.log.rows import will_need

    ahead, nxt = 0, seg
    while nxt < len(log._segs) and log._segs[nxt].rank == log._segs[seg].rank and ahead <= _READ_AHEAD_BYTES:
        path = log._segs[nxt].path
        size = will_need(path)  # again for a segment already asked for: pages in the cache are skipped
        if size is None:
            return
        ahead += size if nxt > seg else 0
        nxt += 1


def _read_block(log: "InfluenceLog", pending: list[tuple[int, list[tuple[int, int]]]], queued: _Queued | None,
                buffers: dict[tuple[int, str], np.ndarray], prefetcher: Prefetcher) -> RowBlock:
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
        for field_ in _FIELDS if queued is None else ():
            offsets = table["grad_offset" if field_ == "grad" else "sample_offset"][rows]
            got = _rows_of_steps(log, seg, rows, field_, offsets, n, buffers)
            if got is not None:
                parts[field_].append(got)
    if queued is not None:
        for field_, got in _prefetched(log, queued, prefetcher).items():
            parts[field_] = [got]
    ids = parts["id"][0] if len(parts["id"]) == 1 else np.concatenate(parts["id"])
    row_step = parts["row_step"][0] if len(parts["row_step"]) == 1 else np.concatenate(parts["row_step"])
    size = log.meta.get("dataset_size")
    if len(ids) and (int(ids.min()) < 0 or (size is not None and int(ids.max()) >= int(size))):
        bad = int(np.argmax((ids < 0) | (ids >= (size if size is not None else np.iinfo(np.int64).max))))
        log._check_ids(pending[0][1][0][0], int(steps[row_step[bad]]), ids)
    if parts["weight"] and (queued is not None or len(parts["weight"]) == len(parts["id"])):
        weights = np.concatenate(parts["weight"]).astype(np.float64)
    else:  # version 1: a plain batch mean over all ranks
        weights = 1.0 / np.maximum(counts, 1)[row_step]
    grads = parts["grad"][0] if len(parts["grad"]) == 1 else np.concatenate(parts["grad"])
    lrs = log.lrs[steps - int(log.steps[0])]
    return RowBlock(steps, lrs, row_step, ids, weights, grads)


def _prefetched(log: "InfluenceLog", queued: _Queued, prefetcher: Prefetcher) -> dict[str, np.ndarray]:
    """The rows the prefetch thread read for a block, per field, once each step's rows match their CRC-32."""
    views, crcs = prefetcher.result(queued.job)
    for i in np.flatnonzero(np.asarray(crcs, dtype=np.int64) != queued.expected).tolist():
        field_, seg, row = queued.checks[i]
        dtype, shape, _ = queued.fields[field_]
        got = np.concatenate([views[run][a:b] for run, a, b in queued.pieces[i]] or [np.zeros(0, np.uint8)])
        log._verify(seg, row, field_, got.view(dtype).reshape(-1, *shape))  # raises LogFormatError
    out = {}
    for field_, (dtype, shape, runs) in queued.fields.items():
        raw = views[runs[0]] if len(runs) == 1 else np.concatenate([views[i] for i in runs])
        out[field_] = raw.view(dtype).reshape(-1, *shape)
    if queued.outer is not None and "grad" in out:
        out["grad"] = queued.outer.expand(out["grad"])
    return out


def _rows_of_steps(log: "InfluenceLog", seg: int, rows: np.ndarray, field_: str, offsets: np.ndarray,
                   n: np.ndarray, buffers: dict[tuple[int, str], np.ndarray]) -> np.ndarray | None:
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
    return log._dense(seg, field_, out)




@dataclass
class _RowMap:
    """Where the rows of an unfiltered dataset lie in its file: chunk ``k`` holds rows ``[k·per_chunk, (k+1)·per_chunk)``
    as raw native bytes from file offset ``offsets[k]`` (a contiguous dataset: one chunk)."""

    offsets: np.ndarray
    per_chunk: int
    row: int  # bytes per row

    def byte_runs(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """``(file offset, bytes)`` of rows ``[lo, hi)``: one run per stretch of chunks stored back to back."""
        runs: list[tuple[int, int]] = []
        while lo < hi:
            k = lo // self.per_chunk
            end = min(hi, (k + 1) * self.per_chunk)
            start, size = int(self.offsets[k]) + (lo - k * self.per_chunk) * self.row, (end - lo) * self.row
            if runs and sum(runs[-1]) == start:
                runs[-1] = (runs[-1][0], runs[-1][1] + size)
            else:
                runs.append((start, size))
            lo = end
        return runs


def _row_map(path: Path, ds: h5py.Dataset) -> _RowMap | None:
    """The :class:`_RowMap` of ``ds`` if every row is stored whole, unfiltered, in native byte order inside the file
    (HDF5's checksummed chunk index says where), else ``None`` (the rows are read through HDF5)."""
    dcpl = ds.id.get_create_plist()
    if not ds.dtype.isnative or ds.dtype.hasobject or dcpl.get_nfilters() or len(ds.shape) < 1 or not ds.shape[0]:
        return None
    row = ds.dtype.itemsize * int(np.prod(ds.shape[1:], dtype=np.int64))
    if dcpl.get_layout() == h5py.h5d.CONTIGUOUS:
        base = ds.id.get_offset()
        per_chunk, chunks = ds.shape[0], ([] if base is None else [(0, base, ds.shape[0] * row)])
    elif dcpl.get_layout() == h5py.h5d.CHUNKED and tuple(ds.chunks[1:]) == tuple(ds.shape[1:]):
        per_chunk = ds.chunks[0]
        chunks = _chunk_index(ds)
    else:
        return None
    n_chunks = -(-ds.shape[0] // per_chunk)
    size = os.path.getsize(path)
    if [c[0] for c in chunks] != [k * per_chunk for k in range(n_chunks)] or any(
            c[2] != per_chunk * row or c[1] + c[2] > size for c in chunks):
        return None  # a chunk missing (never written), of another size, or past the end of the file
    return _RowMap(np.array([c[1] for c in chunks], dtype=np.int64), per_chunk, row)


def _chunk_index(ds: h5py.Dataset) -> list[tuple[int, int, int]]:
    """``(first row, file offset, bytes)`` of every stored chunk of ``ds``, in row order: in one pass over HDF5's
    chunk index where the library has ``H5Dchunk_iter`` (≈ 17× faster than a call per chunk)."""
    infos: list = []
    try:
        ds.id.chunk_iter(infos.append)
    except (AttributeError, NotImplementedError, RuntimeError):  # h5py < 3.8 or HDF5 < 1.14: one call per chunk
        infos = [ds.id.get_chunk_info(i) for i in range(ds.id.get_num_chunks())]
    return sorted((i.chunk_offset[0], i.byte_offset, i.size) for i in infos if i.byte_offset is not None)
