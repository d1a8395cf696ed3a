"""Tracker overhead per recording level on three models, and where the added time goes (issue 13).

Models (``benchmarks/overhead_models.py``): MLP 784-512-512-10 (batch 128), CNN 3x32x32 with
Conv2d 3->32->64, GroupNorm and Linear (batch 64), small GPT (2 layers, d=128, sequence 64,
vocabulary 512, batch 64; per-sample loss = mean token loss). SGD with momentum, synthetic data. On request
(``--models gpt-param``): the GPT with its position table a raw ``nn.Parameter`` (the raw-parameter engine).

For each model:

1. **Step costs**, measured alternately outside Lightning (fastest of ``--reps``): the floor
   (forward+backward of the training step alone), the same step with the hooks capturing, the
   hook engine's projection of the captures (``collect``), one own hooked pass (what each HVP
   scheme repeats: forward once, central twice) and ``vmap`` per-sample gradients; the last two
   as per-sample gradient throughput (samples/s), hooks against vmap. And what bounds the hooks from below
   (``read_floor``): the bytes they must read a step and how fast one core reads them out of cache.
2. **Fit overhead**: ``Trainer.fit`` with the tracker at each level and without it. A round runs, for each level,
   a pair: the level's fit and one without the tracker, each in a process of its own (a fresh heap, the main thread:
   as a user's run), taking turns of ``--turn`` steps (``_Turns``; which goes first alternates): both see the same
   moments of a shared machine within a fraction of a second, where whole fits one after another in one process saw
   moments, and heaps, whose ±10% moved a ratio more than the 5% it is judged by. Per fit, the **step** is timed
   inside the fit: the fit's clocks at every ``on_train_batch_start`` (so a step is everything between two: data,
   forward, backward, optimizer, every callback hook), averaged over the steps after ``--warmup`` (the first steps'
   one-off checks excluded; per-fit set-up and the final flush are outside any step). With ``--clock cpu`` (the
   default) a step is the CPU time of the fit's training thread (the other fits' turns do not advance it), plus the
   log writer at what it costs a long fit: by default a segment closes after 10 s (or 64 MiB of rows), so a short fit
   writes its steps only at its end and a long one every 10 s; the writer CPU per step of one such segment, written
   from the fit's own step records (``steady_writer``; the parameter checkpoints ``θ_0`` and ``θ_T`` are per fit, in
   ``fit``), is added. With ``--clock wall`` it is the elapsed time while the fit held its turn. Each round gives one
   ratio per level (its step over its pair's step without the tracker): the median over rounds and the spread
   (lowest, highest) are reported. The added ms/step is split by where it goes, each part measured in the same
   steps as thread CPU: ``hooks``, the layer engines' work in the step's own forward/backward (what the
   forward hooks keep, the output-gradient hooks' blocks); ``passes``, the HVP scheme's gradient
   passes; ``fd``, the rest of the HVP products (``ε``, the perturbed parameters, the differences, the
   kink guard); ``tracker``, the rest of the tracker's per-step Lightning hooks (ids, random states, the
   projection's collection, the step record, host copies, checks);
   ``writer``, the log writer's background thread (as above); ``other``, what remains (Lightning's calls of the
   tracker's hooks, hook dispatch, the loss observer, caches, noise). ``fit``: the fastest whole fit's CPU (its
   thread's and its writer's) with the tracker over the fastest without (per-fit costs included). ``thread``: the
   step ratio on the training thread's CPU alone, the step's critical path with ``--threads 1`` (the writer's
   background thread, which a second core runs beside the step, left out; it stays in ``ratio``). ``faults``: the
   training thread's minor page faults per step (first touches of memory the allocator got from the system).

Step costs use the process's CPU time by default (``--clock cpu``): on a shared machine the other jobs stretch
elapsed time by a varying factor but move CPU time much less; the per-step tracker seconds in the log (the
callbacks' share) are elapsed time.

    python benchmarks/overhead.py [--models mlp,cnn,gpt] [--steps 120] [--warmup 10] [--turn 10] [--rounds 3]
                                  [--reps 5] [--threads 1] [--keep-heap] [--out benchmarks/results/overhead.json]

``--keep-heap`` runs every fit (with and without the tracker) with glibc's heap kept (``KEEP_HEAP``): the CNN's
step otherwise takes hundreds to thousands of page faults whose number follows the heap's history (what else
the process allocated and freed), which moves its ratios by several percent (docs/per-sample-gradients.md).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import inspect
import json
import math
import multiprocessing
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.overhead_models import DEFAULT, make  # noqa: E402
from lightning_influence import InfluenceTracker  # noqa: E402
from lightning_influence.log.records import StepRecord  # noqa: E402
from lightning_influence.log.segment import write_segment  # noqa: E402
from lightning_influence.log.writer import SEGMENT_BYTES, LogWriter  # noqa: E402
from lightning_influence.capture import (  # noqa: E402
    KroneckerProjector,
    per_sample_grads_hooks,
    per_sample_grads_vmap,
    select_params,
)
from lightning_influence.capture import layers  # noqa: E402
from lightning_influence.capture.layers import capture_owners, foldable_biases  # noqa: E402
from lightning_influence.capture.own_pass import OwnPasses, choose_engine  # noqa: E402

K = 256
_PER_STEP_HOOKS = ("on_train_batch_start", "on_before_backward", "on_after_backward", "on_before_optimizer_step",
                   "on_train_batch_end")
SPENT_KEYS = ("hooks", "tracker", "passes", "fd", "writer")
# thread CPU seconds of this process's fit (one fit a process, run_round), by where they went: the layer engines' hook
# work outside the tracker's own passes, the tracker's per-step Lightning hooks, its own passes (inside those hooks),
# the finite differences around them, its log writer's thread
SPENT = dict.fromkeys(SPENT_KEYS, 0.0)
RECORDS: list[StepRecord] = []  # the step records the fit's writer got (for steady_writer)
WRITERS: list[LogWriter] = []  # the fit's log writer (its segments written before the fit hands its turn on)
_IN_PASS = threading.local()  # inside the tracker's own passes, on this thread: their hook work is "passes"


def _counted(fn: Callable[..., Any], key: str) -> Callable[..., Any]:
    def counted(*args: Any, **kwargs: Any) -> Any:
        in_pass = getattr(_IN_PASS, "on", False)
        if key == "hooks" and in_pass:
            return fn(*args, **kwargs)
        t0 = time.thread_time()
        _IN_PASS.on = in_pass or key == "passes"
        try:
            return fn(*args, **kwargs)
        finally:
            _IN_PASS.on = in_pass
            SPENT[key] += time.thread_time() - t0
    return counted


for _hook in _PER_STEP_HOOKS:
    setattr(InfluenceTracker, _hook, _counted(getattr(InfluenceTracker, _hook), "tracker"))
OwnPasses.grads = _counted(OwnPasses.grads, "passes")  # the HVP scheme's gradient passes
OwnPasses.hvp_products = _counted(OwnPasses.hvp_products, "fd")  # the passes and the finite differences around them
for _engine in {type(e) for e in layers._ENGINES}:  # what the forward hooks keep, the output-gradient hooks' blocks
    for _method in ("save", "blocks"):
        if _method in vars(_engine):
            setattr(_engine, _method, _counted(vars(_engine)[_method], "hooks"))
LogWriter._write = _counted(LogWriter._write, "writer")
_add_step = LogWriter.add_step


def _kept(self: LogWriter, record: StepRecord, checkpoint: Any = None) -> None:
    if not WRITERS:
        WRITERS.append(self)
    RECORDS.append(record)
    _add_step(self, record, checkpoint)


LogWriter.add_step = _kept
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
clock = time.process_time  # --clock: CPU time of this process (all its threads) resists the other jobs of a busy box
LEVELS = {
    "ids+lr": dict(record_losses=False),
    "+losses": dict(record_losses=True),
    "+proj. gradients k=256": dict(record_losses=True, record_gradients=True, projection_dim=K),
    "+HVP forward": dict(record_losses=True, record_gradients=True, projection_dim=K, record_hvp=True,
                         hvp_scheme="forward"),
    "+HVP central": dict(record_losses=True, record_gradients=True, projection_dim=K, record_hvp=True),
}
# glibc's heap neither trimmed after large frees nor bypassed by mmap below 32 MiB: the page faults of a heap that
# shrinks and grows back every step (a CNN's activations) are gone, in the fits with and without the tracker alike
KEEP_HEAP = "glibc.malloc.trim_threshold=4294967296:glibc.malloc.mmap_threshold=33554432"
TARGETS = {"+losses": 1.05, "+proj. gradients k=256": 1.15, "+HVP forward": 2.3, "+HVP central": 3.3}


def _fastest(fns: dict[str, Callable[[], Any]], reps: int) -> dict[str, float]:
    """Milliseconds of each function, fastest of ``reps`` alternating calls (after one warm-up each)."""
    for fn in fns.values():
        fn()
    best = {k: float("inf") for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = clock()
            fn()
            best[k] = min(best[k], 1e3 * (clock() - t0))
    return best


def read_floor(module: pl.LightningModule, batch: Any, names: list[str], reps: int) -> dict[str, float]:
    """What bounds the hooks from below: the MiB a step they read at least (every hooked call's input and output
    gradient, the size of its output, each read once) and how fast one core reads memory out of cache, GB/s: streamed
    (a sum) and by a side projection ``(4096, 512) @ (512, 16)`` (a GEMM, which copies its input into panels first);
    fastest of ``reps``, each after writing 256 MiB elsewhere."""
    owners = capture_owners(module)
    hooked = {id(mod): mod for n in names for _, mod, _ in owners[n]}
    read = [0]

    def count(mod: torch.nn.Module, args: tuple, out: Any) -> None:
        read[0] += sum(t.nbytes for t in (args[0], out) if isinstance(t, torch.Tensor))

    handles = [mod.register_forward_hook(count) for mod in hooked.values()]
    with torch.no_grad():
        module.per_sample_loss(batch)
    for handle in handles:
        handle.remove()
    x, p, evict = torch.randn(4096, 512), torch.randn(512, 16), torch.empty(64 << 20)

    def rate(fn: Callable[[], Any]) -> float:
        best = float("inf")
        for _ in range(reps):
            evict.fill_(1.0)
            t0 = clock()
            fn()
            best = min(best, clock() - t0)
        return x.nbytes / best / 1e9

    return {"hook_read_mib": read[0] / 2**20, "streamed_gb_s": rate(x.sum), "projected_gb_s": rate(lambda: x @ p)}


def step_costs(name: str, reps: int) -> dict[str, float]:
    """Floor, hooks, projection, own pass and vmap per step of model ``name`` (ms), and samples/s."""
    factory, ds, batch_size = make(name, 1)
    torch.manual_seed(0)
    module = factory()
    batch = next(iter(DataLoader(ds, batch_size=batch_size)))[:-1]  # without the ids
    names = select_params(module)
    projector = KroneckerProjector({n: p.shape for n, p in module.named_parameters() if n in names}, K,
                                   fold=foldable_biases(module, names))  # the tracker's layout (fold_bias=True)
    capture = choose_engine(module, names, projector, "auto")[0]  # the tracker's (a raw parameter: capture/raw_params.py)
    loss_fn = type(module).per_sample_loss
    loss_grad = torch.full((batch_size,), 1.0 / batch_size)

    def floor() -> None:
        module.zero_grad(set_to_none=True)
        module.per_sample_loss(batch).mean().backward()

    def hooked() -> None:
        module.zero_grad(set_to_none=True)
        capture.enable()
        capture.watch(batch_size)
        loss = module.per_sample_loss(batch).mean()
        capture.unwatch()
        loss.backward()
        capture.disable()

    def hooked_collect() -> None:
        hooked()
        capture.collect(loss_grad)

    timed = {"floor": floor}
    if capture is not None:  # else every parameter is vmap's: no hook columns (NaN)
        timed.update({"hooked": hooked, "hooked+collect": hooked_collect,
                      "own hooked pass": lambda: per_sample_grads_hooks(module, loss_fn, batch, capture)})
    ms = collections.defaultdict(lambda: float("nan"), _fastest(timed, reps))
    ms["vmap"] = _fastest({"vmap": lambda: per_sample_grads_vmap(module, loss_fn, batch, names, projector)},
                          max(1, reps // 2))["vmap"]
    if capture is not None:
        capture.remove()
    return {
        "batch": batch_size,
        "floor_ms": ms["floor"],
        "hooks_in_step_ms": ms["hooked"] - ms["floor"],
        "projection_ms": ms["hooked+collect"] - ms["hooked"],
        "own_pass_ms": ms["own hooked pass"],
        "vmap_ms": ms["vmap"],
        "hooks_samples_per_s": 1e3 * batch_size / ms["own hooked pass"],
        "vmap_samples_per_s": 1e3 * batch_size / ms["vmap"],
        **read_floor(module, batch, names, reps),
    }


class _Turns:
    """A round's fits take ``steps`` steps each in turn, each in its own process, so that every level sees the same
    moments of a shared machine (its load, its clock speed) within a fraction of a second: whole fits one after another
    saw different moments, whose ±10% moved a level's ratio more than the 5% it is judged by. Each fit has a process of
    its own, as a user's run does: a fresh heap (the allocator's history moved a CNN's step by several percent from one
    fit to the next in one process) and the main thread's. Several steps a turn: a turn's first step finds the caches
    holding another fit's model. A fit hands its turn on once its log writer has written the segments it closed
    (``LogWriter.drain``), so that its writer runs on its own time, not on the next fit's."""

    def __init__(self, ctx: Any, n: int, steps: int) -> None:
        self.steps, self._n = steps, n
        self._cond = ctx.Condition()
        self._turn = ctx.Value("i", 0, lock=False)
        self._left = ctx.Array("b", [1] * n, lock=False)

    def wait(self, i: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._turn.value == i)

    def done(self, i: int, finished: bool = False) -> None:
        """Fit ``i`` has taken its turn's steps (``finished``: its last, or it failed): the next fit still running takes
        its turn. A fit that finishes out of its turn (it failed before it) only leaves the round."""
        with self._cond:
            if finished:
                self._left[i] = 0
            if self._turn.value == i:
                self._turn.value = next((j % self._n for j in range(i + 1, i + 1 + self._n) if self._left[j % self._n]),
                                        -1)
                self._cond.notify_all()


