"""Buffered, crash-safe writer of the influence log (format: ``log/format.py``, ``docs/log-format.md``).

Steps are buffered in memory and handed, ``flush_every_n_steps`` at a time, to a
background thread that builds one segment file per flush as an HDF5 image in memory and
writes it under a temporary name (``os.write``, fsync, atomic rename). Training never waits
on HDF5 unless the queue of pending segments is full. A failed write (disk full, ...) stops
the writer for good, so the log never has a gap; the error is raised on the training thread
at its next call.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import queue
import threading
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import h5py
import numpy as np

from lightning_influence.log.format import (
    CHECKPOINT_GROUP,
    CRC_ATTR,
    DATA_FILE,
    DIGEST_ATTR,
    FORMAT_NAME,
    FORMAT_VERSION,
    LIBVER,
    META_FILE,
    MICRO_COLUMNS,
    ROW_CRC_COLUMNS,
    ROW_DATASETS,
    SCALAR_ATTR,
    STEP_COLUMNS,
    TMP_SUFFIX,
    attrs_digest,
    check_header,
    crc32,
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

_FLOAT_COLUMNS = ("batch_grad_norm", "hvp_eps", "tracker_seconds", "grad_scale", "clip_value", "clip_coef")


class LogWriteError(OSError):
    """Writing the influence log failed (disk full, permissions, ...); the log stops at the last closed segment."""


@dataclass
class MicroRecord:
    """One micro-batch of a step: its size, the random state at its forward, optionally its inputs."""

    size: int
    cpu_rng: np.ndarray | None = None  # uint8 CPU generator state (None: drew no CPU random number)
    cuda_rng: np.ndarray | None = None  # uint8 (n_devices, 16) CUDA generator states (None: drew on no GPU)
    inputs: bytes | None = None  # torch.save of the batch as fed to training_step


@dataclass
class StepRecord:
    """Everything recorded for one optimizer step on one rank (numpy arrays, already on CPU)."""

    step: int
    epoch: int
    batch_idx: int
    micro_batches: int
    lrs: list[float]
    ids: np.ndarray
    losses: np.ndarray | None = None
    grads: np.ndarray | None = None
    hvps: np.ndarray | None = None
    batch_grad_norm: float = float("nan")
    hvp_eps: float = float("nan")
    tracker_seconds: float = 0.0
    micro: list[MicroRecord] | None = None  # None: one micro-batch of all ids, nothing else recorded
    grad_scale: float = float("nan")
    skipped: bool = False
    weights: np.ndarray | None = None  # w_{i,t}, the weight of each row's loss in the applied gradient (step.weights)
    accumulate: int = -1  # Lightning's divisor of each micro-batch loss
    clip_value: float = float("nan")  # step.clipping
    clip_coef: float = float("nan")

    def validate(self) -> None:
        """Refuse a record that would store something wrong: bad shapes or non-finite values.

        Raises:
            ValueError: ids not a 1-D integer array, or rows not matching the ids.
            FloatingPointError: a non-finite loss, gradient or HVP product (naming step and sample ids).
        """
        ids = np.asarray(self.ids)
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise ValueError(f"step {self.step}: sample ids must be a 1-D integer array, got shape {ids.shape} dtype {ids.dtype}")
        for what, rows in (("per-sample loss", self.losses), ("per-sample gradient", self.grads),
                           ("Hessian-gradient product", self.hvps)):
            if rows is None:
                continue
            if len(rows) != len(ids) or np.ndim(rows) != (1 if what == "per-sample loss" else 2):
                raise ValueError(f"step {self.step}: {what} rows have shape {np.shape(rows)} for {len(ids)} sample ids")
            bad = ~np.isfinite(np.asarray(rows).reshape(len(ids), -1)).all(axis=1)
            if bad.any() and not (self.skipped and what == "per-sample loss"):  # a skipped step's losses may overflow
                raise FloatingPointError(
                    f"step {self.step}: non-finite {what} for sample ids {ids[bad].tolist()[:10]}; nothing of this step "
                    "was stored. Lower the learning rate or check these samples.")
        if self.weights is not None and np.shape(self.weights) != ids.shape:
            raise ValueError(f"step {self.step}: sample weight rows have shape {np.shape(self.weights)} for {len(ids)} sample ids")
        if self.hvps is not None and self.grads is None:
            raise ValueError(f"step {self.step}: HVP products need the gradient rows of the same step")
        if self.micro is not None and sum(m.size for m in self.micro) != len(ids):
            raise ValueError(f"step {self.step}: micro-batch sizes {[m.size for m in self.micro]} do not add up to "
                             f"{len(ids)} sample ids")
        if not all(np.isfinite(self.lrs)):
            raise FloatingPointError(f"step {self.step}: non-finite learning rate {self.lrs}; nothing of this step was stored")


@dataclass
class CheckpointRecord:
    """Parameters ``θ_t`` (before step ``t``) and the optimizer state at that moment."""

    step: int
    params: dict[str, np.ndarray]
    optimizer_state: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    optimizer_scalars: dict[str, dict[str, float]] = field(default_factory=dict)


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

    def fill(f: h5py.File) -> None:
        set_text(f.attrs, "format", FORMAT_NAME)
        f.attrs["format_version"] = FORMAT_VERSION
        for key, value in meta.items():
            set_text(f.attrs, key, json_attr(value))
        _seal(f)

    try:
        _write_file(Path(log_dir) / META_FILE, fill)
    except OSError as err:
        raise storage_error(log_dir, META_FILE, err, "Nothing of this fit is in the log yet", started=False) from None


def remove_log(log_dir: str | os.PathLike) -> None:
    """Delete a log's own files (``meta.h5``, ``data.pt``, segments, unfinished ones), never anything else in ``log_dir``.

    Segments go first, newest first, and ``meta.h5`` last, so an interrupted removal leaves
    a log without gaps. A rank folder left empty is removed (one holding a writer lock stays).
    """
    root = Path(log_dir)
    for stale in list_unfinished(root):
        stale.unlink(missing_ok=True)
    for segs in list_segments(root).values():
        for path in reversed(segs):
            path.unlink(missing_ok=True)
    for name in (DATA_FILE, DATA_FILE + TMP_SUFFIX, META_FILE + TMP_SUFFIX, META_FILE):
        (root / name).unlink(missing_ok=True)
    for rank_dir in root.glob("rank-*"):
        if RANK_RE.match(rank_dir.name) and rank_dir.is_dir():
            with contextlib.suppress(OSError):  # not empty: a writer lock, or files that are not the log's
                rank_dir.rmdir()


def _seal(f: h5py.File) -> None:
    """Store the CRC-32 of the root attributes (the last attribute written)."""
    f.attrs[DIGEST_ATTR] = attrs_digest(f.attrs)


def _write_file(path: Path, fill: Callable[[h5py.File], None], source: Path | None = None) -> int:
    """Build an HDF5 file in memory, then write it as ``path`` atomically; returns its size.

    HDF5 only ever works on a memory image (``driver="core"`` without backing store, or the
    bytes of ``source`` to modify): the disk is written by plain ``os.write``, so a full
    disk or an I/O error is an ordinary ``OSError`` and never leaves HDF5 with a half-closed
    file (which can crash the process later). The image goes to ``path.tmp``, is fsynced and
    renamed over ``path``; the folder is fsynced. On failure nothing is left behind.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        if source is None:
            f = h5py.File(tmp, "w", driver="core", backing_store=False, libver=LIBVER)
            try:
                fill(f)
                f.flush()
                image = f.id.get_file_image()
            finally:
                f.close()
        else:  # the bytes, not the file: a reader may hold the file open (HDF5 would refuse to lock it for writing)
            buffer = io.BytesIO(source.read_bytes())
            with h5py.File(buffer, "r+", libver=LIBVER) as f:
                fill(f)
            image = buffer.getvalue()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(image)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):  # on a read-only disk even this fails: report the first error only
            tmp.unlink(missing_ok=True)
        raise
    return len(image)


