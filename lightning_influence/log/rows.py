"""The rows of a log's segment files, as :class:`~lightning_influence.log.reader.InfluenceLog` reads them.

The reader's I/O layer: segment files held open (the least recently used closed), rows read in large read-ahead
blocks (one reused buffer per rank and dataset, so memory stays bounded), each step's rows checked against their
CRC-32 and their ids against the training set, factored gradient blocks expanded (``log/outer.py``), and the kernel
asked to read ahead (:func:`will_need`). ``InfluenceLog`` indexes the segments and presents the steps; the reductions
over the log (``log/blocks.py``, ``log/shares.py``, ``log/microbatches.py``) read through these methods too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from lightning_influence.log.format import ROW_CRC_COLUMNS, ROW_DATASETS, LogFormatError, crc32, reading, restore_hint
from lightning_influence.log.outer import OuterColumns, dense_rows


@dataclass
class Segment:
    """One segment file as the reader indexed it on open: its step table, checkpoints and row layout."""

    index: int  # position in InfluenceLog._segs
    path: Path
    rank: int
    table: dict[str, np.ndarray]  # STEP_COLUMNS and "lr"
    checkpoints: list[int]
    outer: OuterColumns | None = None  # gradient rows stored with factored blocks (log/outer.py)

    @property
    def first(self) -> int:
        return int(self.table["step"][0])

    @property
    def last(self) -> int:
        return int(self.table["step"][-1])


_MAX_OPEN_FILES = 16  # segment files held open at once (least recently used are closed)
_CHUNK_CACHE_BYTES = 2 << 20  # per open file; a gradient chunk is at most 1 MiB
_BLOCK_BYTES = 16 << 20  # read-ahead per rank and dataset (see SegmentRows._rows)


class SegmentRows:
    """The row reads of ``InfluenceLog`` (its base class; the open files, blocks and index are set in its ``__init__``)."""

    def _file(self, seg: int) -> h5py.File:
        f = self._files.get(seg)
        if f is not None:
            self._files.move_to_end(seg)
            return f
        path = self._segments[seg]
        try:
            f = h5py.File(path, "r", rdcc_nbytes=_CHUNK_CACHE_BYTES, rdcc_nslots=1031)
        except FileNotFoundError:
            raise LogFormatError(path, "disappeared while the log was open (a resumed run truncated the log?); "
                                       "open the log again") from None
        except Exception as err:  # noqa: BLE001 - any open failure is a damaged file
            raise LogFormatError(path, f"cannot be opened as HDF5 (truncated or corrupted?): {type(err).__name__}: "
                                       f"{err}. {restore_hint(path)}") from err
        self._files[seg] = f
        if len(self._files) > _MAX_OPEN_FILES:
            _, old = self._files.popitem(last=False)
            old.close()
        return f

    def _read(self, seg: int, row: int, field_: str) -> np.ndarray | None:
        """The rows of ``field_`` of the step at ``row`` of segment ``seg`` (``None`` if not recorded)."""
        s = self._segs[seg]
        table = s.table
        n = int(table["sample_count"][row])
        step = int(table["step"][row])
        off = int(table["sample_offset"][row] if field_ in ("id", "loss", "weight") else table["grad_offset"][row])
        if off < 0:
            return None
        with reading(s.path, f"{field_!r} of step {step}"):
            out = self._rows(seg, ROW_DATASETS[field_], off, n)
        if out is None:
            return None
        self._verify(seg, row, field_, out)
        if field_ == "id":
            self._check_ids(seg, step, out)
        return self._dense(seg, field_, out)

    def _dense(self, seg: int, field_: str, rows: np.ndarray) -> np.ndarray:
        """``rows`` of ``field_`` from segment ``seg`` (checked against their CRC-32) in the projector's columns: gradient
        rows stored with factored blocks are expanded (``log/outer.py``), others returned as they are."""
        return dense_rows(rows, self._segs[seg].outer) if field_ == "grad" else rows

    def _verify(self, seg: int, row: int, field_: str, out: np.ndarray) -> None:
        """Refuse the ``field_`` rows ``out`` of the step at ``row`` of segment ``seg`` unless they match its CRC-32."""
        s = self._segs[seg]
        if crc32(out) != int(s.table[ROW_CRC_COLUMNS[field_]][row]):
            raise LogFormatError(s.path, f"the {field_!r} rows of step {int(s.table['step'][row])} fail their CRC-32: "
                                         f"the file is corrupted. {restore_hint(s.path)}")

    def _check_ids(self, seg: int, step: int, ids: np.ndarray) -> None:
        """Refuse checksummed ids that are not indices into the training set (``step``: the first step they belong to)."""
        size = self.meta.get("dataset_size")
        if len(ids) and (int(ids.min()) < 0 or (size is not None and int(ids.max()) >= int(size))):  # intact, yet wrong
            raise LogFormatError(self._segs[seg].path, f"step {step} holds sample ids outside [0, {size}) although its "
                                 "rows pass their checksum: the run recorded ids that are not indices into its "
                                 f"training set of {size} samples, so they cannot be read as sample ids. "
                                 "Record the run again with ids that index the training set")

    def _rows(self, seg: int, name: str, off: int, n: int) -> np.ndarray | None:
        """Rows ``[off, off + n)`` of dataset ``name``, a view into a read-ahead block of about 16 MiB.

        One block buffer is kept (and reused) per rank and dataset, so memory stays bounded and a
        pass over the log reads each byte once, in large sequential reads; the block extends
        forwards from ``off``, or backwards when steps are visited in reverse (adjoint sweeps).
        The view is overwritten by the next block: callers copy it (``np.concatenate``).
        """
        rank = self._segs[seg].rank
        block = self._blocks.get((rank, name))
        if block is None or block[0] != seg or not (block[1] <= off and off + n <= block[1] + len(block[2])):
            if (seg, name) in self._absent:
                return None
            f = self._file(seg)
            if name not in f:
                self._absent.add((seg, name))  # e.g. the weights of a version-1 log: asked at every step
                return None
            ds = f[name]
            row_shape = ds.shape[1:]
            per_block = max(n, _BLOCK_BYTES // max(1, ds.dtype.itemsize * int(np.prod(row_shape, dtype=np.int64))))
            backwards = block is not None and block[0] == seg and off + n <= block[1]
            start = max(0, off + n - per_block) if backwards else off
            stop = min(ds.shape[0], start + per_block)
            if block is None or block[0] != seg:
                self._prefetch_after(seg)
            buf = self._buffers.get((rank, name))
            if buf is None or buf.dtype != ds.dtype or buf.shape[1:] != row_shape or len(buf) < stop - start:
                buf = self._buffers[(rank, name)] = np.empty((max(per_block, stop - start), *row_shape), ds.dtype)
            if stop > start:
                ds.read_direct(buf, np.s_[start:stop], np.s_[0 : stop - start])
            block = (seg, start, buf[: stop - start])
            self._blocks[(rank, name)] = block
        return block[2][off - block[1] : off - block[1] + n]

    def _prefetch_after(self, seg: int) -> None:
        """Ask the kernel to read the rank's next segment ahead (disk reads overlap the work on this one)."""
        nxt = seg + 1
        if nxt < len(self._segs) and self._segs[nxt].rank == self._segs[seg].rank:
            will_need(self._segs[nxt].path)



def will_need(path: Path, offset: int = 0, length: int = 0, tail: int = 0) -> int | None:
    """Ask the kernel to read ``length`` bytes of the file ``path`` from ``offset`` (0: to its end), and its last
    ``tail`` bytes, ahead, in the background; the file's size (``None``: not possible, a hint only)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
            size = os.fstat(fd).st_size
            if tail:
                os.posix_fadvise(fd, max(0, size - tail), tail, os.POSIX_FADV_WILLNEED)
            return size
        finally:
            os.close(fd)
    except (OSError, AttributeError):  # AttributeError: no posix_fadvise on this OS
        return None

