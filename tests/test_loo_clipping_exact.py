"""Replay leave-one-out's stacked copies are clipped as Lightning clips: each copy's norm reduced as
``torch.nn.utils.clip_grad_norm_`` reduces it. The reference copy then reproduces a clipped bf16-mixed run bit for bit;
a one-ulp difference of the clip factor had grown under the bf16 forward to a drift of 3-4% of a segment's movement on
a small transformer (accumulation 2, clipping at 1: ``evaluate`` refused the run as not reproduced)."""

from __future__ import annotations

import torch

from lightning_influence import InfluenceLog, InfluenceTracker
from lightning_influence.evaluation import replay_loo
from lightning_influence.step.clipping import ClipSpec, apply_clipping, apply_clipping_stacked
from tests.conftest import TinyClassifier, fit, loader, make_data

torch.set_num_threads(1)


def test_stacked_norm_clipping_is_torchs_clip_of_each_copy_bit_for_bit() -> None:
    g = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (7,), (3, 7), (3,), (33, 17)]
    stacked = [torch.randn(4, *s, generator=g).requires_grad_() for s in shapes]
    for p in stacked:
        p.grad = torch.randn(p.shape, generator=g) * torch.rand((), generator=g) * 3
    copies = [[torch.zeros(p.shape[1:], requires_grad=True) for p in stacked] for _ in range(4)]
    for c, params in enumerate(copies):
        for p, s in zip(params, stacked):
            p.grad = s.grad[c].clone()
    spec = ClipSpec("norm", 5.0)
    apply_clipping_stacked(stacked, spec)
    for c, params in enumerate(copies):
        apply_clipping(params, spec)  # torch.nn.utils.clip_grad_norm_, as Lightning calls it
        for p, s in zip(params, stacked):
            assert torch.equal(s.grad[c], p.grad), (c, p.shape)
    assert any(not torch.equal(s.grad, s.grad.clone().zero_()) for s in stacked)


def test_loo_reference_copy_replays_a_clipped_bf16_run_bit_for_bit(tmp_path) -> None:
    torch.manual_seed(0)
    ds = make_data(24, dtype=torch.float32)
    tracker = InfluenceTracker(str(tmp_path / "log"), checkpoint_every_n_steps=2)
    fit(TinyClassifier(optimizer="adamw", lr=0.05, dropout=0.1), loader(ds, 4), tracker, epochs=2,
        precision="bf16-mixed", gradient_clip_val=0.3, accumulate_grad_batches=2)
    log = InfluenceLog(tmp_path / "log")
    coefs = [float(log.step_column(t, "clip_coef")) for t in log.steps]
    assert sum(c < 1 for c in coefs) >= 3, coefs  # the clip binds
    val = (ds.tensors[0][:8], ds.tensors[1][:8])
    out = replay_loo(log, TinyClassifier(optimizer="adamw", lr=0.05, dropout=0.1), ds,
                     lambda m: m.per_sample_loss(val).mean(), sample_ids=[0, 5], tolerance=1.0)
    drift = out.info["replay_drift"]
    assert drift["checkpoints_compared"] == len(log.checkpoint_steps) - 1
    assert drift["max"] == 0.0, drift
