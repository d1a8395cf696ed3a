"""Buffered, crash-safe writer of the influence log (format: ``log/format.py``, ``docs/log-format.md``).

Steps are buffered in memory and handed, a segment at a time, to a background thread that
writes one segment file per flush under a temporary name (HDF5
never sees an I/O error; fsync, atomic rename; the file itself is
:mod:`.segment`). Training never waits on HDF5 unless the queue of pending segments is
full. A segment closes after ``flush_every_n_steps`` steps, or once it has been open
``flush_every_n_seconds`` or holds ``max_segment_bytes`` of rows and parameters, whichever comes
first of those set (the tracker's default: 10 s or 64 MiB, so a fast model writes a file every
few seconds, not every few hundred milliseconds: a segment's fixed cost, about 30 HDF5 datasets,
is then spread over many steps). A failed write (disk full, ...) stops the writer for good, so
the log never has a gap; the error is raised on the training thread at its next call.
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

import h5py
import numpy as np

from lightning_influence.log.format import (
    DATA_FILE,
    FROZEN_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    META_FILE,
    TMP_SUFFIX,
    check_header,
    json_attr,
    list_segments,
    list_unfinished,
    RANK_RE,
    read_meta,
    reading,
    segment_index,
    segment_path,
    set_text,
)
from lightning_influence.log.half import CHECK_EVERY, rounding_of_cast
from lightning_influence.log.lock import WriterLock
from lightning_influence.log.records import CheckpointRecord, StepRecord
from lightning_influence.log.segment import seal, truncate_log, truncation_plan, write_file, write_segment

SEGMENT_BYTES = 64 << 20  # the tracker's default size limit of a segment (rows and parameters)


class LogWriteError(OSError):
    """Writing the influence log failed (disk full, permissions, ...); the log stops at the last closed segment."""


def acquire_writer_lock(log_dir: str | os.PathLike, rank: int) -> WriterLock:
    """Rank ``rank``'s exclusive writer lock of ``log_dir``, held (``log/lock.py``): a second fit writing the same log
    is refused at once; a lock file that cannot be written is a storage error saying that nothing is in the log yet."""
    lock = WriterLock(log_dir, rank)
    try:
        lock.acquire()
    except OSError as err:
        raise storage_error(log_dir, f"{lock.path.parent.name}/{lock.path.name} (the writer lock)", err,
                            "Nothing of this fit is in the log yet", started=False) from None
    return lock


def storage_error(log_dir: str | os.PathLike, where: str, err: BaseException, state: str,
                  started: bool = True) -> LogWriteError:
    """A :class:`LogWriteError` for a failed write: the file, the OS error, what is safe (``state``) and what to do.

    ``started``: the fit has recorded steps, so it is resumed from a checkpoint rather than started again.
    """
    code = getattr(err, "errno", None)
    if code is None and isinstance(err.__cause__, OSError):
        code = err.__cause__.errno
    again = ("resume from the last Lightning checkpoint with Trainer.fit(ckpt_path=...); the log continues from there"
             if started else "start the fit again")
    if code in (errno.ENOSPC, errno.EDQUOT) or "no space left" in str(err).lower():
        todo = (f"The disk is full: free space or move log_dir to a larger disk, or make the log smaller (projection_dim, "
                f"every_n_steps, storage_dtype='float16', compression='gzip'), then {again}.")
    elif code == errno.ENOENT:
        todo = (f"The log's folder was deleted or moved while the fit wrote it: put it back where it was, then {again}; "
                "or resume into another log_dir with overwrite=True (a new log starting at that checkpoint).")
    elif code == errno.EFBIG:
        todo = (f"A file may not be that large there (the file system's limit, or `ulimit -f`): make segments smaller "
                f"(flush_every_n_steps, flush_every_n_seconds; one step's rows: projection_dim, storage_dtype='float16'), "
                f"or move log_dir to another disk, then {again}.")
    elif code in (errno.EROFS, errno.EACCES, errno.EPERM):
        todo = f"log_dir is not writable (read-only disk or missing permission): choose a writable log_dir, then {again}."
    else:
        todo = f"Check that log_dir is writable and healthy, then {again}."
    message = (f"writing the influence log {log_dir} failed at {where}: {type(err).__name__}: "
               f"{err}. {state}. {todo}")
    out = LogWriteError(code or errno.EIO, message)
    out.__cause__ = err
    return out


def write_meta(log_dir: str | os.PathLike, meta: Mapping[str, Any]) -> None:
    """Write ``meta.h5`` atomically: every value becomes a JSON string attribute.

    Raises:
        LogWriteError: the file cannot be written (the message names it and says what to do).
    """
    try:
        _write_meta_file(log_dir, meta)
    except OSError as err:
        raise storage_error(log_dir, META_FILE, err, "Nothing of this fit is in the log yet", started=False) from None


def _write_meta_file(log_dir: str | os.PathLike, meta: Mapping[str, Any]) -> None:
    """:func:`write_meta` raising the ``OSError`` itself (the writer's thread describes it with what is safe)."""

    def fill(f: h5py.File) -> None:
        set_text(f.attrs, "format", FORMAT_NAME)
        f.attrs["format_version"] = FORMAT_VERSION
        for key, value in meta.items():
            set_text(f.attrs, key, json_attr(value))
        seal(f)

    write_file(Path(log_dir) / META_FILE, fill)


def remove_log(log_dir: str | os.PathLike) -> None:
    """Delete a log's own files (``meta.h5``, ``data.pt``, ``frozen.pt``, segments, unfinished ones), never anything else in ``log_dir``.

    Segments go first, newest first, and ``meta.h5`` last, so an interrupted removal leaves
    a log without gaps. A rank folder left empty is removed (one holding a writer lock stays).
    """
    root = Path(log_dir)
    for stale in list_unfinished(root):
        stale.unlink(missing_ok=True)
    for segs in list_segments(root).values():
        for path in reversed(segs):
            path.unlink(missing_ok=True)
    for name in (DATA_FILE, DATA_FILE + TMP_SUFFIX, FROZEN_FILE, FROZEN_FILE + TMP_SUFFIX, META_FILE + TMP_SUFFIX, META_FILE):
        (root / name).unlink(missing_ok=True)
    for rank_dir in root.glob("rank-*"):
        if RANK_RE.match(rank_dir.name) and rank_dir.is_dir():
            with contextlib.suppress(OSError):  # not empty: a writer lock, or files that are not the log's
                rank_dir.rmdir()


def rank_end(log_dir: str | os.PathLike, rank: int) -> int | None:
    """The last step that ``rank`` has in closed segments, or ``None`` if it has none."""
    for path in reversed(list_segments(log_dir).get(rank, [])):
        with reading(path, "the segment header"), h5py.File(path, "r") as f:
            attrs = dict(f.attrs)
        check_header(path, attrs)
        if int(attrs["n_steps"]) > 0:
            return int(attrs["last_step"])
    return None


class LogWriter:
    """Buffers step records of one rank and writes them as closed segments in the background.

    A kill loses at most the steps not yet in a closed segment: the buffer and the segments
    being written, queued, or waiting to be queued while ``add_step`` blocks, at most
    ``max_pending + 2`` segments' worth (``(max_pending + 2) × flush_every_n_steps`` steps, or as many
    times ``flush_every_n_seconds`` of training). Everything in a closed segment stays readable.

    Args:
        log_dir: the log directory.
        rank: the process rank (one folder per rank).
        flush_every_n_steps: steps per segment (``None``: no step limit); smaller loses less on a crash,
            larger makes fewer files.
        flush_every_n_seconds: a segment closes at the first step that finds it open this long (from the
            moment its first step was buffered); ``None``: no time limit.
        max_segment_bytes: a segment closes at the first step that brings its gradient/HVP rows (in the
            storage dtype) and parameter checkpoints to this many bytes; bounds the writer's memory.
        storage_dtype: dtype of gradient/HVP rows on disk (parameters are stored exactly).
        compression: h5py compression filter for gradient rows (``None`` or ``"gzip"``/``"lzf"``).
        background: write segments in a background thread (``False`` writes synchronously).
        max_pending: segments waiting for the background thread before ``add_step`` blocks
            (bounds the memory held by the writer).
        truncate_from: a resumed fit: drop this rank's steps ``>= truncate_from`` (:func:`truncate_log`)
            just before the first segment is written, so a fit refused before it records a step
            (or one that fails) leaves the log as it was; the writer continues at ``truncate_from``.
        resume_meta: with ``truncate_from``, the ``meta.h5`` recording the resume (``log/resume.py``), written
            just before that truncation, so a refused fit leaves ``meta.h5`` as it was too.

    Raises:
        LogWriteError: from any call after a segment write failed; the message names the log, the
            failed segment, the last step safely on disk and what to do.
        FloatingPointError: from ``add_step`` for a non-finite loss/gradient/HVP product, or one beyond
            ``storage_dtype``'s range (nothing stored).
        ValueError: from ``add_step`` for a step that would duplicate or skip a step of this rank.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike,
        rank: int = 0,
        flush_every_n_steps: int | None = 50,
        storage_dtype: str | np.dtype = "float32",
        compression: str | None = None,
        background: bool = True,
        max_pending: int = 2,
        truncate_from: int | None = None,
        resume_meta: Mapping[str, Any] | None = None,
        flush_every_n_seconds: float | None = None,
        max_segment_bytes: int | None = None,
    ) -> None:
        self.log_dir = Path(log_dir)
        self.rank = rank
        self.flush_every_n_steps = flush_every_n_steps
        self.flush_every_n_seconds = flush_every_n_seconds
        self.max_segment_bytes = max_segment_bytes
        self._opened = 0.0  # when the buffer's first step came (clock())
        self._bytes = 0  # rows and parameters in the buffer
        self.storage_dtype = np.dtype(storage_dtype)
        self._half_warned = False  # float16 storage: its rounding warned about once (log/half.py)
        self.compression = compression
        self.bytes_written = 0
        self._steps: list[StepRecord] = []
        self._checkpoints: list[CheckpointRecord] = []
        for stale in list_unfinished(self.log_dir, rank):  # a write interrupted by a crash: never renamed, never read
            stale.unlink(missing_ok=True)
        existing = list_segments(self.log_dir).get(rank, [])
        end = rank_end(self.log_dir, rank)
        self._truncate_from = truncate_from
        self._resume_meta = resume_meta if truncate_from is not None else None
        if truncate_from is not None:  # done just before the first segment is written (see ``_write``)
            deleted = {path for path, _, keep in truncation_plan(self.log_dir, rank, truncate_from) if keep is None}
            existing = [p for p in existing if p not in deleted]
            end = None if end is None or not existing else min(end, truncate_from - 1)
        self._folder = segment_path(self.log_dir, rank, 0).parent
        self._folder_id = _identity(self._folder)  # a folder deleted or moved mid-fit is noticed (_check_in_place)
        self._next_index = segment_index(existing[-1]) + 1 if existing else 0
        self._next_step: int | None = truncate_from if truncate_from is not None else None if end is None else end + 1
        self.last_step_on_disk: int | None = end
        self.run_id = _meta_run_id(self.log_dir)
        self._first_accepted: int | None = None  # first step given to this writer
        self.lost: tuple[int, int] | None = None  # steps accepted but not written, once closed (see ``close``)
        self._error: LogWriteError | None = None
        self._reported = False
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        if background:
            self._queue = queue.Queue(maxsize=max_pending)
            self._thread = threading.Thread(target=self._work, name=f"influence-log-writer-{rank}", daemon=True)
            self._thread.start()

    @property
    def buffered_steps(self) -> int:
        return len(self._steps)

    @property
    def failed(self) -> bool:
        """A segment write failed: the writer writes nothing more."""
        return self._error is not None

    def _check_half(self, record: StepRecord) -> None:
        """float16 storage: every ``CHECK_EVERY``-th step's rows measured (log/half.py), one warning when significant."""
        if (record.grads is None or self.storage_dtype != np.float16 or self._half_warned or record.grad_outer is not None
                or record.step % CHECK_EVERY or np.asarray(record.grads).dtype == np.float16):
            return
        got = rounding_of_cast(np.asarray(record.grads))
        if got.significant():
            self._half_warned = True
            warnings.warn(f"{self.log_dir}: step {record.step}: {got.text('up to')}; estimators read these rounded "
                          "rows. Record with storage_dtype='float32' to keep them (lightning-influence info reports "
                          "the whole log)", RuntimeWarning, stacklevel=3)

    def add_step(self, record: StepRecord, checkpoint: CheckpointRecord | None = None) -> None:
        """Validate and buffer one step (and ``θ_t`` taken before it); a full buffer starts a segment write."""
        self._raise_pending_error()
        record.validate()
        record.check_storable(self.storage_dtype)
        self._check_half(record)
        if self._next_step is not None and record.step != self._next_step:
            raise ValueError(
                f"{self.log_dir}: rank {self.rank} would record step {record.step} but its log continues at step "
                f"{self._next_step}; steps must be recorded once each, in order (a resumed fit truncates the log "
                "to its checkpoint's step first)")
        if record.grads is not None and self._steps:  # a segment's gradient rows share one column layout
            last = next((r for r in reversed(self._steps) if r.grads is not None), None)
            if last is not None and last.grad_outer != record.grad_outer:
                self.flush(wait=False)
        if not self._steps:
            self._opened = clock()
        if checkpoint is not None:
            self._add_checkpoint(checkpoint)
        self._steps.append(record)
        for rows in (record.grads, record.hvps):
            if rows is not None:
                self._bytes += self.storage_dtype.itemsize * np.size(rows)
        self._next_step = record.step + 1
        if self._first_accepted is None:
            self._first_accepted = record.step
        if self._segment_full():
            self.flush(wait=False)

    def discard_from(self, step: int) -> bool:
        """Drop the buffered steps from ``step`` on (a step refused after it was recorded, and any after it); False if
        ``step`` was already written in a closed segment (a segment that closed at that very step)."""
        if self._next_step is None or self._next_step <= step:
            return True  # never recorded
        if not self._steps or self._steps[0].step > step:
            return False
        kept = [r for r in self._steps if r.step < step]
        self._steps, self._next_step = kept, step
        self._bytes = sum(self.storage_dtype.itemsize * np.size(rows) for r in kept for rows in (r.grads, r.hvps)
                          if rows is not None) + sum(np.asarray(v).nbytes for c in self._checkpoints for v in c.params.values())
        return True

    def _segment_full(self) -> bool:
        """The buffered segment reached one of its limits (steps, seconds open, bytes)."""
        return ((self.flush_every_n_steps is not None and len(self._steps) >= self.flush_every_n_steps)
                or (self.max_segment_bytes is not None and self._bytes >= self.max_segment_bytes)
                or (self.flush_every_n_seconds is not None and clock() - self._opened >= self.flush_every_n_seconds))

    def add_checkpoint(self, record: CheckpointRecord) -> None:
        """Buffer a parameter checkpoint; it is written with the next segment."""
        self._raise_pending_error()
        self._add_checkpoint(record)

    def _add_checkpoint(self, record: CheckpointRecord) -> None:
        self._checkpoints.append(record)
        self._bytes += sum(np.asarray(v).nbytes for v in record.params.values())

    def flush(self, wait: bool = True) -> None:
        """Write everything buffered as one segment (if anything is); ``wait`` blocks until on disk."""
        self._raise_pending_error()
        if self._steps or self._checkpoints:
            job = (segment_path(self.log_dir, self.rank, self._next_index), self._steps, self._checkpoints)
            # The buffer is emptied only once the job is handed over: a KeyboardInterrupt while ``put`` waits on a
            # full queue (a disk slower than training) leaves the steps buffered, and ``close`` still writes them.
            if self._queue is None:
                self._write(job)
            else:
                self._queue.put(job)
            self._next_index += 1
            self._steps, self._checkpoints, self._bytes = [], [], 0
        if wait:
            self.drain()
        else:
            self._raise_pending_error()

    def amend_meta(self, amend: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        """Rank 0: ``meta.h5`` becomes ``amend(meta)`` (a value the fit settles after its start), in order with the
        segments; a resumed fit's record of the resume, if not written yet, is amended instead (written with it)."""
        self._raise_pending_error()
        if self._queue is None:
            self._write(amend)
        else:
            self._queue.put(amend)

    def drain(self) -> None:
        """Wait until every segment handed to the background thread is written; the open one stays open (a benchmark
        keeps one fit's writer off another fit's time with it)."""
        if self._queue is not None:
            self._queue.join()
        self._raise_pending_error()

    def close(self, raise_errors: bool = True) -> None:
        """Flush, wait for the background thread and stop it.

        After a failed write nothing more is written (a later segment would leave a gap) and the
        buffered steps are dropped; the failure is raised here unless it was raised before or
        ``raise_errors`` is ``False`` (closing while another exception propagates).
        """
        try:
            if self._error is None:
                try:
                    self.flush(wait=True)
                    if raise_errors:  # a fit that ended without recording a step
                        self._continue_log()
                except LogWriteError:
                    if raise_errors:
                        raise
            elif raise_errors and not self._reported:
                self._raise_pending_error()
        finally:
            try:
                if self._thread is not None and self._queue is not None:
                    self._queue.put(None)  # after every queued segment: they are all written before the thread ends
                    self._thread.join()
                    self._thread = None
            finally:
                self._report_lost()
                self._steps, self._checkpoints, self._bytes = [], [], 0

    def _report_lost(self) -> None:
        """Warn, naming the range, about accepted steps that are not on disk (a failed write, an interrupted close)."""
        self.lost = None
        if self._first_accepted is None or self._next_step is None:
            return
        last = self._next_step - 1
        first = max(self._first_accepted, self.last_step_on_disk + 1 if self.last_step_on_disk is not None else -1)
        if first > last:
            return
        running = self._thread is not None and self._thread.is_alive()
        self.lost = (first, last)
        warnings.warn(
            f"influence log {self.log_dir}, rank {self.rank}: steps {first}..{last} were recorded but are not on disk "
            + ("(the background writer was still writing when the close was interrupted; if the process ends now "
               "they are lost)" if running else "and are lost")
            + ("; no step of this rank is on disk" if self.last_step_on_disk is None else
               f"; the log ends at step {self.last_step_on_disk}") + ". Resume from a Lightning checkpoint to record them again.",
            RuntimeWarning, stacklevel=3)

    def _write(self, job: tuple[Path, list[StepRecord], list[CheckpointRecord]] | Callable) -> None:
        if self._error is not None:  # never write past a failed segment: the log would have a gap
            return
        if callable(job):  # amend_meta
            try:
                self._check_in_place()
                if self._resume_meta is not None:
                    self._resume_meta = job(dict(self._resume_meta))
                else:
                    _write_meta_file(self.log_dir, job(read_meta(self.log_dir)))
            except Exception as err:  # noqa: BLE001 - reported on the training thread, as a segment's failure
                self._error = self._describe_failure(self.log_dir / META_FILE, [], err)
                if self._queue is None:
                    self._raise_pending_error()
            return
        path, steps, checkpoints = job
        try:
            self._check_in_place()
            self._continue_log()
            self.bytes_written += write_segment(path, self.rank, steps, checkpoints, self.storage_dtype,
                                                self.compression, self.run_id)
        except Exception as err:  # noqa: BLE001 - any failure stops the writer and is reported on the training thread
            self._error = self._describe_failure(path, steps, err)
            if self._queue is None:
                self._raise_pending_error()
            return
        if steps:
            self.last_step_on_disk = steps[-1].step
        self._folder_id = self._folder_id or _identity(self._folder)

    def _check_in_place(self) -> None:
        """The rank's folder must be the one this writer started in: a log deleted or moved while the fit wrote it
        would otherwise be re-created around the later segments alone (no ``meta.h5``, no earlier steps), unreadable,
        while training went on as if recorded."""
        if self._folder_id is not None and _identity(self._folder) != self._folder_id:
            raise FolderGoneError(errno.ENOENT, f"{self._folder} was deleted or moved while this fit wrote it")

    def _continue_log(self) -> None:
        """A resumed fit's first change to the log: record the resume in ``meta.h5``, drop the steps it records again."""
        if self._truncate_from is None:
            return
        if self._resume_meta is not None:
            _write_meta_file(self.log_dir, self._resume_meta)
            self._resume_meta = None
        truncate_log(self.log_dir, self.rank, self._truncate_from)
        self._truncate_from = None

    def _describe_failure(self, path: Path, steps: list[StepRecord], err: Exception) -> LogWriteError:
        what = (f"steps {steps[0].step}..{steps[-1].step}" if steps else "the run metadata" if path.name == META_FILE
                else "a checkpoint")
        safe = (f"Nothing more is written to this log; steps up to {self.last_step_on_disk} are safe in closed segments"
                if self.last_step_on_disk is not None else "Nothing more is written to this log; no step of this rank is on disk")
        if isinstance(err, FolderGoneError):
            safe = (f"Nothing more is written to this log; its closed segments (steps up to {self.last_step_on_disk}) "
                    "went with the folder")
        return storage_error(self.log_dir, f"{path.parent.name}/{path.name} ({what})", err, safe)

    def _work(self) -> None:
        assert self._queue is not None
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                self._write(job)
            finally:
                self._queue.task_done()

    def _raise_pending_error(self) -> None:
        if self._error is None:
            return
        if self._reported:
            raise LogWriteError(self._error.errno, f"the influence log writer of {self.log_dir} stopped after an "
                                                   f"earlier failure: {self._error.strerror}")
        self._reported = True
        raise self._error


clock = time.monotonic  # a segment's age (a module attribute: tests set the time)


class FolderGoneError(FileNotFoundError):
    """The rank's folder is not the one the writer started in (deleted or moved during the fit)."""


def _identity(folder: Path) -> tuple[int, int] | None:
    """``(device, inode)`` of ``folder``, or ``None`` if there is none."""
    try:
        st = os.stat(folder)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _meta_run_id(log_dir: Path) -> str | None:
    if not (log_dir / META_FILE).exists():
        return None
    run_id = read_meta(log_dir).get("run_id")
    return str(run_id) if run_id is not None else None
