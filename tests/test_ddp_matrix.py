"""DDP on CPU (2 gloo processes, ``ddp_matrix_run.py``): the processes agree on the gradient engine of every tensor;
the log of a multi-process fit under accumulation, clipping, AdamW, each record level, resumes and a killed process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lightning_influence import InfluenceLog

HERE = Path(__file__).resolve().parent


def matrix_fit(timeout: int = 300, **cfg) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HERE / "ddp_matrix_run.py"), json.dumps(cfg)], capture_output=True,
                          text=True, timeout=timeout)


def ok_fit(**cfg) -> None:
    run = matrix_fit(**cfg)
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.mark.slow
def test_processes_agree_on_the_tensors_the_hooks_demote(tmp_path):
    """The logits mix the samples of a batch holding a flagged sample: rank 1's first batch holds one, so its first-step
    check against autograd demotes every tensor; rank 0's first batch holds none, its second does. Every process
    takes the union at the first step: meta.h5 says vmap from step 0, and every rank's rows equal autograd's gradient
    of each sample's loss alone at the logged θ_t, as vmap computes it (rank 0 kept the hooks, its step-1 rows 20-46%
    off, and meta.h5 said 'hooks'). (The reference was the same fit with gradient_engine='vmap', which the first
    step's applied-gradient check now refuses under DDP as on one process: rows of each sample alone do not sum to
    the gradient of a loss that mixes the samples.)"""
    import torch

    from conftest import TinyClassifier
    from lightning_influence.capture import call_with_params

    ok_fit(log_dir=str(tmp_path / "auto"), model="flagmix")
    auto = InfluenceLog(tmp_path / "auto")
    names = ["net.0.weight", "net.0.bias", "net.3.weight", "net.3.bias"]
    assert auto.meta["gradient_engine"] == "vmap" and auto.meta["gradient_engines"] == dict.fromkeys(names, "vmap")
    assert auto.meta["demoted"] == dict.fromkeys(names, 0)
    # their vmap rows (each sample alone) are not parts of a batch gradient that mixes samples: the first step's
    # applied-gradient check leaves them out (it refused the run, blaming a gradient change, before)
    check = auto.meta["applied_gradient_check"]
    assert not check["checked"] and check["left_out"] == sorted(names) and "mixes the samples" in check["why"]

    class FlagMix(TinyClassifier):  # ddp_matrix_run's model="flagmix"
        def forward(self, x):
            out = self.net(x)
            return out + 0.5 * x[:, -1].amax() * out.mean(0, keepdim=True)

    module, (x, y), proj = FlagMix().double(), _data().tensors, auto.projector()
    steps = 0
    for rec in auto.iter_steps(fields=("loss", "grad")):
        theta = {n: torch.from_numpy(v).requires_grad_(True) for n, v in auto.checkpoint(rec.step).items()}
        for i, row in zip(rec.ids.tolist(), rec.grads):
            loss = call_with_params(module, lambda m, b: m.per_sample_loss(b), theta, (x[i:i + 1], y[i:i + 1]))[0]
            grads = dict(zip(theta, torch.autograd.grad(loss, list(theta.values()))))
            want = proj.project({n: grads[n][None] for n in auto.param_names})[0].numpy()
            np.testing.assert_allclose(row, want, rtol=1e-10, atol=1e-14)
        steps += 1
    assert steps == auto.num_steps == 8


def _data():
    from conftest import make_data
    from ddp_matrix_run import FLAGGED
    from ddp_run import N

    ds = make_data(N)
    ds.tensors[0][:, -1] = 0.0
    ds.tensors[0][list(FLAGGED), -1] = 1.0
    return ds


def _module():
    import torch

    from conftest import TinyClassifier

    torch.manual_seed(0)
    return TinyClassifier().double()


def _loss(m, b):
    return m.per_sample_loss(b)


@pytest.mark.slow
def test_accumulating_clipped_adamw_ddp_log_replays_bit_for_bit_and_equals_one_process(tmp_path):
    """accumulate_grad_batches=2, norm clipping, AdamW, HVP rows, a checkpoint every 3 steps, 2 processes: the rows of
    every step are those of one process on the same global batches (by id: rank 0's micro-batches come first), and so
    is DIT; the log replays bit for bit. DDP sums each process's accumulated gradient: a replay of rank 0's
    micro-batches and then rank 1's into one gradient drifted 1.2e-16 from the stored θ_3 (tolerance=0 refused it)."""
    from lightning_influence.estimators import dit
    from lightning_influence.queries import mean_loss
    from lightning_influence.replay import replay
    from conftest import make_data

    cfg = dict(accumulate=2, clip=0.5, optimizer="adamw", record="hvp", checkpoint_every=3)
    ok_fit(log_dir=str(tmp_path / "ddp"), **cfg)
    ok_fit(log_dir=str(tmp_path / "single"), mode="single", **cfg)
    ddp, single = InfluenceLog(tmp_path / "ddp"), InfluenceLog(tmp_path / "single")
    assert ddp.ranks == [0, 1] and ddp.finished and ddp.checkpoint_steps == single.checkpoint_steps == [0, 3, 4]
    fields = ("loss", "grad", "hvp")
    for d, s in zip(ddp.iter_steps(fields=fields), single.iter_steps(fields=fields), strict=True):
        od, os_ = np.argsort(d.ids), np.argsort(s.ids)
        assert d.step == s.step and d.ids[od].tolist() == s.ids[os_].tolist()
        for f, rtol in (("losses", 1e-10), ("grads", 1e-10), ("hvps", 1e-8)):  # H Ĝ by finite differences: 7e-10 apart
            np.testing.assert_allclose(getattr(d, f)[od], getattr(s, f)[os_], rtol=rtol, atol=1e-14)
        np.testing.assert_array_equal(ddp.weights(d.step)[od], single.weights(s.step)[os_])
    for t in ddp.checkpoint_steps:
        for name, value in ddp.checkpoint(t).items():
            np.testing.assert_allclose(value, single.checkpoint(t)[name], rtol=1e-12, atol=1e-15)
    steps = [rs.step for rs in replay(ddp, _module(), _data(), loss_fn=_loss, tolerance=0.0)]
    assert steps == list(range(ddp.num_steps + 1))
    query = mean_loss(make_data(8, seed=5).tensors)
    got = dit(ddp, query, module=_module(), train_data=_data(), loss_fn=_loss).column(0)
    want = dit(single, query, module=_module(), train_data=_data(), loss_fn=_loss).column(0)
    assert np.abs(want).max() > 1e-4
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-15)


