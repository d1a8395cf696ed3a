"""Runs trained from plain scripts (no LightningCLI, no YAML) answered by the CLI from the log alone.

Each script in ``tests/scripts`` is copied to a temporary directory and run as a subprocess (its
classes live in ``__main__``); the CLI then runs in another subprocess from another working
directory, with nothing but the log. Its scores must equal the estimator's run in-process on the
objects the script built (the oracle), so the model was rebuilt with the hyperparameters it was
trained with and the data are the run's.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_influence import InfluenceLog, queries
from lightning_influence.cli import main
from tests._cli_run import scores_of

SCRIPTS = Path(__file__).parent / "scripts"
ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def train_script(name: str, root: Path, *args: str) -> tuple[Path, Path]:
    """Copy ``tests/scripts/NAME.py`` into ``root/code`` and run it there (``args`` after the log dir); returns
    (script, log dir)."""
    code = root / "code"
    code.mkdir(parents=True, exist_ok=True)
    script = code / f"{name}.py"
    shutil.copy(SCRIPTS / f"{name}.py", script)
    log = root / "log"
    proc = subprocess.run([sys.executable, str(script), str(log), *args], cwd=code, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return script, log


def cli_json(*argv: str, cwd: Path) -> dict:
    proc = subprocess.run([sys.executable, "-m", "lightning_influence", *argv, "--format", "json", "-q"], cwd=cwd,
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def load_script(script: Path):
    """The script as a module (its classes), imported under a fresh name."""
    spec = importlib.util.spec_from_file_location(f"_oracle_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    return train_script("cnn_digits", tmp_path_factory.mktemp("cnn"))


def test_cnn_plain_dataloaders_from_the_log_alone(cnn, tmp_path, monkeypatch, capsys):
    """DIT on the validation loss, model, training and validation data rebuilt from the log (plain DataLoaders)."""
    from lightning_influence.estimators import dit

    script, log_dir = cnn
    meta = InfluenceLog(log_dir).meta
    recipe = meta["recipe"]
    assert meta["module_class"] == "cnn_digits.CNN"  # the script's module name, not __main__
    assert recipe["module"]["hparams"] == {"channels": 3, "lr": 0.2}  # not the class defaults (4, 0.1)
    assert recipe["script"]["dir"] == str(script.parent)
    assert recipe["data"]["train"] == recipe["data"]["val"] == "dataloaders"
    assert recipe["data"]["stored"] == {"file": "data.pt", "train": 96, "val": 48}

    monkeypatch.chdir(tmp_path)  # not the script's directory: the recipe puts it on the import path
    assert main(["query", str(log_dir), "--top", "0", "-f", "json", "-q"]) == 0  # default method and query (val_loss)
    result = json.loads(capsys.readouterr().out)
    assert result["results"][0]["method"].startswith("dit")
    got = scores_of(result, 96)

    mod = load_script(script)
    train, val = mod.data()
    val_batch = [torch.stack([val[i][k] for i in range(len(val))]) for k in range(2)]
    expected = dit(InfluenceLog(log_dir), queries.mean_loss(val_batch), module=mod.CNN(channels=3, lr=0.2),
                   train_data=train).column(0)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-9)
    assert np.abs(expected).max() > 1e-4  # a real answer, not zeros


def test_info_says_how_the_run_is_rebuilt(cnn, capsys):
    script, log_dir = cnn
    assert main(["info", str(log_dir)]) == 0
    out = capsys.readouterr().out
    assert "model        cnn_digits.CNN" in out
    assert (f"rebuild      module hparams channels=3, lr=0.2; data from dataloaders, stored in the log (96 train, 48 val); "
            f"script dir {script.parent}") in out


def test_cnn_test_query_and_labels(cnn, capsys):
    """``test:ID`` indexes the stored validation set; labels come from the stored training items."""
    _, log_dir = cnn
    assert main(["query", str(log_dir), "-m", "tracin", "--query", "test:5", "-k", "4", "-f", "json", "-q"]) == 0
    rows = json.loads(capsys.readouterr().out)["results"][0]["rows"]
    from sklearn.datasets import load_digits

    target = load_digits().target
    assert [r["label"] for r in rows] == [int(target[r["id"]]) for r in rows]


def _error(capsys, *argv: str) -> str:
    code = main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    return err[0]


def _error_subprocess(*argv: str, cwd: Path) -> str:
    """The one error line of a CLI run in a fresh interpreter (no module imported by earlier tests)."""
    proc = subprocess.run([sys.executable, "-m", "lightning_influence", *argv, "-q"], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=300)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr
    return err[0]


def test_plain_dataloaders_without_stored_data_say_why_and_how(cnn, tmp_path, capsys):
    from lightning_influence.log.format import read_meta
    from lightning_influence.log.writer import write_meta

    _, log_dir = cnn
    copy = tmp_path / "log"
    shutil.copytree(log_dir, copy)
    (copy / "data.pt").unlink()
    meta = read_meta(copy)
    meta["recipe"]["data"].update(stored=None, not_stored="InfluenceTracker(store_data=False)")
    write_meta(copy, meta)
    line = _error(capsys, "query", str(copy), "-q")
    assert "plain DataLoaders" in line and "store_data=True" in line and "--builder" in line


def test_builder_and_model_override(cnn, tmp_path, capsys):
    """``--builder file.py:function`` supplies model and data; ``--model`` replaces the recorded class."""
    script, log_dir = cnn
    builder = tmp_path / "build_cnn.py"
    builder.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(script.parent)!r})\n"
        "from cnn_digits import CNN, data\n"
        "def build(log):\n"
        "    train, val = data()\n"
        "    return {'module': CNN(**log.meta['recipe']['module']['hparams']), 'train_data': train,\n"
        "            'val_data': torch_loader(val)}\n"
        "def torch_loader(ds):\n"
        "    from torch.utils.data import DataLoader\n"
        "    return DataLoader(ds, batch_size=7)\n")
    code = main(["query", str(log_dir), "-m", "tracin", "--builder", f"{builder}:build", "-k", "0", "-f", "json", "-q"])
    via_builder = scores_of(json.loads(capsys.readouterr().out), 96)
    assert code == 0
    code = main(["query", str(log_dir), "-m", "tracin", "-k", "0", "-f", "json", "-q"])
    via_log = scores_of(json.loads(capsys.readouterr().out), 96)
    np.testing.assert_allclose(via_builder, via_log, rtol=1e-5, atol=1e-10)

    line = _error(capsys, "query", str(log_dir), "-m", "tracin", "--model", "cnn_digits.NoSuchClass", "-q")
    assert "has no 'NoSuchClass'" in line
    line = _error(capsys, "query", str(log_dir), "-m", "tracin", "--builder", f"{builder}:nope", "-q")
    assert "--builder" in line and "nope" in line


@pytest.mark.slow
def test_cnn_answered_by_a_fresh_interpreter(cnn, tmp_path):
    """The console entry point in a new process, from another directory, with nothing but the log."""
    script, log_dir = cnn
    result = cli_json("query", str(log_dir), "-m", "tracin", "--top", "3", cwd=tmp_path)
    assert len(result["results"][0]["rows"]) == 3 and result["results"][0]["method"] == "tracin"


@pytest.mark.slow
def test_import_errors_keep_their_cause(cnn, tmp_path):
    """A script that fails on import, or that would train again on import, is named with the cause."""
    script, log_dir = cnn
    copy_dir = tmp_path / "code"
    copy_dir.mkdir()
    broken = copy_dir / "cnn_digits.py"
    broken.write_text("import no_such_package_xyz\n")
    log_copy = tmp_path / "log"
    shutil.copytree(log_dir, log_copy)
    from lightning_influence.log.format import read_meta
    from lightning_influence.log.writer import write_meta

    meta = read_meta(log_copy)
    meta["recipe"]["script"].update(dir=str(copy_dir), cwd=str(copy_dir))
    meta["recipe"]["module"]["file"] = str(broken)
    write_meta(log_copy, meta)
    line = _error_subprocess("query", str(log_copy), "-m", "tracin", cwd=tmp_path)
    assert "No module named 'no_such_package_xyz'" in line

    broken.write_text(script.read_text().replace('if __name__ == "__main__":', "if True:"))
    line = _error_subprocess("query", str(log_copy), "-m", "tracin", cwd=tmp_path)
    assert "would train again" in line


def test_yaml_error_shows_the_real_cause(cnn, tmp_path, capsys):
    _, log_dir = cnn
    config = tmp_path / "bad.yaml"
    config.write_text("model:\n  class_path: cnn_digits_nope.CNN\n")
    line = _error(capsys, "query", str(log_dir), "-m", "tracin", "-c", str(config), "-q")
    assert "No module named 'cnn_digits_nope'" in line
    config.write_text("model:\n  channels: three\n")
    line = _error(capsys, "query", str(log_dir), "-m", "tracin", "-c", str(config), "-q")
    assert "channels" in line and "three" in line, line


@pytest.mark.slow
@pytest.mark.parametrize("name, method, query", [("tiny_transformer", "dit", "val_loss"), ("dict_mlp", "dit", "val_loss")])
def test_script_runs_answered_without_yaml(name, method, query, tmp_path):
    """A datamodule defined in the script (transformer) and a module's own dataloader hooks with dict batches."""
    from lightning_influence.estimators import dit

    script, log_dir = train_script(name, tmp_path / name)
    result = cli_json("query", str(log_dir), "-m", method, "--query", query, "-k", "0", cwd=tmp_path)
    log = InfluenceLog(log_dir)
    n = log.dataset_size
    got = scores_of(result, n)
    mod = load_script(script)
    if name == "tiny_transformer":
        assert log.meta["recipe"]["datamodule"]["hparams"]["seed"] == 1
        dm = mod.Tokens(n_train=48, seed=1)
        model = mod.TinyTransformer(dim=8, lr=0.1)
        val = next(iter(torch.utils.data.DataLoader(dm.val_set, batch_size=len(dm.val_set))))
        expected = dit(log, queries.mean_loss(val), module=model, train_data=dm.train_set).column(0)
    else:
        assert log.meta["recipe"]["data"]["train"] == "module"
        model = mod.DictMLP(hidden=7, lr=0.2, n_train=48)
        val = next(iter(torch.utils.data.DataLoader(mod.Table(32, 1, False), batch_size=32)))
        expected = dit(log, queries.mean_loss(val), module=model, train_data=mod.Table(48, 0, True)).column(0)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-9)
    assert np.abs(expected).max() > 1e-5


