"""Reading the next blocks of gradient rows in a background thread while the caller reduces the current one.

A reduction over the log (TracIn, self-influence) alternates two costs per block: waiting for the disk and
multiplying the rows. Done in turn, the disk idles while the CPU multiplies and the CPU idles while the disk
reads. :class:`Prefetcher` overlaps them: one thread reads the byte runs of the next ``depth`` blocks with
``os.preadv`` (which releases the GIL) into a small ring of reused buffers, and computes the CRC-32 of each
step's rows, while the caller's thread multiplies the block read before. The caller compares the CRC-32s with
the step tables before it uses a row, so every checksum is still verified.

Runs of at least 1 MiB (gradient rows) not in the page cache are read with ``O_DIRECT`` (Linux): from the disk into the
buffer, without passing through the page cache, in ``_STREAMS`` parts at once (a disk answers two requests in flight
faster than one, and the read no longer waits for this process's threads between requests). For a log larger than RAM the cache cannot keep the rows
for a second pass anyway, and filling it is what costs a buffered read its CPU (measured in docs/scaling.md:
≈ 0.46 s of system time per GB buffered, ≈ 0.05 s direct) and much of its speed when the CPUs are busy.
Rows already cached (a log read again, or one smaller than RAM) are copied from the cache (a ``RWF_NOWAIT``
read takes what is cached and leaves the rest); where ``O_DIRECT`` is refused (tmpfs, other systems) the rest
is read buffered.

Only bytes the caller has shown to be stored as plain rows are read this way (``log/blocks.py``: HDF5's chunk
index says the dataset's chunks are unfiltered and back to back); anything else is read through HDF5.
"""

from __future__ import annotations

import errno
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lightning_influence.log.format import crc32, reading

_ALIGN = 4096  # O_DIRECT: file offset, length and buffer address in multiples of this (>= the logical block size)
_DIRECT_MIN = 1 << 20  # shorter runs (ids, weights) are read buffered: a direct read costs a disk round trip each
_STREAMS = 2  # direct reads in flight at once (parts of a long run): a disk answers two faster than one (docs/scaling.md)
_NOWAIT = getattr(os, "RWF_NOWAIT", None)  # Linux >= 4.14: a read that returns only what the page cache holds
_DIRECT = getattr(os, "O_DIRECT", None)
AVAILABLE = hasattr(os, "preadv")  # not on Windows: there the blocks are read through HDF5


@dataclass
class ReadJob:
    """Byte runs ``(file, offset, bytes)`` to read, and pieces whose CRC-32 the thread computes once they are read
    (e.g. each step's rows), each a list of ``(run, first byte, end byte)``. Once read, ``views`` holds one ``uint8``
    array per run and ``crcs`` one CRC-32 per piece."""

    runs: list[tuple[Path, int, int]]
    pieces: list[list[tuple[int, int, int]]] = field(default_factory=list)
    views: list[np.ndarray] = field(default_factory=list)
    crcs: list[int] = field(default_factory=list)
    regions: list[tuple[np.ndarray, int]] = field(default_factory=list)  # per run: aligned buffer, its file offset
    error: tuple[Path, BaseException] | None = None
    done: threading.Event = field(default_factory=threading.Event)


