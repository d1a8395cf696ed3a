"""A log larger than RAM, reduced in bounded memory (issue #6, scale).

Writes a synthetic log of ``--gb`` GB of projected gradients through the real writer
(``LogWriter``: background thread, CRC-32 per step, fsync, atomic renames), evicts it from
the page cache (``posix_fadvise(DONTNEED)``, no root needed), then in the same run:

1. raw sequential read of the segment files, cold cache, two ways: buffered (8 MiB ``readinto``, through the
   page cache: what ``cat`` or ``dd`` measure) and direct (``O_DIRECT``, 16 MiB: the disk alone); each before
   and after the estimator passes, so a change in the machine's load shows;
2. TracIn (a synthetic query gradient) and TracIn self-influence over the whole log, each in a fresh
   subprocess (cold cache again), sampling its RSS every 20 ms; its peak RSS (``VmHWM``) and
   throughput (sample-steps/s, GB/s; opening the log included) are compared with the raw reads, and
   its CPU seconds per GB (user + system: a figure that depends less on how busy the machine is) are
   reported. The scores are checked against closed forms (rows are drawn from a known pool), so the
   reduction is verified, not only timed;
3. the same with ``--processes`` (default 2) gloo processes (``lightning_influence.distributed``:
   one contiguous shard of steps each, one all-reduce), cold cache again, peak RSS per process;
4. Gauss-Newton DIT (the synthetic query at checkpoint 0) with 1 process and with ``--processes`` processes splitting
   every step's rows (each reads only its rows, one all-reduce per step); the processes' scores are checked against
   the one process's;
5. where the time goes, to tell a CPU-bound from a disk-bound pass: the raw reads again with ``--processes`` readers
   at once (threads, each a contiguous part of the files: what the disk gives several readers), and for every pass
   the main thread's time split from ``/proc/thread-self/schedstat`` into on a CPU, waiting for a CPU (run queue:
   the cores are busy) and neither (blocked: waiting for the disk, or for the other process's all-reduce), with the
   process's CPU seconds (all threads).

Prints a table, writes JSON to ``benchmarks/results/scale.json`` (git-ignored) and deletes
the synthetic data (``--keep`` keeps it). Needs ``--gb`` × 1.05 free disk.

    python benchmarks/scale.py [--gb 30] [--dir /big/disk/tmp] [--k 1024] [--batch 256] [--flush 50] [--processes 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

POOL_ROWS = 4099  # distinct gradient rows (a prime, so step t's rows are a rolling window of the pool)
N_IDS = 1_000_003  # training-set size: ids of step t are (t·B + 0..B-1) mod N
LR = 0.05


def pool(k: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((POOL_ROWS, k)).astype(np.float32)


def query(k: int) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((1, k))


def rows_of(t: int, batch: int) -> np.ndarray:
    return (t * batch + np.arange(batch)) % POOL_ROWS


def ids_of(t: int, batch: int) -> np.ndarray:
    return (t * batch + np.arange(batch)) % N_IDS


def write_log(path: Path, steps: int, k: int, batch: int, flush: int) -> float:
    """The synthetic log through the real writer; returns seconds."""
    from lightning_influence.capture import KroneckerProjector
    from lightning_influence.log import CheckpointRecord, LogWriter, StepRecord
    from lightning_influence.log.writer import write_meta

    write_meta(path, {"dataset_size": N_IDS, "world_size": 1, "run_id": "scale", "first_step": 0,
                      "tracked_params": ["w"], "param_shapes": {"w": [k]}, "every_n_steps": 1,
                      "recorded": {"losses": False, "gradients": True, "hvp": False, "checkpoints": True},
                      "projection": KroneckerProjector({"w": (k,)}, None).to_metadata(),
                      "optimizer": {"class": "torch.optim.sgd.SGD", "param_groups": [{"lr": LR, "params": ["w"]}]}})
    rows = pool(k)
    writer = LogWriter(path, flush_every_n_steps=flush, storage_dtype="float32")
    t0 = time.perf_counter()
    for t in range(steps):
        rec = StepRecord(step=t, epoch=0, batch_idx=t, micro_batches=1, lrs=[LR], ids=ids_of(t, batch),
                         grads=rows[rows_of(t, batch)])
        writer.add_step(rec, CheckpointRecord(0, {"w": np.zeros(k)}) if t == 0 else None)
        if t % 2000 == 0:
            print(f"  writing: step {t}/{steps}", file=sys.stderr, flush=True)
    writer.close()
    return time.perf_counter() - t0


METHODS = ("tracin", "tracin_self_influence", "dit_gauss_newton")
_MARK: dict[str, float] = {}  # a distributed process's clock and counters at its first progress call


def expected_scores(steps: int, k: int, batch: int, method: str = "tracin") -> np.ndarray:
    """TracIn in closed form: Σ_t (η/B) ⟨q, pool[row]⟩ for each id, from the pool's dot products (self-influence:
    Σ_t (η/B) ‖pool[row]‖²)."""
    rows = pool(k).astype(np.float64)
    dots = rows @ query(k)[0] if method == "tracin" else np.einsum("rk,rk->r", rows, rows)
    out = np.zeros(N_IDS)
    for t in range(steps):
        np.add.at(out, ids_of(t, batch), LR / batch * dots[rows_of(t, batch)])
    return out


def evict(files: list[Path]) -> None:
    """Drop the files' pages from the page cache, so reads come from the disk."""
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_read(files: list[Path]) -> tuple[float, int]:
    """Seconds and bytes of reading ``files`` in turn through the page cache (8 MiB ``readinto``)."""
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    total = 0
    t0 = time.perf_counter()
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return time.perf_counter() - t0, total


