"""One segment file: its layout as written, its atomic write, and its truncation (``docs/log-format.md``).

:func:`write_segment` lays a rank's steps and checkpoints out as one HDF5 file (step table,
sample rows, gradient/HVP rows, micro-batches, checkpoints; CRC-32 of every whole dataset and
of each row, the root attributes sealed last) and writes it with :func:`write_file` to a
temporary file (built in memory, or written through when large; HDF5 never sees an I/O error),
fsynced, renamed atomically. :func:`truncate_log` drops a
rank's steps from a step on, for a resumed fit. The buffering, the background thread and
the error reporting are :class:`~lightning_influence.log.writer.LogWriter`'s.
"""

from __future__ import annotations

import contextlib
import io
import os
import time
import zlib
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np
from h5py import h5a, h5d, h5p, h5s, h5t

try:  # h5py's own chunk rule, private ("subject to change"): without it, datasets go through create_dataset (_dataset)
    from h5py._hl.filters import guess_chunk
except ImportError:  # pragma: no cover - a future h5py
    guess_chunk = None

from lightning_influence.log.format import (
    CHECKPOINT_GROUP,
    CRC_ATTR,
    DIGEST_ATTR,
    FORMAT_NAME,
    FORMAT_VERSION,
    HYPER_PREFIX,
    LIBVER,
    MICRO_COLUMNS,
    OUTER_VERSION,
    ROW_CRC_COLUMNS,
    ROW_DATASETS,
    SCALAR_ATTR,
    SCHEDULE_VERSION,
    STEP_COLUMNS,
    TMP_SUFFIX,
    attrs_digest,
    check_header,
    crc32,
    list_segments,
    list_unfinished,
    reading,
    set_text,
)
from lightning_influence.log.outer import OUTER_ATTR
from lightning_influence.log.records import CheckpointRecord, MicroRecord, StepRecord

__all__ = ["fill_segment", "seal", "truncate_log", "truncation_plan", "write_file", "write_segment"]

_FLOAT_COLUMNS = ("batch_grad_norm", "hvp_eps", "tracker_seconds", "grad_scale", "clip_value", "clip_coef")


def seal(f: h5py.File) -> None:
    """Store the CRC-32 of the root attributes (the last attribute written)."""
    f.attrs[DIGEST_ATTR] = attrs_digest(f.attrs)


_THROUGH_BYTES = 1 << 20  # a segment with this many bytes of rows or parameters is written through (write_segment)


def write_file(path: Path, fill: Callable[[h5py.File], None], source: Path | None = None, through: bool = False) -> int:
    """Build an HDF5 file, then put it at ``path`` atomically; returns its size.

    HDF5 never sees an I/O error, so a full disk or a failing disk is an ordinary ``OSError``
    raised here and never leaves HDF5 with a half-closed file (which can crash the process
    later). A new file is built in memory (``driver="core"`` without backing store) and written
    by one ``os.write``, or (``through``: a large file) written through to ``path.tmp`` as HDF5
    lays it out (:class:`_WriteThrough`: the first OS error is kept and raised once HDF5 has closed
    the file; no image is built and copied). A file to modify (``source``) is changed as bytes in
    memory. ``path.tmp`` is fsynced and renamed over ``path``; the folder is fsynced. On failure
    nothing is left behind.
    """
    if not through or source is not None:
        image = _image(path.with_name(path.name + TMP_SUFFIX), fill, source)
        return write_bytes(path, image)

    def write(fd: int) -> None:
        target = _WriteThrough(fd)
        f = h5py.File(target, "w", libver=LIBVER)
        try:
            fill(f)
        finally:
            f.close()
            if target.error is not None:  # the cause of whatever HDF5 made of the missing bytes
                raise target.error

    return _put(path, write)


