"""``InfluenceLog``: read an influence log (format: ``log/format.py``, ``docs/log-format.md``).

The reader indexes the step tables of all segments of all ranks (small, checked on open),
and reads sample, gradient and checkpoint data lazily, one step at a time, so a log larger
than RAM is reduced in bounded memory; the data checksums are verified by HDF5 as each
chunk is read. Steps recorded by several ranks (DDP) are presented as one step whose batch
is the concatenation of the ranks' micro-batches, in rank order; only steps that every rank
has closed are presented, so a log that is still being written, or whose run was killed,
reads as its complete prefix (``end_note`` says where it ends and why).

This module indexes the segments and presents the steps; the reads of their rows (open files, read-ahead blocks,
checksums) are its base class's, :mod:`lightning_influence.log.rows`.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import h5py
import numpy as np

from lightning_influence.log.format import (CHECKPOINT_GROUP, HYPER_PREFIX, ROW_DATASETS, STEP_COLUMNS, V1_DEFAULTS,
                                            LogFormatError, check_header, list_segments, list_unfinished, read_meta,
                                            reading, text)
from lightning_influence.log.integrity import check_rank, check_segment, read_checked, read_member
from lightning_influence.log.outer import OUTER_ATTR, OuterColumns
from lightning_influence.log.lock import describe_holder, writer_state
from lightning_influence.log.microbatches import MicroBatchRecord, read_micro_batches
from lightning_influence.log.rows import Segment, SegmentRows, will_need
from lightning_influence.log.schedule import logged_schedule
from lightning_influence.log.windows import step_window

if TYPE_CHECKING:
    from lightning_influence.capture.projection import KroneckerProjector
    from lightning_influence.log.blocks import RowBlock


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
    weights: np.ndarray | None = None  # (|B_t|,) w_{i,t}, the weight of each sample's loss (InfluenceLog.weights)



_FIELD_RECORD = {"loss": "losses", "grad": "gradients", "hvp": "hvp"}
_FIELD_ATTR = {"loss": "losses", "grad": "grads", "hvp": "hvps"}
# asked from the kernel for every segment at open: HDF5's metadata and the step table lie at a file's start (the rows
# follow) and a little at its end; opening a log of hundreds of segments otherwise waits for the disk at each
_HEAD_BYTES, _TAIL_BYTES = 128 << 10, 64 << 10


class InfluenceLog(SegmentRows):
    """Reader of an influence log directory.

    Opening reads and checks every segment's step table and attributes (checksummed); data
    rows are read, and their CRC-32 verified, only when asked for. A log that
    is still being written, or whose run was killed, opens as the steps that every rank has in
    closed segment files; :attr:`finished` and :attr:`end_note` say where and why it ends.

    Args:
        path: the log directory written by :class:`~lightning_influence.InfluenceTracker`.

    Attributes:
        steps: the presented steps ``t0 .. T-1`` (``t0 = 0`` unless a resumed fit started the log).
        finished: the run reached ``on_train_end`` (the final ``θ_T`` is stored).
        end_note: where and why the log ends: finished, still being written or killed, ranks that
            lag, unfinished segment files ignored.
        ranks: the ranks that wrote the log (``0 .. world_size-1``).

    Raises:
        LogFormatError: the directory is not a log, a file in it is truncated, corrupted,
            foreign or of an unsupported format version, or segment files are missing or
            overlap (the message names the file and the problem).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.meta: dict[str, Any] = read_meta(self.path)
        self._files: OrderedDict[int, h5py.File] = OrderedDict()
        self._blocks: dict[tuple[int, str], tuple[int, int, np.ndarray]] = {}  # (rank, dataset) -> (seg, first row, rows)
        self._absent: set[tuple[int, str]] = set()  # (segment, dataset) pairs a segment does not hold
        self._buffers: dict[tuple[int, str], np.ndarray] = {}  # reused block memory
        self._segs: list[Segment] = []
        self._segments: list[Path] = []
        self._width: int | None = None  # gradient columns K, equal in every segment
        world_size = int(self.meta.get("world_size") or 1)
        found = list_segments(self.path)
        extra = sorted(r for r in found if r >= world_size)
        if extra:
            raise LogFormatError(self.path, f"holds segment folders of ranks {extra} but the run had world_size "
                                            f"{world_size}; remove the folders of another run")
        self.ranks = list(range(world_size))
        for paths in found.values():  # the disk reads every segment's metadata while the first ones are indexed
            for p in paths:
                will_need(p, 0, _HEAD_BYTES, tail=_TAIL_BYTES)
        try:
            per_rank: list[list[Segment]] = []
            for rank in self.ranks:
                start = len(self._segs)
                for p in found.get(rank, []):
                    self._index_segment(p, rank)
                per_rank.append(self._segs[start:])
            first_step = int(self.meta.get("first_step") or 0)
            for segs in per_rank:
                check_rank(segs, first_step)
            self._present(per_rank)
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------------------- opening
    def _index_segment(self, path: Path, rank: int) -> None:
        seg = Segment(len(self._segs), path, rank, {}, [])
        self._segs.append(seg)
        self._segments.append(path)
        f = self._file(seg.index)
        with reading(path, "the segment index"):
            attrs = dict(f.attrs)
            check_header(path, attrs)
            steps = f["steps"]
            stored = set(steps)
            scheduled = sorted(c for c in stored if c.startswith(HYPER_PREFIX))  # a hyperparameter schedule (version 3)
            seg.table = {c: read_member(path, steps, c) if c in stored else None for c in (*STEP_COLUMNS, "lr", *scheduled)}
            n = len(seg.table["step"])
            for c, default in V1_DEFAULTS.items():
                if seg.table[c] is None and int(attrs["format_version"]) == 1:
                    seg.table[c] = np.full(n, default, dtype=np.float64 if isinstance(default, float) else np.int64)
            missing = [c for c, v in seg.table.items() if v is None]
            if missing:
                raise LogFormatError(path, f"the step table has no column(s) {missing}: the file is corrupted")
            seg.checkpoints = sorted(int(g.attrs["step"]) for g in f["checkpoints"].values())
            shapes = {name: f[name].shape for name in (*ROW_DATASETS.values(), "micro/size") if name in f}
            grad = ROW_DATASETS["grad"]
            if grad in f and OUTER_ATTR in f[grad].attrs:
                seg.outer = OuterColumns.from_attr(f[grad].attrs[OUTER_ATTR])
                rows, *cols = shapes[grad]
                if cols != [seg.outer.stored_width]:
                    raise LogFormatError(path, f"{grad} has shape {shapes[grad]}, expected ({rows}, "
                                               f"{seg.outer.stored_width}) for its factored blocks: the file is corrupted")
                shapes[grad] = (rows, seg.outer.width)  # the projector's columns, as every segment's
        self._width = check_segment(path, rank, attrs, seg.table, shapes, self._width)
        run_id = attrs.get("run_id")
        if run_id is not None and "run_id" in self.meta and text(run_id) != str(self.meta["run_id"]):
            raise LogFormatError(path, f"belongs to another run (run id {text(run_id)}, the log's meta.h5 says "
                                       f"{self.meta['run_id']}); remove segments copied from another log")

    def _present(self, per_rank: list[list[Segment]]) -> None:
        """Choose the steps every rank has closed; index learning rates, epochs and checkpoints."""
        stepped = [[s for s in segs if len(s.table["step"])] for segs in per_rank]
        firsts = {segs[0].first for segs in stepped if segs}
        ends = [segs[-1].last if segs else None for segs in stepped]
        final = max((t for s in per_rank[0] for t in s.checkpoints), default=None) if per_rank else None
        if len(firsts) > 1:
            raise LogFormatError(self.path, f"ranks start at different steps {sorted(firsts)}; the log mixes runs")
        first = firsts.pop() if firsts else int(self.meta.get("first_step") or 0)
        # rank 0 stores the checkpoints; θ_T after its last step means the run reached on_train_end
        finished = bool(ends) and ends[0] is not None and final == ends[0] + 1
        if finished and len(set(ends)) > 1:
            short = [r for r, e in zip(self.ranks, ends) if e != ends[0]]
            raise LogFormatError(self.path, f"the run finished at step {ends[0]} but the log of rank(s) {short} ends "
                                            f"earlier ({[ends[r] for r in short]}): their last segment files are "
                                            "missing; restore them from a backup")
        end = min((e if e is not None else first - 1) for e in ends) if ends else first - 1
        self.steps = np.arange(first, end + 1, dtype=np.int64)
        self.finished = finished
        self._rank_firsts = [[s.first for s in segs] for segs in stepped]  # per rank, for bisect in _locs
        self._stepped_index = [[s.index for s in segs] for segs in stepped]
        rank0 = stepped[0] if stepped else []
        if len(self.steps):
            self.epochs_of_step = np.concatenate([s.table["epoch"] for s in rank0])[: len(self.steps)]
            lrs = [s.table["lr"] for s in rank0]
            width = max(a.shape[1] for a in lrs)
            self._lr = np.concatenate([np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=np.nan) for a in lrs])[: len(self.steps)]
        else:
            self.epochs_of_step = np.zeros(0, np.int64)
            self._lr = np.zeros((0, 1))
        self._hyper = logged_schedule(self.path, self.meta, [s.table for s in rank0], len(self.steps))
        limit = self.num_steps
        self._checkpoint_index: dict[int, int] = {}
        for seg, s in enumerate(self._segs):
            for t in s.checkpoints:
                if t <= limit:
                    self._checkpoint_index.setdefault(t, seg)
        unfinished = list_unfinished(self.path)
        if self.finished:
            note = f"the run finished: steps {first}..{end} and the final parameters θ_{end + 1} are stored"
        elif not len(self.steps):
            note = "no step is in a closed segment yet" + _empty_note(self.path)
        else:
            note = f"steps {first}..{end} are complete; " + _writer_note(self.path)
        lagging = [f"rank {r} has steps up to {e}" for r, e in zip(self.ranks, ends) if e is not None and e > end]
        if lagging:
            note += f"; later steps are hidden until every rank has closed them ({', '.join(lagging)})"
        if unfinished:
            note += f"; {len(unfinished)} unfinished segment file(s) ignored (a write in progress or cut off by a crash)"
        self.end_note = note

    # ----------------------------------------------------------------------------- metadata
    @property
    def first_step(self) -> int:
        """``t0``: the log's first step (0 unless a resumed fit started the log; 0 for a log without steps)."""
        return int(self.steps[0]) if len(self.steps) else 0

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

    def hyper(self, step: int) -> dict[str, np.ndarray] | None:
        """The update rule's hyperparameters at ``step`` that a schedule changed during the run (``OneCycleLR``'s
        momentum, Adam's ``betas``, a weight decay set in ``training_step``): ``{param-group key: per-group values}``
        (``(n_groups,)``, ``betas`` ``(n_groups, 2)``), the recorded ones where the step recorded them, ``meta.h5``'s
        param groups' otherwise. ``None`` for a log whose steps all used ``meta.h5``'s (no schedule, every log before
        format version 3): replay, DIT and ground truth then take the param groups as they are."""
        if self._hyper is None:
            return None
        row = self._step_row(step)
        return {k: v[row] for k, v in self._hyper.items()}

    @property
    def scheduled(self) -> dict[str, np.ndarray]:
        """``{param-group key: (T, n_groups[, 2])}`` of the hyperparameters besides ``lr`` recorded during the run, every
        step's value as :meth:`hyper` returns it; empty for a log without a schedule (most)."""
        return dict(self._hyper or {})

    def param_groups(self) -> list[list[str]]:
        """Parameter names of each optimizer param group."""
        return [g["params"] for g in self.meta["optimizer"]["param_groups"]]

    def projector(self) -> KroneckerProjector:
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

        (A log started by a resumed fit begins at its first step ``t0 > 0``: windows then lie in
        ``[t0, T]``, fractions are of that range.)

        Accepted: ``None`` (whole run); ``(t1, t2)`` ints (steps); ``(a, b)`` floats in
        ``[0, 1]`` (fractions of training); ``("epoch", a, b)`` (epochs ``a .. b-1``); or the
        strings ``"100:500"``, ``"0.8:1.0"``, ``"epoch 3:5"`` (empty ends mean start/end).
        """
        return step_window(self, spec)

    # ------------------------------------------------------------------------------ records
    def batch_ids(self, step: int) -> np.ndarray:
        """Sample ids of ``B_t`` (all micro-batches, all ranks)."""
        return np.concatenate([self._read(seg, row, "id") for seg, row in self._locs(step)])

    def iter_steps(self, t1: int | None = None, t2: int | None = None, fields: Sequence[str] = ("grad",)) -> Iterator[StepBatch]:
        """Yield the steps of ``[t1, t2)`` one at a time (bounded memory); by default every step of the log.

        ``t1 = None`` is the log's first step (0, or the step a resumed fit started the log at).

        ``fields`` chooses what to read besides ids and lrs: any of ``loss``, ``grad``, ``hvp``.
        When ``grad``/``hvp`` is requested, steps without gradient rows (recorded only every
        ``every_n_steps``) are skipped.
        """
        for field_ in fields:
            what = _FIELD_RECORD[field_]
            if not self.recorded.get(what):
                raise ValueError(f"{self.path}: the run did not record {what}; re-run with it enabled in InfluenceTracker")
        needs_grad_rows = bool({"grad", "hvp"} & set(fields))
        t1 = self.first_step if t1 is None else t1
        t2 = self.num_steps if t2 is None else t2
        for t in range(t1, t2):
            if needs_grad_rows and not self.has_grads(t):
                continue
            locs = self._locs(t)
            rec = StepBatch(step=t, epoch=int(self.epochs_of_step[self._step_row(t)]), lrs=self.lr(t),
                            ids=np.concatenate([self._read(seg, row, "id") for seg, row in locs]))
            for field_ in fields:
                setattr(rec, _FIELD_ATTR[field_], np.concatenate([self._read(seg, row, field_) for seg, row in locs]))
            rec.weights = self.weights(t)
            yield rec

    def iter_blocks(self, t1: int, t2: int, breaks: Sequence[int] = ()) -> Iterator["RowBlock"]:
        """The gradient rows of the steps of ``[t1, t2)`` in blocks of consecutive steps, each read in one HDF5 call per
        dataset and rank and verified step by step (for reductions over rows: :mod:`lightning_influence.log.blocks`)."""
        from lightning_influence.log.blocks import iter_row_blocks

        return iter_row_blocks(self, t1, t2, breaks)

    def weights(self, step: int) -> np.ndarray:
        """``w_{i,t}`` of every sample of ``B_t``: the weight of its loss in the gradient the step applied.

        Recorded by the tracker (format version 2: accumulation scaling, micro-batch sizes, DDP
        averaging); ``1/|B_t|`` for a log that does not hold them (version 1: a plain batch mean).
        """
        parts = [self._read(seg, row, "weight") for seg, row in self._locs(step)]
        if any(p is None for p in parts):
            n = len(self.batch_ids(step))
            return np.full(n, 1.0 / max(n, 1))
        return np.concatenate(parts).astype(np.float64)

    def micro_index(self, step: int) -> np.ndarray:
        """Micro-batch of every sample of ``B_t`` (``0, 1, ...`` across ranks, in rank order; one micro-batch
        per rank in a version-1 log)."""
        out, base = [], 0
        for seg, row in self._locs(step):
            s = self._segs[seg]
            off, n = int(s.table["micro_offset"][row]), int(s.table["micro_batches"][row])
            count = int(s.table["sample_count"][row])
            if off < 0:
                sizes = np.array([count])
            else:
                with reading(s.path, f"the micro-batches of step {step}"):
                    sizes = np.array(self._rows(seg, "micro/size", off, n), dtype=np.int64)
            out.append(np.repeat(np.arange(base, base + len(sizes)), sizes))
            base += len(sizes)
        return np.concatenate(out)

    def step_column(self, step: int, column: str) -> Any:
        """The step-table value ``column`` of ``step`` on rank 0 (e.g. ``clip_coef``; version-1 default if absent)."""
        seg, row = self._locs(step)[0]
        return self._segs[seg].table[column][row]

    def micro_batches(self, step: int) -> list[MicroBatchRecord]:
        """The micro-batches of ``step`` in the order they ran (ranks in rank order), with their random
        states and stored inputs (``docs/log-format.md``, version 2)."""
        return read_micro_batches(self, step)

    def grad_scale(self, step: int) -> float | None:
        """The GradScaler factor ``S_t`` of ``step`` (``None`` without a scaler)."""
        seg, row = self._locs(step)[0]
        value = float(self._segs[seg].table["grad_scale"][row])
        return None if np.isnan(value) else value

    def skipped(self, step: int) -> bool:
        """The GradScaler skipped the optimizer step ``step`` (``θ_{t+1} = θ_t``, optimizer state unchanged)."""
        return any(bool(self._segs[seg].table["skipped"][row]) for seg, row in self._locs(step))

    def stored_widths(self) -> list[int]:
        """The values a sample each segment's gradient rows store, distinct, ascending: the projector's columns, or
        fewer where blocks are stored as their factors (``log/outer.py``); empty without gradient rows."""
        return sorted({s.outer.stored_width if s.outer is not None else self._width for s in self._segs
                       if s.outer is not None or self._width is not None})

    def segment_starts(self) -> list[int]:
        """First step of each segment file of rank 0 within the log's steps: a shard of steps that starts at
        one of them shares no segment of rank 0 with the shard before it (ranks flush at the same steps)."""
        firsts = self._rank_firsts[0] if self._rank_firsts and len(self.steps) else []
        return [int(f) for f in firsts if self.steps[0] <= f <= self.steps[-1]]

    def has_grads(self, step: int) -> bool:
        """Whether ``step`` has gradient rows on every rank (``every_n_steps`` records them at some steps only)."""
        return all(self._segs[seg].table["grad_offset"][row] >= 0 for seg, row in self._locs(step))

    def all_ids(self) -> np.ndarray:
        """Every sample id that appears in the log (sorted, unique)."""
        ids = [self.batch_ids(int(t)) for t in self.steps]
        return np.unique(np.concatenate(ids)) if ids else np.zeros(0, np.int64)

    # -------------------------------------------------------------------------- checkpoints
    @property
    def checkpoint_steps(self) -> list[int]:
        """Steps ``t`` with a stored ``θ_t`` (``T`` is the final parameters)."""
        return sorted(self._checkpoint_index)

    def checkpoint(self, step: int) -> dict[str, np.ndarray]:
        """Parameters ``θ_t`` stored at ``step`` (every trainable parameter, exact dtype)."""
        seg, g = self._checkpoint_group(step)
        path = self._segs[seg].path
        with reading(path, f"the parameters of checkpoint {step}"):
            return {name: read_checked(path, ds) for name, ds in g["params"].items()}

    def checkpoint_buffers(self, step: int) -> dict[str, np.ndarray] | None:
        """The module's buffers at ``step`` (BatchNorm running statistics: ``step.buffers``); ``None`` for a log
        whose checkpoints hold none (written before buffers were stored)."""
        seg, g = self._checkpoint_group(step)
        if "buffers" not in g:
            return None
        path = self._segs[seg].path
        with reading(path, f"the buffers of checkpoint {step}"):
            return {name: read_checked(path, ds) for name, ds in g["buffers"].items()}

    def optimizer_state(self, step: int) -> dict[str, dict[str, Any]]:
        """Optimizer state per parameter name at ``step`` (e.g. ``momentum_buffer``, ``exp_avg``)."""
        seg, g = self._checkpoint_group(step)
        path = self._segs[seg].path
        with reading(path, f"the optimizer state of checkpoint {step}"):
            return {name: {**{k: read_checked(path, v) for k, v in sg.items()}, **dict(sg.attrs)} for name, sg in g["optimizer"].items()}

    def close(self) -> None:
        """Close the open segment files and drop the read-ahead buffers (the log reopens files when read again)."""
        for f in self._files.values():
            f.close()
        self._files.clear()
        self._blocks.clear()
        self._buffers.clear()

    def __enter__(self) -> "InfluenceLog":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"InfluenceLog({str(self.path)!r}, steps={self.num_steps}, ranks={self.ranks}, "
                f"finished={self.finished}, recorded={self.recorded})")

    # ----------------------------------------------------------------------------- internals
    def _step_row(self, step: int) -> int:
        row = step - int(self.steps[0]) if len(self.steps) else -1
        if not (0 <= row < len(self.steps)):
            raise ValueError(f"step {step} is not in the log (steps {self.steps[:1].tolist()}..{self.num_steps - 1}; "
                             f"{self.end_note})")
        return row

    def _locs(self, step: int) -> list[tuple[int, int]]:
        """(segment, row) of ``step`` in every rank, in rank order."""
        self._step_row(step)
        out = []
        for firsts, segs in zip(self._rank_firsts, self._stepped_index):
            seg = segs[bisect.bisect_right(firsts, step) - 1]
            out.append((seg, step - self._segs[seg].first))
        return out

    def _checkpoint_group(self, step: int) -> tuple[int, h5py.Group]:
        seg = self._checkpoint_index.get(step)
        if seg is None:
            raise ValueError(f"no checkpoint at step {step}; checkpoints: {self.checkpoint_steps}")
        with reading(self._segs[seg].path, f"checkpoint {step}"):
            return seg, self._file(seg)["checkpoints"][CHECKPOINT_GROUP.format(step=step)]



def _empty_note(path: Path) -> str:
    """Why a log holds no complete step: its writer runs and has not flushed yet, is gone, or ended (a fit that let go
    of the log before its first flush, or segment files deleted since)."""
    state, holder = writer_state(path)
    if state == "live":
        return f" (the run just started: its writer, {describe_holder(holder)}, has not flushed a segment yet)"
    if state == "gone":
        return f" (the run was killed before its first flush: its writer, {describe_holder(holder)}, is gone)"
    if state == "none":  # no writer holds it: a fit that stopped before its first flush, or its segments deleted
        return (" (no writer holds it: the fit stopped before its first flush, or its segment files (rank-*/seg-*.h5) "
                "were deleted or moved since; restore them from a backup)")
    return " (the run just started, or was killed before its first flush)"


def _writer_note(path: Path) -> str:
    """Why a log with complete steps has not finished: its writer still runs, is gone, or cannot be told."""
    state, holder = writer_state(path)
    if state == "live":
        return f"the run is being written now by {describe_holder(holder)} (later steps appear as they are flushed)"
    if state == "gone":
        return (f"the run ended without finishing: its writer, {describe_holder(holder)}, is gone (killed or crashed; "
                "resume from a Lightning checkpoint to complete the log)")
    if state == "none":  # no lock names a writer: the fit let go of the log without reaching on_train_end
        return ("the run ended without finishing: the fit stopped before on_train_end (an exception, Ctrl+C or SIGTERM) "
                "and let go of the log; resume from a Lightning checkpoint to complete it")
    return (f"the run is still being written or ended without finishing (its writer runs on {holder.get('host')}, "
            "not checked from here; killed, crashed or stopped before on_train_end)")
