"""Defects found by the configuration matrix (estimators against replay LOO; log and CLI robustness), one test each."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TinyClassifier, fit, loader, make_data
from lightning_influence import InfluenceLog, InfluenceTracker, WithIds
from lightning_influence.evaluation import replay_loo
from lightning_influence.queries import evaluate_query, mean_loss
from lightning_influence.replay import replay


def _bf16_model() -> TinyClassifier:
    torch.manual_seed(0)
    return TinyClassifier(optimizer="adamw", lr=0.01).float()


def test_replay_loo_of_a_bf16_mixed_run_without_dropout_reproduces_training(tmp_path):
    """Under bf16 autocast the counterfactual copies ran as one vmapped (batched) forward and backward, whose bfloat16
    rounding is not training's: the reference copy left the logged trajectory (0.2-0.7% at a checkpoint, 7% with value
    clipping, refused as a replay mismatch). They run copy by copy as trained now, so the reference copy is bit-exact
    and each removal equals the plain replay of the run with that sample's weight 0."""
    ds = make_data(20, dtype=torch.float32)
    path = tmp_path / "log"
    fit(_bf16_model(), loader(ds, batch_size=6), InfluenceTracker(str(path), checkpoint_every_n_steps=3), epochs=2,
        precision="bf16-mixed", gradient_clip_val=0.05, gradient_clip_algorithm="value")
    log = InfluenceLog(path)
    T = log.num_steps
    query = mean_loss((ds.tensors[0], ds.tensors[1]))
    loo = replay_loo(log, _bf16_model(), WithIds(ds), query, sample_ids=[2, 5], grid=[0, T], tolerance=0.0)
    assert loo.info["replay_drift"]["max"] == 0.0

    def f_without(j: int) -> float:
        w = lambda t, ids: torch.tensor([0.0 if i == j else 1.0 for i in ids])  # noqa: E731
        last = list(replay(log, _bf16_model(), WithIds(ds), 0, None, weights=w, verify=False))[-1]
        return float(evaluate_query(_bf16_model(), query, last.params))

    base = f_without(-1)
    assert loo.base[-1, 0] == base
    for row, j in enumerate([2, 5]):
        assert loo.at(T)[row, 0] == pytest.approx(f_without(j) - base, rel=1e-3, abs=1e-7)
