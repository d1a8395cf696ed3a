"""One process's part of every step's rows, read without the bytes of the other processes (docs/scaling.md).

A computation that splits each step's rows over ``world`` processes (Gauss-Newton DIT's row split) needs each
process to read only its rows: :class:`RowShares` reads rows ``split_range(n, world)[rank]`` of every training
rank's rows of a step (ids, weights, gradients). Where HDF5's chunk index shows them stored as raw bytes (unfiltered
chunks of whole rows, :func:`lightning_influence.log.blocks._row_map`) it reads exactly their bytes with ``os.preadv``
and the kernel's read-ahead off (``POSIX_FADV_RANDOM``), so a chunk that holds rows of two processes is read in
parts, each by its process (HDF5 itself reads a whole chunk for a part of it); other rows (compressed) are read
through HDF5, which decompresses every chunk a process needs part of.

The log keeps one CRC-32 per step, training rank and field, over all the rows; no process sees them all. CRC-32 is
linear over GF(2): the CRC of ``A‖B`` is ``shift(crc(A), |B|) ⊕ crc(B)``, ``shift(c, n)`` the CRC register ``c``
carried over ``n`` zero bytes. So each process contributes ``shift(crc(its part), bytes after it)`` and the step's
CRC-32 is the XOR of the contributions. :meth:`RowShares.read` returns them as 32 bits (0/1) per piece, which the
caller adds over the processes inside the all-reduce it does anyway (exact in float64: at most ``world``);
:meth:`RowShares.verify` takes the sums mod 2 and compares them with the step table, so a changed byte anywhere in
the step is refused by every process at the same step.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import h5py
import numpy as np

from lightning_influence.log.blocks import _row_map, _RowMap
from lightning_influence.log.format import ROW_CRC_COLUMNS, ROW_DATASETS, LogFormatError, crc32, reading, restore_hint
from lightning_influence.step.shard import split_range

if TYPE_CHECKING:
    from lightning_influence.log.reader import InfluenceLog

__all__ = ["RowShares", "ShareRows", "crc_shift"]

_FIELDS = ("id", "weight", "grad")
_BITS = np.arange(32, dtype=np.uint32)


@lru_cache(maxsize=64)
def _shift_columns(nbytes: int) -> np.ndarray:
    """The images of the 32 unit registers under ``nbytes`` zero bytes: column ``j`` is ``shift(1 << j, nbytes)``."""
    zeros = bytes(nbytes)
    base = zlib.crc32(zeros, 0)
    return np.array([zlib.crc32(zeros, 1 << j) ^ base for j in range(32)], dtype=np.uint32)


def crc_shift(crc: int, nbytes: int) -> int:
    """``crc`` (a CRC-32 of some bytes ``A``) carried over ``nbytes`` zero bytes: ``crc32(A‖B) = crc_shift(crc32(A),
    len(B)) ^ crc32(B)`` (zlib's ``crc32_combine``, linear in ``crc``; the operator is cached per length)."""
    if nbytes == 0 or crc == 0:
        return int(crc)
    cols = _shift_columns(int(nbytes))
    mask = ((int(crc) >> _BITS) & 1).astype(bool)
    return int(np.bitwise_xor.reduce(cols[mask])) if mask.any() else 0


@dataclass(frozen=True)
class _Layout:
    """A row dataset of a segment: the dataset, where its rows lie when stored raw (``None``: read through HDF5), their
    dtype, shape and bytes per row."""

    ds: h5py.Dataset
    where: _RowMap | None
    dtype: np.dtype
    shape: tuple[int, ...]
    row_bytes: int


@dataclass
class ShareRows:
    """This process's rows of one step (training ranks in rank order) and the parity bits of their CRC-32 parts.

    Attributes:
        step: the step.
        lrs: its learning rates per param group.
        count: ``|B_t|``, the step's rows over all training ranks and processes.
        ids, weights, grads: this process's rows (``weights`` float64, ``grads`` ``(n, K)`` as stored).
        bits: ``(32·pieces,)`` float64 0/1: this process's contribution to every piece's CRC-32 (see module doc).
    """

    step: int
    lrs: np.ndarray
    count: int
    ids: np.ndarray
    weights: np.ndarray
    grads: np.ndarray
    bits: np.ndarray


class RowShares:
    """Reader of process ``rank``'s rows (of ``world``) of each step of ``log``; a context manager (closes its files).

    Attributes:
        bytes_read: row bytes this process asked the files for (its parts, all fields).
    """

    def __init__(self, log: "InfluenceLog", rank: int, world: int) -> None:
        self.log, self.rank, self.world = log, int(rank), int(world)
        self._files: dict[int, h5py.File] = {}
        self._fds: dict[int, int] = {}
        self._layouts: dict[tuple[int, str], _Layout | None] = {}
        self.bytes_read = 0

    def __enter__(self) -> "RowShares":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _layout(self, seg: int, field_: str) -> _Layout | None:
        """How the ``field_`` rows of segment ``seg`` are stored (``None``: not stored), cached."""
        key = (seg, field_)
        if key not in self._layouts:
            path = self.log._segs[seg].path
            f = self._files.get(seg)
            with reading(path, f"the layout of the {field_!r} rows"):
                if f is None:
                    f = self._files[seg] = h5py.File(path, "r", rdcc_nbytes=0)
                name = ROW_DATASETS[field_]
                ds = f[name] if name in f else None
                self._layouts[key] = None if ds is None else _Layout(
                    ds, _row_map(path, ds) if hasattr(os, "preadv") else None, ds.dtype, tuple(ds.shape[1:]),
                    ds.dtype.itemsize * int(np.prod(ds.shape[1:], dtype=np.int64)))
        return self._layouts[key]

    def _read_rows(self, seg: int, lay: _Layout, lo: int, hi: int) -> np.ndarray:
        """Rows ``[lo, hi)``: their bytes alone where they are stored raw, else through HDF5."""
        out = np.empty((hi - lo, *lay.shape), lay.dtype)
        if hi <= lo:
            return out
        if lay.where is None:
            lay.ds.read_direct(out, np.s_[lo:hi])
            return out
        fd = self._fds.get(seg)
        if fd is None:
            fd = self._fds[seg] = os.open(self.log._segs[seg].path, os.O_RDONLY)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no read-ahead into the other processes' rows
        flat, at = out.reshape(-1).view(np.uint8), 0
        for start, size in lay.where.byte_runs(lo, hi):
            got = os.preadv(fd, [flat[at : at + size]], start)
            if got != size:
                raise OSError(f"read {got} of {size} bytes at offset {start}")
            at += size
        return out

    def read(self, t: int) -> ShareRows:
        """This process's rows of step ``t`` (which must have gradient rows) and their CRC-32 contributions."""
        log = self.log
        locs = log._locs(t)
        counts = [int(log._segs[seg].table["sample_count"][row]) for seg, row in locs]
        parts: dict[str, list[np.ndarray]] = {f: [] for f in _FIELDS}
        bits: list[np.ndarray] = []
        for (seg, row), n in zip(locs, counts):
            s = log._segs[seg]
            a, b = split_range(n, self.world)[self.rank]
            for field_ in _FIELDS:
                lay = self._layout(seg, field_)
                if lay is None:
                    if field_ != "weight":
                        raise LogFormatError(s.path, f"has no {ROW_DATASETS[field_]!r} rows for step {t}")
                    continue  # a version-1 log: a plain batch mean (below)
                off = int(s.table["grad_offset" if field_ == "grad" else "sample_offset"][row])
                with reading(s.path, f"{field_!r} rows {off + a}..{off + b} of step {t}"):
                    out = self._read_rows(seg, lay, off + a, off + b)
                self.bytes_read += out.nbytes
                part = crc_shift(crc32(out), (n - b) * lay.row_bytes)
                bits.append(((np.uint32(part) >> _BITS) & 1).astype(np.float64))
                parts[field_].append(out)
        count = sum(counts)
        ids = np.concatenate(parts["id"])
        size = log.meta.get("dataset_size")
        if len(ids) and (int(ids.min()) < 0 or (size is not None and int(ids.max()) >= int(size))):
            log._check_ids(locs[0][0], t, ids)  # raises LogFormatError
        weights = (np.concatenate(parts["weight"]).astype(np.float64) if len(parts["weight"]) == len(locs)
                   else np.full(len(ids), 1.0 / max(count, 1)))
        grads = [log._dense(seg, "grad", g) for (seg, _), g in zip(locs, parts["grad"])]
        return ShareRows(t, log.lr(t), count, ids, weights, np.concatenate(grads),
                         np.concatenate(bits) if bits else np.zeros(0))

    def verify(self, t: int, summed_bits: np.ndarray) -> None:
        """Compare the CRC-32s that the processes' bits (``summed_bits``: :attr:`ShareRows.bits` summed over the
        processes) add up to with step ``t``'s table; raises :class:`LogFormatError` on a mismatch."""
        log = self.log
        parity = np.rint(np.asarray(summed_bits)).astype(np.int64) % 2
        i = 0
        for seg, row in log._locs(t):
            s = log._segs[seg]
            for field_ in _FIELDS:
                if self._layout(seg, field_) is None:
                    continue
                got = int((parity[32 * i : 32 * i + 32] << np.arange(32)).sum())
                i += 1
                if got != int(s.table[ROW_CRC_COLUMNS[field_]][row]):
                    raise LogFormatError(s.path, f"the {field_!r} rows of step {t} fail their CRC-32: the file is "
                                                 f"corrupted. {restore_hint(s.path)}")
