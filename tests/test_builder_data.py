"""What a ``--builder`` may return for the CLI's data: a validation set given as a map-style dataset (as its
``train_data`` is) is the batch of all its items, checked against the estimator run in-process on that batch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from lightning_influence import InfluenceLog, queries, tracin
from lightning_influence.cli import main
from tests._cli_run import scores_of, train_tiny_run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

BUILDER = '''
import yaml
from torch.utils.data import TensorDataset
from lightning_influence.examples.digits import DigitsClassifier, DigitsDataModule


class Batched(DigitsClassifier):
    """The run's classifier, whose forward needs a batch dimension (as a sequence model's does)."""

    def forward(self, x):
        return self.net(x.reshape(x.shape[0], -1))


def build():
    cfg = yaml.safe_load(open({config!r}).read())
    dm = DigitsDataModule(**cfg["data"])
    return {{"module": Batched(**cfg["model"]), "train_data": dm.train_dataset,
            "val_data": TensorDataset(*dm.splits["val"])}}
'''


def test_validation_dataset_from_a_builder_is_one_batch(tmp_path, tmp_path_factory, capsys):
    """``val_data`` as a TensorDataset: each item had been taken for a batch (``x`` without its batch dimension), so
    a model that needs one failed with "IndexError"/a shape error, and one that did not was evaluated item by item."""
    run = train_tiny_run(tmp_path_factory.mktemp("builder") / "run")
    builder = tmp_path / "build_digits.py"
    builder.write_text(BUILDER.format(config=run.config))
    code = main(["query", run.log, "-m", "tracin", "--query", "val_loss", "-k", "0", "--builder", f"{builder}:build",
                 "-f", "json", "-q"])
    out, err = capsys.readouterr()
    assert code == 0, err
    log = InfluenceLog(run.log)
    got = scores_of(json.loads(out), log.dataset_size)

    from lightning_influence.examples.digits import DigitsClassifier, DigitsDataModule

    cfg = yaml.safe_load(open(run.config).read())
    val = DigitsDataModule(**cfg["data"]).splits["val"]  # the whole validation set as one batch
    expected = tracin(log, queries.mean_loss(val), module=DigitsClassifier(**cfg["model"])).column(0)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-12)
    assert np.abs(expected).max() > 1e-6


LOADER_BUILDER = '''
import yaml
from torch.utils.data import DataLoader
from lightning_influence.examples.digits import DigitsClassifier, DigitsDataModule


def build():
    cfg = yaml.safe_load(open({config!r}).read())
    dm = DigitsDataModule(**cfg["data"])
    dm.setup("fit")
    return {{"module": DigitsClassifier(**cfg["model"]), "train_data": dm.train_dataloader(), "val_data": dm.val_dataloader()}}
'''


def test_training_dataloader_as_train_data(tmp_path, tmp_path_factory, capsys):
    """The training DataLoader as ``train_data`` (from a builder, or to an estimator from Python) is its dataset by id:
    the builder's failed as an internal error (TypeError: train_data must be a map-style Dataset...) and the Python
    call with a TypeError; both now give the scores of the dataset itself."""
    from lightning_influence import dit
    from lightning_influence.examples.digits import DigitsClassifier, DigitsDataModule

    run = train_tiny_run(tmp_path_factory.mktemp("builder") / "run")
    builder = tmp_path / "build_loader.py"
    builder.write_text(LOADER_BUILDER.format(config=run.config))
    code = main(["query", run.log, "-m", "dit", "-w", "0:3", "-k", "0", "--builder", f"{builder}:build", "-f", "json", "-q"])
    out, err = capsys.readouterr()
    assert code == 0, err
    log = InfluenceLog(run.log)
    got = scores_of(json.loads(out), log.dataset_size)

    cfg = yaml.safe_load(open(run.config).read())
    dm = DigitsDataModule(**cfg["data"])
    dm.setup("fit")
    query = queries.mean_loss(dm.splits["val"])
    expected = dit(log, query, module=DigitsClassifier(**cfg["model"]), train_data=dm.train_dataset, window=(0, 3)).column(0)
    from_loader = dit(log, query, module=DigitsClassifier(**cfg["model"]), train_data=dm.train_dataloader(),
                      window=(0, 3)).column(0)
    np.testing.assert_array_equal(from_loader, expected)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-12)
    assert np.abs(expected).max() > 1e-6