def write_segment(
    path: Path,
    rank: int,
    steps: list[StepRecord],
    checkpoints: list[CheckpointRecord],
    storage_dtype: np.dtype,
    compression: str | None,
    run_id: str | None = None,
) -> int:
    """Write one closed segment file; returns its size in bytes. A failed write leaves no file behind."""
    return _write_file(path, lambda f: _fill_segment(f, rank, steps, checkpoints, storage_dtype, compression, run_id))


def _fill_segment(f: h5py.File, rank: int, steps: list[StepRecord], checkpoints: list[CheckpointRecord],
                  storage_dtype: np.dtype, compression: str | None, run_id: str | None) -> None:
    columns: dict[str, list[Any]] = {c: [] for c in STEP_COLUMNS}
    rows: dict[str, list[np.ndarray]] = {"id": [], "loss": [], "grad": [], "hvp": [], "weight": []}
    micro = _MicroRows()
    n_rows = n_grad_rows = 0
    for rec in steps:
        n = len(rec.ids)
        stored = {"id": np.asarray(rec.ids, np.int64),
                  "loss": None if rec.losses is None else np.asarray(rec.losses, np.float64),
                  "grad": None if rec.grads is None else np.asarray(rec.grads).astype(storage_dtype, copy=False),
                  "hvp": None if rec.hvps is None else np.asarray(rec.hvps).astype(storage_dtype, copy=False),
                  "weight": None if rec.weights is None else np.asarray(rec.weights, np.float64)}
        columns["step"].append(rec.step)
        columns["epoch"].append(rec.epoch)
        columns["batch_idx"].append(rec.batch_idx)
        columns["micro_batches"].append(rec.micro_batches)
        columns["sample_offset"].append(n_rows)
        columns["sample_count"].append(n)
        columns["grad_offset"].append(n_grad_rows if rec.grads is not None else -1)
        columns["batch_grad_norm"].append(rec.batch_grad_norm)
        columns["hvp_eps"].append(rec.hvp_eps)
        columns["tracker_seconds"].append(rec.tracker_seconds)
        columns["grad_scale"].append(rec.grad_scale)
        columns["skipped"].append(int(rec.skipped))
        columns["micro_offset"].append(micro.n)
        columns["micro_crc32"].append(micro.add(rec.micro if rec.micro is not None else [MicroRecord(n)]))
        columns["accumulate"].append(rec.accumulate)
        columns["clip_value"].append(rec.clip_value)
        columns["clip_coef"].append(rec.clip_coef)
        for field_, value in stored.items():
            columns[ROW_CRC_COLUMNS[field_]].append(crc32(value) if value is not None else -1)
            if value is not None:
                rows[field_].append(value)
        if rec.grads is not None:
            n_grad_rows += n
        n_rows += n
    for field_, what in (("loss", "per-sample losses"), ("weight", "sample weights")):
        if rows[field_] and len(rows[field_]) != len(steps):
            raise ValueError(f"{what} must be recorded at every step of a segment or none")
    if len(rows["hvp"]) not in (0, len(rows["grad"])):
        raise ValueError("HVP products must accompany every recorded gradient row")
    set_text(f.attrs, "format", FORMAT_NAME)
    f.attrs["format_version"] = FORMAT_VERSION
    f.attrs["rank"] = rank
    f.attrs["first_step"] = steps[0].step if steps else -1
    f.attrs["last_step"] = steps[-1].step if steps else -1
    f.attrs["n_steps"] = len(steps)
    f.attrs["n_samples"] = n_rows
    f.attrs["n_grad_rows"] = n_grad_rows
    f.attrs["created"] = time.time()
    if run_id is not None:
        set_text(f.attrs, "run_id", run_id)
    g = f.create_group("steps")
    for name, values in columns.items():
        _dataset(g, name, np.asarray(values, dtype=np.float64 if name in _FLOAT_COLUMNS else np.int64))
    n_groups = max((len(r.lrs) for r in steps), default=1)
    lr = np.full((len(steps), n_groups), np.nan)
    for i, rec in enumerate(steps):
        lr[i, : len(rec.lrs)] = rec.lrs
    _dataset(g, "lr", lr)
    f.create_group("samples")
    f.create_group("grads")
    _dataset(f, ROW_DATASETS["id"], _cat(rows["id"], np.int64, (0,)), whole_crc=False)
    for field_ in ("loss", "weight"):
        if rows[field_]:
            _dataset(f, ROW_DATASETS[field_], np.concatenate(rows[field_]), whole_crc=False)
    for field_ in ("grad", "hvp"):
        if rows[field_]:
            data = np.concatenate(rows[field_])
            chunk_rows = max(1, min(len(data), (1 << 20) // max(1, data.shape[1] * data.dtype.itemsize)))
            _dataset(f, ROW_DATASETS[field_], data, chunks=(chunk_rows, data.shape[1]), compression=compression,
                     whole_crc=False)
    micro.write(f)
    c = f.create_group("checkpoints")
    for ck in checkpoints:
        cg = c.create_group(CHECKPOINT_GROUP.format(step=ck.step))
        cg.attrs["step"] = ck.step
        pg = cg.create_group("params")
        for name, value in ck.params.items():
            _dataset(pg, name, value)
        og = cg.create_group("optimizer")
        for name, state in ck.optimizer_state.items():
            sg = og.create_group(name)
            for key, value in state.items():
                _dataset(sg, key, value)
            for key, value in ck.optimizer_scalars.get(name, {}).items():
                sg.attrs[key] = value
    _seal(f)


class _MicroRows:
    """The ``micro/*``, ``rng/*`` and ``inputs/bytes`` rows of a segment, built step by step."""

    def __init__(self) -> None:
        self.columns: dict[str, list[int]] = {c: [] for c in MICRO_COLUMNS}
        self.cpu: list[np.ndarray] = []
        self.cuda: list[np.ndarray] = []
        self.inputs: list[bytes] = []
        self.n_bytes = 0

    @property
    def n(self) -> int:
        return len(self.columns["size"])

    def add(self, micro: list[MicroRecord]) -> int:
        """Append one step's micro-batches; returns the CRC-32 chain of everything stored for them."""
        crc = 0
        for m in micro:
            row = {"size": int(m.size), "cpu_rng": -1, "cuda_rng": -1, "input_offset": -1, "input_length": 0}
            if m.cpu_rng is not None:
                row["cpu_rng"] = len(self.cpu)
                self.cpu.append(np.asarray(m.cpu_rng, np.uint8).reshape(-1))
                crc = zlib.crc32(self.cpu[-1], crc)
            if m.cuda_rng is not None:
                row["cuda_rng"] = len(self.cuda)
                self.cuda.append(np.asarray(m.cuda_rng, np.uint8).reshape(-1))
                crc = zlib.crc32(self.cuda[-1], crc)
            if m.inputs is not None:
                row["input_offset"], row["input_length"] = self.n_bytes, len(m.inputs)
                self.inputs.append(m.inputs)
                self.n_bytes += len(m.inputs)
                crc = zlib.crc32(m.inputs, crc)
            for c in MICRO_COLUMNS:
                self.columns[c].append(row[c])
            crc = zlib.crc32(np.asarray([row["size"], row["cpu_rng"] >= 0, row["cuda_rng"] >= 0, row["input_length"]],
                                        np.int64), crc)
        return crc

    def write(self, f: h5py.File) -> None:
        g = f.create_group("micro")
        for c, values in self.columns.items():
            _dataset(g, c, np.asarray(values, np.int64), whole_crc=False)
        if self.cpu or self.cuda:
            r = f.create_group("rng")
            for name, states in (("cpu", self.cpu), ("cuda", self.cuda)):
                if states:
                    _dataset(r, name, np.stack(states), whole_crc=False)
        if self.inputs:
            _dataset(f.create_group("inputs"), "bytes", np.frombuffer(b"".join(self.inputs), np.uint8), whole_crc=False)


def _cat(parts: list[np.ndarray], dtype: Any, empty_shape: tuple[int, ...]) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(empty_shape, dtype)


def _dataset(group: h5py.Group, name: str, data: Any, chunks: Any = True, compression: str | None = None,
             whole_crc: bool = True) -> h5py.Dataset:
    """A chunked (resizable) dataset; 0-d arrays are stored as shape ``(1,)``.

    ``whole_crc``: store the CRC-32 of the whole dataset in its ``crc32`` attribute (datasets
    read whole); row datasets are checked per step instead (``*_crc32`` step columns).
    """
    data = np.asarray(data)
    scalar = data.ndim == 0
    if scalar:
        data = data.reshape(1)
    ds = group.create_dataset(name, data=data, maxshape=(None, *data.shape[1:]), chunks=chunks, compression=compression)
    if scalar:
        ds.attrs[SCALAR_ATTR] = 1
    if whole_crc:
        ds.attrs[CRC_ATTR] = crc32(data)
    return ds


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
    ``(max_pending + 2) × flush_every_n_steps`` steps. Everything in a closed segment stays readable.

    Args:
        log_dir: the log directory.
        rank: the process rank (one folder per rank).
        flush_every_n_steps: steps per segment; smaller loses less on a crash, larger makes fewer files.
        storage_dtype: dtype of gradient/HVP rows on disk (parameters are stored exactly).
        compression: h5py compression filter for gradient rows (``None`` or ``"gzip"``/``"lzf"``).
        background: write segments in a background thread (``False`` writes synchronously).
        max_pending: segments waiting for the background thread before ``add_step`` blocks
            (bounds the memory held by the writer).
        truncate_from: a resumed fit: drop this rank's steps ``>= truncate_from`` (:func:`truncate_log`)
            just before the first segment is written, so a fit refused before it records a step
            (or one that fails) leaves the log as it was; the writer continues at ``truncate_from``.

    Raises:
        LogWriteError: from any call after a segment write failed; the message names the log, the
            failed segment, the last step safely on disk and what to do.
        FloatingPointError: from ``add_step`` for a non-finite loss/gradient/HVP product (nothing stored).
        ValueError: from ``add_step`` for a step that would duplicate or skip a step of this rank.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike,
        rank: int = 0,
        flush_every_n_steps: int = 50,
        storage_dtype: str | np.dtype = "float32",
        compression: str | None = None,
        background: bool = True,
        max_pending: int = 2,
        truncate_from: int | None = None,
    ) -> None:
        self.log_dir = Path(log_dir)
        self.rank = rank
        self.flush_every_n_steps = flush_every_n_steps
        self.storage_dtype = np.dtype(storage_dtype)
        self.compression = compression
        self.bytes_written = 0
        self._steps: list[StepRecord] = []
        self._checkpoints: list[CheckpointRecord] = []
        for stale in list_unfinished(self.log_dir, rank):  # a write interrupted by a crash: never renamed, never read
            stale.unlink(missing_ok=True)
        existing = list_segments(self.log_dir).get(rank, [])
        end = rank_end(self.log_dir, rank)
        self._truncate_from = truncate_from
        if truncate_from is not None:  # done just before the first segment is written (see ``_write``)
            deleted = {path for path, _, keep in _truncation_plan(self.log_dir, rank, truncate_from) if keep is None}
            existing = [p for p in existing if p not in deleted]
            end = None if end is None or not existing else min(end, truncate_from - 1)
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

    def add_step(self, record: StepRecord, checkpoint: CheckpointRecord | None = None) -> None:
        """Validate and buffer one step (and ``θ_t`` taken before it); a full buffer starts a segment write."""
        self._raise_pending_error()
        record.validate()
        if self._next_step is not None and record.step != self._next_step:
            raise ValueError(
                f"{self.log_dir}: rank {self.rank} would record step {record.step} but its log continues at step "
                f"{self._next_step}; steps must be recorded once each, in order (a resumed fit truncates the log "
                "to its checkpoint's step first)")
        if checkpoint is not None:
            self._checkpoints.append(checkpoint)
        self._steps.append(record)
        self._next_step = record.step + 1
        if self._first_accepted is None:
            self._first_accepted = record.step
        if len(self._steps) >= self.flush_every_n_steps:
            self.flush(wait=False)

    def add_checkpoint(self, record: CheckpointRecord) -> None:
        """Buffer a parameter checkpoint; it is written with the next segment."""
        self._raise_pending_error()
        self._checkpoints.append(record)

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
            self._steps, self._checkpoints = [], []
        if wait and self._queue is not None:
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
                    if raise_errors and self._truncate_from is not None:  # a fit that ended without recording a step
                        truncate_log(self.log_dir, self.rank, self._truncate_from)
                        self._truncate_from = None
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
                self._steps, self._checkpoints = [], []

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

    def _write(self, job: tuple[Path, list[StepRecord], list[CheckpointRecord]]) -> None:
        path, steps, checkpoints = job
        if self._error is not None:  # never write past a failed segment: the log would have a gap
            return
        try:
            if self._truncate_from is not None:
                truncate_log(self.log_dir, self.rank, self._truncate_from)
                self._truncate_from = None
            self.bytes_written += write_segment(path, self.rank, steps, checkpoints, self.storage_dtype,
                                                self.compression, self.run_id)
        except Exception as err:  # noqa: BLE001 - any failure stops the writer and is reported on the training thread
            self._error = self._describe_failure(path, steps, err)
            if self._queue is None:
                self._raise_pending_error()
            return
        if steps:
            self.last_step_on_disk = steps[-1].step

    def _describe_failure(self, path: Path, steps: list[StepRecord], err: Exception) -> LogWriteError:
        what = (f"steps {steps[0].step}..{steps[-1].step}" if steps else "a checkpoint")
        safe = (f"Nothing more is written to this log; steps up to {self.last_step_on_disk} are safe in closed segments"
                if self.last_step_on_disk is not None else "Nothing more is written to this log; no step of this rank is on disk")
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


def _meta_run_id(log_dir: Path) -> str | None:
    if not (log_dir / META_FILE).exists():
        return None
    run_id = read_meta(log_dir).get("run_id")
    return str(run_id) if run_id is not None else None


def truncate_log(log_dir: str | os.PathLike, rank: int, from_step: int) -> None:
    """Drop everything of ``rank`` recorded at steps ``>= from_step`` (a resumed fit re-records them).

    Segments entirely past ``from_step`` are deleted, newest first, so a crash during the
    truncation leaves a log without gaps (the next resume finishes the job); a segment that
    straddles ``from_step`` is shrunk in memory, re-sealed and atomically renamed over the
    original.
    """
    for stale in list_unfinished(log_dir, rank):
        stale.unlink(missing_ok=True)
    for path, steps, keep in _truncation_plan(log_dir, rank, from_step):
        if keep is None:
            path.unlink()
        else:
            _write_file(path, lambda f: _shrink(f, steps, keep, from_step), source=path)


def _truncation_plan(log_dir: str | os.PathLike, rank: int, from_step: int) -> list[tuple[Path, np.ndarray, int | None]]:
    """What :func:`truncate_log` does, newest segment first, without doing it: ``(path, steps, keep)``, ``keep``
    ``None`` for a segment deleted whole, else the number of its steps kept."""
    plan: list[tuple[Path, np.ndarray, int | None]] = []
    for path in reversed(list_segments(log_dir).get(rank, [])):
        with reading(path, "the segment index"), h5py.File(path, "r") as f:
            check_header(path, dict(f.attrs))
            steps = f["steps/step"][()]
            ckpts = [int(g.attrs["step"]) for g in f["checkpoints"].values()]
        keep = int(np.searchsorted(steps, from_step))
        if keep == len(steps) and all(t < from_step for t in ckpts):
            break  # this segment and every earlier one end before from_step
        plan.append((path, steps, None if keep == 0 and all(t >= from_step for t in ckpts) else keep))
    return plan


def _shrink(f: h5py.File, steps: np.ndarray, keep: int, from_step: int) -> None:
    """Keep the first ``keep`` steps of a segment (its datasets are resizable) and the checkpoints before ``from_step``."""
    table = f["steps"]
    n_rows = int(table["sample_offset"][keep]) if keep < len(steps) else int(f.attrs["n_samples"])
    grad_offsets = table["grad_offset"][keep:]
    n_grad = int(grad_offsets[grad_offsets >= 0][0]) if (grad_offsets >= 0).any() else int(f.attrs["n_grad_rows"])
    if "micro" in f:
        n_micro = int(table["micro_offset"][keep]) if keep < len(steps) else len(f["micro/size"])
    for ds in table.values():
        ds.resize(keep, axis=0)
        ds.attrs[CRC_ATTR] = crc32(ds[()])
    for ds in f["samples"].values():
        ds.resize(n_rows, axis=0)
    for ds in f["grads"].values():
        ds.resize(n_grad, axis=0)
    if "micro" in f:  # version 2; unreferenced rows of rng/* and inputs/bytes may stay
        for ds in f["micro"].values():
            ds.resize(n_micro, axis=0)
    for name in [n for n, g in f["checkpoints"].items() if int(g.attrs["step"]) >= from_step]:
        del f["checkpoints"][name]
    f.attrs["last_step"] = int(steps[keep - 1]) if keep else -1
    f.attrs["first_step"] = int(steps[0]) if keep else -1
    f.attrs["n_steps"] = keep
    f.attrs["n_samples"] = n_rows
    f.attrs["n_grad_rows"] = n_grad
    _seal(f)