def raw_read_parallel(files: list[Path], readers: int, read: Callable[[list[Path]], tuple[float, int]]
                      ) -> tuple[float, int]:
    """Seconds and bytes of ``readers`` threads reading ``files`` at once, each a contiguous part of about equal bytes
    with ``read`` (the reads release the GIL): what the disk gives several readers."""
    sizes = np.cumsum([p.stat().st_size for p in files])  # type: ignore[var-annotated]
    parts = [[p for p, end in zip(files, sizes) if r * sizes[-1] / readers < end <= (r + 1) * sizes[-1] / readers]
             for r in range(readers)]
    got: list[tuple[float, int]] = []
    threads = [threading.Thread(target=lambda fs=fs: got.append(read(fs))) for fs in parts if fs]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return time.perf_counter() - t0, sum(n for _, n in got)


def raw_read_direct(files: list[Path]) -> tuple[float, int]:
    """Seconds and bytes of reading ``files`` in turn with ``O_DIRECT`` (16 MiB, page-aligned buffer): the disk alone,
    without the page cache (falls back to buffered reads where the file system refuses ``O_DIRECT``)."""
    import mmap

    view = memoryview(mmap.mmap(-1, 16 << 20))  # anonymous maps are page-aligned
    total = 0
    t0 = time.perf_counter()
    for p in files:
        try:
            fd = os.open(p, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        except OSError:
            fd = os.open(p, os.O_RDONLY)
        try:
            while n := os.readv(fd, [view]):
                total += n
        finally:
            os.close(fd)
    return time.perf_counter() - t0, total


def _status_bytes(field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident since exec) of this process, from /proc."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _rss_bytes() -> int:
    return _status_bytes("VmRSS")


def _sched() -> tuple[float, float, float]:
    """Seconds the main thread has run on a CPU and waited in a run queue for one, and the run-queue seconds of all
    the process's live threads (reader and checksum threads included), from ``/proc/.../schedstat``."""
    def read(path: str) -> tuple[float, float]:
        with open(path) as f:
            on_cpu, waited = f.read().split()[:2]
        return int(on_cpu) / 1e9, int(waited) / 1e9

    try:
        main = read(f"/proc/self/task/{os.getpid()}/schedstat")
        threads = 0.0
        for task in os.listdir("/proc/self/task"):
            try:
                threads += read(f"/proc/self/task/{task}/schedstat")[1]
            except OSError:  # the thread ended meanwhile
                pass
        return main[0], main[1], threads
    except (OSError, ValueError):
        return float("nan"), float("nan"), float("nan")


def _split_time(wall: float, sched0: tuple[float, float, float], sched1: tuple[float, float, float]) -> dict:
    """The main thread's ``wall`` seconds as fractions on a CPU, waiting for one, and blocked (neither); and the
    seconds all threads waited for a CPU per wall second (threads started meanwhile: since their start)."""
    on_cpu, waited = sched1[0] - sched0[0], sched1[1] - sched0[1]
    return {"on_cpu": on_cpu / wall, "run_queue": waited / wall, "blocked": max(0.0, wall - on_cpu - waited) / wall,
            "threads_run_queue": (sched1[2] - sched0[2]) / wall}


def _rank_peak(done: int, total: int) -> None:
    """Progress callback of each process of a distributed reduction: its peak RSS and CPU seconds once its shard is
    done, and from its first progress call to its last (most of its shard) its wall and CPU seconds and where the main
    thread's time went (:func:`_split_time`)."""
    if not _MARK:
        _MARK.update(wall=time.perf_counter(), cpu=time.process_time(), sched=_sched())  # type: ignore[arg-type]
    if done == total:
        from lightning_influence.distributed import global_rank

        wall = time.perf_counter() - _MARK["wall"]
        Path(os.environ["SCALE_RSS_DIR"], f"rank-{global_rank()}.json").write_text(
            json.dumps({"pid": os.getpid(), "peak_rss_bytes": _status_bytes("VmHWM"),
                        "cpu_seconds": sum(resource.getrusage(resource.RUSAGE_SELF)[:2]),
                        "interval_seconds": wall, "interval_cpu_seconds": time.process_time() - _MARK["cpu"],
                        "interval_time": _split_time(wall, _MARK["sched"], _sched()) if wall > 0 else {}}))  # type: ignore[arg-type]


def reduce_distributed(path: Path, k: int, processes: int, method: str) -> dict:
    """``method`` over the log on ``processes`` gloo processes (``lightning_influence.distributed``)."""
    from lightning_influence.distributed import run, sweep

    rss_dir = Path(tempfile.mkdtemp(prefix="scale-rss-"))
    os.environ["SCALE_RSS_DIR"] = str(rss_dir)  # inherited by the spawned processes
    t0 = time.perf_counter()
    if method == "dit_gauss_newton":  # every step's rows split over the processes
        from lightning_influence import InfluenceLog
        from lightning_influence.estimators.gauss_newton import dit_gauss_newton

        with InfluenceLog(path) as log:
            scores = sweep(dit_gauss_newton, log, {0: query(k)}, processes, progress=_rank_peak)
    else:
        scores = run(method, path, {0: query(k)} if method == "tracin" else None, devices=processes, progress=_rank_peak)
    seconds = time.perf_counter() - t0
    per_rank = [json.loads(f.read_text()) for f in sorted(rss_dir.glob("rank-*.json"))]
    shutil.rmtree(rss_dir, ignore_errors=True)
    # seconds: the slowest process's shard (without starting the processes and the final all-reduce); wall: all of it
    reduction = max(r["seconds"] for r in scores.info["per_rank"])
    return {"seconds": reduction, "wall_seconds_with_process_start": seconds, "steps": int(scores.window[1]),
            "processes": processes,
            "per_rank_seconds": [r["seconds"] for r in scores.info["per_rank"]],
            "per_rank_peak_rss_bytes": [r["peak_rss_bytes"] for r in per_rank],
            # CPU of each whole process (its start and imports included: an upper bound on the reduction's)
            "per_rank_cpu_seconds_with_start": [r["cpu_seconds"] for r in per_rank],
            "per_rank_reduction_cpu_seconds": [r.get("cpu_seconds") for r in scores.info["per_rank"]],
            # from each process's first progress call to its last: CPU seconds over wall, and the main thread's time
            "per_rank_interval_cpu_per_wall": [r["interval_cpu_seconds"] / max(r["interval_seconds"], 1e-9)
                                               for r in per_rank],
            "per_rank_time": [r["interval_time"] for r in per_rank],
            **({"per_rank_bytes_read": [r["bytes_read"] for r in scores.info["per_rank"]]}
               if "bytes_read" in scores.info else {}),
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in per_rank), "scores": scores.column(0)}


