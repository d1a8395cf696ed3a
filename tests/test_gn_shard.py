"""Gauss-Newton DIT with every step's logged rows split over processes: each reads only its part (log/shares.py)."""

from __future__ import annotations

import os
import shutil
import time
import zlib

import h5py
import numpy as np
import pytest

from conftest import fit, loader, make_data, tiny
from lightning_influence import InfluenceLog, InfluenceTracker
from lightning_influence.distributed import DistributedQueryError, Processes, by_batch, split_for, sweep
from lightning_influence.estimators.gauss_newton import dit_gauss_newton, query_gradients_for
from lightning_influence.log.format import LogFormatError
from lightning_influence.log.shares import RowShares, crc_shift
from lightning_influence.step.shard import BatchShard
from test_distributed import ValLosses, _in_threads, _kill_rank_1


@pytest.fixture(scope="module")
def gn_log(tmp_path_factory):
    """SGD with momentum and weight decay, norm clipping that binds, 2 micro-batches per step (weights differ between
    steps: the last micro-batch of an epoch is short), projected float64 rows, 5 segments."""
    path = tmp_path_factory.mktemp("gn") / "log"
    tracker = InfluenceTracker(str(path), record_gradients=True, projection_dim=5, checkpoint_every_n_steps=3,
                               storage_dtype="float64", flush_every_n_steps=4)
    fit(tiny(momentum=0.9, weight_decay=0.01, lr=0.5), loader(make_data(26, seed=1), batch_size=4), tracker, epochs=3,
        gradient_clip_val=0.05, accumulate_grad_batches=2)
    return str(path)


