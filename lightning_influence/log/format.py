"""The on-disk influence log, format version 2, 3 for a segment holding an optimizer hyperparameter schedule (the full
spec is ``docs/log-format.md``; version 1 is still read).

A log is a directory::

    LOG_DIR/
      meta.h5                    run metadata (written once by rank 0 at the start of fit)
      rank-0/seg-00000000.h5     closed, immutable segment files, one per flush
      rank-0/seg-00000001.h5
      rank-1/...                 one folder per process (DDP)

Every segment holds a contiguous range of optimizer steps: the step table, the sample
rows of those steps (ids, losses), the gradient rows (per-sample gradients and
Hessian-gradient products, for the steps that recorded them) and the parameter
checkpoints taken inside the range. A segment is written under a temporary name and
renamed only once closed and synced, so a crash can lose at most the steps buffered
since the last flush, never a step already on disk.

Integrity: every file is written with HDF5 1.10 file-format structures (``LIBVER``), whose
superblock, object headers and chunk indexes carry checksums; strings are fixed-length
(in the object header, not in the unchecksummed global heap); the root attributes are
covered by a CRC-32 (``attrs_digest``, attribute ``attrs_crc32``); every dataset read whole
(step table, checkpoints) carries the CRC-32 of its bytes (attribute ``crc32``), and the
rows of every step (ids, losses, gradients, HVP products) have their CRC-32 in the step
table (``*_crc32`` columns), checked when the step is read. (HDF5's ``fletcher32`` filter is
not used: it accepts a zeroed chunk whose stored checksum is zeroed too.)

This module holds the names and the small pieces of logic both the writer and the reader
need; nothing here touches Lightning.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

FORMAT_NAME = "lightning-influence-log"
FORMAT_VERSION = 2
# a segment holding a hyperparameter schedule (HYPER_PREFIX columns): a version-2 reader would replay it with the
# param groups of meta.h5, so it refuses the file; every other file of such a log stays version 2
SCHEDULE_VERSION = 3
# a segment whose gradient rows store some blocks as two factors (log/outer.py): a version-3 reader would take the
# stored columns for the projector's
OUTER_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)  # a version-1 log reads as one micro-batch per step, no random state, full precision
HYPER_PREFIX = "hyper_"  # steps/hyper_<param-group key>: a step's update-rule hyperparameter per group (docs/log-format.md)

META_FILE = "meta.h5"
RANK_DIR = "rank-{rank}"
SEGMENT_FILE = "seg-{index:08d}.h5"
SEGMENT_RE = re.compile(r"^seg-(\d{8})\.h5$")
RANK_RE = re.compile(r"^rank-(\d+)$")
TMP_SUFFIX = ".tmp"
DATA_FILE = "data.pt"  # the stored training/validation sets (written by ``recipe.py``): removed with the log
FROZEN_FILE = "frozen.pt"  # the module's frozen parameters (``step/frozen.py``): removed with the log
LOCK_FILE = "writer.lock"  # in each rank folder: the exclusive writer lock (``log/lock.py``), not part of the data
CHECKPOINT_GROUP = "step_{step:08d}"
LIBVER = ("v110", "v110")  # HDF5 >= 1.10 structures: checksummed superblock, object headers, chunk indexes
DIGEST_ATTR = "attrs_crc32"  # CRC-32 of every other root attribute of a file (``attrs_digest``)
SCALAR_ATTR = "scalar"  # on a checkpoint dataset: stored as shape (1,), read back as a 0-d array

# Step table columns (group ``steps``), one row per optimizer step.
STEP_COLUMNS = (
    "step",  # int64, optimizer step t (Lightning's global_step before the update)
    "epoch",  # int64
    "batch_idx",  # int64, index of the step's last micro-batch within its epoch
    "micro_batches",  # int64, number of micro-batches accumulated into the step
    "sample_offset",  # int64, first row of the step in ``samples/*`` of this segment
    "sample_count",  # int64, |B_t| on this rank
    "grad_offset",  # int64, first row in ``grads/*`` or -1 if not recorded at this step
    "batch_grad_norm",  # float64, ||G_t|| of the (unscaled) batch-mean gradient; NaN if not recorded (docs/log-format.md)
    "hvp_eps",  # float64, finite-difference epsilon used for the HVP products, NaN if none
    "tracker_seconds",  # float64, wall time the tracker spent in this step
    "id_crc32",  # int64, CRC-32 of the step's rows of samples/id as stored
    "loss_crc32",  # int64, ... of samples/loss, -1 if not stored
    "grad_crc32",  # int64, ... of grads/grad, -1 if not stored at this step
    "hvp_crc32",  # int64, ... of grads/hvp, -1 if not stored at this step
    # version 2
    "micro_offset",  # int64, first row of the step in ``micro/*`` (``micro_batches`` rows); -1 in version 1
    "micro_crc32",  # int64, CRC-32 chain of the step's micro rows, random states and inputs; -1 in version 1
    "grad_scale",  # float64, the GradScaler factor S_t of the step, NaN without a scaler
    "skipped",  # int64, 1 when the GradScaler skipped the optimizer step (non-finite gradients)
    "accumulate",  # int64, the divisor Lightning applied to each micro-batch loss (accumulate_grad_batches); -1 in version 1
    "clip_value",  # float64, gradient clipping threshold applied at this step, NaN if none
    "clip_coef",  # float64, factor the clipping applied (norm: min(1, c/(||g|| + 1e-6))), NaN if none
    "weight_crc32",  # int64, CRC-32 of the step's rows of samples/weight, -1 in version 1
)
V1_DEFAULTS = {"micro_offset": -1, "micro_crc32": -1, "grad_scale": float("nan"), "skipped": 0,  # columns absent in version 1
               "accumulate": -1, "clip_value": float("nan"), "clip_coef": float("nan"), "weight_crc32": -1}
# Micro-batch rows (group ``micro``), one per micro-batch of every step, in the order they ran.
MICRO_COLUMNS = (
    "size",  # int64, samples in the micro-batch (its rows of ``samples/*`` follow each other)
    "cpu_rng",  # int64, row of ``rng/cpu`` holding the CPU generator state at its forward, -1 if it drew no CPU number
    "cuda_rng",  # int64, row of ``rng/cuda`` holding every CUDA device's (seed, offset), -1 if it drew on no GPU
    "input_offset",  # int64, first byte of its inputs in ``inputs/bytes`` (torch.save of the batch), -1 if not stored
    "input_length",  # int64, their length in bytes (0 if not stored)
)
ROW_DATASETS = {"id": "samples/id", "loss": "samples/loss", "grad": "grads/grad", "hvp": "grads/hvp",
                "weight": "samples/weight"}
ROW_CRC_COLUMNS = {"id": "id_crc32", "loss": "loss_crc32", "grad": "grad_crc32", "hvp": "hvp_crc32",
                   "weight": "weight_crc32"}
CRC_ATTR = "crc32"  # on every dataset read whole (step table, checkpoints): CRC-32 of its bytes as stored


try:  # the same CRC-32 as zlib's, with the CPU's carry-less multiply: ~8x faster on the rows of a long log
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # pragma: no cover - isal is an optional speed-up (pip install lightning-influence[fast])
    _crc32 = zlib.crc32


def crc32(array: Any, value: int = 0) -> int:
    """CRC-32 (zlib's polynomial; computed by ``isal`` when installed) of an array's bytes in C order (continuing
    the CRC-32 ``value`` of the bytes before them)."""
    return _crc32(np.ascontiguousarray(array), value)


def json_attr(value: Any) -> str:
    """Serialise a metadata value as a JSON string attribute (portable across HDF5 readers)."""
    return json.dumps(value, sort_keys=True)


def set_text(attrs: Any, key: str, text: str) -> None:
    """Store a string attribute as fixed-length UTF-8, inside the checksummed object header.

    Not as an h5py variable-length string: those live in HDF5's global heap, which has no
    checksum and on which HDF5 can loop forever when its bytes are damaged.
    """
    import h5py

    data = text.encode()
    attrs.create(key, data=data, dtype=h5py.string_dtype("utf-8", max(1, len(data))))


def text(value: Any) -> str:
    """A string attribute as ``str`` (h5py returns fixed-length strings as ``bytes``)."""
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else str(value)


def attrs_digest(attrs: Any) -> int:
    """CRC-32 of a file's root attributes (all but ``DIGEST_ATTR``), in key order.

    Computed from the values as h5py returns them, by the writer (after setting them) and by
    the reader, so a bit flip in any attribute, including string values kept in HDF5's
    unchecksummed global heap, is detected.
    """
    crc = 0
    for key in sorted(k for k in attrs.keys() if k != DIGEST_ATTR):
        crc = zlib.crc32(key.encode("utf-8", "surrogateescape"), crc)
        crc = zlib.crc32(_canonical_bytes(attrs[key]), crc)
    return crc


def _canonical_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return b"s:" + value
    if isinstance(value, str):
        return b"s:" + value.encode("utf-8", "surrogateescape")  # h5py decodes invalid UTF-8 to surrogates
    arr = np.asarray(value)
    return f"{arr.dtype.str}{arr.shape}:".encode() + arr.tobytes()


def segment_path(log_dir: str | os.PathLike, rank: int, index: int) -> Path:
    """Path of segment ``index`` of ``rank``."""
    return Path(log_dir) / RANK_DIR.format(rank=rank) / SEGMENT_FILE.format(index=index)


def list_segments(log_dir: str | os.PathLike) -> dict[int, list[Path]]:
    """Closed segment files per rank, in write order; ranks without any are left out. Temporary (unfinished) files are skipped."""
    out: dict[int, list[Path]] = {}
    root = Path(log_dir)
    if not root.is_dir():
        return out
    for rank_dir in sorted(root.iterdir()):
        m = RANK_RE.match(rank_dir.name)
        if not m or not rank_dir.is_dir():
            continue
        segs = sorted(p for p in rank_dir.iterdir() if SEGMENT_RE.match(p.name))
        if segs:  # a folder holding only its writer lock holds no log yet
            out[int(m.group(1))] = segs
    return out


def list_unfinished(log_dir: str | os.PathLike, rank: int | None = None) -> list[Path]:
    """Temporary files of segments whose write was interrupted (or is in progress), of one or all ranks."""
    root = Path(log_dir)
    dirs = [root / RANK_DIR.format(rank=rank)] if rank is not None else [d for d in root.glob("rank-*") if RANK_RE.match(d.name)]
    return sorted(p for d in dirs if d.is_dir() for p in d.iterdir() if p.name.endswith(TMP_SUFFIX))


def segment_index(path: Path) -> int:
    """The index ``i`` of a segment file named ``seg-<i>.h5``."""
    return int(SEGMENT_RE.match(path.name).group(1))


class LogFormatError(ValueError):
    """A log file is missing, truncated, corrupted, foreign or of an unsupported version."""

    def __init__(self, path: str | os.PathLike, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


@contextmanager
def reading(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Turn any failure while reading ``path`` into a :class:`LogFormatError` naming the file and ``what``.

    HDF5 reports a damaged file through many exception types (``OSError`` for a checksum
    mismatch or a truncated file, ``KeyError`` for a lost link, ``ValueError``/``TypeError``
    for a mangled datatype, ...); whatever it raises, the user learns which file is damaged.
    """
    try:
        yield
    except LogFormatError:
        raise
    except Exception as err:  # noqa: BLE001 - every h5py failure becomes one clear error
        detail = f"{type(err).__name__}: {err}"
        raise LogFormatError(path, f"cannot read {what}: the file is corrupted or truncated ({detail}). "
                                   f"{restore_hint(path)}") from err


def restore_hint(path: str | os.PathLike) -> str:
    """What to do about a damaged file of a log."""
    if Path(path).name == META_FILE:
        return f"Restore {META_FILE} from a backup: without it the segments cannot be interpreted."
    return ("Restore the file from a backup, or delete it and every later segment of its rank to keep the steps "
            "before it.")


def check_header(path: str | os.PathLike, attrs: Mapping[str, Any]) -> None:
    """Refuse a file that is not a lightning-influence file of this format version, or whose attributes changed."""
    if DIGEST_ATTR in attrs and _stored_digest(attrs) != attrs_digest(attrs):
        raise LogFormatError(path, f"its attributes fail their checksum ({DIGEST_ATTR}): the file is corrupted. "
                                   + restore_hint(path))
    fmt = attrs.get("format")
    fmt = text(fmt) if fmt is not None else None
    if fmt != FORMAT_NAME:
        raise LogFormatError(path, f"not a lightning-influence file (format attribute is {fmt!r}); "
                                   "point InfluenceLog at a directory written by InfluenceTracker")
    try:
        version = int(attrs.get("format_version", -1))
    except (TypeError, ValueError):
        version = -1
    if version not in READABLE_VERSIONS:
        raise LogFormatError(path, f"format version {version} is not supported (this reader reads versions "
                                   f"{', '.join(map(str, READABLE_VERSIONS))}); use a matching lightning-influence release")
    if DIGEST_ATTR not in attrs:
        raise LogFormatError(path, f"has no {DIGEST_ATTR} attribute, so its integrity cannot be checked "
                                   "(written by a pre-release writer?); re-create the log with this release")


def _stored_digest(attrs: Mapping[str, Any]) -> int | None:
    try:
        return int(attrs[DIGEST_ATTR])
    except (TypeError, ValueError):
        return None


def read_meta(log_dir: str | os.PathLike) -> dict[str, Any]:
    """The run metadata of a log (``meta.h5``), checked and JSON-decoded."""
    import h5py

    path = Path(log_dir) / META_FILE
    missing = LogFormatError(Path(log_dir), f"not an influence log ({META_FILE} is missing)")
    if not path.exists():
        raise missing
    with reading(path, "the run metadata"):
        try:
            f = h5py.File(path, "r")
        except FileNotFoundError:  # removed since the check (a fit starting a new log over it): missing, not damaged
            raise missing from None
        with f:
            attrs = dict(f.attrs)
    check_header(path, attrs)
    out: dict[str, Any] = {}
    for key, value in attrs.items():
        if key in ("format", "format_version", DIGEST_ATTR):
            continue
        try:
            out[key] = json.loads(value)
        except (TypeError, ValueError) as err:
            raise LogFormatError(path, f"metadata attribute {key!r} is not valid JSON: {err}") from None
    return out