@pytest.mark.slow
def test_a_killed_process_leaves_a_readable_log_that_a_resume_completes(tmp_path):
    """Rank 1 is killed (SIGKILL) as it starts step 6 (rank 0 then fails in the all-reduce): the log reads, holds
    the steps both processes completed (none of rank 0's later rows), and a resume from the Lightning checkpoint of
    step 4 makes it equal, bit for bit, to an uninterrupted run's."""
    cfg = dict(optimizer="adamw", record="gradients", checkpoint_every=3, epochs=3)
    ok_fit(log_dir=str(tmp_path / "ref"), **cfg)
    run = matrix_fit(log_dir=str(tmp_path / "log"), ckpt_dir=str(tmp_path / "ck"), ckpt_every=4, kill=[1, 6], **cfg)
    assert run.returncode != 0 and sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["step=4.ckpt"]
    ref = InfluenceLog(tmp_path / "ref")
    with InfluenceLog(tmp_path / "log") as cut:
        assert not cut.finished and cut.ranks == [0, 1] and 4 <= cut.num_steps <= 6
        for a, b in zip(cut.iter_steps(), ref.iter_steps(0, cut.num_steps), strict=True):
            assert a.step == b.step and np.array_equal(a.ids, b.ids) and np.array_equal(a.grads, b.grads)
    ok_fit(log_dir=str(tmp_path / "log"), ckpt_dir=str(tmp_path / "ck2"), resume_from=str(tmp_path / "ck" / "step=4.ckpt"),
           **cfg)
    log = InfluenceLog(tmp_path / "log")
    assert log.finished and log.num_steps == ref.num_steps == 12 and log.checkpoint_steps == ref.checkpoint_steps
    for a, b in zip(log.iter_steps(fields=("loss", "grad")), ref.iter_steps(fields=("loss", "grad")), strict=True):
        assert a.step == b.step and np.array_equal(a.ids, b.ids)
        assert np.array_equal(a.losses, b.losses) and np.array_equal(a.grads, b.grads)
    assert all(np.array_equal(v, ref.checkpoint(t)[k]) for t in ref.checkpoint_steps for k, v in log.checkpoint(t).items())


