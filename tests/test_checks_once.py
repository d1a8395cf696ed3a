"""The data checks (lightning_influence.datacheck) send the query and the training data through the model once per
CLI command, however many methods it runs, and once per estimator called from Python."""

from __future__ import annotations

import pytest

import lightning_influence as li
from lightning_influence import datacheck
from lightning_influence.cli import main
from tests._cli_run import train_tiny_run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_tiny_run(tmp_path_factory.mktemp("once") / "run")


@pytest.fixture
def forwards(monkeypatch):
    """The model forwards the data checks make (each check is one forward, through ``datacheck._quietly``)."""
    seen = []
    quietly = datacheck._quietly

    def counted(fn):
        seen.append(1)
        return quietly(fn)

    monkeypatch.setattr(datacheck, "_quietly", counted)
    return seen


def test_evaluate_with_several_methods_checks_the_data_once(run, forwards, capsys):
    """`evaluate -m dit -m tracin` had run 5 check forwards: the CLI's two (training data, query), then DIT's two and
    TracIn's one again inside each estimator. Now the CLI's two."""
    code = main(["evaluate", run.log, "-m", "dit", "-m", "tracin", "-m", "dit-gn", "--truth", "none",
                 "--samples", "0,1", "-q"])
    assert code == 0, capsys.readouterr().err
    assert len(forwards) == 2


def test_timeline_checks_the_data_once(run, forwards, capsys):
    code = main(["timeline", run.log, "-m", "dit", "--grid", "2", "-q"])
    assert code == 0, capsys.readouterr().err
    assert len(forwards) == 2


def test_an_estimator_called_from_python_checks_its_own_data(run, forwards):
    """Outside a CLI command each estimator checks what it is given: DIT the query and the training data, TracIn the
    query (it reads no training data); inside checked_by_caller() neither."""
    import yaml
    from pathlib import Path

    from lightning_influence.examples.digits import DigitsClassifier, DigitsDataModule

    cfg = yaml.safe_load(Path(run.config).read_text())
    dm, model, log = DigitsDataModule(**cfg["data"]), DigitsClassifier(**cfg["model"]), li.InfluenceLog(run.log)
    query = li.queries.mean_loss(tuple(dm.splits["val"]))
    li.dit(log, query, module=model, train_data=dm.train_dataset, window=(0, 2))
    assert len(forwards) == 2
    li.tracin(log, query, module=model)
    assert len(forwards) == 3
    with datacheck.checked_by_caller():
        li.dit(log, query, module=model, train_data=dm.train_dataset, window=(0, 2))
        li.tracin(log, query, module=model)
    assert len(forwards) == 3
    li.tracin(log, query, module=model)  # the context left: checked again
    assert len(forwards) == 4


