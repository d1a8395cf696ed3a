"""Kill-and-resume driver for ``test_robustness.py``: SIGKILL real training processes, resume them, read live.

Run as ``python tests/crash_run.py WORKDIR --seeds 0 1 2``. It imports torch/Lightning once, then
forks one training process per run (the parent never runs torch code, so forking is safe):

1. ``ref``: an uninterrupted fit, the reference log.
2. For each seed: a fit that is SIGKILLed at a random step (a random delay after it, or,
   every other run, inside the next segment write, made slower so the kill lands in it), a
   snapshot of the log as the kill left it,
   a resumed fit (``Trainer.fit(ckpt_path=<newest loadable epoch checkpoint>)``) killed again,
   another snapshot, and a last resumed fit that runs to the end.
3. While children train, the parent opens the log again and again with ``InfluenceLog`` and
   compares every step it sees with the reference (reading while training).

Writes ``WORKDIR/report.json``; ``test_robustness.py`` checks the snapshots and the final logs.
With ``--sigint-at STEP`` it runs the reference and then ``sigint_run`` instead (Ctrl+C on a slow disk,
checked by ``test_reliability.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

N, BATCH, EPOCHS = 24, 6, 8  # 4 steps per epoch, 32 steps


def train(log_dir: Path, ckpt_dir: Path, flush: int, progress: Path | None, slow_write: float,
          hold: tuple[int, Path] | None = None) -> None:
    """One deterministic fit (resumed from the newest loadable checkpoint in ``ckpt_dir``, if any).

    ``hold = (step, path)``: after ``step`` optimizer steps, wait until ``path`` exists (a fit paused mid-run).
    """
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
    from torch.utils.data import DataLoader

    from conftest import make_data, tiny
    from lightning_influence import InfluenceTracker, WithIds
    from lightning_influence.log import writer as writer_mod

    torch.set_num_threads(1)
    if slow_write:
        real_fsync = os.fsync

        def slow_fsync(fd: int) -> None:  # widen the window in which a segment file is written but not yet renamed
            time.sleep(slow_write)
            real_fsync(fd)

        writer_mod.os.fsync = slow_fsync  # (this child process only)

    class Progress(Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            if progress is not None:
                with open(progress, "a") as f:
                    f.write(f"{trainer.global_step}\n")
                time.sleep(0.02)  # steps longer than the parent's polling and live reads: a kill lands before the end
            while hold is not None and trainer.global_step == hold[0] and not hold[1].exists():
                time.sleep(0.01)

    ckpt = newest_checkpoint(ckpt_dir)
    ds = make_data(N)
    loader = DataLoader(WithIds(ds), batch_size=BATCH, sampler=EpochShuffle(N, seed=7))
    tracker = InfluenceTracker(str(log_dir), record_gradients=True, checkpoint_every_n_steps=1, storage_dtype="float64",
                               flush_every_n_steps=flush, overwrite=ckpt is None)
    every_epoch = ModelCheckpoint(dirpath=ckpt_dir, filename="{epoch}-{step}", save_top_k=-1, every_n_epochs=1,
                                  save_on_train_epoch_end=True)
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(max_epochs=EPOCHS, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, deterministic=True, callbacks=[tracker, every_epoch, Progress()])
    trainer.fit(tiny(momentum=0.9), loader, ckpt_path=str(ckpt) if ckpt else None)


class EpochShuffle:
    """A different, seeded permutation every epoch, reproducible after a resume (Lightning calls ``set_epoch``)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(np.random.default_rng(self.seed + self.epoch).permutation(self.n).tolist())

    def __len__(self) -> int:
        return self.n


