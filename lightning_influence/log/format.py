"""The on-disk influence log, format version 1 (the full spec is ``docs/log-format.md``).

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

This module holds the names and the small pieces of logic both the writer and the reader
need; nothing here touches Lightning.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

FORMAT_NAME = "lightning-influence-log"
FORMAT_VERSION = 1

META_FILE = "meta.h5"
RANK_DIR = "rank-{rank}"
SEGMENT_FILE = "seg-{index:08d}.h5"
SEGMENT_RE = re.compile(r"^seg-(\d{8})\.h5$")
RANK_RE = re.compile(r"^rank-(\d+)$")
TMP_SUFFIX = ".tmp"
CHECKPOINT_GROUP = "step_{step:08d}"

# Step table columns (group ``steps``), one row per optimizer step.
STEP_COLUMNS = (
    "step",  # int64, optimizer step t (Lightning's global_step before the update)
    "epoch",  # int64
    "batch_idx",  # int64, index of the step's last micro-batch within its epoch
    "micro_batches",  # int64, number of micro-batches accumulated into the step
    "sample_offset",  # int64, first row of the step in ``samples/*`` of this segment
    "sample_count",  # int64, |B_t| on this rank
    "grad_offset",  # int64, first row in ``grads/*`` or -1 if not recorded at this step
    "batch_grad_norm",  # float64, ||G_t|| of the (unscaled) batch-mean gradient, NaN if unknown
    "hvp_eps",  # float64, finite-difference epsilon used for the HVP products, NaN if none
    "tracker_seconds",  # float64, wall time the tracker spent in this step
)


def json_attr(value: Any) -> str:
    """Serialise a metadata value as a JSON string attribute (portable across HDF5 readers)."""
    return json.dumps(value, sort_keys=True)


def segment_path(log_dir: str | os.PathLike, rank: int, index: int) -> Path:
    """Path of segment ``index`` of ``rank``."""
    return Path(log_dir) / RANK_DIR.format(rank=rank) / SEGMENT_FILE.format(index=index)


def list_segments(log_dir: str | os.PathLike) -> dict[int, list[Path]]:
    """Closed segment files per rank, in write order. Temporary (unfinished) files are skipped."""
    out: dict[int, list[Path]] = {}
    root = Path(log_dir)
    if not root.is_dir():
        return out
    for rank_dir in sorted(root.iterdir()):
        m = RANK_RE.match(rank_dir.name)
        if not m or not rank_dir.is_dir():
            continue
        segs = sorted(p for p in rank_dir.iterdir() if SEGMENT_RE.match(p.name))
        out[int(m.group(1))] = segs
    return out


class LogFormatError(ValueError):
    """A log file is missing, truncated, corrupted, foreign or of an unsupported version."""

    def __init__(self, path: str | os.PathLike, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem
