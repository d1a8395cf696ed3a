"""The block reader of log-only reductions (log/blocks.py) and TracIn over it, against the per-step reader."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from lightning_influence import InfluenceLog, LogFormatError, tracin, tracin_self_influence
from lightning_influence.capture import KroneckerProjector
from lightning_influence.estimators.tracin import _row_products
from lightning_influence.log import LogWriter, StepRecord
from lightning_influence.log.blocks import _plain_run, iter_row_blocks
from lightning_influence.log.writer import write_meta

K, N = 5, 40


def _write(path, world: int, steps: int = 11, flush: int = 4, dtype: str = "float32", every: int = 1,
           compression: str | None = None) -> None:
    """Steps with gradients at every ``every``-th step, two param groups, ``world`` ranks of 3 or 4 samples."""
    rng = np.random.default_rng(7)
    write_meta(path, {"dataset_size": N, "world_size": world, "run_id": "blocks", "tracked_params": ["a", "b"],
                      "param_shapes": {"a": [3], "b": [2]}, "every_n_steps": every,
                      "recorded": {"losses": False, "gradients": True, "hvp": False, "checkpoints": False},
                      "projection": KroneckerProjector({"a": (3,), "b": (2,)}, None).to_metadata(),
                      "optimizer": {"class": "torch.optim.sgd.SGD",
                                    "param_groups": [{"lr": 0.1, "params": ["a"]}, {"lr": 0.3, "params": ["b"]}]}})
    for rank in range(world):
        w = LogWriter(path, rank=rank, flush_every_n_steps=flush, storage_dtype=dtype, compression=compression)
        for t in range(steps):
            n = 3 + (t + rank) % 2
            w.add_step(StepRecord(step=t, epoch=0, batch_idx=t, micro_batches=1, lrs=[0.1 / (1 + t), 0.3 + t],
                                  ids=rng.choice(N, n, replace=False),
                                  grads=rng.standard_normal((n, K)) if t % every == 0 else None))
        w.close()


@pytest.mark.parametrize("world,every,compression", [(1, 1, None), (2, 2, None), (1, 1, "gzip")])
def test_blocks_hold_the_rows_of_iter_steps(tmp_path, world, every, compression):
    """Gradient rows are memory-mapped where stored as plain bytes (read through HDF5 when compressed)."""
    _write(tmp_path, world, every=every, compression=compression)
    with h5py.File(sorted(tmp_path.glob("rank-0/seg-*.h5"))[0]) as f:
        assert (_plain_run(f.filename, f["grads/grad"]) is None) == (compression is not None)
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


def test_row_products_are_float64_products_of_the_stored_rows():
    rng = np.random.default_rng(0)
    G = rng.standard_normal((301, 7)).astype(np.float16)
    M = rng.standard_normal((7, 3))
    ref = G.astype(np.float64) @ M
    np.testing.assert_allclose(_row_products(G, M), ref, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(_row_products(G, M, square=True), (G.astype(np.float64) ** 2) @ M, rtol=1e-14, atol=1e-14)


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


def test_mapped_rows_span_chunks_and_unmappable_layouts_are_declined(tmp_path):
    from lightning_influence.log.blocks import _mapped

    rows = np.random.default_rng(2).standard_normal((50, 6)).astype(np.float32)
    with h5py.File(tmp_path / "a.h5", "w", libver=("v110", "v110")) as f:
        f.create_dataset("plain", data=rows, chunks=(7, 6), maxshape=(None, 6))
        f.create_dataset("narrow", data=rows, chunks=(7, 3))  # a row split over two chunks
        f.create_dataset("swapped", data=rows.astype(">f4"), chunks=(7, 6))  # not native byte order
    with h5py.File(tmp_path / "a.h5", "r") as f:
        got = _mapped(tmp_path / "a.h5", f["plain"], 13, 41, {})
        np.testing.assert_array_equal(got, rows[13:41])
        assert not got.flags.writeable
        assert _plain_run(tmp_path / "a.h5", f["narrow"]) is None and _plain_run(tmp_path / "a.h5", f["swapped"]) is None
