"""Gradient and HVP rows of a segment are written chunk by chunk straight from the steps' rows (log/segment.py)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from lightning_influence.capture import KroneckerProjector
from lightning_influence.log import InfluenceLog, LogWriter, StepRecord
from lightning_influence.log.writer import write_meta


def _write(path, sizes, width, storage_dtype, compression):
    """Steps with ``sizes[t]`` rows each, all in one segment; returns their records."""
    rng = np.random.default_rng(len(sizes) + width)
    shapes = {"w": [1, width]}
    write_meta(path, {
        "dataset_size": 10_000, "tracked_params": ["w"], "param_shapes": shapes, "every_n_steps": 1,
        "recorded": {"losses": True, "gradients": True, "hvp": True, "checkpoints": False},
        "projection": KroneckerProjector(shapes, None).to_metadata(),
        "optimizer": {"class": "torch.optim.sgd.SGD", "param_groups": [{"lr": 0.1, "params": ["w"]}]},
    })
    writer = LogWriter(path, flush_every_n_steps=len(sizes), storage_dtype=storage_dtype, compression=compression,
                       background=False)
    records, first = [], 0
    for t, n in enumerate(sizes):
        rec = StepRecord(step=t, epoch=0, batch_idx=t, micro_batches=1, lrs=[0.1], ids=np.arange(first, first + n),
                         losses=rng.random(n), grads=rng.standard_normal((n, width)).astype(np.float32),
                         hvps=rng.standard_normal((n, width)).astype(np.float32))
        first += n
        writer.add_step(rec)
        records.append(rec)
    writer.close()
    return records


@pytest.mark.parametrize("sizes, width, dtype", [
    ([128] * 7, 762, "float32"),  # one chunk per step (381 KiB)
    ([60] * 7, 762, "float32"),  # 344-row chunks spanning steps (60 rows are 179 KiB), a partial last chunk
    ([700, 3, 0, 1, 700], 300, "float16"),  # a chunk per 700-row step, then steps without rows, chunks across steps, a cast
    ([5, 6], 4, "float64"),  # one chunk holding every row
])
def test_direct_chunks_hold_the_rows_as_hdf5_writes_them(tmp_path, monkeypatch, sizes, width, dtype):
    from lightning_influence.log import segment

    direct, filtered = tmp_path / "direct", tmp_path / "gzip"
    records = _write(direct, sizes, width, dtype, None)  # written through, except the last (small) case
    monkeypatch.setattr(segment, "_THROUGH_BYTES", 1 << 62)  # the reference: built in memory,
    _write(filtered, sizes, width, dtype, "gzip")  # through HDF5's own write (the filter pipeline)
    with InfluenceLog(direct) as log:  # checks every step's row CRC-32
        got = {s.step: s for s in log.iter_steps(fields=("grad", "hvp"))}
    for rec in records:
        np.testing.assert_array_equal(got[rec.step].grads, rec.grads.astype(dtype))
        np.testing.assert_array_equal(got[rec.step].hvps, rec.hvps.astype(dtype))
    (a,), (b,) = direct.glob("rank-*/*.h5"), filtered.glob("rank-*/*.h5")
    with h5py.File(a) as fa, h5py.File(b) as fb:
        for name in ("grads/grad", "grads/hvp"):
            assert fa[name].compression is None and fb[name].compression == "gzip"
            assert (fa[name].shape, fa[name].chunks, fa[name].maxshape, fa[name].dtype) == \
                   (fb[name].shape, fb[name].chunks, fb[name].maxshape, fb[name].dtype)
            np.testing.assert_array_equal(fa[name][()], fb[name][()])
            np.testing.assert_array_equal(fa[name][()], np.concatenate([getattr(r, name[6:] + "s") for r in records]).astype(dtype))
        for column in ("grad_crc32", "hvp_crc32"):
            np.testing.assert_array_equal(fa["steps"][column][()], fb["steps"][column][()])


def test_a_write_error_mid_file_is_raised_after_hdf5_closed_it(tmp_path, monkeypatch):
    """HDF5 writes a new segment through to disk; it never sees the OS error, which write_segment raises."""
    import errno
    import os

    from lightning_influence.log import segment

    rows = np.random.default_rng(0).standard_normal((1000, 300)).astype(np.float32)  # 1.2 MB: written through
    steps = [StepRecord(step=t, epoch=0, batch_idx=t, micro_batches=1, lrs=[0.1], ids=np.arange(500) + 500 * t,
                        grads=rows[500 * t:500 * (t + 1)]) for t in range(2)]
    real, calls = os.pwrite, []

    def full_disk(fd, data, offset):
        calls.append(offset)
        if len(calls) == 2:  # a chunk of rows: HDF5 goes on writing its metadata, to nowhere
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full_disk)
    path = tmp_path / "seg-00000000.h5"
    with pytest.raises(OSError) as info:
        segment.write_segment(path, 0, steps, [], np.dtype("float32"), None)
    assert info.value.errno == errno.ENOSPC and len(calls) == 2  # nothing more was written after the failure
    assert not list(tmp_path.iterdir())  # no segment, no temporary file
    monkeypatch.undo()
    size = segment.write_segment(path, 0, steps, [], np.dtype("float32"), None)  # h5py is healthy
    assert size == path.stat().st_size
    with h5py.File(path) as f:
        np.testing.assert_array_equal(f["grads/grad"][()], rows)


def test_the_write_through_file_reads_what_it_wrote_and_keeps_the_first_error(tmp_path, monkeypatch):
    import errno
    import os

    from lightning_influence.log.segment import _WriteThrough

    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        f = _WriteThrough(fd)
        assert f.write(b"abcdef") == 6 and f.seek(0, os.SEEK_END) == 6 and f.tell() == 6
        f.seek(2)
        assert f.read(3) == b"cde" and f.read(4) == b"f\0\0\0"  # past the end: zeros
        f.seek(10)
        f.write(memoryview(np.arange(3, dtype=np.int32)))
        assert f.size == 22 and (tmp_path / "f").read_bytes()[10:] == np.arange(3, dtype=np.int32).tobytes()
        monkeypatch.setattr(os, "pwrite", lambda *a: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
        f.seek(30)
        assert f.write(b"xyz") == 3 and f.error.errno == errno.EIO and f.size == 33  # HDF5 sees its write done
        monkeypatch.undo()
        assert f.write(b"later") == 5 and f.error.errno == errno.EIO  # dropped: the file stops at the failure
        assert (tmp_path / "f").stat().st_size == 22
        f.seek(0)
        assert f.read(2) == b"\0\0"  # reads after a failure see zeros
    finally:
        os.close(fd)


@pytest.mark.parametrize("data", [np.arange(7), np.random.default_rng(0).random((6, 3)), np.asarray(2.5, np.float32),
                                  np.zeros((0,), np.int64), np.ones((2, 5056), np.uint8), np.array([True, False])])
@pytest.mark.parametrize("private_rule", [True, False], ids=["h5py-chunk-rule", "without-it"])
def test_small_datasets_are_the_files_h5py_create_dataset_makes(data, private_rule, monkeypatch):
    """segment._dataset makes numeric datasets by h5py's low-level calls: the file is the one create_dataset makes;
    an h5py without its private chunk rule (``guess_chunk``) gets create_dataset itself, the same file."""
    from lightning_influence.log import segment
    from lightning_influence.log.format import CRC_ATTR, LIBVER, SCALAR_ATTR, crc32

    if not private_rule:
        monkeypatch.setattr(segment, "guess_chunk", None)

    def image(make):
        f = h5py.File("in-memory", "w", driver="core", backing_store=False, libver=LIBVER)
        try:
            make(f.create_group("g"))
            f.flush()
            return f.id.get_file_image()
        finally:
            f.close()

    def by_h5py(g):
        stored = data.reshape(1) if data.ndim == 0 else data
        ds = g.create_dataset("x", data=stored, maxshape=(None, *stored.shape[1:]), chunks=True)
        if data.ndim == 0:
            ds.attrs[SCALAR_ATTR] = 1
        ds.attrs[CRC_ATTR] = crc32(stored)

    assert image(lambda g: segment._dataset(g, "x", data)) == image(by_h5py)


@pytest.mark.parametrize("step_rows, row_bytes, want", [
    (128, 3048, 128),  # the MLP's rows: a step is one chunk
    (64, 20480, 32),  # at most 51 rows fit 1 MiB: the largest divisor of 64 below, 640 KiB
    (60, 3048, 344),  # a step is 179 KiB: the most rows in 1 MiB
    (8, 264, 3971),  # tiny rows: the most rows in 1 MiB
    (17, 61440, 17),  # 17 rows are 1020 KiB
    (18, 61440, 9),  # 18 do not fit: 9 (540 KiB)
    (37, 30000, 34),  # 37 is prime and 1110 KB: no divisor makes 256 KiB..1 MiB, so the most rows, 34
])
def test_chunk_rows_by_hand(step_rows, row_bytes, want):
    from lightning_influence.log.segment import _chunk_rows

    assert _chunk_rows(step_rows, row_bytes) == want
