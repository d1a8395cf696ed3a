"""A data-attribution researcher's use of the CLI and the Python API (the ninth session's dogfooding): each test is a
defect a user met, checked against an independent computation."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from lightning_influence import InfluenceLog, tracin_self_influence
from lightning_influence.cli import main
from lightning_influence.evaluation import auroc
from tests._cli_run import train_tiny_run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_tiny_run(tmp_path_factory.mktemp("research") / "run")


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _flipped(run) -> np.ndarray:
    from lightning_influence.examples.digits import DigitsDataModule

    return np.asarray(DigitsDataModule(**yaml.safe_load(Path(run.config).read_text())["data"]).flipped)


def test_evaluate_detects_flipped_labels_by_large_self_influence(run, capsys):
    """Self-influence flags a mislabelled sample by a *large* score: its detection AUROC is P(flipped scores higher),
    not of the negated scores (evaluate had reported 1 - AUROC for tracin-self and diffin-self)."""
    code, out, err = cli(capsys, "evaluate", run.log, "-c", run.config, "-m", "tracin-self", "-m", "tracin",
                         "--truth", "none", "--samples", "flipped:2", "-f", "json", "-q")
    assert code == 0, err
    metrics = json.loads(out)["metrics"]
    flipped = _flipped(run)
    n = InfluenceLog(run.log).dataset_size
    mask = np.isin(np.arange(n), flipped)
    own = tracin_self_influence(InfluenceLog(run.log)).column(0)
    assert metrics["tracin-self"]["flipped_auroc"] == pytest.approx(auroc(own, mask), abs=1e-12)
    top = np.argsort(-own, kind="stable")[: len(flipped)]
    assert metrics["tracin-self"][f"flipped_precision@{len(flipped)}"] == pytest.approx(mask[top].mean(), abs=1e-12)
    assert metrics["tracin-self"]["flipped_auroc"] > 0.5  # self-influence does find these flips


def test_evaluate_keeps_every_method_asked_for(run, capsys):
    """dit-linear equals dit for plain SGD and carries dit's name: asked for together, both columns are shown (the
    second had overwritten the first, leaving one)."""
    code, out, err = cli(capsys, "evaluate", run.log, "-c", run.config, "-m", "dit", "-m", "dit-linear", "-m", "dit",
                         "--truth", "none", "--samples", "0,1,2", "-f", "json", "-q")
    assert code == 0, err
    res = json.loads(out)
    assert list(res["metrics"]) == ["dit", "dit-linear"]
    for s in res["samples"]:
        assert s["dit"] == pytest.approx(s["dit-linear"], rel=1e-9, abs=1e-15)


def test_epoch_windows_reaching_outside_the_run_are_refused(run):
    """An epoch window is held to the run as a step window is: 'epoch -1:' (Python's last) had meant the whole run and
    'epoch 1:9' the epochs that exist, silently."""
    log = InfluenceLog(run.log)
    lo, hi = int(log.epochs.min()), int(log.epochs.max())
    last = log.window(f"epoch {hi}:")
    assert last == (int(log.steps[log.epochs_of_step == hi][0]), log.num_steps)
    assert log.window(("epoch", lo, hi + 1)) == (0, log.num_steps)
    for bad in ("epoch -1:", f"epoch 1:{hi + 5}", ("epoch", -1, 1), f"epoch {hi}:{hi + 2}"):
        with pytest.raises(ValueError, match="reaches outside the run"):
            log.window(bad)
    with pytest.raises(ValueError, match="hold no step"):
        log.window(f"epoch {hi + 1}:")


BUILDER = '''
import yaml
from lightning_influence.examples.digits import DigitsClassifier, DigitsDataModule
from lightning_influence import WithIds
from torch.utils.data import TensorDataset


def _parts():
    cfg = yaml.safe_load(open({config!r}).read())
    dm = DigitsDataModule(**cfg["data"])
    (xt, yt), (xv, yv) = dm.splits["train"], dm.splits["val"]
    return DigitsClassifier(**cfg["model"]), xt, yt, xv, yv


def narrow_train():
    model, xt, yt, xv, yv = _parts()
    return {{"module": model, "train_data": WithIds(TensorDataset(xt[:, :32], yt)), "val_data": (xv, yv)}}


def labels_beyond_outputs():
    model, xt, yt, xv, yv = _parts()
    return {{"module": model, "train_data": WithIds(TensorDataset(xt, yt + 10)), "val_data": (xv, yv)}}


def no_flips():
    model, xt, yt, xv, yv = _parts()
    return {{"module": model, "train_data": WithIds(TensorDataset(xt, yt)), "val_data": (xv, yv)}}


def narrow_query():
    model, xt, yt, xv, yv = _parts()
    return {{"module": model, "train_data": WithIds(TensorDataset(xt, yt)), "val_data": (xv[:, :32], yv)}}
'''


@pytest.mark.parametrize("builder, method, needle", [
    ("narrow_train", "dit", "the run's per-sample loss fails on the training data rebuilt for step"),
    ("labels_beyond_outputs", "diffin-self", "IndexError: Target 1"),
    ("narrow_query", "tracin", "the query fails on the model: RuntimeError: mat1 and mat2 shapes cannot be multiplied"),
    ("narrow_query", "dit-gn", "must be what the model takes"),
])
def test_data_the_model_cannot_take_is_a_user_error(run, tmp_path, capsys, builder, method, needle):
    """Data from --builder that the model cannot take (another feature count, labels beyond its outputs) had failed
    inside the sweep as "internal error (RuntimeError: mat1 and mat2 shapes ...)", exit code 1."""
    path = tmp_path / "builders.py"
    path.write_text(BUILDER.format(config=run.config))
    code, out, err = cli(capsys, "query", run.log, "--builder", f"{path}:{builder}", "-m", method, "-q")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and out == "", err
    assert needle in lines[0] and "internal error" not in lines[0]
    if builder != "narrow_query":
        code, _, err = cli(capsys, "evaluate", run.log, "--builder", f"{path}:{builder}", "-m", "tracin", "-q",
                           "--samples", "0,1")
        assert code == 2 and "fails on the training data" in err, err


def test_evaluate_shows_flipped_only_where_known_and_writes_its_table_to_csv(run, tmp_path, capsys):
    """evaluate had a 'flipped' column, empty, for a run that knows no flipped labels (read as 'none flipped'), wrote
    flipped as 'yes'/'' where query's CSV writes True/False, and left the --pbrf column out of its CSV."""
    path = tmp_path / "builders.py"
    path.write_text(BUILDER.format(config=run.config))
    code, out, err = cli(capsys, "evaluate", run.log, "--builder", f"{path}:no_flips", "-m", "tracin", "--samples",
                         "3,7", "--truth", "none", "-q")
    assert code == 0, err
    assert out.splitlines()[1].split() == ["id", "label", "truth", "tracin"]
    code, out, err = cli(capsys, "evaluate", run.log, "-m", "tracin", "--samples", "3,7,11", "--pbrf", "-f", "csv", "-q")
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert list(rows[0]) == ["id", "label", "flipped", "truth", "pbrf", "pbrf_converged", "tracin"]
    flipped = set(_flipped(run).tolist())
    assert [r["flipped"] for r in rows] == [str(i in flipped) for i in (3, 7, 11)]
    code, out, err = cli(capsys, "evaluate", run.log, "-m", "tracin", "--samples", "3,7,11", "--pbrf", "-f", "json", "-q")
    pbrf = [s["pbrf"] for s in json.loads(out)["samples"]]
    assert [float(r["pbrf"]) for r in rows] == pbrf
    assert [r["pbrf_converged"] for r in rows] == [str(s["pbrf_converged"]) for s in json.loads(out)["samples"]]


def test_timeline_grid_spellings(run):
    """A numpy int is a number of windows as an int is (it had been iterated: "'numpy.int64' object is not iterable");
    a string other than 'epoch' says which grids there are (it had said "invalid literal for int() ... 'w'")."""
    from lightning_influence.replay import grid_steps

    log = InfluenceLog(run.log)
    assert grid_steps(log, np.int64(3)).tolist() == grid_steps(log, 3).tolist() == [0, 4, 8, 12]
    for bad in ("weekly", "10", True):
        with pytest.raises(ValueError, match="an int n \\(n equal windows, as the CLI's --grid n\\)"):
            grid_steps(log, bad)


def test_evaluate_top_samples_of_self_influence_are_the_most_suspicious(run, capsys):
    """'top:K' picks the K first in the first method's own order: for self-influence the largest (the mislabelled
    candidates, as `query` lists them first), not the most negative (the least suspicious)."""
    own = tracin_self_influence(InfluenceLog(run.log)).column(0)
    for spec, expected in (("top:3", np.argsort(-own, kind="stable")[:3]), ("bottom:3", np.argsort(own, kind="stable")[:3])):
        code, out, err = cli(capsys, "evaluate", run.log, "-c", run.config, "-m", "tracin-self", "--truth", "none",
                             "--samples", spec, "-f", "json", "-q")
        assert code == 0, err
        assert [s["id"] for s in json.loads(out)["samples"]] == expected.tolist()


def test_a_module_of_another_class_is_named_in_a_warning(run, capsys):
    """TracIn replays nothing: a model of other layers with the run's parameter shapes (Tanh for ReLU) loaded the
    checkpoints and scored silently. It is now named in a warning; the run's own class is not."""
    import warnings

    import torch

    from lightning_influence import tracin
    from lightning_influence.examples.digits import DigitsClassifier

    cfg = yaml.safe_load(Path(run.config).read_text())

    class TanhDigits(DigitsClassifier):  # the same parameters, another activation
        def forward(self, x):
            return torch.tanh(super().forward(x))

    log = InfluenceLog(run.log)
    query = lambda m: m(torch.zeros(2, 64)).sum()  # noqa: E731
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracin(log, query, module=DigitsClassifier(**cfg["model"]))
        assert not [w for w in caught if "the module given is" in str(w.message)]
        tracin(log, query, module=TanhDigits(**cfg["model"]))
    named = [str(w.message) for w in caught if "the module given is" in str(w.message)]
    assert named and "DigitsClassifier" in named[0] and "TanhDigits" in named[0]


@pytest.fixture(scope="module")
def run64(tmp_path_factory):
    """A precision="64-true" fit on a float32 training set (Lightning casts each batch to float64)."""
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader

    from lightning_influence import InfluenceTracker
    from tests.conftest import TinyClassifier, loader, make_data

    log_dir = tmp_path_factory.mktemp("research64") / "log"
    train, val = make_data(18, dtype=torch.float32), make_data(8, dtype=torch.float32, seed=1)
    torch.manual_seed(0)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, deterministic=True, precision="64-true",
                         callbacks=[InfluenceTracker(str(log_dir), checkpoint_every_n_steps=3)])
    trainer.fit(TinyClassifier(), loader(train), DataLoader(val, batch_size=4))
    return str(log_dir), train, val


