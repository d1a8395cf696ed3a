"""DDP on CPU (2 processes, gloo): one segment folder per rank, one log, the scores of one process."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from conftest import make_data, tiny
from ddp_run import EPOCHS, N, fit
from lightning_influence import InfluenceLog, tracin
from lightning_influence.queries import mean_loss

HERE = Path(__file__).resolve().parent


def ddp_fit(*args: str) -> None:
    run = subprocess.run([sys.executable, str(HERE / "ddp_run.py"), *args], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


def ddp_and_single(tmp_path: Path, schedule: str = "") -> tuple[InfluenceLog, InfluenceLog]:
    """The logs of the 2-process run (``tmp_path/ddp``) and of one process (``tmp_path/single``) of the same global
    batches; ``schedule``: ``ddp_run.py``'s mode suffix (``"+onecycle"``)."""
    ddp_fit(str(tmp_path / "ddp"), "ddp" + schedule)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fit(str(tmp_path / "single"), "single" + schedule)
    finally:
        torch.set_num_threads(threads)
    return InfluenceLog(tmp_path / "ddp"), InfluenceLog(tmp_path / "single")


def test_ddp_log_equals_a_single_process_run_of_the_same_global_batches(tmp_path):
    """2 ranks × 3 samples per step vs 1 process × 6: same ids per step, records and TracIn scores."""
    ddp, single = ddp_and_single(tmp_path)
    assert ddp.ranks == [0, 1] and ddp.meta["world_size"] == 2 and ddp.finished
    for seg in (tmp_path / "ddp" / "rank-1").iterdir():  # θ_t is the same on every rank: only rank 0 stores it
        with h5py.File(seg, "r") as f:
            assert len(f["checkpoints"]) == 0
    assert ddp.num_steps == single.num_steps == 4 * EPOCHS
    assert ddp.checkpoint_steps == single.checkpoint_steps == list(range(4 * EPOCHS + 1))
    per_epoch: dict[int, list[int]] = {}
    d_recs = list(ddp.iter_steps(fields=("loss", "grad")))
    s_recs = list(single.iter_steps(fields=("loss", "grad")))
    for d, s in zip(d_recs, s_recs, strict=True):
        assert d.step == s.step and d.ids.tolist() == s.ids.tolist()  # rank 0's share, then rank 1's
        per_epoch.setdefault(d.epoch, []).extend(d.ids.tolist())
        np.testing.assert_allclose(d.losses, s.losses, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(d.grads, s.grads, rtol=1e-10, atol=1e-14)
        np.testing.assert_array_equal(d.lrs, s.lrs)
    assert all(sorted(ids) == list(range(N)) for ids in per_epoch.values())  # every sample-step exactly once
    for t in ddp.checkpoint_steps:
        for name, value in ddp.checkpoint(t).items():
            np.testing.assert_allclose(value, single.checkpoint(t)[name], rtol=1e-12, atol=1e-15)
    query = mean_loss(make_data(8, seed=5).tensors, name="val_loss")
    got, want = tracin(ddp, query, module=tiny()).column(0), tracin(single, query, module=tiny()).column(0)
    assert np.abs(want).max() > 1e-3
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-15)
    from test_gn_shard import _split_equals_one_process  # Gauss-Newton DIT's row split: each training rank's rows cut

    _split_equals_one_process(tmp_path / "ddp", {0: np.random.default_rng(0).standard_normal((2, len(ddp.column_groups())))})
    # DDP averages the ranks' gradients: each sample weighs 1/(|micro-batch| · 2), as 1/|B_t| in the single run,
    # and a replay of the DDP log (rank 0's micro-batch, then rank 1's) reproduces every stored θ_t
    for t in range(ddp.num_steps):
        np.testing.assert_allclose(ddp.weights(t), single.weights(t), rtol=1e-15)
    from lightning_influence.replay import replay

    steps = [rs.step for rs in replay(ddp, tiny(), make_data(N), 0, None, loss_fn=lambda m, b: m.per_sample_loss(b),
                                      tolerance=1e-9)]
    assert steps == list(range(ddp.num_steps + 1))


def test_ddp_resume_continues_the_log_on_every_rank(tmp_path):
    """Resume a finished 2-rank run from its first epoch's checkpoint: both ranks drop their steps from
    there and record them again (new segment files), and the log equals the first run's, bit for bit."""
    log_dir, ckpt_dir = str(tmp_path / "log"), str(tmp_path / "ckpt")
    ddp_fit(log_dir, "ddp", ckpt_dir)
    first = InfluenceLog(log_dir)
    ref = [(r.step, r.ids, r.losses, r.grads) for r in first.iter_steps(fields=("loss", "grad"))]
    ref_ckpts = {t: first.checkpoint(t) for t in first.checkpoint_steps}
    run_id = first.meta["run_id"]
    first.close()
    (ckpt,) = Path(ckpt_dir).glob("epoch=0-step=4.ckpt")
    started = time.time()
    ddp_fit(log_dir, "ddp", str(tmp_path / "ckpt2"), str(ckpt))
    log = InfluenceLog(log_dir)
    assert log.finished and log.meta["run_id"] == run_id and log.ranks == [0, 1]
    recs = [(r.step, r.ids, r.losses, r.grads) for r in log.iter_steps(fields=("loss", "grad"))]
    assert [r[0] for r in recs] == list(range(4 * EPOCHS))  # every step once
    for (s1, i1, l1, g1), (s2, i2, l2, g2) in zip(ref, recs, strict=True):
        assert s1 == s2 and np.array_equal(i1, i2) and np.array_equal(l1, l2) and np.array_equal(g1, g2)
    assert log.checkpoint_steps == sorted(ref_ckpts)
    assert all(np.array_equal(v, ref_ckpts[t][k]) for t in ref_ckpts for k, v in log.checkpoint(t).items())
    for rank in (0, 1):  # steps from the checkpoint on were written by the resumed fit
        for seg in (Path(log_dir) / f"rank-{rank}").iterdir():
            with h5py.File(seg, "r") as f:
                if int(f.attrs["n_steps"]) and int(f.attrs["last_step"]) >= 4:
                    assert float(f.attrs["created"]) >= started, (seg.name, dict(f.attrs))
    log.close()