def reduce(path: Path, k: int, method: str, products: str = "float64") -> dict:
    from lightning_influence import InfluenceLog, tracin, tracin_self_influence
    from lightning_influence.estimators.gauss_newton import dit_gauss_newton

    if method == "dit_gauss_newton":  # torch.func's lazy imports at the first VJP (~1-2 s), outside the timing, as a
        with InfluenceLog(path) as warm:  # spawned process has them from importing Lightning; one step's rows
            dit_gauss_newton(warm, {0: query(k)}, window=(0, 1))
    baseline = _rss_bytes()
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(_rss_bytes())
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cpu0 = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
    sched0 = _sched()
    t0 = time.perf_counter()
    log = InfluenceLog(path)
    t_open = time.perf_counter() - t0
    cpu_open = sum(resource.getrusage(resource.RUSAGE_SELF)[:2]) - cpu0
    last = [0.0]
    end: list = []  # the time and schedstat at the last progress call (the reader threads still alive)

    def progress(done: int, total: int) -> None:
        if done == total:
            end[:] = [time.perf_counter(), _sched()]
        now = time.perf_counter()
        if now - last[0] > 10:
            last[0] = now
            print(f"  reducing: step {done}/{total}", file=sys.stderr, flush=True)

    if method == "tracin":
        scores = tracin(log, {0: query(k)}, progress=progress, products=products)
    elif method == "dit_gauss_newton":
        scores = dit_gauss_newton(log, {0: query(k)}, progress=progress)
    else:
        scores = tracin_self_influence(log, progress=progress, products=products)
    seconds = time.perf_counter() - t0
    time_split = _split_time(end[0] - t0, sched0, end[1]) if end else {}
    stop.set()
    sampler.join()
    log.close()
    return {"seconds": seconds, "open_seconds": t_open, "open_cpu_seconds": cpu_open, "steps": log.num_steps,
            "rss_before_bytes": baseline, "rss_peak_sampled_bytes": max(samples + [baseline]),
            # VmHWM, not ru_maxrss: on Linux ru_maxrss keeps the pre-exec peak of the forked parent
            "peak_rss_bytes": _status_bytes("VmHWM"),
            "cpu_seconds": sum(resource.getrusage(resource.RUSAGE_SELF)[:2]) - cpu0, "time": time_split,
            "scores": scores.column(0)}