class _Fit(pl.Callback):
    """A round's fit (first in its callback list): at a step's start it hands the turn on after its turn's steps and
    waits for its next one; it marks every step's start with ``(its wall time while it held the turn, its thread's CPU
    time, its thread's minor page faults, SPENT)``."""

    def __init__(self, turns: _Turns, index: int) -> None:
        self.turns, self.index = turns, index
        self.marks: list[tuple[float, float, int, dict[str, float]]] = []
        self._wall = 0.0
        self._since: float | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._since is None or len(self.marks) % self.turns.steps == 0:
            if self._since is not None:
                for writer in WRITERS:  # its segments written on its own time, not in the next fit's turn
                    writer.drain()
                self._wall += time.perf_counter() - self._since
                self.turns.done(self.index)
            self.turns.wait(self.index)
            self._since = time.perf_counter()
        self.marks.append((self._wall, time.thread_time(), resource.getrusage(resource.RUSAGE_THREAD).ru_minflt,
                           dict(SPENT)))


def _one_fit(name: str, level: str, index: int, steps: int, warmup: int, log_dir: Path, turns: _Turns,
             results: Any) -> None:
    """A round's fit at ``level``, in a process of its own (:func:`run_round`); puts ``(index, what run_round returns
    for it)`` or ``(index, the traceback)`` on ``results``."""
    try:
        factory, ds, batch_size = make(name, 8)  # 8 batches an epoch: the fits run over epochs
        data = DataLoader(ds, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
        pl.seed_everything(0, verbose=False)
        module, fit = factory(), _Fit(turns, index)
        tracker = None if level == "baseline" else InfluenceTracker(str(log_dir), **LEVELS[level])
        trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[fit, tracker] if tracker else [fit])
        t0 = time.thread_time()
        trainer.fit(module, data)
        turns.done(index, finished=True)
        total = time.thread_time() - t0 + SPENT["writer"]
        (w_a, t_a, f_a, s_a), (w_b, t_b, f_b, s_b) = fit.marks[warmup], fit.marks[-1]
        n = len(fit.marks) - 1 - warmup
        spent = {key: (s_b[key] - s_a[key]) / n for key in SPENT_KEYS}
        main_step = (t_b - t_a) / n
        step = main_step if clock is time.process_time else (w_b - w_a) / n
        if tracker is not None and clock is time.process_time:  # the writer of a long fit (docstring)
            spent["writer"] = steady_writer(RECORDS, main_step, tracker.storage_dtype)
            step += spent["writer"]
        results.put((index, {"fit": total, "step": step, "main": main_step, "faults": (f_b - f_a) / n, "spent": spent}))
    except BaseException:  # noqa: BLE001 - reported by run_round
        turns.done(index, finished=True)
        results.put((index, traceback.format_exc()))


