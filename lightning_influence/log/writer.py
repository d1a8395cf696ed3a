"""Buffered, crash-safe writer of the influence log (format: ``log/format.py``).

Steps are buffered in memory and handed, ``flush_every_n_steps`` at a time, to a
background thread that writes one closed segment file per flush (temporary name, fsync,
atomic rename). Training never waits on HDF5 unless the queue of pending segments is full.
"""

from __future__ import annotations

import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import h5py
import numpy as np

from lightning_influence.log.format import (
    CHECKPOINT_GROUP,
    FORMAT_NAME,
    FORMAT_VERSION,
    META_FILE,
    STEP_COLUMNS,
    TMP_SUFFIX,
    json_attr,
    list_segments,
    segment_path,
)


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


@dataclass
class CheckpointRecord:
    """Parameters ``θ_t`` (before step ``t``) and the optimizer state at that moment."""

    step: int
    params: dict[str, np.ndarray]
    optimizer_state: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    optimizer_scalars: dict[str, dict[str, float]] = field(default_factory=dict)


def write_meta(log_dir: str | os.PathLike, meta: Mapping[str, Any]) -> None:
    """Write ``meta.h5`` atomically: every value becomes a JSON string attribute."""
    path = Path(log_dir) / META_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with h5py.File(tmp, "w") as f:
        f.attrs["format"] = FORMAT_NAME
        f.attrs["format_version"] = FORMAT_VERSION
        for key, value in meta.items():
            f.attrs[key] = json_attr(value)
    _sync_and_rename(tmp, path)


def _sync_and_rename(tmp: Path, final: Path) -> None:
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_segment(
    path: Path,
    rank: int,
    steps: list[StepRecord],
    checkpoints: list[CheckpointRecord],
    storage_dtype: np.dtype,
    compression: str | None,
) -> int:
    """Write one closed segment file; returns its size in bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    columns: dict[str, list[Any]] = {c: [] for c in STEP_COLUMNS}
    ids, losses, grads, hvps = [], [], [], []
    n_rows = n_grad_rows = 0
    for rec in steps:
        n = len(rec.ids)
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
        ids.append(rec.ids)
        if rec.losses is not None:
            losses.append(rec.losses)
        if rec.grads is not None:
            grads.append(rec.grads)
            if rec.hvps is not None:
                hvps.append(rec.hvps)
            n_grad_rows += n
        n_rows += n
    with h5py.File(tmp, "w") as f:
        f.attrs["format"] = FORMAT_NAME
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["rank"] = rank
        f.attrs["first_step"] = steps[0].step if steps else -1
        f.attrs["last_step"] = steps[-1].step if steps else -1
        f.attrs["n_steps"] = len(steps)
        f.attrs["n_samples"] = n_rows
        f.attrs["n_grad_rows"] = n_grad_rows
        f.attrs["created"] = time.time()
        g = f.create_group("steps")
        for name, values in columns.items():
            dtype = np.float64 if name in ("batch_grad_norm", "hvp_eps", "tracker_seconds") else np.int64
            g.create_dataset(name, data=np.asarray(values, dtype=dtype), maxshape=(None,))
        n_groups = max((len(r.lrs) for r in steps), default=1)
        lr = np.full((len(steps), n_groups), np.nan)
        for i, rec in enumerate(steps):
            lr[i, : len(rec.lrs)] = rec.lrs
        g.create_dataset("lr", data=lr, maxshape=(None, n_groups))
        s = f.create_group("samples")
        s.create_dataset("id", data=_cat(ids, np.int64, (0,)), maxshape=(None,))
        if losses:
            if len(losses) != len(steps):
                raise ValueError("per-sample losses must be recorded at every step of a segment or none")
            s.create_dataset("loss", data=_cat(losses, np.float64, (0,)), maxshape=(None,))
        gr = f.create_group("grads")
        if grads:
            _row_dataset(gr, "grad", np.concatenate(grads), storage_dtype, compression)
        if hvps:
            if len(hvps) != len(grads):
                raise ValueError("HVP products must accompany every recorded gradient row")
            _row_dataset(gr, "hvp", np.concatenate(hvps), storage_dtype, compression)
        c = f.create_group("checkpoints")
        for ck in checkpoints:
            cg = c.create_group(CHECKPOINT_GROUP.format(step=ck.step))
            cg.attrs["step"] = ck.step
            pg = cg.create_group("params")
            for name, value in ck.params.items():
                pg.create_dataset(name, data=value)
            og = cg.create_group("optimizer")
            for name, state in ck.optimizer_state.items():
                sg = og.create_group(name)
                for key, value in state.items():
                    sg.create_dataset(key, data=value)
                for key, value in ck.optimizer_scalars.get(name, {}).items():
                    sg.attrs[key] = value
    _sync_and_rename(tmp, path)
    return path.stat().st_size


def _cat(parts: list[np.ndarray], dtype: Any, empty_shape: tuple[int, ...]) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(empty_shape, dtype)


def _row_dataset(group: h5py.Group, name: str, data: np.ndarray, dtype: np.dtype, compression: str | None) -> None:
    rows, cols = data.shape
    chunk_rows = max(1, min(rows, (1 << 20) // max(1, cols * np.dtype(dtype).itemsize)))
    group.create_dataset(
        name,
        data=data.astype(dtype, copy=False),
        maxshape=(None, cols),
        chunks=(chunk_rows, cols),
        compression=compression,
    )


class LogWriter:
    """Buffers step records of one rank and writes them as closed segments in the background.

    Args:
        log_dir: the log directory.
        rank: the process rank (one folder per rank).
        flush_every_n_steps: steps per segment; smaller loses less on a crash, larger makes fewer files.
        storage_dtype: dtype of gradient/HVP rows on disk (parameters are stored exactly).
        compression: h5py compression filter for gradient rows (``None`` or ``"gzip"``/``"lzf"``).
        background: write segments in a background thread (``False`` writes synchronously).
        max_pending: segments waiting for the background thread before ``add_step`` blocks
            (bounds the memory held by the writer).
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
    ) -> None:
        self.log_dir = Path(log_dir)
        self.rank = rank
        self.flush_every_n_steps = flush_every_n_steps
        self.storage_dtype = np.dtype(storage_dtype)
        self.compression = compression
        self.bytes_written = 0
        self._steps: list[StepRecord] = []
        self._checkpoints: list[CheckpointRecord] = []
        existing = list_segments(self.log_dir).get(rank, [])
        self._next_index = int(existing[-1].name[4:12]) + 1 if existing else 0
        self._error: BaseException | None = None
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        if background:
            self._queue = queue.Queue(maxsize=max_pending)
            self._thread = threading.Thread(target=self._work, name=f"influence-log-writer-{rank}", daemon=True)
            self._thread.start()

    @property
    def buffered_steps(self) -> int:
        return len(self._steps)

    def add_step(self, record: StepRecord) -> None:
        """Buffer one step; starts a segment write once ``flush_every_n_steps`` are buffered."""
        self._raise_pending_error()
        self._steps.append(record)
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
            self._next_index += 1
            self._steps, self._checkpoints = [], []
            if self._queue is None:
                self._write(job)
            else:
                self._queue.put(job)
        if wait and self._queue is not None:
            self._queue.join()
        self._raise_pending_error()

    def close(self) -> None:
        """Flush, wait for the background thread and stop it."""
        try:
            self.flush(wait=True)
        finally:
            if self._thread is not None and self._queue is not None:
                self._queue.put(None)
                self._thread.join()
                self._thread = None

    def _write(self, job: tuple[Path, list[StepRecord], list[CheckpointRecord]]) -> None:
        path, steps, checkpoints = job
        self.bytes_written += write_segment(path, self.rank, steps, checkpoints, self.storage_dtype, self.compression)

    def _work(self) -> None:
        assert self._queue is not None
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                if self._error is None:
                    self._write(job)
            except BaseException as err:  # surfaced on the training thread at the next call
                self._error = err
            finally:
                self._queue.task_done()

    def _raise_pending_error(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"writing the influence log under {self.log_dir} failed: {err}") from err


