"""The block reader of log-only reductions (log/blocks.py) and TracIn over it, against the per-step reader."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from benchmarks.scale import evict
from lightning_influence import InfluenceLog, LogFormatError, tracin, tracin_self_influence
from lightning_influence.capture import KroneckerProjector
from lightning_influence.estimators.tracin import _row_products
from lightning_influence.log import LogWriter, StepRecord
from lightning_influence.log.blocks import _chunk_index, _row_map, iter_row_blocks
from lightning_influence.log.format import list_segments
from lightning_influence.log.writer import write_meta

K, N = 5, 40


def _write(path, world: int, steps: int = 11, flush: int | tuple[int, ...] = 4, dtype: str = "float32", every: int = 1,
           compression: str | None = None) -> None:
    """Steps with gradients at every ``every``-th step, two param groups, ``world`` ranks of 3 or 4 samples
    (``flush``: steps per segment, or per rank)."""
    rng = np.random.default_rng(7)
    write_meta(path, {"dataset_size": N, "world_size": world, "run_id": "blocks", "tracked_params": ["a", "b"],
                      "param_shapes": {"a": [3], "b": [2]}, "every_n_steps": every,
                      "recorded": {"losses": False, "gradients": True, "hvp": False, "checkpoints": False},
                      "projection": KroneckerProjector({"a": (3,), "b": (2,)}, None).to_metadata(),
                      "optimizer": {"class": "torch.optim.sgd.SGD",
                                    "param_groups": [{"lr": 0.1, "params": ["a"]}, {"lr": 0.3, "params": ["b"]}]}})
    for rank in range(world):
        w = LogWriter(path, rank=rank, flush_every_n_steps=flush if isinstance(flush, int) else flush[rank],
                      storage_dtype=dtype, compression=compression)
        for t in range(steps):
            n = 3 + (t + rank) % 2
            w.add_step(StepRecord(step=t, epoch=0, batch_idx=t, micro_batches=1, lrs=[0.1 / (1 + t), 0.3 + t],
                                  ids=rng.choice(N, n, replace=False),
                                  grads=rng.standard_normal((n, K)) if t % every == 0 else None))
        w.close()


@pytest.mark.parametrize("world,every,compression,cold,preadv", [
    (1, 1, None, True, True), (2, 2, None, True, True), (2, 2, None, False, True), (1, 1, "gzip", True, True),
    (2, 1, "gzip", False, True), (2, 2, None, True, False)])
def test_blocks_hold_the_rows_of_iter_steps(tmp_path, monkeypatch, world, every, compression, cold, preadv):
    """Rows stored as plain bytes are read by the prefetch thread (from the disk, or the page cache when there),
    compressed rows (or any, without os.preadv: Windows) through HDF5; either way a block holds what iter_steps
    reads, over several segments per rank and a partial last segment (11 steps, 4 per segment)."""
    from lightning_influence.log import blocks, prefetch

    monkeypatch.setattr(prefetch, "AVAILABLE", preadv)
    _write(tmp_path, world, every=every, compression=compression)
    with h5py.File(sorted(tmp_path.glob("rank-0/seg-*.h5"))[0]) as f:
        assert (_row_map(f.filename, f["grads/grad"]) is None) == (compression is not None)
    if cold:
        for seg in tmp_path.glob("rank-*/seg-*.h5"):
            evict([seg])
    through_hdf5 = []
    rows_of_steps = blocks._rows_of_steps
    monkeypatch.setattr(blocks, "_rows_of_steps", lambda *a: through_hdf5.append(a[3]) or rows_of_steps(*a))
    with InfluenceLog(tmp_path) as log:
        want = {r.step: r for r in log.iter_steps(0, log.num_steps, fields=("grad",))}
        seen = []
        # tiny blocks (a few rows) and a break at step 5: blocks split inside segments too
        for b in iter_row_blocks(log, 0, log.num_steps, breaks=[5], max_bytes=60):
            assert 5 not in b.steps[1:]
            for i, t in enumerate(b.steps.tolist()):
                rows = b.row_step == i
                r = want[t]
                np.testing.assert_array_equal(b.ids[rows], r.ids)
                np.testing.assert_array_equal(b.grads[rows], r.grads)
                np.testing.assert_array_equal(b.weights[rows], r.weights)
                np.testing.assert_array_equal(b.lrs[i], r.lrs)
                seen.append(t)
        assert seen == sorted(want)
    assert set(through_hdf5) == (set() if compression is None and preadv else {"id", "weight", "grad"})


def test_a_version_1_log_reads_the_same_blocks_through_the_prefetch_thread():
    """Version 1 stores no weights (a plain batch mean): the prefetched blocks still equal iter_steps."""
    from pathlib import Path

    with InfluenceLog(Path(__file__).parent / "fixtures" / "log_v1") as log:
        want = {r.step: r for r in log.iter_steps(0, log.num_steps, fields=("grad",)) if r.grads is not None}
        got = 0
        for b in iter_row_blocks(log, 0, log.num_steps, max_bytes=200):
            for i, t in enumerate(b.steps.tolist()):
                rows = b.row_step == i
                np.testing.assert_array_equal(b.ids[rows], want[t].ids)
                np.testing.assert_array_equal(b.grads[rows], want[t].grads)
                np.testing.assert_array_equal(b.weights[rows], want[t].weights)
                got += 1
        assert got == len(want) > 1


def test_stopping_early_ends_the_prefetch_thread(tmp_path):
    import threading

    _write(tmp_path, 1)
    with InfluenceLog(tmp_path) as log:
        it = iter_row_blocks(log, 0, log.num_steps, max_bytes=60)
        next(it)
        names = {t.name for t in threading.enumerate()}
        assert {"influence-log-prefetch", "influence-log-checksum"} <= names
        it.close()
        assert not any(t.name.startswith("influence-log-") for t in threading.enumerate())


def test_row_products_are_float64_products_of_the_stored_rows():
    rng = np.random.default_rng(0)
    G = rng.standard_normal((301, 7)).astype(np.float16)
    M = rng.standard_normal((7, 3))
    ref = G.astype(np.float64) @ M
    np.testing.assert_allclose(_row_products(G, M), ref, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(_row_products(G, M, square=True), (G.astype(np.float64) ** 2) @ M, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("stored", [np.float16, np.float32, np.float64])
def test_float32_row_products_stay_within_their_stated_bound(stored):
    """(K + 3)·2⁻²⁴·Σ_k |G_rk|·|M_kc| (|G_rk|² squared) around the float64 products; and the bound is not slack by
    orders of magnitude (the float32 products do differ from the float64 ones)."""
    rng = np.random.default_rng(5)
    K = 1024
    G = (rng.standard_normal((513, K)) * np.exp(rng.standard_normal((513, 1)))).astype(stored)
    M = rng.standard_normal((K, 3))
    G64 = G.astype(np.float64)
    odd = np.empty(G.nbytes + 1, np.uint8)[1:].view(G.dtype).reshape(G.shape)  # rows at an odd address, as read
    odd[:] = G  # from an odd file offset
    assert not odd.flags.aligned or G.itemsize == 1
    for square, ref, scale in ((False, G64 @ M, np.abs(G64) @ np.abs(M)), (True, (G64 * G64) @ M, (G64 * G64) @ np.abs(M))):
        for rows in (G, odd):
            got = _row_products(rows, M, square=square, dtype=np.dtype(np.float32))
            assert got.dtype == np.float64
            err = np.abs(got - ref)
            assert np.all(err <= (K + 3) * 2.0 ** -24 * scale)
            assert err.max() > 0
            assert np.all(np.abs(_row_products(rows, M, square=square) - ref) <= 1e-13 * scale)  # float64 path


def test_float32_products_of_tracin_and_self_influence_stay_within_the_bound(tmp_path):
    """The scores with products="float32" against float64: within Σ_terms |η_t w_j|·(K + 3)·2⁻²⁴·Σ_k |g_k||q_k|."""
    _write(tmp_path, 2)
    q = np.random.default_rng(3).standard_normal((2, K))
    with InfluenceLog(tmp_path) as log:
        cols = log.column_groups()
        bound, own_bound = np.zeros((N, 2)), np.zeros(N)
        for r in log.iter_steps(0, log.num_steps, fields=("grad",)):
            G = np.abs(r.grads.astype(np.float64))
            eta = r.lrs[cols]
            np.add.at(bound, r.ids, np.abs(r.weights)[:, None] * (G @ np.abs(q * eta).T))
            np.add.at(own_bound, r.ids, np.abs(r.weights) * ((G * G) @ eta))
        u = (K + 3) * 2.0 ** -24
        for fn, arg, b in ((tracin, {0: q}, bound), (tracin_self_influence, None, own_bound[:, None])):
            exact, fast = fn(log, arg), fn(log, arg, products="float32")
            assert fast.info["products"] == "float32" and exact.info["products"] == "float64"
            assert np.all(np.abs(fast.scores - exact.scores) <= u * b * (1 + 1e-9) + 1e-300)
        with pytest.raises(ValueError, match="products must be 'float64' or 'float32'"):
            tracin(log, {0: q}, products="float16")


@pytest.mark.parametrize("world,every", [(1, 1), (2, 2)])
def test_tracin_and_self_influence_equal_the_per_step_sums(tmp_path, world, every):
    """Σ_t η_{t,group(k)}·every·w_j ⟨q, g_j⟩ per column group, from iter_steps in float64 (two param groups)."""
    _write(tmp_path, world, every=every)
    q = np.random.default_rng(3).standard_normal((2, K))
    with InfluenceLog(tmp_path) as log:
        cols = log.column_groups()
        want, own = np.zeros((N, 2)), np.zeros(N)
        for r in log.iter_steps(0, log.num_steps, fields=("grad",)):
            eta = r.lrs[cols] * every
            G = r.grads.astype(np.float64)
            np.add.at(want, r.ids, r.weights[:, None] * (G @ (q * eta).T))
            np.add.at(own, r.ids, r.weights * ((G * G) @ eta))
        np.testing.assert_allclose(tracin(log, {0: q}).scores, want, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(tracin_self_influence(log).scores[:, 0], own, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dataset", ["grads/grad", "samples/id"])
def test_a_changed_row_inside_a_block_is_refused(tmp_path, dataset):
    _write(tmp_path, 1)
    seg = sorted(tmp_path.glob("rank-0/seg-*.h5"))[1]
    with h5py.File(seg, "r+") as f:  # a well-formed file whose row no longer matches its step's CRC-32
        ds = f[dataset]
        ds[5] = ds[5] + 1
    with InfluenceLog(tmp_path) as log:
        with pytest.raises(LogFormatError, match="fail their CRC-32") as err:
            list(log.iter_blocks(0, log.num_steps))
        assert seg.name in str(err.value)
        with pytest.raises(LogFormatError, match="fail their CRC-32"):
            tracin_self_influence(log)


def test_row_checksum_is_zlibs_crc32_whichever_library_computes_it():
    """format.crc32 (isal when installed) must give zlib's CRC-32: logs stay readable by either."""
    import zlib

    from lightning_influence.log.format import crc32

    rng = np.random.default_rng(1)
    for a in (rng.standard_normal((257, 33)).astype(np.float32), rng.integers(0, 9, 1001), np.zeros(0),
              rng.standard_normal((40, 8))[:, ::2].astype(np.float16), np.arange(3 << 20, dtype=np.uint8)):
        assert crc32(a) == zlib.crc32(np.ascontiguousarray(a).tobytes())