def write_bytes(path: Path, data: bytes | memoryview) -> int:
    """Put ``data`` at ``path`` atomically, as :func:`write_file` does (a disk error is an ``OSError`` and leaves
    nothing behind); returns its size."""
    return _put(path, lambda fd: _write_all(fd, data))


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _put(path: Path, write: Callable[[int], None]) -> int:
    """``write(fd)`` into ``path.tmp``, fsync it, rename it over ``path``, fsync the folder; on failure remove it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            write(fd)
            os.fsync(fd)
            size = os.fstat(fd).st_size
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
    return size


def _image(name: Path, fill: Callable[[h5py.File], None], source: Path | None) -> bytes:
    """The bytes of a new file (``source=None``), or of ``source`` changed, built by HDF5 in memory."""
    if source is None:
        f = h5py.File(name, "w", driver="core", backing_store=False, libver=LIBVER)
        try:
            fill(f)
            f.flush()
            return f.id.get_file_image()
        finally:
            f.close()
    buffer = io.BytesIO(source.read_bytes())  # the bytes, not the file: a reader may hold the file open (HDF5
    with h5py.File(buffer, "r+", libver=LIBVER) as f:  # would refuse to lock it for writing)
        fill(f)
    return buffer.getvalue()


class _WriteThrough:
    """The file object a new HDF5 file is written through (h5py's ``fileobj`` driver), an open descriptor below.

    Each write goes to the file at once (``os.pwrite`` from HDF5's buffer, or from the caller's rows for a chunk
    written directly): no image of the file is built in memory and copied out, which for gradient rows (about
    1 MB a step) were two more copies into fresh memory. An OS error is never raised to HDF5: the first one is
    kept (:attr:`error`), later writes are dropped and reads see zeros, and :func:`write_file` raises it once
    HDF5 has closed the file.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.position = 0
        self.size = 0  # as HDF5 wrote it (the same after a failed write: HDF5 sees the file it made)
        self.error: OSError | None = None

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_END:
            offset += self.size
        elif whence == os.SEEK_CUR:
            offset += self.position
        self.position = offset
        return offset

    def tell(self) -> int:
        return self.position

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        n, offset = view.nbytes, self.position
        self.position += n
        self.size = max(self.size, self.position)
        if self.error is None:
            try:
                while view:
                    written = os.pwrite(self.fd, view, offset)
                    view, offset = view[written:], offset + written
            except OSError as err:
                self.error = err
        return n

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = b""
        if self.error is None and self.position < self.size:  # in practice HDF5 reads nothing back of a new file
            try:
                data = os.pread(self.fd, min(view.nbytes, self.size - self.position), self.position)
            except OSError as err:
                self.error = err
        view[:len(data)] = data
        view[len(data):] = bytes(view.nbytes - len(data))  # past the end: zeros, as HDF5's own drivers read
        self.position += view.nbytes
        return view.nbytes

    def read(self, size: int = -1) -> bytes:
        buffer = bytearray(max(0, self.size - self.position) if size < 0 else size)
        return bytes(buffer[:self.readinto(buffer)])

    def truncate(self, size: int | None = None) -> int:
        size = self.position if size is None else size
        self.size = size
        if self.error is None:
            try:
                os.ftruncate(self.fd, size)
            except OSError as err:
                self.error = err
        return size

    def flush(self) -> None:
        """Nothing buffered: every write is already the file's (fsynced by :func:`write_file`)."""


def write_segment(
    path: Path,
    rank: int,
    steps: list[StepRecord],
    checkpoints: list[CheckpointRecord],
    storage_dtype: np.dtype,
    compression: str | None,
    run_id: str | None = None,
) -> int:
    """Write one closed segment file; returns its size in bytes. A failed write leaves no file behind.

    A segment holding a megabyte or more of gradient/HVP rows and parameters is written through (the rows go from
    the steps' arrays to the file, :class:`_WriteThrough`); a smaller one is built in memory and written at once
    (fewer calls: HDF5 writes a file in about 170 pieces, each a call into Python when written through).
    """
    rows = sum(np.dtype(storage_dtype).itemsize * np.size(r) for rec in steps for r in (rec.grads, rec.hvps) if r is not None)
    params = sum(np.asarray(v).nbytes for ck in checkpoints for v in ck.params.values())
    return write_file(path, lambda f: fill_segment(f, rank, steps, checkpoints, storage_dtype, compression, run_id),
                      through=rows + params >= _THROUGH_BYTES)


def fill_segment(f: h5py.File, rank: int, steps: list[StepRecord], checkpoints: list[CheckpointRecord],
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
    hyper = _hyper_columns(steps)
    layouts = {rec.grad_outer for rec in steps if rec.grads is not None}
    if len(layouts) > 1:
        raise ValueError("the gradient rows of a segment must share one column layout (LogWriter closes a segment "
                         "where it changes)")
    outer = layouts.pop() if layouts else None
    set_text(f.attrs, "format", FORMAT_NAME)
    f.attrs["format_version"] = OUTER_VERSION if outer is not None else SCHEDULE_VERSION if hyper else FORMAT_VERSION
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
    for key, values in hyper.items():
        _dataset(g, HYPER_PREFIX + key, values)
    f.create_group("samples")
    f.create_group("grads")
    _dataset(f, ROW_DATASETS["id"], _cat(rows["id"], np.int64, (0,)), whole_crc=False)
    for field_ in ("loss", "weight"):
        if rows[field_]:
            _dataset(f, ROW_DATASETS[field_], np.concatenate(rows[field_]), whole_crc=False)
    for field_ in ("grad", "hvp"):
        if rows[field_]:
            _row_dataset(f, ROW_DATASETS[field_], rows[field_], compression)
    if outer is not None:
        f[ROW_DATASETS["grad"]].attrs[OUTER_ATTR] = outer.to_attr()
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
        bg = cg.create_group("buffers")
        for name, value in ck.buffers.items():
            _dataset(bg, name, value)
    seal(f)


def _hyper_columns(steps: list[StepRecord]) -> dict[str, np.ndarray]:
    """``{key: (n_steps, n_groups[, 2]) float64}`` of the steps' recorded hyperparameters (``StepRecord.hyper``), NaN
    rows for the steps that used meta.h5's param groups; empty when no step recorded any (the common case)."""
    keys = {key: per_group for rec in steps if rec.hyper for key, per_group in rec.hyper.items()}
    out: dict[str, np.ndarray] = {}
    for key, example in keys.items():
        nan = np.full(np.shape(example), np.nan)
        out[key] = np.asarray([nan if not rec.hyper or key not in rec.hyper else rec.hyper[key] for rec in steps],
                              dtype=np.float64)
    return out


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


def _row_dataset(f: h5py.File, name: str, parts: list[np.ndarray], compression: str | None) -> None:
    """The gradient or HVP rows of a segment, ``parts`` (one 2-D array per step, storage dtype) one under the other,
    in chunks of at most 1 MiB of whole rows (:func:`chunk_rows`).

    Uncompressed, each chunk is handed to HDF5 as it is stored (``write_direct_chunk``): a chunk inside one step's
    rows straight from them, one spanning steps assembled in a single chunk-sized buffer. This skips concatenating
    the segment's rows (about 1 MB a step with gradients: a copy into fresh memory) and HDF5's chunk cache (a
    second copy); the file holds the same data, chunks and checksums.
    """
    n, width, dtype = sum(len(p) for p in parts), parts[0].shape[1], parts[0].dtype
    chunk_rows = min(n, _chunk_rows(len(parts[0]), width * dtype.itemsize))
    if compression is not None or width == 0 or any(p.dtype != dtype or not p.flags.c_contiguous for p in parts):
        _dataset(f, name, np.concatenate(parts), chunks=(chunk_rows, width), compression=compression, whole_crc=False)
        return
    ds = f.create_dataset(name, shape=(n, width), dtype=dtype, maxshape=(None, width), chunks=(chunk_rows, width))
    buffer: np.ndarray | None = None
    filled = start = 0  # rows in the buffer; first row of the chunk being assembled
    for part in parts:
        i = 0
        while i < len(part):
            if filled == 0 and len(part) - i >= chunk_rows:  # a whole chunk inside this step's rows
                ds.id.write_direct_chunk((start, 0), part[i:i + chunk_rows])
                i += chunk_rows
                start += chunk_rows
                continue
            if buffer is None:
                buffer = np.empty((chunk_rows, width), dtype)
            k = min(chunk_rows - filled, len(part) - i)
            buffer[filled:filled + k] = part[i:i + k]
            filled, i = filled + k, i + k
            if filled == chunk_rows:
                ds.id.write_direct_chunk((start, 0), buffer)
                start, filled = start + chunk_rows, 0
    if filled:  # the last chunk, past the rows: zeros (HDF5's fill value) as H5Dwrite stores them
        buffer[filled:] = 0
        ds.id.write_direct_chunk((start, 0), buffer)


def _chunk_rows(step_rows: int, row_bytes: int) -> int:
    """Rows per chunk: the most whole rows in 1 MiB, or, where some divisor ``d`` of a step's row count ``step_rows``
    makes a chunk of 256 KiB to 1 MiB, the largest such ``d``, so that steps of that many rows are written as whole
    chunks straight from their arrays (no chunk assembled from two steps' rows: a copy of every byte)."""
    most = max(1, (1 << 20) // max(1, row_bytes))
    for d in range(min(step_rows, most), 0, -1):
        if d * row_bytes < 256 << 10:
            break
        if step_rows % d == 0:
            return d
    return most


def _cat(parts: list[np.ndarray], dtype: Any, empty_shape: tuple[int, ...]) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(empty_shape, dtype)


def _dataset(group: h5py.Group, name: str, data: Any, chunks: Any = True, compression: str | None = None,
             whole_crc: bool = True) -> None:
    """A chunked (resizable) dataset; 0-d arrays are stored as shape ``(1,)``.

    ``whole_crc``: store the CRC-32 of the whole dataset in its ``crc32`` attribute (datasets
    read whole); row datasets are checked per step instead (``*_crc32`` step columns).
    A numeric dataset without a filter is made by h5py's low-level calls, the ones its
    ``create_dataset`` makes for it (the same file, byte for byte): a segment has some 30 of them,
    and the high-level call's own work was a third of each. An h5py without its (private) chunk rule gets the
    high-level call.
    """
    data = np.asarray(data)
    scalar = data.ndim == 0
    if scalar:
        data = data.reshape(1)
    if compression is not None or data.dtype.kind not in "biuf" or (chunks is True and guess_chunk is None):
        ds = group.create_dataset(name, data=data, maxshape=(None, *data.shape[1:]), chunks=chunks,
                                  compression=compression)
        if scalar:
            ds.attrs[SCALAR_ATTR] = 1
        if whole_crc:
            ds.attrs[CRC_ATTR] = crc32(data)
        return
    data = np.ascontiguousarray(data)
    dcpl = h5p.create(h5p.DATASET_CREATE)
    dcpl.set_chunk(guess_chunk(data.shape, (None, *data.shape[1:]), data.dtype.itemsize) if chunks is True else chunks)
    dcpl.set_obj_track_times(False)
    dcpl.set_attr_creation_order(0)
    space = h5s.create_simple(data.shape, (h5s.UNLIMITED, *data.shape[1:]))
    ds_id = h5d.create(group.id, name.encode(), h5t.py_create(data.dtype, logical=1), space, dcpl=dcpl)
    ds_id.write(h5s.ALL, h5s.ALL, data)
    if scalar:
        _int_attr(ds_id, SCALAR_ATTR, 1)
    if whole_crc:
        _int_attr(ds_id, CRC_ATTR, crc32(data))


def _int_attr(obj: Any, name: str, value: int) -> None:
    """``obj.attrs[name] = value`` for an int, by the low-level calls (an int64 scalar)."""
    attr = h5a.create(obj, name.encode(), h5t.py_create(np.dtype(np.int64), logical=1), h5s.create(h5s.SCALAR))
    attr.write(np.asarray(value, np.int64))


def truncate_log(log_dir: str | os.PathLike, rank: int, from_step: int) -> None:
    """Drop everything of ``rank`` recorded at steps ``>= from_step`` (a resumed fit re-records them).

    Segments entirely past ``from_step`` are deleted, newest first, so a crash during the
    truncation leaves a log without gaps (the next resume finishes the job); a segment that
    straddles ``from_step`` is shrunk in memory, re-sealed and atomically renamed over the
    original.
    """
    for stale in list_unfinished(log_dir, rank):
        stale.unlink(missing_ok=True)
    for path, steps, keep in truncation_plan(log_dir, rank, from_step):
        if keep is None:
            path.unlink()
        else:
            write_file(path, lambda f: _shrink(f, steps, keep, from_step), source=path)


def truncation_plan(log_dir: str | os.PathLike, rank: int, from_step: int) -> list[tuple[Path, np.ndarray, int | None]]:
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
    seal(f)