class Prefetcher:
    """Two background threads (a reader, then a checksummer) that carry out :class:`ReadJob` s in the order submitted,
    into ``depth + 1`` buffers.

    The buffer of a job is reused by the job submitted ``depth + 1`` later: a caller that submits at most ``depth``
    jobs beyond the one it is using never sees its rows overwritten. Use as a context manager (the thread ends on
    exit, also when the caller stops early).

    Args:
        depth: jobs read ahead of the one in use.
        direct: read what the page cache does not hold with ``O_DIRECT`` where the system allows it.
    """

    def __init__(self, depth: int = 2, direct: bool = True) -> None:
        self.depth = depth
        self.direct = direct and _DIRECT is not None
        self._ring: list[np.ndarray] = [np.empty(0, np.uint8) for _ in range(depth + 1)]
        self._next = 0
        self._jobs: queue.Queue[ReadJob | None] = queue.Queue()
        self._read: queue.Queue[ReadJob | None] = queue.Queue()  # read by the reader, to be checksummed
        self._threads: list[threading.Thread] = []
        self._undirect: set[Path] = set()  # files whose O_DIRECT reads were refused: read buffered
        self._streams = ThreadPoolExecutor(_STREAMS, thread_name_prefix="influence-log-direct")

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, job: ReadJob) -> ReadJob:
        """Queue ``job``; its runs go to the next buffer of the ring (grown when too small), each run at an aligned
        address with the file's alignment, so the part of it that is not cached can be read with ``O_DIRECT``."""
        spans = []
        for _, offset, nbytes in job.runs:
            start = offset - offset % _ALIGN
            spans.append((start, -(-(offset + nbytes - start) // _ALIGN) * _ALIGN))
        total = sum(span for _, span in spans)
        slot = self._next % len(self._ring)
        self._next += 1
        if len(self._ring[slot]) < total + _ALIGN:
            self._ring[slot] = np.empty(total + _ALIGN, np.uint8)
        buf = self._ring[slot]
        at = -buf.ctypes.data % _ALIGN
        for (_, offset, nbytes), (start, span) in zip(job.runs, spans):
            region = buf[at: at + span]
            job.regions.append((region, start))
            job.views.append(region[offset - start: offset - start + nbytes])
            at += span
        if not self._threads:
            self._threads = [threading.Thread(target=work, name=f"influence-log-{name}", daemon=True)
                             for work, name in ((self._work, "prefetch"), (self._check, "checksum"))]
            for thread in self._threads:
                thread.start()
        self._jobs.put(job)
        return job

    def result(self, job: ReadJob) -> tuple[list[np.ndarray], list[int]]:
        """The bytes of each run of ``job`` (views into the ring) and the CRC-32 of each piece, once read.

        Raises:
            LogFormatError: reading a run failed, or its file ended before the run (naming the file).
        """
        job.done.wait()
        if job.error is not None:
            path, err = job.error
            with reading(path, "gradient rows"):
                raise err
        return job.views, job.crcs

    def close(self) -> None:
        if self._threads:
            self._jobs.put(None)
            for thread in self._threads:
                thread.join()
            self._threads = []
        self._streams.shutdown()

    def _work(self) -> None:
        """The reader: reads each job and hands it to the checker, so the disk is asked for the next job's bytes
        while the checker computes this one's CRC-32s (``isal`` holds the GIL while it does)."""
        while (job := self._jobs.get()) is not None:
            path = job.runs[0][0] if job.runs else Path()
            try:
                for (path, offset, nbytes), view, (region, start) in zip(job.runs, job.views, job.regions):
                    self._read_run(path, offset, view, region, start)
            except Exception as err:  # noqa: BLE001 - handed to the caller's thread by result()
                job.error = (path, err)
            self._read.put(job)
        self._read.put(None)

    def _check(self) -> None:
        """The checker: the CRC-32 of each piece of each job read, then the job is done."""
        while (job := self._read.get()) is not None:
            try:
                if job.error is None:
                    job.crcs = [_crc_of(job.views, piece) for piece in job.pieces]
            except Exception as err:  # noqa: BLE001 - handed to the caller's thread by result()
                job.error = (job.runs[0][0], err)
            finally:
                job.done.set()

    def _read_run(self, path: Path, offset: int, view: np.ndarray, region: np.ndarray, start: int) -> None:
        """``view`` (bytes ``offset ..`` of ``path``, inside the aligned ``region`` that starts at file offset
        ``start``): what the page cache holds copied from it, the rest read directly from the disk."""
        fd = os.open(path, os.O_RDONLY)
        try:
            direct = self.direct and len(view) >= _DIRECT_MIN and path not in self._undirect
            got = _cached(fd, view, offset, probe=direct)
            if got < len(view) and direct:
                got = self._read_direct(path, offset, got, len(view), region, start)
            _read_all(fd, memoryview(view)[got:], offset + got)
        finally:
            os.close(fd)

    def _read_direct(self, path: Path, offset: int, got: int, nbytes: int, region: np.ndarray, start: int) -> int:
        """Read bytes ``[offset + got, offset + nbytes)`` with ``O_DIRECT`` (from the aligned offset at or before
        them), in ``_STREAMS`` parts at once; the bytes now in ``region`` from ``offset`` on (``got`` again if the
        system refuses)."""
        assert _DIRECT is not None
        a, end = offset + got - (offset + got) % _ALIGN, offset + nbytes
        try:
            fd = os.open(path, os.O_RDONLY | _DIRECT)
        except OSError:
            self._undirect.add(path)
            return got
        try:
            parts = _parts(a, end)
            futures = [self._streams.submit(_read_span, fd, memoryview(region), start, lo, hi) for lo, hi in parts]
            futures_wait(futures)  # every part has ended before its file is closed
        finally:
            os.close(fd)
        for (_, hi), future in zip(parts, futures):  # the bytes read back to back from ``a`` on
            err = future.exception()
            if err is not None:
                if not isinstance(err, OSError) or err.errno != errno.EINVAL:
                    raise err
                self._undirect.add(path)  # EINVAL: this file system wants another alignment; read buffered
                break
            a = future.result()
            if a < hi:  # the file ends early: the buffered read after this says so
                break
        return max(got, min(a, end) - offset)


def _parts(a: int, end: int) -> list[tuple[int, int]]:
    """``[a, end)`` cut into up to ``_STREAMS`` parts of about equal size at page boundaries, none under
    ``_DIRECT_MIN`` bytes."""
    n = max(1, min(_STREAMS, (end - a) // _DIRECT_MIN))
    cuts = [a + (end - a) * i // n // _ALIGN * _ALIGN for i in range(n)] + [end]
    return list(zip(cuts, cuts[1:]))


def _read_span(fd: int, mv: memoryview, start: int, a: int, end: int) -> int:
    """Read ``[a, end)`` of the ``O_DIRECT`` file ``fd`` into ``mv`` (which holds the file from offset ``start``);
    the offset reached (``end`` or beyond, unless the file ends first)."""
    while a < end:
        n = os.preadv(fd, [mv[a - start: end - start + (-end) % _ALIGN]], a)
        step = n if a + n >= end else n - n % _ALIGN  # a short read mid-file: resume at an aligned offset
        if step <= 0:
            break
        a += step
    return a


def _crc_of(views: list[np.ndarray], piece: list[tuple[int, int, int]]) -> int:
    """The CRC-32 of the bytes of ``piece``, one stretch after the other."""
    value = 0
    for run, a, b in piece:
        value = crc32(views[run][a:b], value)
    return value


def _cached(fd: int, view: np.ndarray, offset: int, probe: bool) -> int:
    """Copy into ``view`` what the page cache holds of the bytes from ``offset`` on (up to the first page it does not
    hold); the number of bytes copied. ``probe``: first ask for the run's last bytes alone, and copy nothing if they
    are not cached (a run to be read from the disk: a ``RWF_NOWAIT`` read of a long run whose first pages happen to
    be cached, e.g. next to rows read before, costs ~0.5 ms to copy those few pages). A ``RWF_NOWAIT`` read of an
    uncached page may start the kernel's read-ahead of a few pages there: the direct read that follows reads them
    again (a few KiB a run)."""
    if _NOWAIT is None or not len(view):
        return 0
    try:
        tail = len(view) - _ALIGN
        if probe and tail > 0 and os.preadv(fd, [view[tail:]], offset + tail, _NOWAIT) < _ALIGN:
            return 0
        return os.preadv(fd, [view], offset, _NOWAIT)
    except OSError:  # EAGAIN: the first page is not cached (or the flag is not supported here)
        return 0


def _read_all(fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view`` from ``offset`` of ``fd`` (buffered)."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise EOFError(f"the file ends {len(view) - done} bytes before the rows it should hold")
        done += got