def newest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest checkpoint that loads; a checkpoint cut off by a kill is deleted."""
    import torch

    for path in sorted(ckpt_dir.glob("*.ckpt"), key=lambda p: int(p.stem.split("step=")[1]), reverse=True):
        try:
            torch.load(path, weights_only=False)
            return path
        except Exception:  # noqa: BLE001 - a partial file written when the kill landed
            path.unlink()
    return None


def run_child(args, log_dir: Path, ckpt_dir: Path, slow_write: float, kill: tuple[int, float, bool] | None, ref) -> dict:
    """Fork a training process and read its log while it runs.

    ``kill = (step, delay, mid_write)``: SIGKILL it ``delay`` seconds after it completes
    ``step`` optimizer steps, or, with ``mid_write``, at the first moment after that when a
    segment file is half-written.
    """
    log_dir.parent.mkdir(parents=True, exist_ok=True)
    progress = log_dir.parent / "progress"
    progress.unlink(missing_ok=True)
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            train(log_dir, ckpt_dir, args.flush, progress, slow_write)
        except BaseException:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    t0 = time.monotonic()
    out: dict = {"reads": [], "read_mismatches": []}
    reached_at = None
    next_read = t0
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            out["exit"] = os.waitstatus_to_exitcode(status)
            out["child_cpu_s"] = round(usage.ru_utime + usage.ru_stime, 2)
            break
        if kill is not None:
            if reached_at is None and last_step(progress) >= kill[0]:
                reached_at = time.monotonic()
            tmp_files = [p.name for p in log_dir.glob("rank-*/*.tmp")] if reached_at is not None else []
            if reached_at is not None and (tmp_files if kill[2] else time.monotonic() - reached_at >= kill[1]):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                out.update(exit="killed", killed_at_s=round(time.monotonic() - t0, 3), tmp_at_kill=tmp_files)
                break
        if ref is not None and time.monotonic() >= next_read:
            live_read(log_dir, ref, out)
            next_read = time.monotonic() + 0.05
        time.sleep(0.005)
    out["completed_steps"] = last_step(progress)
    out["seconds"] = round(time.monotonic() - t0, 3)
    return out


def last_step(progress: Path) -> int:
    """Optimizer steps the child has completed (global_step after its last batch), -1 before the first."""
    try:
        lines = progress.read_text().split()
    except FileNotFoundError:
        return -1
    return int(lines[-1]) if lines else -1


def live_read(log_dir: Path, ref, out: dict) -> None:
    """Open the log being written; the steps it presents beyond those already checked must equal the reference."""
    from lightning_influence import InfluenceLog
    from lightning_influence.log import LogFormatError

    try:
        log = InfluenceLog(log_dir)
    except LogFormatError as err:
        if "disappeared while the log was open" in str(err):  # a resume truncated the log under us: open again
            out["reopened"] = out.get("reopened", 0) + 1
        elif "meta.h5 is missing" not in str(err):
            out["read_mismatches"].append(f"open failed: {err}")
        return
    with log:
        out["reads"].append(log.num_steps)
        checked = out.get("checked", 0)
        out["checked"] = max(checked, log.num_steps)
        for rec in log.iter_steps(checked, fields=("loss", "grad")):
            want = ref[rec.step]
            if not (np.array_equal(rec.ids, want[0]) and np.array_equal(rec.losses, want[1])
                    and np.array_equal(rec.grads, want[2])):
                out["read_mismatches"].append(f"step {rec.step} differs from the reference")


def sigint_run(work: Path, at_step: int) -> dict:
    """Fork a fit whose segment writes are slow (fsync sleeps 0.1 s, a segment per step), SIGINT it at ``at_step``
    while it waits on the full writer queue, and report what it had handed to the writer."""
    log_dir, marks = work / "sigint" / "log", work / "sigint"
    marks.mkdir(parents=True, exist_ok=True)
    progress, accepted, in_put, interrupted = (marks / n for n in ("progress", "accepted", "in_put", "interrupted"))
    pid = os.fork()
    if pid == 0:
        from lightning_influence.log import writer as writer_mod

        add_step, flush = writer_mod.LogWriter.add_step, writer_mod.LogWriter.flush

        def logged_add_step(self, record, checkpoint=None):
            with open(accepted, "a") as f:
                f.write(f"{record.step}\n")
            return add_step(self, record, checkpoint)

        def marked_flush(self, wait=True):
            if not wait:  # from add_step: blocks in queue.put while the queue is full
                in_put.write_text(str(time.monotonic()))
            try:
                return flush(self, wait)
            finally:
                in_put.write_text("")

        writer_mod.LogWriter.add_step, writer_mod.LogWriter.flush = logged_add_step, marked_flush
        import lightning.pytorch as pl

        def on_exception(self, trainer, module, exc):  # where the KeyboardInterrupt landed
            tb, names = exc.__traceback__, []
            while tb is not None:
                names.append(tb.tb_frame.f_code.co_name)
                tb = tb.tb_next
            interrupted.write_text(json.dumps(names))

        pl.Callback.on_exception = on_exception  # (this child only) every callback reports, the Progress one too
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a Ctrl+C as in a terminal (not ignored, as a shell's
        code = 0  # background jobs inherit it)
        try:
            train(log_dir, work / "sigint" / "ckpt", 1, progress, 0.1)
        except SystemExit as err:
            code = err.code if isinstance(err.code, int) else 1
        except BaseException:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            code = 3
        finally:
            os._exit(code)
    while last_step(progress) < at_step or not _waiting_since(in_put, 0.05):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return {"exit": os.waitstatus_to_exitcode(status), "error": "finished before the interrupt"}
        time.sleep(0.005)
    os.kill(pid, signal.SIGINT)
    out = {"exit": os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), "completed_steps": last_step(progress)}
    names = json.loads(interrupted.read_text()) if interrupted.exists() else []
    out["interrupted_in"] = names[-4:]
    out["blocked_in_put"] = "put" in names
    out["accepted"] = int(accepted.read_text().split()[-1]) + 1
    return out


def _waiting_since(marker: Path, seconds: float) -> bool:
    """The child entered ``flush`` (and so ``queue.put``) at least ``seconds`` ago and is still in it."""
    try:
        text = marker.read_text()
    except FileNotFoundError:
        return False
    return bool(text) and time.monotonic() - float(text) >= seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--flush", type=int, default=2)
    parser.add_argument("--kills", type=int, default=2, help="kills per seed before the run is let finish")
    parser.add_argument("--sigint-at", type=int, default=None,
                        help="instead: a reference fit, then one SIGINTed at this step while waiting on a slow disk")
    args = parser.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    # Import everything the children need once, here: forked children share it (imports run no torch kernel,
    # so forking stays safe); otherwise every child would spend seconds importing Lightning.
    import lightning.pytorch  # noqa: F401
    import lightning.pytorch.callbacks  # noqa: F401

    import conftest  # noqa: F401
    from lightning_influence import InfluenceLog, InfluenceTracker  # noqa: F401

    report: dict = {"config": {"n": N, "batch": BATCH, "epochs": EPOCHS, "flush": args.flush}}
    ref_run = run_child(args, work / "ref" / "log", work / "ref" / "ckpt", 0.0, None, None)
    report["ref"] = ref_run
    if args.sigint_at is not None:
        report["sigint"] = sigint_run(work, args.sigint_at)
        (work / "report.json").write_text(json.dumps(report, indent=1))
        return
    with InfluenceLog(work / "ref" / "log") as ref_log:
        ref = {r.step: (r.ids, r.losses, r.grads) for r in ref_log.iter_steps(fields=("loss", "grad"))}
    runs = []
    for seed in args.seeds:
        rng = random.Random(seed)
        base = work / f"seed{seed}"
        for k in range(args.kills + 1):
            last = k == args.kills
            mid_write = bool((seed + k) % 2)
            slow = 0.1 if mid_write else 0.0  # a write window wide enough for a parent descheduled under load
            kill = None if last else (rng.randrange(N // BATCH * EPOCHS), rng.uniform(0.0, 0.03), mid_write)
            info = run_child(args, base / "log", base / "ckpt", slow, kill, ref)
            info.update(seed=seed, round=k, slow_write=slow, kill=kill)
            if not last:
                snap = base / f"after-kill-{k}"
                shutil.copytree(base / "log", snap) if (base / "log").exists() else snap.mkdir()
                info["snapshot"] = str(snap)
            runs.append(info)
            print(json.dumps({k: v for k, v in info.items() if k != "reads"}), file=sys.stderr)
    report["runs"] = runs
    (work / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