def truncate_log(log_dir: str | os.PathLike, rank: int, from_step: int) -> None:
    """Drop everything of ``rank`` recorded at steps ``>= from_step`` (a resumed fit re-records them).

    Segments entirely past ``from_step`` are deleted; a segment that straddles it is copied,
    shrunk (its datasets are resizable) and atomically renamed over the original.
    """
    for path in list_segments(log_dir).get(rank, []):
        with h5py.File(path, "r") as f:
            steps = f["steps/step"][()]
            ckpts = [int(g.attrs["step"]) for g in f["checkpoints"].values()]
        keep = int(np.searchsorted(steps, from_step))
        if keep == len(steps) and all(t < from_step for t in ckpts):
            continue
        if keep == 0 and all(t >= from_step for t in ckpts):
            path.unlink()
            continue
        tmp = path.with_name(path.name + TMP_SUFFIX)
        shutil.copyfile(path, tmp)
        with h5py.File(tmp, "r+") as f:
            table = f["steps"]
            n_rows = int(table["sample_offset"][keep]) if keep < len(steps) else int(f.attrs["n_samples"])
            grad_offsets = table["grad_offset"][keep:]
            n_grad = int(grad_offsets[grad_offsets >= 0][0]) if (grad_offsets >= 0).any() else int(f.attrs["n_grad_rows"])
            for ds in table.values():
                ds.resize(keep, axis=0)
            for ds in f["samples"].values():
                ds.resize(n_rows, axis=0)
            for ds in f["grads"].values():
                ds.resize(n_grad, axis=0)
            for name in [n for n, g in f["checkpoints"].items() if int(g.attrs["step"]) >= from_step]:
                del f["checkpoints"][name]
            f.attrs["last_step"] = int(steps[keep - 1]) if keep else -1
            f.attrs["n_steps"] = keep
            f.attrs["n_samples"] = n_rows
            f.attrs["n_grad_rows"] = n_grad
        _sync_and_rename(tmp, path)
