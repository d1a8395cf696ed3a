"""``Trainer(precision="64-true")`` on a float32 dataset: Lightning casts the module and every batch's floats to float64.

The tracker recorded such a run (it compares the first batch up to that cast), but replay, the estimators and the CLI
rebuilt each step's batch from the float32 training set and fed it to the float64 module: "the module's forward failed
on mixed dtypes" for every estimator, and for the CLI even on the data it had stored itself. Steps are now cast as the
precision plugin cast them (``Precision.convert_input``, ``replay.load_step``), and the CLI casts its queries' data too.
"""

from __future__ import annotations

import json

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import InfluenceLog, InfluenceTracker, WithIds, diffin, dit, queries
from lightning_influence.cli import main
from lightning_influence.replay import replay
from lightning_influence.step.precision import Precision
from tests._cli_run import scores_of
from tests.conftest import TinyClassifier, loader, make_data

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def run64(tmp_path_factory):
    """A 64-true fit of a float32 module on float32 data, its training and validation sets stored in the log."""
    log_dir = tmp_path_factory.mktemp("run64") / "log"
    train, val = make_data(24, dtype=torch.float32), make_data(10, dtype=torch.float32, seed=1)
    torch.manual_seed(0)
    tracker = InfluenceTracker(str(log_dir), record_gradients=True, projection_dim=None, checkpoint_every_n_steps=3)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, deterministic=True, callbacks=[tracker],
                         precision="64-true")
    trainer.fit(TinyClassifier(), loader(train), DataLoader(val, batch_size=5))
    return log_dir, train, val


def test_convert_input_casts_floats_as_lightnings_true_precisions_do():
    batch = {"x": torch.ones(2, 3), "mask": torch.ones(2, 3, dtype=torch.bool), "pair": (torch.zeros(2), torch.arange(2))}
    got = Precision("64-true").convert_input(batch)
    assert got["x"].dtype == torch.float64 and got["pair"][0].dtype == torch.float64
    assert got["mask"].dtype == torch.bool and got["pair"][1].dtype == torch.int64
    assert Precision("16-true").convert_input(batch)["x"].dtype == torch.float16
    for name in ("32-true", "bf16-mixed"):  # no cast: the batch itself
        assert Precision(name).convert_input(batch) is batch


def test_replay_of_a_64_true_run_from_its_float32_training_set_is_bit_exact(run64):
    log_dir, train, _ = run64
    log = InfluenceLog(log_dir)
    assert log.meta["precision"]["name"] == "64-true"
    torch.manual_seed(0)
    final = None
    for point in replay(log, TinyClassifier().double(), WithIds(train), tolerance=0.0):
        final = point
    expected = log.checkpoint(log.checkpoint_steps[-1])
    for name, value in final.params.items():
        np.testing.assert_array_equal(value.detach().numpy(), expected[name])


def test_the_cli_scores_a_64_true_run_from_its_stored_float32_data(run64, capsys):
    log_dir, train, val = run64
    assert main(["query", str(log_dir), "-m", "dit", "--top", "0", "-f", "json", "-q"]) == 0
    got = scores_of(json.loads(capsys.readouterr().out), 24)
    # oracle: the Python API with the validation set given in float64 (the cast Lightning's validation would make)
    torch.manual_seed(0)
    want = dit(InfluenceLog(log_dir), queries.mean_loss((val.tensors[0].double(), val.tensors[1])),
               module=TinyClassifier().double(), train_data=WithIds(train)).column(0)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    assert main(["query", str(log_dir), "--query", "pred:3", "-m", "tracin", "--top", "0", "-f", "json", "-q"]) == 0


def test_diffin_evaluating_every_sample_by_id_casts_them_too(run64):
    log_dir, train, val = run64
    log = InfluenceLog(log_dir)
    query = queries.mean_loss((val.tensors[0].double(), val.tensors[1]))
    torch.manual_seed(0)
    module = TinyClassifier().double()
    got = diffin(log, query, module=module, train_data=WithIds(train), samples="all").column(0)
    # oracle: the same with the training set given in float64 (the batches Lightning trained on)
    want = diffin(log, query, module=module, train_data=WithIds(TensorDataset(train.tensors[0].double(), train.tensors[1])),
                  samples="all").column(0)
    assert np.isfinite(got).all() and np.abs(got).max() > 0
    np.testing.assert_array_equal(got, want)