def run_round(name: str, levels: list[str], steps: int, warmup: int, tmp: Path, turn: int = 1
              ) -> dict[str, dict[str, Any]]:
    """One fit per level (``"baseline"``: without the tracker), each in a process of its own, in turns of ``turn``
    steps (:class:`_Turns`). Per level: ``fit`` (CPU seconds of the whole fit, its writer's included), ``step``
    (seconds per step on ``clock``: CPU, the training thread's plus the writer of a long fit, or wall time while the
    fit held its turn), ``main`` (the training thread's CPU seconds per step), ``spent`` (SPENT_KEYS seconds per
    step); per step: the mean over the steps after ``warmup`` (from the start of step ``warmup`` to the start of the
    last step)."""
    ctx = multiprocessing.get_context("fork")  # the children inherit this module's instrumentation and settings
    turns, results = _Turns(ctx, len(levels), turn), ctx.SimpleQueue()
    procs = [ctx.Process(target=_one_fit, args=(name, level, i, steps, warmup, tmp / f"log-{i}", turns, results),
                         name=f"fit-{level}") for i, level in enumerate(levels)]
    for proc in procs:
        proc.start()
    got = dict(results.get() for _ in procs)
    for proc in procs:
        proc.join()
    for i in range(len(levels)):
        shutil.rmtree(tmp / f"log-{i}", ignore_errors=True)
    failed = [f"{levels[i]}:\n{r}" for i, r in sorted(got.items()) if isinstance(r, str)]
    if failed:
        raise RuntimeError("a benchmark fit failed:\n" + "\n".join(failed))
    return {level: got[i] for i, level in enumerate(levels)}