@pytest.mark.slow
def test_a_distributed_sampler_padded_epoch_is_logged_as_trained(tmp_path):
    """Lightning's DistributedSampler over 19 samples on 2 processes pads each epoch with its first sample, which then
    trains twice an epoch: in the first step (rank 0, weight 1/6) and alone in rank 1's last batch (weight 1/2: the
    mean over its one sample, averaged over the 2 processes). Not twice in one step: the log holds it at both steps with
    the weight its gradient had, so the estimators and replay leave-one-out remove it from both, as training used it;
    the replay of the log reproduces every stored θ_t."""
    from conftest import make_data, tiny
    from ddp_matrix_run import FLAGGED
    from lightning_influence.replay import replay

    ok_fit(log_dir=str(tmp_path / "log"), sampler="distributed", n=19, batch=3, epochs=2)
    log = InfluenceLog(tmp_path / "log")
    assert log.num_steps == 8  # 10 samples a process an epoch: batches of 3, 3, 3, 1
    for epoch in (0, 1):
        steps = [t for t in range(log.num_steps) if log.epochs_of_step[t] == epoch]
        ids = np.concatenate([log.batch_ids(t) for t in steps])
        values, counts = np.unique(ids, return_counts=True)
        assert len(ids) == 20 and len(values) == 19 and counts.max() == 2
        twice = int(values[counts == 2][0])
        at = [t for t in steps if twice in log.batch_ids(t)]
        assert len(at) == 2 and at[-1] == steps[-1]  # the epoch's last step holds the repeat
        weights = [float(log.weights(t)[list(log.batch_ids(t)).index(twice)]) for t in at]
        np.testing.assert_allclose(weights, [1 / 6, 1 / 2], rtol=1e-15)
        for t in steps:  # never twice in one step
            assert len(np.unique(log.batch_ids(t))) == len(log.batch_ids(t))
    data = make_data(19)  # the run's: its flag feature
    data.tensors[0][:, -1] = 0.0
    data.tensors[0][[i for i in FLAGGED if i < 19], -1] = 1.0
    steps = [rs.step for rs in replay(log, tiny(), data, 0, None, loss_fn=lambda m, b: m.per_sample_loss(b),
                                      tolerance=1e-9)]
    assert steps == list(range(log.num_steps + 1))


@pytest.mark.slow
def test_padding_repeated_within_one_step_is_refused_with_what_to_do(tmp_path):
    """5 samples on 2 processes in batches of 3: one step an epoch, so the DistributedSampler's repeat of a sample is
    in the same step as its first use, on the other process. Refused at step 0, naming the padding and the remedy (the
    message said the data was not split by rank and to use Lightning's default DistributedSampler, which this run
    used); the remedy, a DistributedSampler(drop_last=True), trains and logs each sample once a step."""
    run = matrix_fit(log_dir=str(tmp_path / "padded"), sampler="distributed", n=5, batch=3)
    assert run.returncode != 0
    assert "DistributedSampler of 5 samples on 2 processes repeats 1" in run.stderr, run.stderr[-3000:]
    assert "DistributedSampler(dataset, drop_last=True)" in run.stderr
    ok_fit(log_dir=str(tmp_path / "dropped"), sampler="distributed-drop", n=5, batch=3)
    log = InfluenceLog(tmp_path / "dropped")
    assert log.num_steps == 2
    for t in range(log.num_steps):
        assert len(log.batch_ids(t)) == 4 and len(np.unique(log.batch_ids(t))) == 4