def test_diffin_fd_is_checked_and_exact_is_the_default(cnn, capsys):
    """On the ReLU CNN (float32): exact HVPs by default; FD at its dtype-chosen step agrees with them (kinks
    guarded); FD with a step far too large is flagged (warning, info, method name) instead of returned silently."""
    from lightning_influence import diffin_self_influence

    script, log_dir = cnn
    mod = load_script(script)
    train, _ = mod.data()
    log = InfluenceLog(log_dir)
    kw = dict(module=mod.CNN(channels=3, lr=0.2), train_data=train)
    exact = diffin_self_influence(log, **kw)
    assert "(exact)" in exact.method
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no warning at the default step
        fd = diffin_self_influence(log, **kw, hvp="fd")
    assert fd.info["fd_kinks"] < 0.2 * fd.info["fd_products"] and not fd.info.get("fd_unreliable")
    assert fd.info["fd_dtype"] == "float64"  # float64 differences at ε_0 = 1e-6 (estimators/fd.py, as DIT's)
    err = np.abs(fd.column(0) - exact.column(0)).max() / np.abs(exact.column(0)).max()
    assert err < 1e-5, err  # the float32 differences at ε_0 = 1e-3 were within 2e-2 only
    with pytest.warns(RuntimeWarning, match="not reliable"):
        bad = diffin_self_influence(log, **kw, hvp="fd", eps0=1e-2)
    assert bad.info["fd_unreliable"] and "[FD unreliable]" in bad.method
    assert np.abs(bad.column(0) - exact.column(0)).max() > 0.5 * np.abs(exact.column(0)).max()  # it was garbage

    from lightning_influence import dit

    query = queries.mean_loss([torch.stack([t[k] for t in mod.data()[1]]) for k in range(2)])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        exact_dit = dit(log, query, **kw)  # the default: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        fd_dit = dit(log, query, **kw, hvp="fd")  # float64 differences at ε_0 = 1e-6 (estimators/fd.py): no warning
    assert fd_dit.info["fd_dtype"] == "float64" and not fd_dit.info.get("fd_unreliable")
    assert np.abs(fd_dit.column(0) - exact_dit.column(0)).max() < 1e-3 * np.abs(exact_dit.column(0)).max()
    with pytest.warns(RuntimeWarning, match="DIT with hvp='fd'.*crossed a kink"):
        bad_dit = dit(log, query, **kw, hvp="fd", eps0=3e-2)  # a step too large for this ReLU CNN: flagged, not silent
    assert bad_dit.info["fd_unreliable"] and bad_dit.info["fd_kinks"] > 0.2 * bad_dit.info["fd_products"]
    assert np.abs(bad_dit.column(0) - exact_dit.column(0)).max() > 0.1 * np.abs(exact_dit.column(0)).max()

    for extra, tag in (([], "(exact)"), (["--hvp", "fd"], "(fd)")):
        assert main(["query", str(log_dir), "-m", "diffin-self", "-k", "3", "-f", "json", "-q", *extra]) == 0
        assert tag in json.loads(capsys.readouterr().out)["results"][0]["method"]
    assert main(["query", str(log_dir), "-m", "dit-fd", "--hvp", "exact", "-q"]) == 2
    assert "contradicts" in capsys.readouterr().err


