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


# ------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from tests._cli_run import train_tiny_run

    return train_tiny_run(tmp_path_factory.mktemp("cli") / "run")


def _one_line_error(capsys, *argv: str) -> str:
    from lightning_influence.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "internal error" not in err and out == "", err
    return lines[0]


@pytest.mark.parametrize("query", ["pred:0:10", "margin:0:99", "pred:0:-1"])
def test_a_class_outside_the_models_outputs_is_a_user_error(run, capsys, query):
    """``pred:ID:CLASS`` with a class the model has no logit for failed as "internal error (IndexError ...)" (exit 1);
    a negative class silently took a logit counted from the end."""
    line = _one_line_error(capsys, "query", run.log, "-q", "--method", "tracin", "--query", query)
    assert "class" in line and "10 outputs" in line, line


def test_a_model_class_that_is_no_module_is_a_user_error(run, capsys):
    """``--model`` naming a class that is not a LightningModule (here the datamodule) failed as "internal error
    (AttributeError: ... no attribute 'named_parameters')"."""
    line = _one_line_error(capsys, "query", run.log, "-q", "--model", "lightning_influence.examples.digits.DigitsDataModule")
    assert "DigitsDataModule" in line and "not a LightningModule" in line, line


@pytest.mark.parametrize("value", ["-1", "nan"])
def test_a_negative_or_non_finite_replay_tolerance_is_refused_by_name(run, capsys, value):
    """``--replay-tolerance -1`` (or nan) ran the replay and then reported a replay mismatch of drift 0."""
    line = _one_line_error(capsys, "query", run.log, "-q", "--replay-tolerance", value)
    assert "--replay-tolerance" in line and "mismatch" not in line and "reproduce" not in line, line


def test_a_negative_tolerance_is_refused_by_the_estimators(run):
    from lightning_influence.replay_drift import resolve_tolerance

    assert resolve_tolerance(None) == 0.01 and resolve_tolerance(0) == 0.0 and resolve_tolerance(float("inf")) > 1e300
    for bad in (-1e-3, float("nan")):
        with pytest.raises(ValueError, match="tolerance must be a number >= 0"):
            resolve_tolerance(bad)