@pytest.mark.parametrize("method", ["tracin", "dit"])
def test_a_stale_model_on_a_log_with_stored_inputs_is_refused_by_the_cli(tmp_path, capsys, method):
    """With the estimators' own checks skipped inside a command, the CLI's check covers what they covered: where the run
    gives no training set but the log stores its inputs, the model against the losses logged at the last checkpoint.
    TracIn (which reads no training data) had let a changed model through here."""
    from conftest import fit, loader, make_data, tiny

    from lightning_influence import InfluenceTracker

    fit(tiny(), loader(make_data(12)), InfluenceTracker(str(tmp_path / "log"), store_inputs=True, store_data=False,
                                                        record_gradients=True, record_losses=True,
                                                        checkpoint_every_n_steps=2), epochs=1)
    builder = tmp_path / "build.py"
    builder.write_text("from conftest import TinyClassifier, make_data\n"
                       "class Stale(TinyClassifier):\n"
                       "    def forward(self, x):\n        return 2 * super().forward(x)\n"
                       "def build(log):\n    return {'module': Stale().double(), 'val_data': make_data(4, seed=5).tensors}\n"
                       "def same(log):\n    return {'module': TinyClassifier().double(), "
                       "'val_data': make_data(4, seed=5).tensors}\n")
    argv = ["query", str(tmp_path / "log"), "-m", method, "-k", "3", "-q"]
    assert main([*argv, "--builder", f"{builder}:same"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main([*argv, "--builder", f"{builder}:build"]) == 2
    err = capsys.readouterr().err
    assert "do not reproduce the run's logged losses" in err and "--builder" in err, err



_COUNTER = """import os
if os.environ.get("LI_CHECK_COUNT"):  # in every process of the command: its data-check forwards, by process and caller
    import traceback
    from lightning_influence import datacheck

    _quietly = datacheck._quietly

    def _counted(fn):
        by_cli = any(f.filename.endswith(os.path.join("cli", "datacheck.py")) for f in traceback.extract_stack())
        with open(os.environ["LI_CHECK_COUNT"], "a") as f:
            f.write(f"{os.getpid()}:{'cli' if by_cli else 'estimator'}\\n")
        return _quietly(fn)

    datacheck._quietly = _counted
"""


@pytest.mark.slow
def test_each_process_of_devices_checks_the_data_once_in_the_command(run, tmp_path):
    """`query -m dit --devices 2` runs the command in each process (Lightning's ddp: the other process re-runs it and
    rebuilds its own model and data from the recipe), so each checks what it rebuilt, once, in the command (a mistake
    then fails alike in every process, each exiting 2); the estimators there run inside checked_by_caller() and check
    nothing again: 2 forwards per process, all the command's."""
    import json
    import os
    import subprocess
    import sys
    from collections import Counter
    from pathlib import Path

    (tmp_path / "sitecustomize.py").write_text(_COUNTER)
    counts = tmp_path / "forwards.txt"
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LI_CHECK_COUNT": str(counts),
           "PYTHONPATH": os.pathsep.join([str(tmp_path), root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "lightning_influence", "query", run.log, "-m", "dit", "--split",
                             "batch", "--devices", "2", "-k", "3", "-q", "-f", "json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert [r["rank"] for r in json.loads(out)["results"][0]["info"]["per_rank"]] == [0, 1]  # two processes
    seen = Counter(counts.read_text().split())
    assert len(seen) == 2 and f"{proc.pid}:cli" in seen, seen
    assert all(caller == "cli" and n == 2 for (key, n) in seen.items() for caller in [key.split(":")[1]]), seen


_SWEEP = """import sys, yaml
from pathlib import Path
import lightning_influence as li
from lightning_influence.distributed import Processes, sweep
from lightning_influence.examples.digits import DigitsClassifier, DigitsDataModule

if __name__ == "__main__":
    cfg = yaml.safe_load(Path(sys.argv[2]).read_text())
    dm, model = DigitsDataModule(**cfg["data"]), DigitsClassifier(**cfg["model"])
    with li.InfluenceLog(sys.argv[1]) as log:
        res = sweep(li.dit, log, li.queries.mean_loss(tuple(dm.splits["val"])), Processes(devices=2), split="batch",
                    module=model, train_data=dm.train_dataset)
    print(res.info["processes"])
"""


def _digits(run):
    import yaml
    from pathlib import Path

    from lightning_influence.examples.digits import DigitsClassifier, DigitsDataModule

    cfg = yaml.safe_load(Path(run.config).read_text())
    dm = DigitsDataModule(**cfg["data"])
    return DigitsClassifier(**cfg["model"]), dm, li.queries.mean_loss(tuple(dm.splits["val"]))


@pytest.mark.slow
def test_a_sweep_over_processes_checks_the_data_once_before_starting_them(run, tmp_path):
    """distributed.sweep(dit, ..., Processes(devices=2)) from Python checked nothing before starting the processes and
    each process checked the data inside DIT (2 forwards each, checked_by_caller() does not cross into a spawned
    process), so a training set the model cannot take failed as a DistributedQueryError of the processes, after
    starting them. Now the sweep checks once, here, and passes the fact to the processes: 2 forwards in all."""
    import os
    import subprocess
    import sys
    from collections import Counter
    from pathlib import Path

    import torch

    from lightning_influence.distributed import Processes, sweep

    model, dm, query = _digits(run)
    bad = li.WithIds(torch.utils.data.TensorDataset(torch.zeros(60, 7), torch.zeros(60, dtype=torch.long)))
    with li.InfluenceLog(run.log) as log, pytest.raises(datacheck.DataMismatchError, match="shapes cannot be"):
        sweep(li.dit, log, query, Processes(devices=2, timeout_s=60), split="batch", module=model, train_data=bad)
    (tmp_path / "sitecustomize.py").write_text(_COUNTER)
    (tmp_path / "sweep.py").write_text(_SWEEP)
    counts = tmp_path / "forwards.txt"
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LI_CHECK_COUNT": str(counts),
           "PYTHONPATH": os.pathsep.join([str(tmp_path), root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(tmp_path / "sweep.py"), run.log, run.config], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert out.split()[-1] == "2"  # two processes swept
    assert Counter(counts.read_text().split()) == {f"{proc.pid}:estimator": 2}