def test_pbrf_of_a_64_true_run_casts_the_training_samples_as_training_did(run64):
    """The PBRF, its linear form and the gap read every training sample by id: on a 64-true run with a float32 training
    set they failed on mixed dtypes (CLI `evaluate --pbrf` too). Oracle: the same calls given the set in float64."""
    import torch
    from torch.utils.data import TensorDataset

    from lightning_influence import WithIds, queries
    from lightning_influence.evaluation import gap_decomposition, linear_pbrf, pbrf
    from tests.conftest import TinyClassifier

    log_dir, train, val = run64
    log = InfluenceLog(log_dir)
    query = queries.mean_loss((val.tensors[0].double(), val.tensors[1]))
    as64 = WithIds(TensorDataset(train.tensors[0].double(), train.tensors[1]))
    kw = dict(damping=1e-2)
    for fn in (lambda data: pbrf(log, TinyClassifier().double(), data, query, samples=[0, 5], **kw),
               lambda data: linear_pbrf(log, TinyClassifier().double(), data, query, samples=[0, 5], **kw),
               lambda data: gap_decomposition(log, TinyClassifier().double(), data, query, samples=[0, 5], **kw)):
        want, got = fn(as64).to_dict(), fn(WithIds(train)).to_dict()
        assert _untimed(got) == _untimed(want)