def test_crc_parts_combine_into_the_crc_of_the_whole():
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, 5000, dtype=np.uint8).tobytes()
    for cuts in ([0, 1700, 1700, 5000], [0, 0, 3, 4999, 5000], [0, 5000]):
        parts = [data[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
        got = 0
        for i, p in enumerate(parts):
            got ^= crc_shift(zlib.crc32(p), sum(len(q) for q in parts[i + 1:]))
        assert got == zlib.crc32(data)
    assert crc_shift(zlib.crc32(b"ab"), 3) == zlib.crc32(b"ab\0\0\0") ^ zlib.crc32(b"\0\0\0")


def _parts(log, world, t):
    shares = [RowShares(log, r, world) for r in range(world)]
    got = [s.read(t) for s in shares]
    for s in shares:
        s.close()
    return got


def test_row_shares_are_the_step_rows_and_check_the_step_crc(gn_log, tmp_path):
    with InfluenceLog(gn_log) as log:
        for rec in log.iter_steps(fields=("grad",)):
            for world in (2, 3):
                parts = _parts(log, world, rec.step)
                np.testing.assert_array_equal(np.concatenate([p.ids for p in parts]), rec.ids)
                np.testing.assert_array_equal(np.concatenate([p.weights for p in parts]), rec.weights)
                np.testing.assert_array_equal(np.concatenate([p.grads for p in parts]), rec.grads)
                assert {p.count for p in parts} == {len(rec.ids)}
                RowShares(log, 0, world).verify(rec.step, sum(p.bits for p in parts))  # passes
        assert min(len(r.ids) for r in log.iter_steps(fields=("grad",))) < 3  # a process without rows in a step
    bad = tmp_path / "bad"
    shutil.copytree(gn_log, bad)
    with InfluenceLog(bad) as log:
        seg, row = log._locs(7)[0]
        path, off = log._segs[seg].path, int(log._segs[seg].table["grad_offset"][row])
    with h5py.File(path, "r+") as f:  # one value of the step's last row: process 1's part of step 7
        n = int(log._segs[seg].table["sample_count"][row])
        f["grads/grad"][off + n - 1, 2] += 1e-9
    with InfluenceLog(bad) as log:
        parts = _parts(log, 2, 7)
        with pytest.raises(LogFormatError, match="'grad' rows of step 7 fail their CRC-32"):
            RowShares(log, 0, 2).verify(7, parts[0].bits + parts[1].bits)
        RowShares(log, 0, 2).verify(6, sum(p.bits for p in _parts(log, 2, 6)))


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar"))


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux's /proc/self/io")
def test_each_process_reads_only_its_part_of_the_rows(tmp_path):
    """Bytes the process asked the kernel for (``rchar``): rank 0 of 2 reads about half of what one process reads."""
    path = tmp_path / "big"
    tracker = InfluenceTracker(str(path), record_gradients=True, storage_dtype="float32", flush_every_n_steps=4)
    fit(tiny(d_in=32, hidden=64), loader(make_data(512, d_in=32, seed=1), batch_size=16), tracker, epochs=3)
    with InfluenceLog(path) as log:
        steps = [t for t in log.steps.tolist() if log.has_grads(t)]
        with h5py.File(sorted(path.glob("rank-0/seg-*.h5"))[0]) as f:  # the values a row stores (its Linear blocks
            width = f["grads/grad"].shape[1]  # as factors: docs/log-format.md, Version 4)
        assert width < len(log.column_groups())
        total = sum(len(log.batch_ids(t)) for t in steps) * (width * 4 + 16)
        read = {}
        for world, rank in ((1, 0), (2, 0), (2, 1)):
            before = _rchar()
            with RowShares(log, rank, world) as shares:
                for t in steps:
                    shares.read(t)
            read[world, rank] = (_rchar() - before, shares.bytes_read)
    assert read[1, 0][1] == total == read[2, 0][1] + read[2, 1][1]  # (stored float32 + id + weight) per row
    assert total > 1 << 20 and read[1, 0][0] >= total
    for rank in (0, 1):
        assert read[2, rank][0] < 0.55 * read[1, 0][0], read


def test_row_split_in_threads_equals_one_process(gn_log):
    """2 and 3 threads standing for processes (the collective a sum over them) against one process, to 1e-12: the
    whole-log sweep over a window (both ends), the local form, precomputed query gradients."""
    with InfluenceLog(gn_log) as log:
        pre, names = query_gradients_for(log, tiny(), ValLosses())
        cases = [({"window": (3, 10)}, ValLosses(), {"module": tiny()}),
                 ({"window": (3, 10), "local": True}, ValLosses(), {"module": tiny()}),
                 ({"window": (5, 12), "query_names_": names}, pre, {})]
        for extra, query, mod in cases:
            want = dit_gauss_newton(log, query, **mod, **extra)
            assert np.abs(want.scores).max() > 1e-6 and "bytes_read" not in want.info
            for world in (2, 3):
                def one(rank, all_reduce):
                    with InfluenceLog(gn_log) as own:
                        shard = BatchShard(rank, world, all_reduce)  # a module each: threads share no parameters
                        return dit_gauss_newton(own, query, shard=shard, **{k: tiny() for k in mod}, **extra)

                got = _in_threads(world, one)
                for g in got:
                    assert g.method == want.method and g.query_names == want.query_names == ["a", "b", "c"]
                    np.testing.assert_allclose(g.scores, want.scores, rtol=1e-12, atol=1e-14 * np.abs(want.scores).max())
                assert sum(g.info["rows_evaluated"] for g in got) == want.info["rows_evaluated"]


def _split_equals_one_process(path, query, worlds=(2, 3)) -> None:
    """Gauss-Newton DIT of ``path`` on ``worlds`` threads standing for processes equals one process to 1e-12."""
    with InfluenceLog(path) as log:
        want = dit_gauss_newton(log, query)
    assert np.abs(want.scores).max() > 1e-6
    for world in worlds:
        def one(rank, all_reduce):
            with InfluenceLog(path) as own:
                return dit_gauss_newton(own, query, shard=BatchShard(rank, world, all_reduce))

        for got in _in_threads(world, one):
            np.testing.assert_allclose(got.scores, want.scores, rtol=1e-12, atol=1e-14 * np.abs(want.scores).max())


def test_row_split_of_a_version_1_log_equals_one_process():
    """A version-1 log (no weight rows: each row weighs 1/|B_t| of the whole step, over the processes' parts)."""
    path = os.path.join(os.path.dirname(__file__), "fixtures", "log_v1")
    with InfluenceLog(path) as log, RowShares(log, 0, 2) as shares:
        assert shares._layout(log._locs(0)[0][0], "weight") is None
        K = len(log.column_groups())
    _split_equals_one_process(path, {0: np.random.default_rng(0).standard_normal((2, K))})


def test_a_corrupted_row_stops_every_process_at_its_step(gn_log, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(gn_log, bad)
    with InfluenceLog(bad) as log:
        seg, row = log._locs(9)[0]
        path, off = log._segs[seg].path, int(log._segs[seg].table["grad_offset"][row])
        pre, names = query_gradients_for(log, tiny(), ValLosses())
    with h5py.File(path, "r+") as f:  # a value of process 0's part of step 9
        f["grads/grad"][off, 0] *= 1.0 + 1e-12

    def one(rank, all_reduce):
        with InfluenceLog(bad) as own:
            try:
                dit_gauss_newton(own, pre, shard=BatchShard(rank, 2, all_reduce))
            except LogFormatError as err:
                return str(err)
        return None

    assert all(e is not None and "'grad' rows of step 9 fail their CRC-32" in e for e in _in_threads(2, one))


def test_sweep_splits_gauss_newton_dit_by_batch_rows_whatever_the_module():
    assert split_for(dit_gauss_newton, tiny(batchnorm=True)) == "batch" == split_for(dit_gauss_newton, None)
    assert split_for(dit_gauss_newton, tiny(), "columns") == "columns"


@pytest.mark.slow
def test_row_split_on_two_gloo_processes_equals_one_process(gn_log):
    """2 gloo processes (``sweep`` picks the row split): each reads half of the row bytes; equal to one process."""
    procs = Processes(devices=2, timeout_s=120)
    with InfluenceLog(gn_log) as log:
        for extra in ({"window": (3, 10)}, {"window": (3, 10), "local": True}):
            want = dit_gauss_newton(log, ValLosses(), module=tiny(), **extra)
            got = sweep(dit_gauss_newton, log, ValLosses(), procs, module=tiny(), **extra)
            assert got.info["split"] == "batch" and got.info["processes"] == 2 and got.query_names == ["a", "b", "c"]
            ranks = got.info["per_rank"]
            assert sum(r["rows"] for r in ranks) == want.info["rows_evaluated"] and min(r["rows"] for r in ranks) > 0
            assert abs(ranks[0]["bytes_read"] - ranks[1]["bytes_read"]) < 0.2 * got.info["bytes_read"]
            np.testing.assert_allclose(got.scores, want.scores, rtol=1e-12, atol=1e-14 * np.abs(want.scores).max())


@pytest.mark.slow
def test_a_killed_process_ends_a_row_split_gauss_newton_dit_with_a_clear_error(gn_log):
    t0 = time.perf_counter()
    with InfluenceLog(gn_log) as log, pytest.raises(DistributedQueryError,
                                                    match=r"dit_gauss_newton \(batch split\) on 2 processes"):
        by_batch(dit_gauss_newton, log, ValLosses(), Processes(devices=2, timeout_s=60), module=tiny(),
                 progress=_kill_rank_1)
    assert time.perf_counter() - t0 < 60


def test_scale_benchmark_parallel_reads_and_bottleneck_verdict(tmp_path):
    """benchmarks/scale.py: N readers at once read every byte once; the verdict follows the measured shares."""
    from benchmarks.scale import _split_time, bottleneck, raw_read, raw_read_parallel

    files = []
    for i, size in enumerate((3000, 5000, 7000, 1)):
        files.append(tmp_path / f"f{i}")
        files[-1].write_bytes(bytes(size))
    for readers in (1, 2, 3):
        assert raw_read_parallel(files, readers, raw_read)[1] == 15001
    split = _split_time(2.0, (1.0, 1.0, 1.0), (1.5, 2.0, 3.0))
    assert split == {"on_cpu": 0.25, "run_queue": 0.5, "blocked": 0.25, "threads_run_queue": 1.0}
    raw = {"buffered": 1e9, "direct": 2e9, "buffered, parallel": 1e9, "direct, parallel": 2e9}
    def t(on_cpu, run_queue, threads):
        return {"on_cpu": on_cpu, "run_queue": run_queue, "blocked": 1 - on_cpu - run_queue, "threads_run_queue": threads}

    runs = {"tracin": {"1": {"gb_per_s": 1.9, "time": t(0.4, 0.5, 0.5)},
                       "2": {"gb_per_s": 0.5, "per_rank_time": [t(0.1, 0.4, 0.6)] * 2}},
            "dit_gauss_newton": {"1": {"gb_per_s": 0.2, "time": t(0.7, 0.2, 0.2)},
                                 "2": {"gb_per_s": 0.2, "per_rank_time": [t(0.15, 0.05, 0.2)] * 2}}}
    out = bottleneck(runs, raw, 2)
    assert out["tracin, 1"]["verdict"] == "disk-bound" and out["tracin, 2"]["verdict"] == "CPU-bound (cores shared)"
    assert out["dit_gauss_newton, 1"]["verdict"] == "CPU-bound (computing)"
    assert out["dit_gauss_newton, 2"]["verdict"].startswith("neither")
    assert out["tracin, 2"]["of_disk_speed"] == pytest.approx(0.25) and out["parallel_read_gain"]["direct"] == 1.0