def steady_writer(records: list[StepRecord], step_seconds: float, storage_dtype: str) -> float:
    """Writer thread CPU seconds per step of a long fit: one segment as the tracker's default limits close it (open
    ``flush_every_n_seconds``, or ``SEGMENT_BYTES`` of rows) written from this fit's records (cycled, renumbered),
    fastest of 3, over its steps."""
    per_row = max(1, np.dtype(storage_dtype).itemsize * sum(np.size(r) for r in (records[0].grads, records[0].hvps)
                                                             if r is not None))
    seconds = inspect.signature(InfluenceTracker).parameters["flush_every_n_seconds"].default
    n = max(1, min(math.ceil(seconds / step_seconds), math.ceil(SEGMENT_BYTES / per_row)))
    segment = [dataclasses.replace(records[i % len(records)], step=i) for i in range(n)]
    best = float("inf")
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(3):
            t0 = time.thread_time()
            write_segment(Path(tmp) / f"seg-{i}.h5", 0, segment, [], np.dtype(storage_dtype), None)
            best = min(best, time.thread_time() - t0)
    return best / n


def fit_overhead(name: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Rounds of pairs: per round and level, that level's fit and one without the tracker taking steps in turn (which
    goes first alternates); the level's step over its pair's step without the tracker. Pairs, not all levels in one
    round: with six fits in turns (the GPT's), the one without the tracker ran 5% slower than the same fit beside one
    other, so every level looked cheaper than it was."""
    levels = [lv for lv in LEVELS if lv in args.levels]
    got: dict[str, list[dict[str, Any]]] = {k: [] for k in levels}  # per round: the level's fit
    base: dict[str, list[dict[str, Any]]] = {k: [] for k in levels}  # per round: its pair's fit without the tracker
    run_round(name, ["baseline"], 2, 0, tmp)  # warm-up
    for r in range(args.rounds):
        for i, level in enumerate(levels):
            pair = ["baseline", level] if (r + i) % 2 == 0 else [level, "baseline"]
            fits = run_round(name, pair, args.steps, args.warmup, tmp, args.turn)
            got[level].append(fits[level])
            base[level].append(fits["baseline"])
        print(f"  {name}: round {r + 1}/{args.rounds} done", file=sys.stderr)
    rows = []
    for level in levels:
        mine, theirs = got[level], base[level]
        ratios = [a["step"] / b["step"] for a, b in zip(mine, theirs)]
        on_main = [a["main"] / b["main"] for a, b in zip(mine, theirs)]
        added = [1e3 * (a["step"] - b["step"]) for a, b in zip(mine, theirs)]
        threads = {f"{key}_ms_per_step": statistics.median(1e3 * a["spent"][key] for a in mine) for key in SPENT_KEYS}
        rows.append({**threads,
            "level": level, "ratio": statistics.median(ratios), "ratio_low": min(ratios), "ratio_high": max(ratios),
            "round_ratios": ratios, "target": TARGETS.get(level), "added_ms_per_step": statistics.median(added),
            "thread_ratio": statistics.median(on_main), "thread_ratio_low": min(on_main),
            "thread_ratio_high": max(on_main), "thread_round_ratios": on_main,
            "fit_ratio": min(a["fit"] for a in mine) / min(b["fit"] for b in theirs),
            "faults_per_step": statistics.median(a["faults"] for a in mine),
            "step_s": [a["step"] for a in mine], "baseline_step_s": [b["step"] for b in theirs],
            "training_thread_step_s": [a["main"] for a in mine],
            "baseline_training_thread_step_s": [b["main"] for b in theirs],
        })
    baselines = [b for lv in levels for b in base[lv]]
    return {"baseline_ms_per_step": 1e3 * statistics.median(b["step"] for b in baselines), "levels": rows,
            "baseline_faults_per_step": statistics.median(b["faults"] for b in baselines)}


def where_it_goes(row: dict[str, Any]) -> dict[str, float]:
    """Added ms/step of a level split into hooks, HVP passes, the finite differences around them, the tracker's hooks'
    other work, the writer and other
    (all but ``other`` measured in the fits, as thread CPU)."""
    hooks, passes, fd, tracker, writer = (row[f"{k}_ms_per_step"] for k in ("hooks", "passes", "fd", "tracker", "writer"))
    return {"hooks": hooks, "passes": passes, "fd": fd - passes, "tracker": tracker - fd, "writer": writer,
            "other": row["added_ms_per_step"] - hooks - tracker - writer}


def report(name: str, costs: dict[str, float], fits: dict[str, Any]) -> None:
    c = costs
    print(f"\n{name} (batch {c['batch']}): floor fwd+bwd {c['floor_ms']:.1f} ms; Lightning step without tracker "
          f"{fits['baseline_ms_per_step']:.1f} ms, {fits['baseline_faults_per_step']:.0f} page faults")
    print(f"  hooks during fwd/bwd +{c['hooks_in_step_ms']:.2f} ms, projection of the captures {c['projection_ms']:.2f} ms, "
          f"own hooked pass {c['own_pass_ms']:.1f} ms, vmap {c['vmap_ms']:.1f} ms")
    print(f"  per-sample gradients: hooks {c['hooks_samples_per_s']:.0f} samples/s, vmap {c['vmap_samples_per_s']:.0f} "
          f"samples/s ({c['vmap_ms'] / c['own_pass_ms']:.1f}x)")
    mib, proj = c["hook_read_mib"], next((r for r in fits["levels"] if r["level"] == "+proj. gradients k=256"), None)
    print(f"  hooks read {mib:.1f} MiB a step at least: {mib * 1.048576 / c['streamed_gb_s']:.1f} ms streamed "
          f"({c['streamed_gb_s']:.1f} GB/s out of cache), {mib * 1.048576 / c['projected_gb_s']:.1f} ms at a side "
          f"projection's {c['projected_gb_s']:.1f} GB/s" + (f"; in the fits {proj['hooks_ms_per_step']:.1f} ms" if proj else ""))
    print(f"  {'level':<24}{'ratio':>7}{'spread':>13}{'target':>8}{'met':>5}{'+ms/step':>10}"
          f"{'hooks':>8}{'passes':>8}{'fd':>6}{'tracker':>8}{'writer':>8}{'other':>8}{'fit':>7}{'thread':>8}"
          f"{'spread':>13}{'faults':>8}")
    for row in fits["levels"]:
        tgt, split = row["target"], where_it_goes(row)
        met = "-" if tgt is None else ("yes" if row["ratio"] <= tgt else "NO")
        spread = f"{row['ratio_low']:.3f}-{row['ratio_high']:.3f}"
        print(f"  {row['level']:<24}{row['ratio']:>7.3f}{spread:>13}{'-' if tgt is None else f'{tgt:.2f}':>8}{met:>5}"
              f"{row['added_ms_per_step']:>10.2f}{split['hooks']:>8.2f}{split['passes']:>8.2f}{split['fd']:>6.2f}{split['tracker']:>8.2f}"
              f"{split['writer']:>8.2f}{split['other']:>8.2f}{row['fit_ratio']:>7.3f}{row['thread_ratio']:>8.3f}"
              f"{row['thread_ratio_low']:>7.3f}-{row['thread_ratio_high']:.3f}{row['faults_per_step']:>8.0f}")


def machine_info() -> dict[str, str]:
    """The CPU the ratios were measured on: they move with it (the benchmark CNN's step took 55 ms on an AVX2 EPYC and
    32 ms on an AVX-512 Xeon, the tracker's memory-bound work sped up less: ``docs/per-sample-gradients.md``)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "isa": torch.backends.cpu.get_cpu_capability(), "cores": str(os.cpu_count()),
            "torch": torch.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(DEFAULT))
    ap.add_argument("--levels", default=",".join(LEVELS), help="comma-separated level names")
    ap.add_argument("--steps", type=int, default=120, help="steps per fit")
    ap.add_argument("--warmup", type=int, default=10, help="first steps of each fit left out of the per-step time")
    ap.add_argument("--turn", type=int, default=10, help="steps a fit takes before the round's next fit takes its turn")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=list(CLOCKS), default="cpu",
                    help="cpu: process CPU time (default; other jobs on a shared machine barely move it); wall: elapsed")
    ap.add_argument("--keep-heap", action="store_true",
                    help=f"run (every fit, baseline included) with glibc's heap kept: {KEEP_HEAP} (docs/per-sample-gradients.md)")
    ap.add_argument("--out", default="benchmarks/results/overhead.json")
    args = ap.parse_args()
    if args.keep_heap and os.environ.get("GLIBC_TUNABLES") != KEEP_HEAP:  # read by glibc at start: run again with it
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "GLIBC_TUNABLES": KEEP_HEAP})
    args.levels = args.levels.split(",")
    global clock
    clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="li-overhead-"))
    machine = machine_info()
    print(f"machine: {machine['cpu']} ({machine['isa']}), torch {machine['torch']}, {args.threads} thread(s)")
    results = {}
    try:
        for name in args.models.split(","):
            costs = step_costs(name, args.reps)
            fits = fit_overhead(name, args, tmp)
            for row in fits["levels"]:
                row["where_ms_per_step"] = where_it_goes(row)
            results[name] = {"step_costs": costs, **fits}
            report(name, costs, fits)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\ntimes: {args.clock} clock{' (glibc heap kept: ' + KEEP_HEAP + ')' if args.keep_heap else ''}. ratio: a level's step over the step without the tracker, timed inside "
          "fits taking turns of steps (mean over the steps after the warm-up), median over rounds; spread: lowest-highest round; "
          "met: median within the target; per step, thread CPU: hooks: the layer engines in the step's forward/backward; "
          "passes: the HVP scheme's gradient passes; fd: the finite differences around them (eps, perturbed parameters, "
          "differences, kink guard); tracker: the rest of the tracker's per-step hooks (bookkeeping, projection); writer: the log writer's background thread; other: the remainder "
          "(hook dispatch, loss observer, noise); fit: fastest whole fit over the fastest without (per-fit costs in); "
          "thread: the step's critical path, the training thread's CPU per step over the same without the tracker "
          "(the writer's background thread left out; median, spread over rounds); faults: the training thread's minor page "
          "faults per step")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"models": results, "args": vars(args), "machine": machine}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