def _untimed(value):
    """A result's dict without its run times."""
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if "seconds" not in k}
    if isinstance(value, (list, tuple)):
        return [_untimed(v) for v in value]
    return value


STALE = '''
import torch
from lightning_influence.examples.digits import DigitsClassifier


class DigitsClassifier(DigitsClassifier):  # the class edited after the run: Tanh for ReLU, the same parameters
    def forward(self, x):
        return torch.tanh(super().forward(x))
'''


@pytest.mark.parametrize("method", ["tracin", "dit-gn"])
def test_a_stale_model_is_refused_by_the_logged_losses(run, tmp_path, capsys, monkeypatch, method):
    """A model edited since the run (same class name and parameter shapes) loads the checkpoints; TracIn and
    Gauss-Newton DIT replay nothing and had scored with it silently. The rebuilt model and data must reproduce the
    losses the run logged at its first step."""
    (tmp_path / "edited.py").write_text(STALE)
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out, err = cli(capsys, "query", run.log, "-c", run.config, "--model", "edited.DigitsClassifier", "-m", method,
                         "-q")
    lines = [line for line in err.splitlines() if line.strip() and "Warning" not in line and "warn" not in line]
    assert code == 2 and out == "", err
    assert "do not reproduce the run's logged losses at step" in lines[-1] and "stale log" in lines[-1]
    code, out, err = cli(capsys, "query", run.log, "-c", run.config, "-m", method, "-q")  # the run's own class
    assert code == 0, err