def test_rows_of_chunks_apart_in_the_file_are_read_as_several_runs(tmp_path):
    """HDF5 puts chunk index blocks between small chunks: the row map follows the chunk index, and a step's rows
    that span two runs are checksummed across them."""
    from lightning_influence.log.format import crc32
    from lightning_influence.log.prefetch import Prefetcher, ReadJob

    ids = np.random.default_rng(4).integers(0, 10**6, 12800)
    path = tmp_path / "ids.h5"
    with h5py.File(path, "w", libver=("v110", "v110"), rdcc_nbytes=0) as f:  # chunks of two datasets in turn
        a = f.create_dataset("id", shape=(0,), dtype=np.int64, chunks=(800,), maxshape=(None,))
        b = f.create_dataset("other", shape=(0,), dtype=np.int64, chunks=(800,), maxshape=(None,))
        for k in range(16):
            for ds, data in ((a, ids), (b, -ids)):
                ds.resize((800 * (k + 1),))
                ds[800 * k:] = data[800 * k: 800 * (k + 1)]
    with h5py.File(path, "r") as f:
        where = _row_map(path, f["id"])
    with h5py.File(path, "r") as f:  # the one-pass chunk index equals HDF5's answer chunk by chunk
        ds = f["id"]
        by_chunk = [ds.id.get_chunk_info(i) for i in range(ds.id.get_num_chunks())]
        assert _chunk_index(ds) == sorted((i.chunk_offset[0], i.byte_offset, i.size) for i in by_chunk)
    runs = where.byte_runs(700, 12000)
    assert len(runs) > 1 and sum(n for _, n in runs) == 11300 * 8
    with Prefetcher() as pre:
        job = pre.submit(ReadJob([(path, a, n) for a, n in runs], [[(0, 0, runs[0][1]), (1, 0, 8)]]))
        views, crcs = pre.result(job)
    np.testing.assert_array_equal(np.concatenate(views).view(np.int64), ids[700:12000])
    assert crcs == [crc32(ids[700:700 + runs[0][1] // 8 + 1])]


@pytest.mark.parametrize("cold,direct", [(True, True), (False, True), (True, False)])
def test_plain_runs_are_read_by_the_prefetch_thread_and_unplain_layouts_are_declined(tmp_path, cold, direct):
    """Rows found where _row_map says (spanning chunks, at unaligned offsets), read by the Prefetcher from the
    disk (O_DIRECT or buffered) or from the page cache; a row split over chunks or a foreign byte order is not a
    plain run; a run past the end of the file is refused naming the file."""
    from lightning_influence.log.format import crc32
    from lightning_influence.log.prefetch import Prefetcher, ReadJob

    rows = np.random.default_rng(2).standard_normal((500, 60)).astype(np.float32)
    path = tmp_path / "a.h5"
    with h5py.File(path, "w", libver=("v110", "v110")) as f:
        f.create_dataset("plain", data=rows, chunks=(70, 60), maxshape=(None, 60))
        f.create_dataset("narrow", data=rows, chunks=(7, 30))  # a row split over two chunks
        f.create_dataset("swapped", data=rows.astype(">f4"), chunks=(7, 60))  # not native byte order
    with h5py.File(path, "r") as f:
        where = _row_map(path, f["plain"])
        assert _row_map(path, f["narrow"]) is None and _row_map(path, f["swapped"]) is None
    assert len(where.byte_runs(0, 500)) == 1  # eight chunks back to back
    base = int(where.offsets[0])
    if cold:
        evict([path])
    row = 60 * 4
    with Prefetcher(depth=1, direct=direct) as pre:  # three runs into one buffer, the ring reused twice
        for lo, hi in [(13, 441), (3, 5), (499, 500), (0, 500)] * 2:
            job = pre.submit(ReadJob([(path, base + lo * row, (hi - lo) * row), (path, base + 3 * row, 2 * row),
                                      (path, base, 0)], [[(0, 0, row)], [(1, row, 2 * row)], [(2, 0, 0)]]))
            views, crcs = pre.result(job)
            np.testing.assert_array_equal(views[0].view(np.float32).reshape(-1, 60), rows[lo:hi])
            np.testing.assert_array_equal(views[1].view(np.float32).reshape(-1, 60), rows[3:5])
            assert crcs == [crc32(rows[lo]), crc32(rows[4]), 0]
            assert len(views[2]) == 0
        assert not pre._undirect  # this file system took the direct reads
        with pytest.raises(LogFormatError, match="a.h5: cannot read gradient rows.*ends 240 bytes before"):
            pre.result(pre.submit(ReadJob([(path, path.stat().st_size - row, 2 * row)])))


@pytest.mark.parametrize("streams", [1, 2, 3])
def test_long_runs_are_read_from_the_disk_in_parts_and_cached_runs_from_the_cache(tmp_path, monkeypatch, streams):
    """Runs of >= 1 MiB not in the page cache are read with O_DIRECT, in ``_STREAMS`` parts at once, whatever their
    alignment; the bytes equal the file's (read with O_DIRECT in the parts ``_read_span`` was asked for: whether
    pages stay out of the cache cannot be asserted, a RWF_NOWAIT probe may start the kernel's read-ahead), a cached
    run is
    copied from the cache even when its first pages are not cached, and a run past the end of the file is refused
    naming the file, from whichever part the file ends in."""
    import os

    from lightning_influence.log import prefetch
    from lightning_influence.log.format import crc32
    from lightning_influence.log.prefetch import Prefetcher, ReadJob

    if prefetch._DIRECT is None or prefetch._NOWAIT is None:
        pytest.skip("needs Linux's O_DIRECT and RWF_NOWAIT")
    monkeypatch.setattr(prefetch, "_STREAMS", streams)
    data = np.random.default_rng(3).integers(0, 256, (7 << 20) + 1234, dtype=np.uint8)
    path = tmp_path / "rows.bin"
    data.tofile(path)
    size = len(data)
    runs = [(4097, (3 << 20) + 5), (0, 1 << 20), (size - (2 << 20) - 77, (2 << 20) + 77)]  # unaligned, exact, to the end
    evict([path])
    spans = []
    read_span = prefetch._read_span
    monkeypatch.setattr(prefetch, "_read_span", lambda *a: spans.append(a[3:]) or read_span(*a))
    with Prefetcher(depth=1) as pre:
        views, crcs = pre.result(pre.submit(ReadJob([(path, a, n) for a, n in runs], [[(0, 0, 5000)]])))
        for (a, n), view in zip(runs, views):
            np.testing.assert_array_equal(view, data[a:a + n])
        assert crcs == [crc32(data[4097:4097 + 5000])] and not pre._undirect
        # each run in min(streams, MiB) parts, from its page on, back to back, each but the last page-aligned
        parts = [min(streams, (a % 4096 + n) >> 20) for a, n in runs]
        assert len(spans) == sum(parts)
        for (a, n), k in zip(runs, parts):
            mine, spans = sorted(spans[:k]), spans[k:]
            assert mine[0][0] == a - a % 4096 and mine[-1][1] == a + n
            assert all(x[1] == y[0] and x[1] % 4096 == 0 for x, y in zip(mine, mine[1:]))
        with open(path, "rb") as f:  # the last 1.5 MiB now cached, the first part of the run not
            f.seek(size - (3 << 19))
            f.read()
        views, _ = pre.result(pre.submit(ReadJob([(path, size - (3 << 20), 3 << 20)])))
        np.testing.assert_array_equal(views[0], data[size - (3 << 20):])
        tail = size - (3 << 20)  # its uncached start: all of it read from the disk, the cached tail too
        assert min(spans)[0] == tail - tail % 4096 and max(spans)[1] == size
        spans.clear()
        evict([path])
        with open(path, "rb") as f:  # all of it cached: copied from the cache
            f.read()
        monkeypatch.setattr(prefetch, "_read_span", lambda *a: spans.append(a[3:]) or a[3])
        views, _ = pre.result(pre.submit(ReadJob([(path, 5, 5 << 20)])))
        np.testing.assert_array_equal(views[0], data[5:5 + (5 << 20)])
        assert spans == []
        monkeypatch.undo()
        monkeypatch.setattr(prefetch, "_STREAMS", streams)
        evict([path])
        with pytest.raises(LogFormatError, match="rows.bin: cannot read gradient rows.*ends 4096 bytes before"):
            pre.result(pre.submit(ReadJob([(path, size - (3 << 20), (3 << 20) + 4096)])))


def test_the_small_rows_of_a_segment_and_the_next_are_asked_for_once_before_they_are_read(tmp_path, monkeypatch):
    """Ids and weights (a few bytes a row, one short read each per block) are asked from the kernel for the whole
    segment, and for the rank's next segment, once, before any block of that segment is submitted."""
    from lightning_influence.log import blocks, rows

    _write(tmp_path, 2)
    asked, order = [], []
    monkeypatch.setattr(rows, "will_need", lambda path, offset=0, length=0, tail=0: asked.append(
        (path, offset, length)) if tail == 0 else None)  # (tail: the segments' metadata, asked at open)
    submit = blocks.Prefetcher.submit
    monkeypatch.setattr(blocks.Prefetcher, "submit", lambda self, job: order.append(
        ({path for path, _, _ in job.runs}, len(asked))) or submit(self, job))  # asked for when its read is queued
    with InfluenceLog(tmp_path) as log:
        for _ in iter_row_blocks(log, 0, log.num_steps, max_bytes=60):
            pass
        segs = list(log._segs)
    stored = 0
    for s in segs:  # each small dataset of each segment: one ask covering all its rows
        with h5py.File(s.path) as f:
            for name in ("samples/id", "samples/weight"):
                if name not in f:  # weights: stored where a step's are not a plain batch mean
                    continue
                stored += 1
                where = _row_map(s.path, f[name])
                lo, hi = int(where.offsets.min()), int(where.offsets.max()) + where.per_chunk * where.row
                mine = [(o, n) for p, o, n in asked if p == s.path and o <= lo and o + n >= hi]
                assert len(mine) == 1, (s.path, name)
    assert len(asked) == stored >= len(segs) > 4
    assert len(order) > 4
    for paths, n_asked in order:  # every segment of a read (and the next of its rank) asked for before it
        for path in paths:
            i = next(i for i, s in enumerate(segs) if s.path == path)
            nxt = [segs[i + 1].path] if i + 1 < len(segs) and segs[i + 1].rank == segs[i].rank else []
            assert {p for p, _, _ in asked[:n_asked]} >= {path, *nxt}


def test_opening_a_log_asks_the_kernel_for_every_segments_metadata_before_indexing_any(tmp_path, monkeypatch):
    """HDF5's metadata and the step table lie at a segment's start (and a little at its end): opening a log asks the
    kernel for those ranges of every segment first, so indexing the segments one by one does not wait for the disk
    at each."""
    from lightning_influence.log import reader

    _write(tmp_path, 2)
    events = []
    monkeypatch.setattr(reader, "will_need", lambda path, offset=0, length=0, tail=0: events.append(
        ("ask", path, offset, length, tail)))
    index = reader.InfluenceLog._index_segment
    monkeypatch.setattr(reader.InfluenceLog, "_index_segment", lambda self, path, rank: events.append(
        ("index", path)) or index(self, path, rank))
    with InfluenceLog(tmp_path) as log:
        segs = sorted(s.path for s in log._segs)
    asks = [e for e in events if e[0] == "ask"]
    assert len(segs) == len(asks) > 4 and events[:len(asks)] == asks  # all asked before the first is indexed
    assert sorted(a[1] for a in asks) == segs
    assert {a[2:] for a in asks} == {(0, reader._HEAD_BYTES, reader._TAIL_BYTES)}


def test_ranks_that_close_their_segments_at_other_steps_read_as_when_aligned(tmp_path):
    """Under the default segment limits each training rank closes its segments by its own clock: a log whose ranks
    cut their steps into segments at different steps reads the same as one whose ranks cut them alike."""
    _write(tmp_path / "aligned", 2, flush=4)
    _write(tmp_path / "apart", 2, flush=(4, 3))
    assert [len(v) for v in list_segments(tmp_path / "apart").values()] == [3, 4]  # 11 steps: 4+4+3 and 3+3+3+2
    got = {}
    for name in ("aligned", "apart"):
        with InfluenceLog(tmp_path / name) as log:
            steps = {r.step: (r.ids, r.grads) for r in log.iter_steps(0, log.num_steps, fields=("grad",))}
            rows: dict[int, list] = {}
            for b in iter_row_blocks(log, 0, log.num_steps, breaks=[5], max_bytes=60):
                for i, t in enumerate(b.steps.tolist()):
                    at = b.row_step == i
                    rows.setdefault(t, []).append((b.ids[at], b.grads[at], b.weights[at]))
            got[name] = steps, rows
    (steps_a, rows_a), (steps_b, rows_b) = got["aligned"], got["apart"]
    assert steps_a.keys() == steps_b.keys() == rows_a.keys() == rows_b.keys() == set(range(11))
    for t in steps_a:
        for x, y in zip(steps_a[t], steps_b[t], strict=True):
            np.testing.assert_array_equal(x, y)
        for x, y in zip([np.concatenate(c) for c in zip(*rows_a[t])], [np.concatenate(c) for c in zip(*rows_b[t])],
                        strict=True):
            np.testing.assert_array_equal(x, y)
