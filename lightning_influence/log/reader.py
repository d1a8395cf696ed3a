"""``InfluenceLog``: read an influence log (format: ``log/format.py``, ``docs/log-format.md``).

The reader indexes the step tables of all segments of all ranks (small), and reads sample,
gradient and checkpoint data lazily, one step range at a time, so a log larger than RAM is
reduced in bounded memory. Steps recorded by several ranks (DDP) are presented as one step
whose batch is the concatenation of the ranks' micro-batches.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import h5py
import numpy as np

from lightning_influence.log.format import (
    CHECKPOINT_GROUP,
    FORMAT_NAME,
    FORMAT_VERSION,
    META_FILE,
    STEP_COLUMNS,
    LogFormatError,
    list_segments,
)


@dataclass
class StepBatch:
    """The records of one optimizer step: ids of ``B_t`` and, where recorded, their rows."""

    step: int
    epoch: int
    lrs: np.ndarray  # (n_param_groups,)
    ids: np.ndarray  # (|B_t|,) int64
    losses: np.ndarray | None = None  # (|B_t|,)
    grads: np.ndarray | None = None  # (|B_t|, K)
    hvps: np.ndarray | None = None  # (|B_t|, K)


@dataclass(frozen=True)
class _Location:
    rank: int
    segment: int  # index into InfluenceLog._segments
    row: int  # row in that segment's step table


_FIELD_RECORD = {"loss": "losses", "grad": "gradients", "hvp": "hvp"}
_FIELD_ATTR = {"loss": "losses", "grad": "grads", "hvp": "hvps"}
_WINDOW_RE = re.compile(r"^\s*(epochs?\s+)?([-+0-9.eE]*)\s*:\s*([-+0-9.eE]*)\s*$")


class InfluenceLog:
    """Reader of an influence log directory.

    Args:
        path: the log directory written by :class:`~lightning_influence.InfluenceTracker`.

    Raises:
        LogFormatError: the directory is not a log, or a file in it is truncated, corrupted,
            foreign or of an unsupported format version.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        meta_path = self.path / META_FILE
        if not meta_path.exists():
            raise LogFormatError(self.path, f"not an influence log ({META_FILE} is missing)")
        self.meta: dict[str, Any] = _read_attrs(meta_path)
        self._files: dict[int, h5py.File] = {}
        self._segments: list[Path] = []
        self._seg_steps: list[dict[str, np.ndarray]] = []
        self._seg_checkpoints: list[list[int]] = []
        by_step: dict[int, list[_Location]] = {}
        self.ranks = sorted(list_segments(self.path))
        for rank, paths in list_segments(self.path).items():
            for path_ in paths:
                seg = len(self._segments)
                self._segments.append(path_)
                table, ckpts = self._read_index(seg)
                self._seg_steps.append(table)
                self._seg_checkpoints.append(ckpts)
                for row, step in enumerate(table["step"]):
                    by_step.setdefault(int(step), []).append(_Location(rank, seg, row))
        self._by_step = by_step
        steps = np.array(sorted(by_step), dtype=np.int64)
        if len(steps) and not np.array_equal(steps, np.arange(steps[0], steps[0] + len(steps))):
            missing = sorted(set(range(int(steps[0]), int(steps[-1]) + 1)) - set(steps.tolist()))
            raise LogFormatError(self.path, f"steps are missing from the log: {missing[:10]}")
        self.steps = steps
        first = [by_step[int(t)][0] for t in steps]
        self.epochs_of_step = np.array([self._seg_steps[l.segment]["epoch"][l.row] for l in first], dtype=np.int64)
        self._lr = np.array([self._seg_steps[l.segment]["lr"][l.row] for l in first]).reshape(len(steps), -1)
        self._checkpoint_index: dict[int, int] = {}
        for seg, ckpts in enumerate(self._seg_checkpoints):
            for t in ckpts:
                self._checkpoint_index.setdefault(t, seg)

    # ----------------------------------------------------------------------------- metadata
    @property
    def num_steps(self) -> int:
        """``T``: the number of recorded optimizer steps (steps ``0 .. T-1``)."""
        return int(self.steps[-1]) + 1 if len(self.steps) else 0

    @property
    def dataset_size(self) -> int:
        """``N``: the training-set size recorded at fit start (or 1 + the largest id seen)."""
        n = self.meta.get("dataset_size")
        return int(n) if n is not None else int(self.all_ids().max()) + 1

    @property
    def param_names(self) -> list[str]:
        """Names of the tracked parameters, in gradient-column order."""
        return list(self.meta["tracked_params"])

    @property
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v) for k, v in self.meta["param_shapes"].items()}

    @property
    def recorded(self) -> dict[str, bool]:
        """What the run recorded: ``losses``, ``gradients``, ``hvp``, ``checkpoints``."""
        return dict(self.meta["recorded"])

    @property
    def epochs(self) -> np.ndarray:
        return np.unique(self.epochs_of_step)

    def lr(self, step: int) -> np.ndarray:
        """Learning rate of every param group at ``step``."""
        return self._lr[self._step_row(step)]

    @property
    def lrs(self) -> np.ndarray:
        """``(T, n_groups)`` learning rates."""
        return self._lr

    def param_groups(self) -> list[list[str]]:
        """Parameter names of each optimizer param group."""
        return [g["params"] for g in self.meta["optimizer"]["param_groups"]]

    def projector(self):  # -> KroneckerProjector
        """The projection used for the gradient rows, regenerated from the metadata."""
        from lightning_influence.capture.projection import KroneckerProjector

        return KroneckerProjector.from_metadata(self.meta["projection"])

    def column_groups(self) -> np.ndarray:
        """For each gradient column, the index of the param group its parameter belongs to."""
        proj = self.projector()
        group_of = {n: gi for gi, names in enumerate(self.param_groups()) for n in names}
        out = np.zeros(proj.out_dim, dtype=np.int64)
        for name, sl in proj.slices.items():
            out[sl] = group_of[name]
        return out

    # ------------------------------------------------------------------------------ windows
    def window(self, spec: Any) -> tuple[int, int]:
        """Map a window to a half-open step range ``[t1, t2)`` with ``0 <= t1 < t2 <= T``.

        Accepted: ``None`` (whole run); ``(t1, t2)`` ints (steps); ``(a, b)`` floats in
        ``[0, 1]`` (fractions of training); ``("epoch", a, b)`` (epochs ``a .. b-1``); or the
        strings ``"100:500"``, ``"0.8:1.0"``, ``"epoch 3:5"`` (empty ends mean start/end).
        """
        T = self.num_steps
        if spec is None:
            return 0, T
        if isinstance(spec, str):
            m = _WINDOW_RE.match(spec)
            if not m:
                raise ValueError(f"cannot parse window {spec!r}: use '100:500' (steps), '0.8:1.0' (fractions) or 'epoch 3:5'")
            lo, hi = m.group(2), m.group(3)
            if m.group(1):
                spec = ("epoch", int(lo) if lo else int(self.epochs[0]), int(hi) if hi else int(self.epochs[-1]) + 1)
            elif "." in lo + hi or "e" in (lo + hi).lower():
                spec = (float(lo) if lo else 0.0, float(hi) if hi else 1.0)
            else:
                spec = (int(lo) if lo else 0, int(hi) if hi else T)
        if len(spec) == 3 and spec[0] in ("epoch", "epochs"):
            a, b = int(spec[1]), int(spec[2])
            sel = np.nonzero((self.epochs_of_step >= a) & (self.epochs_of_step < b))[0]
            if not len(sel):
                raise ValueError(f"epochs [{a}, {b}) hold no step; the run has epochs {self.epochs.min()}..{self.epochs.max()}")
            return int(self.steps[sel[0]]), int(self.steps[sel[-1]]) + 1
        a, b = spec
        if isinstance(a, float) or isinstance(b, float):
            if not (0.0 <= a < b <= 1.0):
                raise ValueError(f"fractional window ({a}, {b}) must satisfy 0 <= a < b <= 1")
            t1, t2 = int(round(a * T)), int(round(b * T))
            return t1, max(t2, t1 + 1)
        t1, t2 = int(a), int(b)
        if not (0 <= t1 < t2 <= T):
            raise ValueError(f"step window [{t1}, {t2}) is outside the run: need 0 <= t1 < t2 <= T = {T}")
        return t1, t2

    # ------------------------------------------------------------------------------ records
    def batch_ids(self, step: int) -> np.ndarray:
        """Sample ids of ``B_t`` (all micro-batches, all ranks)."""
        return np.concatenate([self._read(l, "id") for l in self._locs(step)])

    def iter_steps(self, t1: int = 0, t2: int | None = None, fields: Sequence[str] = ("grad",)) -> Iterator[StepBatch]:
        """Yield the steps of ``[t1, t2)`` one at a time (bounded memory).

        ``fields`` chooses what to read besides ids and lrs: any of ``loss``, ``grad``, ``hvp``.
        When ``grad``/``hvp`` is requested, steps without gradient rows (recorded only every
        ``every_n_steps``) are skipped.
        """
        for field_ in fields:
            what = _FIELD_RECORD[field_]
            if not self.recorded.get(what):
                raise ValueError(f"{self.path}: the run did not record {what}; re-run with it enabled in InfluenceTracker")
        needs_grad_rows = bool({"grad", "hvp"} & set(fields))
        t2 = self.num_steps if t2 is None else t2
        for t in range(t1, t2):
            if needs_grad_rows and not self.has_grads(t):
                continue
            locs = self._locs(t)
            rec = StepBatch(step=t, epoch=int(self.epochs_of_step[self._step_row(t)]), lrs=self.lr(t),
                            ids=np.concatenate([self._read(l, "id") for l in locs]))
            for field_ in fields:
                setattr(rec, _FIELD_ATTR[field_], np.concatenate([self._read(l, field_) for l in locs]))
            yield rec

    def has_grads(self, step: int) -> bool:
        return all(self._seg_steps[l.segment]["grad_offset"][l.row] >= 0 for l in self._locs(step))

    def all_ids(self) -> np.ndarray:
        """Every sample id that appears in the log (sorted, unique)."""
        ids = [self._file(seg)["samples/id"][()] for seg in range(len(self._segments))]
        return np.unique(np.concatenate(ids)) if ids else np.zeros(0, np.int64)

    # -------------------------------------------------------------------------- checkpoints
    @property
    def checkpoint_steps(self) -> list[int]:
        """Steps ``t`` with a stored ``θ_t`` (``T`` is the final parameters)."""
        return sorted(self._checkpoint_index)

    def checkpoint(self, step: int) -> dict[str, np.ndarray]:
        """Parameters ``θ_t`` stored at ``step`` (every trainable parameter, exact dtype)."""
        g = self._checkpoint_group(step)
        return {name: ds[()] for name, ds in g["params"].items()}

    def optimizer_state(self, step: int) -> dict[str, dict[str, Any]]:
        """Optimizer state per parameter name at ``step`` (e.g. ``momentum_buffer``, ``exp_avg``)."""
        g = self._checkpoint_group(step)["optimizer"]
        return {name: {**{k: v[()] for k, v in sg.items()}, **dict(sg.attrs)} for name, sg in g.items()}

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> "InfluenceLog":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"InfluenceLog({str(self.path)!r}, steps={self.num_steps}, ranks={self.ranks}, recorded={self.recorded})"

    # ----------------------------------------------------------------------------- internals
    def _step_row(self, step: int) -> int:
        row = step - int(self.steps[0]) if len(self.steps) else -1
        if not (0 <= row < len(self.steps)):
            raise ValueError(f"step {step} is not in the log (steps {self.steps[:1].tolist()}..{self.num_steps - 1})")
        return row

    def _locs(self, step: int) -> list[_Location]:
        self._step_row(step)
        return self._by_step[step]

    def _file(self, seg: int) -> h5py.File:
        f = self._files.get(seg)
        if f is None:
            path = self._segments[seg]
            try:
                f = h5py.File(path, "r")
            except OSError as err:
                raise LogFormatError(path, f"cannot be opened as HDF5 (truncated or corrupted?): {err}") from None
            self._files[seg] = f
        return f

    def _read_index(self, seg: int) -> tuple[dict[str, np.ndarray], list[int]]:
        path = self._segments[seg]
        f = self._file(seg)
        try:
            _check_header(path, dict(f.attrs))
            table = {c: f["steps"][c][()] for c in STEP_COLUMNS}
            table["lr"] = f["steps/lr"][()]
            ckpts = [int(g.attrs["step"]) for g in f["checkpoints"].values()]
            n = int(f.attrs["n_samples"])
            if f["samples/id"].shape != (n,) or (len(table["step"]) and table["sample_offset"][-1] + table["sample_count"][-1] != n):
                raise LogFormatError(path, "sample table is inconsistent with the step table")
        except LogFormatError:
            raise
        except (KeyError, OSError, ValueError, TypeError) as err:
            raise LogFormatError(path, f"segment is corrupted or incomplete: {err}") from None
        return table, ckpts

    def _read(self, loc: _Location, field_: str) -> np.ndarray | None:
        table = self._seg_steps[loc.segment]
        f = self._file(loc.segment)
        n = int(table["sample_count"][loc.row])
        try:
            if field_ in ("id", "loss"):
                if field_ not in f["samples"]:
                    return None
                off = int(table["sample_offset"][loc.row])
                out = f["samples"][field_][off : off + n]
            else:
                off = int(table["grad_offset"][loc.row])
                if off < 0 or field_ not in f["grads"]:
                    return None
                out = f["grads"][field_][off : off + n]
        except (OSError, KeyError) as err:
            raise LogFormatError(self._segments[loc.segment], f"cannot read {field_!r} of step {table['step'][loc.row]}: {err}") from None
        return out

    def _checkpoint_group(self, step: int) -> h5py.Group:
        seg = self._checkpoint_index.get(step)
        if seg is None:
            raise ValueError(f"no checkpoint at step {step}; checkpoints: {self.checkpoint_steps}")
        return self._file(seg)["checkpoints"][CHECKPOINT_GROUP.format(step=step)]


def _read_attrs(path: Path) -> dict[str, Any]:
    try:
        with h5py.File(path, "r") as f:
            attrs = dict(f.attrs)
    except OSError as err:
        raise LogFormatError(path, f"cannot be opened as HDF5 (truncated or corrupted?): {err}") from None
    _check_header(path, attrs)
    out: dict[str, Any] = {}
    for key, value in attrs.items():
        if key in ("format", "format_version"):
            continue
        try:
            out[key] = json.loads(value)
        except (TypeError, json.JSONDecodeError) as err:
            raise LogFormatError(path, f"metadata attribute {key!r} is not valid JSON: {err}") from None
    return out


def _check_header(path: Path, attrs: dict[str, Any]) -> None:
    fmt = attrs.get("format")
    if isinstance(fmt, bytes):
        fmt = fmt.decode()
    if fmt != FORMAT_NAME:
        raise LogFormatError(path, f"not a lightning-influence file (format attribute is {fmt!r})")
    version = int(attrs.get("format_version", -1))
    if version != FORMAT_VERSION:
        raise LogFormatError(path, f"format version {version} is not supported (this reader reads version {FORMAT_VERSION}); use a matching lightning-influence release")