def _label(run: str) -> str:
    """``"1"`` -> "1 process", ``"2"`` -> "2 processes", ``"1f32"`` -> "1 process, float32 products"."""
    n = int(run.removesuffix("f32"))
    return f"{n} process{'es' if n > 1 else ''}" + (", float32 products" if run.endswith("f32") else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=30.0, help="size of the gradient rows to write (default 30)")
    parser.add_argument("--dir", default=None, help="where to write the log (default: the system temp dir)")
    parser.add_argument("--k", type=int, default=1024, help="gradient columns per sample (projection dim)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--flush", type=int, default=50, help="steps per segment file")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic log")
    parser.add_argument("--log", default=None, help="reduce this synthetic log (written before with --keep and the "
                        "same --gb/--k/--batch) instead of writing one")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "scale.json"))
    parser.add_argument("--processes", type=int, default=2, help="also reduce with this many processes (default 2)")
    parser.add_argument("--reduce-only", default=None, help=argparse.SUPPRESS)  # internal: the child process
    parser.add_argument("--with-processes", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--method", default="tracin", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--products", default="float64", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reduce_only:
        path = Path(args.reduce_only)
        res = (reduce(path, args.k, args.method, args.products) if args.with_processes == 1
               else reduce_distributed(path, args.k, args.with_processes, args.method))
        np.save(path / f"scores-{args.method}-{args.with_processes}{args.products}.npy", res.pop("scores"))
        print(json.dumps(res))
        return

    row_bytes = args.k * 4
    steps = max(1, int(args.gb * 1e9 / (row_bytes * args.batch)))
    parent = Path(args.dir or tempfile.gettempdir())
    free = shutil.disk_usage(parent).free
    if args.log is None and free < args.gb * 1e9 * 1.05:
        sys.exit(f"scale.py: {parent} has {free / 1e9:.1f} GB free, {args.gb * 1.05:.1f} GB are needed; "
                 "lower --gb or pass --dir on a larger disk")
    mem_total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    work = Path(tempfile.mkdtemp(prefix="influence-scale-", dir=parent)) if args.log is None else None
    log_dir = work / "log" if work is not None else Path(args.log)
    t_write = float("nan")
    try:
        if work is not None:
            print(f"writing {steps} steps × {args.batch} samples × {args.k} float32 columns "
                  f"({steps * args.batch * row_bytes / 1e9:.2f} GB of gradient rows) to {log_dir}", file=sys.stderr)
            t_write = write_log(log_dir, steps, args.k, args.batch, args.flush)
        files = sorted(log_dir.rglob("*.h5"))
        disk_bytes = sum(p.stat().st_size for p in files)
        raws: dict[str, list[float]] = {"buffered": [], "direct": [], "buffered, parallel": [], "direct, parallel": []}

        def raw_reads() -> None:
            for kind, read in (("buffered", raw_read), ("direct", raw_read_direct)):
                evict(files)
                print(f"raw sequential read, {kind} (cold cache)", file=sys.stderr)
                seconds, nbytes = read(files)
                raws[kind].append(nbytes / seconds)
                evict(files)
                print(f"raw read, {kind}, {args.processes} readers at once (cold cache)", file=sys.stderr)
                seconds, nbytes = raw_read_parallel(files, args.processes, read)
                raws[f"{kind}, parallel"].append(nbytes / seconds)

        raw_reads()
        # per method: 1 and N processes with float64 products, then 1 process with float32 products ("1f32")
        runs: dict[str, dict[str, dict]] = {m: {} for m in METHODS}
        for method in METHODS:
            gn = method == "dit_gauss_newton"  # no closed form: the processes' scores against one process's
            want = None if gn else expected_scores(steps, args.k, args.batch, method)
            plan = [(1, "float64"), (args.processes, "float64")] + ([] if gn else [(1, "float32")])
            for processes, products in dict.fromkeys(plan):
                evict(files)
                print(f"{method} with {processes} process(es), {products} products, started fresh (cold cache)",
                      file=sys.stderr)
                child = subprocess.run([sys.executable, __file__, "--reduce-only", str(log_dir), "--k", str(args.k),
                                        "--with-processes", str(processes), "--method", method,
                                        "--products", products], capture_output=True, text=True)
                if child.returncode != 0:
                    sys.exit(f"{method} with {processes} process(es) failed:\n{child.stderr[-3000:]}")
                red = json.loads(child.stdout.strip().splitlines()[-1])
                got = np.load(log_dir / f"scores-{method}-{processes}{products}.npy")
                if want is None:
                    want = got
                red["max_rel_error_vs_closed_form" if not gn else "max_rel_error_vs_one_process"] = float(
                    np.abs(got - want).max() / np.abs(want).max())
                red["products"] = products
                runs[method][f"{processes}" + ("" if products == "float64" else "f32")] = red
        raw_reads()
    finally:
        if work is not None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    gb = 1e9
    sample_steps = steps * args.batch
    raw_speed = {kind: float(np.mean(v)) for kind, v in raws.items()}
    for per_method in runs.values():
        for red in per_method.values():
            speed = disk_bytes / red["seconds"]
            red.update(sample_steps_per_s=sample_steps / red["seconds"], gb_per_s=speed / gb,
                       vs_raw_read=speed / raw_speed["buffered"], vs_raw_direct_read=speed / raw_speed["direct"])
            if "cpu_seconds" in red:  # one process (a distributed one's CPU includes starting it: in the JSON only)
                red["cpu_seconds_per_gb"] = red["cpu_seconds"] / (disk_bytes / gb)
    result = {
        "config": {"gb": args.gb, "k": args.k, "batch": args.batch, "flush": args.flush, "steps": steps,
                   "segments": len(files) - 1, "machine_ram_bytes": mem_total, "cpus": os.cpu_count(),
                   "load_average": os.getloadavg()},
        "log_bytes_on_disk": disk_bytes,
        "write": {"seconds": t_write, "gb_per_s": disk_bytes / t_write / gb},
        "raw_read": {kind: {"gb_per_s_each": [v / gb for v in vs], "gb_per_s": raw_speed[kind] / gb}
                     for kind, vs in raws.items()},
        **{method: {str(p): red for p, red in per.items()} for method, per in runs.items()},
    }
    print(f"\nlog: {disk_bytes / gb:.2f} GB on disk ({steps} steps × {args.batch} samples × {args.k} float32 columns, "
          f"{len(files) - 1} segments); machine RAM {mem_total / gb:.1f} GB, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'phase':<50}{'seconds':>8}{'GB/s':>7}{'of raw':>8}{'of direct':>10}{'sample-steps/s':>16}"
          f"{'CPU s/GB':>9}{'peak RSS/process (GB)':>23}")
    if work is not None:
        print(f"{'write (LogWriter, fsync)':<50}{t_write:>8.1f}{disk_bytes / t_write / gb:>7.2f}{'':>18}"
              f"{sample_steps / t_write:>16,.0f}")
    for kind in raws:
        each = " / ".join(f"{v / gb:.2f}" for v in raws[kind])
        label = (f"raw read, {kind.split(',')[0]}, {args.processes} readers at once" if "parallel" in kind
                 else f"raw sequential read, {kind}")
        print(f"{label:<50}{disk_bytes / raw_speed[kind]:>8.2f}{raw_speed[kind] / gb:>7.2f}"
              f"{raw_speed[kind] / raw_speed['buffered']:>8.0%}{raw_speed[kind] / raw_speed['direct']:>10.0%}"
              f"   (before / after: {each} GB/s)")
    for method, per in runs.items():
        for p, red in per.items():
            rss = red.get("per_rank_peak_rss_bytes", [red["peak_rss_bytes"]])
            print(f"{f'{method}, {_label(p)}':<50}{red['seconds']:>8.2f}{red['gb_per_s']:>7.2f}"
                  f"{red['vs_raw_read']:>8.0%}{red['vs_raw_direct_read']:>10.0%}{red['sample_steps_per_s']:>16,.0f}"
                  + (f"{red['cpu_seconds_per_gb']:>9.2f}" if "cpu_seconds_per_gb" in red else f"{'':>9}")
                  + f"{' '.join(f'{r / gb:.2f}' for r in rss):>23}")
    for method, per in runs.items():
        for p, red in per.items():
            if "open_seconds" in red:
                print(f"{method}, {_label(p)}: opening the log {red['open_seconds']:.2f} s of it "
                      f"({red['open_cpu_seconds']:.2f} s CPU)")
            if "wall_seconds_with_process_start" in red:
                print(f"{method}, {p} processes: {red['wall_seconds_with_process_start']:.1f} s with starting them "
                      f"(imports), per process {', '.join(f'{s:.2f}' for s in red['per_rank_seconds'])} s")
    print("scores vs closed form (Gauss-Newton DIT: vs one process), max rel. error: " + ", ".join(
        f"{method} {_label(p)} {red.get('max_rel_error_vs_closed_form', red.get('max_rel_error_vs_one_process')):.1e}"
        for method, per in runs.items() for p, red in per.items()))
    result["bottleneck"] = bottleneck(runs, raw_speed, args.processes)
    print("\nwhere the time goes (main thread: on a CPU / waiting for a CPU / blocked on the disk, its reader threads or "
          "the other processes; CPU s per wall s and seconds waiting for a CPU per wall s: all threads of the process)")
    for method, per in runs.items():
        for p, red in per.items():
            splits = red.get("per_rank_time", [red.get("time", {})])
            cpu = red.get("per_rank_interval_cpu_per_wall", [red["cpu_seconds"] / red["seconds"]] if "cpu_seconds" in red else [])
            print(f"  {f'{method}, {_label(p)}':<48}" + "; ".join(
                f"{sp.get('on_cpu', float('nan')):.0%} / {sp.get('run_queue', float('nan')):.0%} / "
                f"{sp.get('blocked', float('nan')):.0%}, CPU {c:.2f} s/s, all threads waited "
                f"{sp.get('threads_run_queue', float('nan')):.2f} s/s" for sp, c in zip(splits, cpu)))
    print(result["bottleneck"]["verdict"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


def bottleneck(runs: dict[str, dict[str, dict]], raw_speed: dict[str, float], processes: int) -> dict:
    """For each method with 1 and with ``processes`` processes (float64 products): the share of what the disk gave as
    many readers at once (the faster of the buffered and direct raw reads) that the pass read, and where its time went
    (means over its processes). Disk-bound: at least 80% of the disk's speed; else CPU-bound where its threads waited
    for a core at least 0.3 s per s (the cores are shared) or its main thread was on a CPU or waiting for one at least
    half of the time (computing); else neither (blocked on read latency or the other processes)."""
    gain = {kind: raw_speed[f"{kind}, parallel"] / raw_speed[kind] for kind in ("buffered", "direct")}
    out: dict = {"parallel_read_gain": gain}
    lines = [f"the disk gave {processes} readers at once {gain['direct']:.2f}x (direct) / {gain['buffered']:.2f}x "
             "(buffered) the speed of one"]
    for method, per in runs.items():
        for n in dict.fromkeys([1, processes]):
            red = per.get(str(n))
            splits = [sp for sp in (red.get("per_rank_time", [red.get("time")]) if red else []) if sp]
            if not splits:
                continue
            share = {k: float(np.mean([sp[k] for sp in splits]))
                     for k in ("on_cpu", "run_queue", "blocked", "threads_run_queue")}
            disk = max(raw_speed["buffered" if n == 1 else "buffered, parallel"],
                       raw_speed["direct" if n == 1 else "direct, parallel"])
            of_disk = red["gb_per_s"] * 1e9 / disk
            what = ("disk-bound" if of_disk >= 0.8 else
                    "CPU-bound (cores shared)" if max(share["run_queue"], share["threads_run_queue"]) >= 0.3 else
                    "CPU-bound (computing)" if share["on_cpu"] + share["run_queue"] >= 0.5 else
                    "neither (read latency, the other processes)")
            lines.append(f"{method}, {_label(str(n))}: {of_disk:.0%} of the disk's speed for {n} reader(s); main "
                         f"thread on a CPU {share['on_cpu']:.0%}, waited for a core {share['run_queue']:.0%}, blocked "
                         f"{share['blocked']:.0%}; all "
                         f"threads waited {share['threads_run_queue']:.2f} s per s for a core: {what}")
            out[f"{method}, {n}"] = {**share, "of_disk_speed": of_disk, "verdict": what}
    out["verdict"] = "\n".join(lines)
    return out


if __name__ == "__main__":
    main()
