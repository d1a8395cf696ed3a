"""A run tracked with ``InfluenceTracker(loss_fn=...)`` on a model without ``per_sample_loss``, answered by the CLI.

The log's recipe names the loss function (a top-level function of the training script); the CLI imports it for its
estimators, queries and ground truth, and the scores equal the estimator's run in-process with that function (the
oracle). A lambda cannot be imported again: the CLI says so and takes ``--loss-fn``. Before, every model-based command
stopped with "internal error (AttributeError: ... no attribute 'per_sample_loss')".
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_influence import InfluenceLog, queries
from lightning_influence.cli import main
from lightning_influence.log.format import read_meta
from lightning_influence.log.writer import write_meta
from tests._cli_run import scores_of
from tests.test_script_runs import _env, load_script, train_script

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_script("loss_fn_mlp", tmp_path_factory.mktemp("lossfn"))


def _val_batch(mod) -> dict:
    val = mod.Table(16, 1)
    return {"features": val.x, "label": val.y}


def test_the_recipe_names_the_loss_function_and_the_cli_uses_it(run, tmp_path, monkeypatch, capsys):
    from lightning_influence.estimators import dit
    from lightning_influence.evaluation import replay_loo

    script, log_dir = run
    entry = read_meta(log_dir)["recipe"]["loss_fn"]
    assert entry == {"function": "loss_fn_mlp.sample_loss", "file": str(script), "why": None}
    monkeypatch.chdir(tmp_path)  # not the script's directory: the recipe puts it on the import path
    assert main(["query", str(log_dir), "-m", "dit", "--top", "0", "-f", "json", "-q"]) == 0
    got = scores_of(json.loads(capsys.readouterr().out), 40)

    mod = load_script(script)
    log = InfluenceLog(log_dir)
    query = queries.mean_loss(_val_batch(mod), loss_fn=mod.sample_loss)
    expected = dit(log, query, module=mod.PlainMLP(hidden=6, lr=0.1), train_data=mod.Table(40, 0),
                   loss_fn=mod.sample_loss).column(0)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-12)
    assert np.abs(expected).max() > 1e-4

    # ground truth through the CLI: replay leave-one-out with the same loss, against the in-process one
    assert main(["evaluate", str(log_dir), "-m", "dit", "-s", "3,17,30", "-f", "json", "-q"]) == 0
    out = json.loads(capsys.readouterr().out)
    truth = replay_loo(log, mod.PlainMLP(hidden=6, lr=0.1), mod.Table(40, 0), query, sample_ids=[3, 17, 30],
                       loss_fn=mod.sample_loss)
    rows = {r["id"]: r for r in out["samples"]}
    expected_truth = truth.window(*log.window(None))
    np.testing.assert_allclose([rows[i]["truth"] for i in (3, 17, 30)], expected_truth, rtol=1e-6, atol=1e-12)
    assert np.abs(expected_truth).max() > 1e-5


def test_a_lambda_is_named_and_loss_fn_replaces_it(tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    script = code / "loss_fn_mlp.py"
    script.write_text((Path(__file__).parent / "scripts" / "loss_fn_mlp.py").read_text())
    log_dir = tmp_path / "log"
    proc = subprocess.run([sys.executable, str(script), str(log_dir), "lambda"], cwd=code, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    entry = read_meta(log_dir)["recipe"]["loss_fn"]
    assert entry["function"] is None and "<lambda>" in entry["why"]

    def cli(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "lightning_influence", *argv, "-q"], cwd=tmp_path, env=_env(),
                              capture_output=True, text=True, timeout=300)

    refused = cli("query", str(log_dir), "-m", "dit", "-k", "3")
    assert refused.returncode == 2 and "--loss-fn" in refused.stderr and "internal error" not in refused.stderr
    ok = cli("query", str(log_dir), "-m", "dit", "--top", "0", "-f", "json", "--loss-fn", f"{script}:sample_loss")
    assert ok.returncode == 0, ok.stderr
    mod = load_script(script)
    from lightning_influence.estimators import dit

    expected = dit(InfluenceLog(log_dir), queries.mean_loss(_val_batch(mod), loss_fn=mod.sample_loss),
                   module=mod.PlainMLP(hidden=6, lr=0.1), train_data=mod.Table(40, 0), loss_fn=mod.sample_loss).column(0)
    np.testing.assert_allclose(scores_of(json.loads(ok.stdout), 40), expected, rtol=1e-6, atol=1e-12)


def test_no_per_sample_loss_and_no_recorded_function_is_a_user_error(run, tmp_path, capsys):
    """A log without the recipe's loss entry (written before it existed) of a model without per_sample_loss: the CLI
    says to pass --loss-fn; the Python API says to pass loss_fn=."""
    import shutil

    _, log_dir = run
    old = tmp_path / "old"
    shutil.copytree(log_dir, old)
    meta = read_meta(old)
    del meta["recipe"]["loss_fn"]
    write_meta(old, meta)
    assert main(["query", str(old), "-m", "dit", "-k", "3", "-q"]) == 2
    err = capsys.readouterr().err
    assert "has no per_sample_loss" in err and "--loss-fn" in err

    from lightning_influence.estimators import dit

    mod = load_script(run[0])
    with pytest.raises(TypeError, match="pass loss_fn=.*to the estimator or to the query helper"):
        dit(InfluenceLog(log_dir), queries.mean_loss(_val_batch(mod)), module=mod.PlainMLP(hidden=6, lr=0.1),
            train_data=mod.Table(40, 0))


def test_loss_fn_given_once_serves_the_estimator_and_the_query(run):
    """The Python workflow on a model without per_sample_loss had taken the loss twice, to the query helper and to
    the estimator (``dit(log, mean_loss(val, loss_fn=f), ..., loss_fn=f)``); given to the query alone it stopped with
    "has no per_sample_loss", given to the estimator alone the query did. Either one is enough now (queries.shared_loss),
    with the scores of the twice-given call, for the estimators and replay leave-one-out."""
    from lightning_influence.estimators import diffin, dit
    from lightning_influence.evaluation import replay_loo

    script, log_dir = run
    mod = load_script(script)
    log, f, val = InfluenceLog(log_dir), mod.sample_loss, _val_batch(mod)
    model = dict(module=mod.PlainMLP(hidden=6, lr=0.1), train_data=mod.Table(40, 0))
    for estimator in (dit, diffin):
        twice = estimator(log, queries.mean_loss(val, loss_fn=f), loss_fn=f, **model).scores
        np.testing.assert_array_equal(estimator(log, queries.mean_loss(val, loss_fn=f), **model).scores, twice)
        per_sample = estimator(log, queries.eval_mode(queries.sample_losses(val)), loss_fn=f, **model).scores
        np.testing.assert_allclose(per_sample.mean(axis=1), twice[:, 0], rtol=1e-5, atol=1e-9)  # float32 sweeps
    truth = replay_loo(log, model["module"], model["train_data"], queries.mean_loss(val, loss_fn=f), sample_ids=[3, 17],
                       loss_fn=f).values
    np.testing.assert_array_equal(replay_loo(log, model["module"], model["train_data"], queries.mean_loss(val),
                                             sample_ids=[3, 17], loss_fn=f).values, truth)
    np.testing.assert_array_equal(replay_loo(log, model["module"], model["train_data"], queries.mean_loss(val, loss_fn=f),
                                             sample_ids=[3, 17]).values, truth)


def test_a_model_with_per_sample_loss_keeps_it_for_training_whatever_the_query_evaluates():
    """The sharing rule never replaces a module's own per_sample_loss: a query on another loss (here the squared
    logit) leaves the training loss at per_sample_loss, and an estimator's loss_fn leaves a default query alone."""
    from lightning_influence.queries import default_loss_fn, mean_loss, shared_loss

    class Own(torch.nn.Linear):
        def per_sample_loss(self, batch):
            return self(batch[0]).sum(1)

    other = lambda m, b: m(b[0]).pow(2).sum(1)  # noqa: E731
    q = mean_loss((torch.zeros(2, 3),), loss_fn=other)
    assert shared_loss(Own(3, 1), q, default_loss_fn) == (default_loss_fn, q)
    plain = mean_loss((torch.zeros(2, 3),))
    assert shared_loss(Own(3, 1), plain, other) == (other, plain)
    assert shared_loss(torch.nn.Linear(3, 1), q, default_loss_fn) == (other, q)  # no per_sample_loss: the query's
    loss, shared = shared_loss(torch.nn.Linear(3, 1), plain, other)
    assert loss is other and shared is not plain and shared.loss_fn is other and plain.loss_fn is default_loss_fn