def test_evaluate_with_self_influence_first_rebuilds_the_run_and_judges_only_query_answers(run, capsys):
    """`evaluate -m tracin-self -m tracin` (a log-only method first) had stopped at "queries need the model and data:
    pass --builder or --config" although the log's recipe rebuilds them; and self-influence, which answers each
    sample's own loss, was ranked against the query's leave-one-out (and could be named the best)."""
    code, out, err = cli(capsys, "evaluate", run.log, "-m", "tracin-self", "-m", "tracin", "--samples", "0,1,2,3",
                         "-f", "json", "-q")
    assert code == 0, err
    res = json.loads(out)
    assert "spearman" not in res["metrics"]["tracin-self"] and "spearman" in res["metrics"]["tracin"]
    assert res["verdict"].count("tracin-self") == 0
    code, out, err = cli(capsys, "evaluate", run.log, "-m", "tracin-self", "--samples", "0,1", "-f", "json")
    assert code == 0 and "no ground truth: self-influence answers each sample's own loss" in err, err
    assert all(s["truth"] is None for s in json.loads(out)["samples"])


def test_timeline_grid_boundaries_outside_the_window_are_refused(run, capsys):
    """`timeline --grid 0,4,8 --window 8:12` had answered windows 0-4 and 4-8, ignoring --window without a word."""
    code, out, err = cli(capsys, "timeline", run.log, "-c", run.config, "-m", "tracin", "--grid", "0,4,8", "--window",
                         "8:12", "-q")
    assert code == 2 and out == "" and "boundaries must lie in 8..12 (the steps of --window)" in err, err
    code, out, err = cli(capsys, "timeline", run.log, "-c", run.config, "-m", "tracin", "--grid", "8,10,12", "--window",
                         "8:12", "-q", "-f", "json")
    assert code == 0, err


class LazyNet(__import__("tests.conftest", fromlist=["TinyClassifier"]).TinyClassifier):
    """TinyClassifier whose first layer is an nn.LazyLinear (its shape known only after a forward)."""

    def __init__(self) -> None:
        super().__init__()
        import torch

        self.net = torch.nn.Sequential(torch.nn.LazyLinear(7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def test_the_cli_rebuilds_a_model_with_lazy_layers(tmp_path, capsys):
    """A freshly rebuilt model's lazy layers have no shapes: every command had failed with "internal error
    (RuntimeError: Can't access the shape of an uninitialized parameter ...)". They take the log's shapes; the scores
    equal the Python estimator's on the trained module."""
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader

    from lightning_influence import InfluenceTracker, WithIds, dit, queries
    from tests.conftest import loader, make_data

    train, val = make_data(18, dtype=torch.float32), make_data(8, dtype=torch.float32, seed=1)
    torch.manual_seed(0)
    module = LazyNet()
    module(train.tensors[0][:1])  # the lazy layer takes its shape (the tracker reads the shapes at the fit's start)
    pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, deterministic=True,
               callbacks=[InfluenceTracker(str(tmp_path / "log"), checkpoint_every_n_steps=2)]
               ).fit(module, loader(train), DataLoader(val, batch_size=4))
    code, out, err = cli(capsys, "query", str(tmp_path / "log"), "-m", "dit", "-k", "0", "-f", "json", "-q")
    assert code == 0, err
    from tests._cli_run import scores_of

    want = dit(InfluenceLog(str(tmp_path / "log")), queries.mean_loss(tuple(val.tensors)), module=module,
               train_data=WithIds(train)).column(0)
    np.testing.assert_allclose(scores_of(json.loads(out), 18), want, rtol=1e-12, atol=1e-15)


def test_the_tracker_refuses_lazy_layers_not_yet_run_naming_the_fix(tmp_path):
    """A lazy layer not yet run at the fit's start (no validation sanity check ran a forward) had failed in the
    tracker's on_train_start with torch's "Can't access the shape of an uninitialized parameter"."""
    import lightning.pytorch as pl
    import torch

    from lightning_influence import InfluenceTracker
    from tests.conftest import loader, make_data

    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[InfluenceTracker(str(tmp_path / "log"))])
    with pytest.raises(RuntimeError, match=r"parameters \['net.0.weight', 'net.0.bias'\] have no shape yet .* run one "
                                           r"forward before Trainer.fit"):
        trainer.fit(LazyNet(), loader(make_data(12, dtype=torch.float32)))
