"""Ground truth on a log with stored inputs (``InfluenceTracker(store_inputs=True)``): the retraining reads only the
steps' batches, so ``train_data=None`` gives exactly the result given the dataset (replay LOO, its groups, the
datamodel subsets, the CLI ``evaluate``); the PBRF reads samples by id and refuses up front, saying what to do."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lightning_influence import InfluenceTracker
from lightning_influence.evaluation import (datamodel_quality, gap_decomposition, group_additivity, linear_pbrf, pbrf,
                                            replay_group_removal, replay_loo)
from lightning_influence.log import InfluenceLog
from lightning_influence.queries import mean_loss
from lightning_influence.replay import replay
from tests.conftest import fit, loader, make_data, tiny
from tests.test_step_rng import _Augmented

MODEL = dict(dropout=0.2, momentum=0.9)


@pytest.fixture(scope="module")
def augmented(tmp_path_factory):
    """A randomly augmented run (the dataset by id gives other inputs than training saw) with stored inputs, no data.pt."""
    path = tmp_path_factory.mktemp("augmented") / "log"
    ds = _Augmented(make_data(12))
    fit(tiny(**MODEL), loader(ds), InfluenceTracker(str(path), store_inputs=True, store_data=False,
                                                    record_gradients=True, checkpoint_every_n_steps=2), epochs=1)
    return InfluenceLog(path), ds


def _query():
    return mean_loss(make_data(4, seed=5).tensors)


def test_replay_ground_truths_on_stored_inputs_need_no_dataset(augmented):
    log, ds = augmented
    calls = [
        lambda data: replay_loo(log, tiny(**MODEL), data, _query()).values,
        lambda data: replay_loo(log, tiny(**MODEL), data, _query(), window=(1, 2), in_window_only=True).values,
        lambda data: replay_group_removal(log, tiny(**MODEL), data, _query(), [[0, 1], [5], [2, 7, 11]]),
        lambda data: np.array([r["actual"] for r in group_additivity(
            log, tiny(**MODEL), data, _query(), {"zero": np.zeros(12)}, fractions=(0.2,), kinds=("random",)).rows]),
        lambda data: np.array([datamodel_quality(log, tiny(**MODEL), data, _query(), pairs=3, bootstrap=0).mass.W1]),
    ]
    for call in calls:
        got, given = call(None), call(ds)
        assert np.isfinite(got).all() and np.abs(got).max() > 0
        np.testing.assert_array_equal(got, given)


def test_ground_truths_that_need_samples_by_id_refuse_up_front(augmented, tmp_path):
    log, _ = augmented
    for fn, kw in ((pbrf, {"samples": [0]}), (linear_pbrf, {}), (gap_decomposition, {"samples": [0], "loo": np.zeros((1, 1))})):
        with pytest.raises(ValueError, match=r"the PBRF .* by id, which needs `train_data`.*Pass train_data"):
            fn(log, tiny(**MODEL), None, _query(), loss_fn=lambda m, b: m.per_sample_loss(b), **kw)
    fit(tiny(), loader(make_data(12)), InfluenceTracker(str(tmp_path / "plain")), epochs=1)
    plain = InfluenceLog(tmp_path / "plain")  # without stored inputs the retraining needs the dataset
    with pytest.raises(ValueError, match=r"replay_loo needs `train_data`.*store_inputs=True"):
        replay_loo(plain, tiny(), None, _query())
    with pytest.raises(ValueError, match=r"replay needs `train_data`.*store_inputs=True"):
        next(replay(plain, tiny(), None))


def test_cli_evaluate_on_stored_inputs_needs_no_training_set(augmented, tmp_path, capsys):
    """``evaluate`` with a builder returning the model and validation set only: the ground truth, ``--groups`` and
    ``--datamodel`` run from the stored inputs (the last two stopped: 'no training set'), the truth equals
    ``replay_loo`` given the dataset; ``--pbrf`` is refused before any replay, saying what to do (exit code 2)."""
    from lightning_influence.cli import main

    log, ds = augmented
    builder = tmp_path / "build.py"
    builder.write_text("from conftest import make_data, tiny\n"
                       "def build(log):\n    return {'module': tiny(dropout=0.2, momentum=0.9), "
                       "'val_data': make_data(4, seed=5).tensors}\n")
    base = ["evaluate", str(log.path), "-m", "dit", "--builder", f"{builder}:build", "-s", "0,3,5", "-f", "json", "-q"]
    code = main(base)
    out, err = capsys.readouterr()
    assert code == 0, err
    truth = [s["truth"] for s in json.loads(out)["samples"]]
    expected = replay_loo(log, tiny(**MODEL), ds, _query(), sample_ids=[0, 3, 5]).window(0, log.num_steps)
    np.testing.assert_array_equal(truth, expected)
    for extra, key in ((["--groups", "--group-kinds", "random", "--group-sizes", "0.2"], "groups"),
                       (["--datamodel", "--pairs", "3"], "datamodel")):
        code = main(base + extra)
        out, err = capsys.readouterr()
        assert code == 0, err
        assert key in json.loads(out)
    code = main(base + ["--pbrf"])
    out, err = capsys.readouterr()
    assert code == 2 and not out
    assert "--pbrf/--gap: the PBRF evaluates every training sample's outputs and loss at θ_T by id, which needs " \
           "`train_data`" in err and "return train_data from --builder" in err, err