@pytest.mark.slow
def test_token_samples_in_tensorboard_through_the_decoder_hook(tmp_path):
    """The transformer's most harmful/helpful samples per window as text, decoded by ``--decoder file.py:function``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, log_dir = train_script("tiny_transformer", tmp_path / "tt")
    decoder = tmp_path / "vocab.py"
    decoder.write_text("def decode(tokens):\n    return ''.join('abcdefghijkl'[int(t)] for t in tokens)\n")
    logdir = tmp_path / "tb"
    proc = subprocess.run([sys.executable, "-m", "lightning_influence", "tensorboard", str(log_dir), "-m", "tracin",
                           "--logdir", str(logdir), "--decoder", f"{decoder}:decode", "-q"], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    ea = EventAccumulator(str(logdir / "tracin"), size_guidance={"tensors": 0})
    ea.Reload()
    events = ea.Tensors("influence/val_loss/samples/e0/text_summary")
    md = events[0].tensor_proto.string_val[0].decode()
    assert "most negative (harmful)" in md and "token ids shown" not in md
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| id")]
    assert len(rows) == 10 and all(set(r.split("|")[4].strip()) <= set("abcdefghijkl") for r in rows)


@pytest.mark.parametrize("variant", ["module-level", "local"])
def test_a_script_that_would_train_again_on_import_is_never_imported(variant, tmp_path):
    """A script calling ``main()`` (which trains) at its top level, without the ``__main__`` guard: importing it to
    rebuild the model trained again inside the CLI and, with ``overwrite=True``, replaced the log; a class defined
    inside ``main`` failed only after that import. Both are refused before anything is imported; the log is unchanged."""
    code = tmp_path / "code"
    code.mkdir()
    script = code / "unguarded_main.py"
    shutil.copy(SCRIPTS / "unguarded_main.py", script)
    log_dir = tmp_path / "log"
    extra = ["local"] if variant == "local" else []
    proc = subprocess.run([sys.executable, str(script), str(log_dir), *extra], cwd=code, env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = InfluenceLog(log_dir).meta["run_id"]
    line = _error_subprocess("query", str(log_dir), "-m", "dit", cwd=tmp_path)
    expected = "was defined inside a function" if variant == "local" else "would train again"
    assert expected in line and "--builder" in line, line
    assert InfluenceLog(log_dir).meta["run_id"] == before
