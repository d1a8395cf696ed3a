"""The ``lightning-influence`` command line: every subcommand, every error case (one line, exit 2)."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from lightning_influence import InfluenceLog, estimators, queries
from lightning_influence.cli import METHODS, main
from tests._cli_run import scores_of, train_tiny_run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_tiny_run(tmp_path_factory.mktemp("cli") / "run")


def _without(run, root: Path, **recorded: bool) -> str:
    """The run's log as if trained without some records (its metadata rewritten)."""
    from lightning_influence.log.format import read_meta
    from lightning_influence.log.writer import write_meta

    shutil.copytree(run.log, root)
    meta = read_meta(root)
    meta["recorded"].update(recorded)
    write_meta(root, meta)
    return str(root)


@pytest.fixture(scope="module")
def no_grads_log(run, tmp_path_factory):
    return _without(run, tmp_path_factory.mktemp("cli") / "nograd", gradients=False, hvp=False)


@pytest.fixture(scope="module")
def direct(run):
    """The run's model, data and val-loss query, built by hand (not through the CLI)."""
    from lightning_influence.examples.digits import DigitsClassifier, DigitsDataModule

    cfg = yaml.safe_load(Path(run.config).read_text())
    dm = DigitsDataModule(**cfg["data"])
    model = DigitsClassifier(**cfg["model"])
    query = queries.mean_loss(tuple(dm.splits["val"]), name="val_loss")
    return model, dm, query


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_error(result: tuple[int, str, str], needle: str) -> str:
    code, out, err = result
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert needle in lines[0], lines[0]
    assert out == ""
    return lines[0]


# ---------------------------------------------------------------------------------------- info
def test_info_table(run, capsys):
    code, out, err = cli(capsys, "info", run.log)
    assert code == 0, err
    log = InfluenceLog(run.log)
    assert f"steps        {log.num_steps} (0..{log.num_steps - 1}), epochs 0..2" in out
    assert "recorded     ids, lrs, losses, gradients, hvp, checkpoints" in out
    assert "lightning_influence.examples.digits.DigitsClassifier" in out  # recorded importable class, not __main__
    assert "integrity    OK" in out
    assert "MB on disk" in out or "KB on disk" in out


def test_info_json_and_verify(run, capsys):
    code, out, _ = cli(capsys, "info", run.log, "--format", "json", "--verify", "-q")
    assert code == 0
    info = json.loads(out)
    log = InfluenceLog(run.log)
    assert info["steps"] == log.num_steps == 12
    assert info["dataset_size"] == 60 and info["ids_seen"] == 60
    assert info["recorded"]["hvp"] is True
    assert info["checkpoints"] == {"count": 13, "every_n_steps": 1, "final": True,
                                   "final_weights_replaced_by": None}
    assert info["integrity"]["ok"] and any("--verify" in n for n in info["integrity"]["notes"])
    assert "tracin" in info["methods"]["usable"] and "dit" in info["methods"]["usable"]
    assert info["datamodule_class"] == "lightning_influence.examples.digits.DigitsDataModule"
    assert info["size_bytes"] == sum(p.stat().st_size for p in Path(run.log).rglob("*") if p.is_file())


def test_info_lists_only_methods_that_model_the_runs_optimizer(run, tmp_path, capsys):
    from lightning_influence.log.format import read_meta
    from lightning_influence.log.writer import write_meta

    info = json.loads(cli(capsys, "info", run.log, "--format", "json", "-q")[1])
    assert {"dit-gn", "dit-gn-local"} <= set(info["methods"]["usable"])  # an SGD run
    assert info["methods"]["not_usable"]["dit-frozen"] == ["optimizer Adam/AdamW/RMSprop/Adagrad, not SGD"]
    root = tmp_path / "adamw"
    shutil.copytree(run.log, root)
    meta = read_meta(root)
    meta["optimizer"]["class"] = "torch.optim.adamw.AdamW"
    write_meta(root, meta)
    info = json.loads(cli(capsys, "info", str(root), "--format", "json", "-q")[1])
    assert "dit-gn" not in info["methods"]["usable"] and "dit-frozen" in info["methods"]["usable"]
    assert "dit" in info["methods"]["usable"]
    out = cli(capsys, "info", str(root))[1]
    assert "not dit-gn (needs optimizer SGD, not AdamW)" in out
    assert_error(cli(capsys, "query", str(root), "-c", run.config, "-m", "dit-gn"), "--method dit-gn needs optimizer SGD, not AdamW, or use")


def test_info_reports_a_crashed_run(run, tmp_path, capsys):
    log = tmp_path / "crashed"
    shutil.copytree(run.log, log)
    segs = sorted((log / "rank-0").glob("seg-*.h5"))
    segs[-1].rename(segs[-1].with_name(segs[-1].name + ".tmp"))  # the last write was cut off by a crash
    code, out, _ = cli(capsys, "info", str(log))
    assert code == 2 and "PROBLEMS" in out and "ended without finishing" in out and "no final θ_T" in out  # printed
    assert cli(capsys, "info", str(log), "--strict", "-q")[0] == 2  # problems: exit 2, with or without --strict
    code, out, _ = cli(capsys, "query", str(log), "-c", run.config, "-m", "tracin", "-q")  # the kept steps still answer
    assert code == 0 and "window whole run = steps [0, " in out


# --------------------------------------------------------------------------------------- query
def test_query_table(run, capsys):
    code, out, err = cli(capsys, "query", run.log, "--config", run.config, "--window", "epoch 2:", "--top", "5",
                         "--progress")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("dit: query val_loss, window epoch 2: = steps [8, 12), 60 training samples")
    assert "negative = harmful" in lines[1]
    assert lines[2].split() == ["rank", "id", "score", "label", "flipped"]
    rows = lines[3:8]
    assert [int(r.split()[0]) for r in rows] == [1, 2, 3, 4, 5]
    scores = [float(r.split()[2]) for r in rows]
    assert scores == sorted(scores)
    assert lines[8].startswith("flipped labels among these 5:")
    assert "dit [8, 12)" in err and "12/12" in err  # --progress: a tqdm bar on stderr (steps swept, rate, ETA)


def test_no_progress_lines_when_stderr_is_not_a_terminal(run, capsys):
    code, out, err = cli(capsys, "timeline", run.log, "-m", "tracin", "--grid", "3", "-k", "2")
    assert code == 0, err
    assert err.strip().splitlines() == ["rebuilding the model and data from the log's recipe ..."]


@pytest.mark.parametrize("method", ["tracin", "dit"])
def test_query_scores_equal_the_estimator(run, direct, method, capsys):
    model, dm, query = direct
    code, out, err = cli(capsys, "query", run.log, "-c", run.config, "-m", method, "-w", "0.5:1.0", "--top", "0",
                         "-f", "json", "-q")
    assert code == 0, err
    answer = json.loads(out)
    res = answer["results"][0]
    log = InfluenceLog(run.log)
    window = log.window("0.5:1.0")
    if method == "tracin":
        expected = estimators.tracin(log, query, module=model, window=window).column(0)
    else:
        expected = estimators.dit(log, query, module=model, train_data=dm.train_dataloader().dataset,
                                  window=window).column(0)
    np.testing.assert_allclose(scores_of(answer, 60), expected, rtol=1e-12, atol=0)
    assert res["steps"] == list(window)
    labels = dm.splits["train"][1].numpy()
    flipped = set(dm.flipped.tolist())
    for row in res["rows"]:
        assert row["label"] == labels[row["id"]]
        assert row["flipped"] is (row["id"] in flipped)  # a JSON boolean (had been the strings "yes"/"")


def test_query_window_forms_and_csv_out(run, tmp_path, capsys):
    out_file = tmp_path / "top.csv"
    code, _, err = cli(capsys, "query", run.log, "-c", run.config, "-m", "tracin", "-w", "2:8", "-w", "0.5:1.0",
                       "-w", "epoch 1:2", "-k", "3", "-o", str(out_file), "-q")
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out_file.read_text())))
    assert len(rows) == 9
    assert {(r["window"], int(r["t1"]), int(r["t2"])) for r in rows} == {("2:8", 2, 8), ("6:12", 6, 12), ("4:8", 4, 8)}
    assert set(rows[0]) == {"method", "query", "window", "t1", "t2", "rank", "id", "score", "label", "flipped"}


@pytest.mark.parametrize("method, extra", [("dit", []), ("tracin", ["--sort", "abs", "--top", "7"])])
def test_query_csv_is_the_python_apis_csv(run, direct, method, extra, capsys):
    """The CLI's CSV and InfluenceScores.to_csv are one table: the same bytes for the same log, method and window
    (they had other columns: id,label,score,rank against method,query,window,t1,t2,rank,id,score,label,flipped)."""
    model, dm, query = direct
    code, out, err = cli(capsys, "query", run.log, "-c", run.config, "-m", method, "-w", "0.5:1.0", "-f", "csv", "-q",
                         *(extra or ["--top", "0"]))
    assert code == 0, err
    log = InfluenceLog(run.log)
    train = dm.train_dataloader().dataset
    fn = estimators.tracin if method == "tracin" else estimators.dit
    kwargs = {} if method == "tracin" else {"train_data": train}
    scores = fn(log, query, module=model, window="0.5:1.0", **kwargs).with_labels(train, flipped=dm.flipped)
    text = scores.to_csv(**({"sort": "abs", "top": 7} if extra else {}))
    assert text == out
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == (7 if extra else 60) and rows[0]["window"] == "6:12" and rows[0]["query"] == "val_loss"
    assert {r["flipped"] for r in rows} <= {"True", "False"}


def test_query_test_sample_and_prediction(run, capsys):
    code, out, err = cli(capsys, "query", run.log, "-c", run.config, "-m", "tracin", "--query", "test:3",
                         "--query", "pred:3", "--query", "margin:3:1", "--sort", "abs", "-k", "4", "-f", "json", "-q")
    assert code == 0, err
    results = json.loads(out)["results"]
    assert [r["query"] for r in results] == ["test:3", "pred:3", "margin:3:1"]
    assert [r["loss_query"] for r in results] == [True, False, False]
    for r in results:
        mags = [abs(row["score"]) for row in r["rows"]]
        assert mags == sorted(mags, reverse=True)


def test_query_with_class_path_config(run, tmp_path, capsys):
    cfg = yaml.safe_load(Path(run.config).read_text())
    cfg["model"] = {"class_path": "lightning_influence.examples.digits.DigitsClassifier", "init_args": cfg["model"]}
    cfg["data"] = {"class_path": "lightning_influence.examples.digits.DigitsDataModule", "init_args": cfg["data"]}
    path = tmp_path / "class_path.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, out, err = cli(capsys, "query", run.log, "-c", str(path), "-m", "tracin", "-k", "2", "-q")
    assert code == 0, err
    assert "tracin: query val_loss, window whole run = steps [0, 12)" in out


def test_json_output_writes_numpy_booleans_as_booleans():
    """json_text (every command's -f json) wrote a numpy bool (an estimator's info flag) as the string "True"."""
    from lightning_influence.cli.common import json_text

    assert json.loads(json_text({"converged": np.bool_(True), "flags": np.array([True, False])})) == \
        {"converged": True, "flags": [True, False]}


def _strict(token: str):
    raise ValueError(f"not JSON: {token}")  # what JSON.parse and jq say to NaN/Infinity


def test_json_output_is_strict_json_nan_as_null(run, capsys):
    """-f json wrote Python's NaN for undefined metrics (here: correlations over samples the one-step window never
    trains on, all truths 0), which JSON.parse and jq reject; now null, and the output is strict JSON."""
    from lightning_influence.cli.common import json_text

    trained = set(InfluenceLog(run.log).batch_ids(0).tolist())
    untouched = [j for j in range(30) if j not in trained][:3]
    code, out, err = cli(capsys, "evaluate", run.log, "-c", run.config, "-m", "tracin", "-w", "0:1", "--samples",
                         ",".join(map(str, untouched)), "-q", "-f", "json")
    assert code == 0, err
    res = json.loads(out, parse_constant=_strict)
    assert [s["truth"] for s in res["samples"]] == [0.0, 0.0, 0.0]  # never trained on in [0, 1)
    assert res["metrics"]["tracin"]["pearson"] is None and res["metrics"]["tracin"]["spearman"] is None
    values = {"a": float("nan"), "b": [np.float32(np.inf), -np.inf, 1.5], "c": np.array([[np.nan, 2.0]]),
              "d": (np.float64(-np.inf),), "e": np.array([1, 2]), "f": 3}
    assert json.loads(json_text(values), parse_constant=_strict) == \
        {"a": None, "b": [None, None, 1.5], "c": [[None, 2.0]], "d": [None], "e": [1, 2], "f": 3}
    from lightning_influence.estimators.scores import InfluenceScores

    rows = json.loads(InfluenceScores(np.array([np.nan, 1.0]), "tracin", (0, 1), ["q"]).to_json(top=0),
                      parse_constant=_strict)["rows"]
    assert sorted((r["id"], r["score"]) for r in rows) == [(0, None), (1, 1.0)]


# ------------------------------------------------------------------------------------ timeline
def test_timeline_patterns_and_additivity(run, direct, capsys):
    model, dm, query = direct
    code, out, err = cli(capsys, "timeline", run.log, "-c", run.config, "-m", "dit", "-f", "json", "-q")
    assert code == 0, err
    res = json.loads(out)["results"][0]
    assert res["grid"] == [[0, 4], [4, 8], [8, 12]] and res["grid_labels"] == ["e0", "e1", "e2"]
    assert sum(res["pattern_counts"].values()) == 60 == len(res["rows"])
    log = InfluenceLog(run.log)
    whole = estimators.dit(log, query, module=model, train_data=dm.train_dataloader().dataset).column(0)
    for row in res["rows"]:
        assert row["pattern"] in ("early", "late", "fluctuating", "stable", "negligible")
        assert row["total"] == pytest.approx(sum(row["windows"]), rel=1e-9, abs=1e-15)
        assert row["total"] == pytest.approx(whole[row["id"]], rel=1e-8, abs=1e-12)  # DIT is additive over windows
        assert row["flipped"] is (row["id"] in set(dm.flipped.tolist()))  # a JSON boolean (had been "yes"/"")


@pytest.mark.parametrize("grid", ["5", "3", "epochs"])
def test_timeline_grid_means_the_same_windows_in_python_and_the_cli(run, direct, capsys, grid):
    """An int grid was a step interval in Python (timeline(grid=5): points 0, 5, 10, 12) and a number of equal windows
    in the CLI (--grid 5: 0, 2, 5, 7, 10, 12); both are equal windows now, from one function (replay.grid_bounds), and
    the CLI's window scores are the Python timeline's increments."""
    model, dm, query = direct
    code, out, err = cli(capsys, "timeline", run.log, "-c", run.config, "-m", "dit", "--grid", grid, "-f", "json", "-q")
    assert code == 0, err
    res = json.loads(out)["results"][0]
    log = InfluenceLog(run.log)
    tl = estimators.timeline(log, query, module=model, train_data=dm.train_dataloader().dataset,
                             grid=grid if grid == "epochs" else int(grid))
    bounds = tl.grid.tolist()
    assert res["grid"] == [list(w) for w in zip(bounds[:-1], bounds[1:])]
    if grid == "5":
        assert bounds == [0, 2, 5, 7, 10, 12]  # linspace(0, 12, 6) rounded: 5 windows, as --help says
    inc = tl.increments(0)
    for row in res["rows"]:
        np.testing.assert_allclose(row["windows"], inc[row["id"]], rtol=1e-9, atol=1e-15)


def test_timeline_table(run, capsys):
    code, out, err = cli(capsys, "timeline", run.log, "-c", run.config, "-m", "tracin", "--grid", "3", "-k", "5",
                         "--progress")
    assert code == 0, err
    lines = out.splitlines()
    assert "3 windows over steps [0, 12) (3)" in lines[0]
    assert lines[1].startswith("patterns: early")
    assert lines[2].startswith("noise σ per window")
    head = 4 if lines[3].startswith("note: ") else 3
    assert lines[head].split() == ["id", "label", "flipped", "pattern", "total", "0-4", "4-8", "8-12"]
    assert len(lines) == head + 1 + 5
    assert "tracin window 3/3" in err


def test_timeline_shows_the_noise_its_patterns_were_calibrated_with(run, capsys):
    """A small text classifier's timeline labelled the run's most harmful samples 'negligible' (σ_w, the robust
    spread of a window's scores, is no noise level when every sample matters) and showed no σ: now the table and the
    JSON give σ_w, and a note says when samples of the largest totals are 'negligible'."""
    from lightning_influence.cli.timeline import noise_line
    from lightning_influence.evaluation import classify_windows

    code, out, err = cli(capsys, "timeline", run.log, "-c", run.config, "-m", "tracin", "-k", "0", "-f", "json", "-q")
    assert code == 0, err
    res = json.loads(out)["results"][0]
    x = np.array([row["windows"] for row in res["rows"]])
    np.testing.assert_allclose(res["noise"], 1.4826 * np.median(np.abs(x), axis=0), rtol=1e-12)
    code, out, err = cli(capsys, "timeline", run.log, "-c", run.config, "-m", "tracin", "-k", "2", "-q")
    assert f"median |score|, docs/trust.md §4): {' '.join(f'{v:.2e}' for v in res['noise'])};" in out.splitlines()[2]

    rng = np.random.default_rng(0)
    one_population = rng.normal(size=(300, 4))  # every sample matters about as much: σ_w is their spread
    line = noise_line(np.median(np.abs(one_population), axis=0) * 1.4826, one_population.sum(1),
                      classify_windows(one_population).labels)
    assert "\nnote: " in line and "of the 10 samples of largest |total| are negligible" in line
    heavy = rng.normal(scale=1e-3, size=(300, 4))  # noise, and ten samples that matter
    heavy[:10] += rng.choice([-1.0, 1.0], size=(10, 1))
    assert "note" not in noise_line(np.median(np.abs(heavy), axis=0) * 1.4826, heavy.sum(1),
                                    classify_windows(heavy).labels)


# ------------------------------------------------------------------------------------ evaluate
def test_evaluate_detection_metrics(run, capsys):
    code, out, err = cli(capsys, "evaluate", run.log, "-c", run.config, "-m", "tracin", "-m", "dit-gn", "--truth", "none",
                         "--samples", "flipped:3", "-f", "json", "-q")
    assert code == 0, err
    res = json.loads(out)
    assert [s["flipped"] for s in res["samples"]] == [True] * 3  # JSON true (had been the string "yes")
    assert set(res["metrics"]) == {"tracin", "dit-gauss-newton (approx.)"}
    for row in res["metrics"].values():
        assert 0.0 <= row["flipped_auroc"] <= 1.0 and "flipped_precision@6" in row


@pytest.mark.parametrize("sort", ["positive", "abs", "negative"])
def test_evaluate_sort_orders_its_samples_as_query_does(run, capsys, sort):
    """--sort was accepted and ignored: top:K was always the most negative. Now top:K is query's top K in --sort order
    (the same ids, the same order), bottom:K the other end, and explicit ids are listed in that order."""
    code, out, err = cli(capsys, "query", run.log, "-m", "tracin", "--sort", sort, "-k", "4", "-f", "json", "-q")
    assert code == 0, err
    listed = [r["id"] for r in json.loads(out)["results"][0]["rows"]]
    code, out, err = cli(capsys, "evaluate", run.log, "-m", "tracin", "--sort", sort, "--samples", "top:4", "--truth",
                         "none", "-f", "json", "-q")
    assert code == 0, err
    assert [s["id"] for s in json.loads(out)["samples"]] == listed
    code, out, err = cli(capsys, "evaluate", run.log, "-m", "tracin", "--sort", sort, "--samples", "3,7,11,20,41",
                         "--truth", "none", "-f", "json", "-q")
    assert code == 0, err
    scores = {s["id"]: s["tracin"] for s in json.loads(out)["samples"]}
    key = {"negative": lambda i: scores[i], "positive": lambda i: -scores[i], "abs": lambda i: -abs(scores[i])}[sort]
    assert list(scores) == sorted(scores, key=key) and set(scores) == {3, 7, 11, 20, 41}
    code, out, err = cli(capsys, "query", run.log, "-m", "tracin", "--sort", sort, "-k", "0", "-f", "json", "-q")
    everything = [r["id"] for r in json.loads(out)["results"][0]["rows"]]
    code, out, err = cli(capsys, "evaluate", run.log, "-m", "tracin", "--sort", sort, "--samples", "bottom:2", "--truth",
                         "none", "-q")
    assert code == 0, err
    assert f"sorted {sort} first by tracin" in out.splitlines()[0]
    rows = out.splitlines()[2:4]  # the head line, the table's header, then the samples
    assert {int(r.split()[0]) for r in rows} == set(everything[-2:])


def test_evaluate_replay_ground_truth(run, capsys):
    pytest.importorskip("lightning_influence.evaluation.ground_truth")
    code, out, err = cli(capsys, "evaluate", run.log, "-c", run.config, "-m", "tracin", "--samples", "top:4", "-q")
    assert code == 0, err
    assert "ground truth: replay leave-one-out" in out
    assert "pearson" in out and "spearman" in out
    assert "truth noise floor" in out and out.strip().splitlines()[-1].startswith("verdict: ")
    code, out, err = cli(capsys, "evaluate", run.log, "-m", "tracin", "-m", "dit", "--samples", "top:4", "-q", "-f", "json")
    res = json.loads(out)
    assert res["truth_noise_floor"] > 0 and 0 <= res["truth_above_floor"] <= 4 and res["verdict"]


def test_evaluate_names_a_dit_removed_over_other_steps_than_the_truth(run, capsys):
    """``evaluate -w 'epoch 2:' --in-window -m dit`` compared DIT (each sample removed from every step before the
    window's end) with a truth removed only inside the window, and said no more than 'no method agrees'; the verdict
    now names the mismatch (and the reverse one of dit-local against a truth removed from the start)."""
    def verdict_of(*argv):
        code, out, err = cli(capsys, "evaluate", run.log, "-w", "epoch 2:", "--samples", "3,7,11", "-q", "-f", "json",
                             "--no-linearity", *argv)
        assert code == 0, err
        return json.loads(out)["verdict"]

    full_vs_local = verdict_of("-m", "dit", "-m", "tracin", "--in-window")
    assert full_vs_local.endswith("; dit removes each sample from every step before the window's end, the truth "
                                  "(--in-window) only inside the window: compare dit-local, or drop --in-window")
    local_vs_full = verdict_of("-m", "dit-local")
    assert local_vs_full.endswith("; dit-local (approx.) sweeps only inside the window, the truth removes each sample "
                                  "from every step before its end: add --in-window, or compare dit")
    assert "removes each sample" not in verdict_of("-m", "dit-local", "--in-window")
    assert "removes each sample" not in verdict_of("-m", "dit")
    code, out, err = cli(capsys, "evaluate", run.log, "--samples", "3,7,11", "-q", "-f", "json", "--no-linearity",
                         "-m", "dit-local", "--in-window", "-w", "0:8")  # a window from the start: the same removal
    assert code == 0 and "removes each sample" not in json.loads(out)["verdict"], err


def test_evaluate_trust_tools_match_direct_calls(run, direct, capsys):
    from lightning_influence.evaluation import pbrf

    code, out, err = cli(capsys, "evaluate", run.log, "-c", run.config, "-m", "tracin", "--samples", "3,7,11", "-q",
                         "--pbrf", "--gap", "--datamodel", "--pairs", "6", "--groups", "--group-sizes", "0.1",
                         "--group-kinds", "random", "-f", "json")
    assert code == 0, err
    res = json.loads(out)
    assert {"pbrf", "gap", "datamodel", "groups"} <= set(res)
    model, dm, query = direct
    expected = pbrf(InfluenceLog(run.log), model, dm.train_dataset, query, samples=[3, 7, 11], damping=1e-2, steps=100)
    assert res["pbrf"]["summary"]["samples"] == 3
    np.testing.assert_allclose(np.asarray(res["pbrf"]["scores"]).reshape(-1), expected.scores.reshape(-1), rtol=1e-6)
    assert [row["pbrf"] for row in res["samples"]] == pytest.approx(expected.scores[:, 0].tolist(), rel=1e-6)
    assert "pbrf_spearman" in res["metrics"]["tracin"]
    assert res["datamodel"]["pairs"] == 6 and "residual" in res["datamodel"]
    assert res["groups"]["rows"] and "tracin" in res["groups"]["estimators"]
    code, _, err = cli(capsys, "evaluate", run.log, "-c", run.config, "-m", "tracin", "--pbrf", "-w", "0:5", "-q")
    assert code == 2 and "measure the whole run" in err


# ---------------------------------------------------------------------------------- tensorboard
def test_tensorboard_command(run, tmp_path, capsys):
    code, out, err = cli(capsys, "tensorboard", run.log, "-c", run.config, "-m", "tracin", "--logdir",
                         str(tmp_path / "tb"), "-q")
    assert code == 0, err
    assert f"wrote tracin scores of 60 samples over 3 windows to {tmp_path / 'tb' / 'tracin'}" in out
    assert f"view: tensorboard --logdir {tmp_path / 'tb'}" in out
    assert list((tmp_path / "tb" / "tracin").glob("events.out.tfevents.*"))


# ------------------------------------------------------------------------------ entry points
def test_help_lists_methods_and_their_needs(capsys):
    code, out, _ = cli(capsys, "--help")
    assert code == 0
    for name in METHODS:
        assert f"  {name}" in out
    assert "needs the model, training and query data" in out
    code, out, _ = cli(capsys, "query", "--help")
    assert code == 0 and "--config" in out and "fractions" in out and "no traceback" not in out


def test_console_script_declared():
    import tomllib

    scripts = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, func = scripts["lightning-influence"].partition(":")
    assert (module, func) == ("lightning_influence.cli", "main")


def test_subprocess_entry_point(run):
    script = Path(sys.executable).with_name("lightning-influence")  # installed by `pip install -e .`
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "lightning_influence"]
    proc = subprocess.run([*cmd, "info", run.log, "--format", "json"], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["steps"] == 12


# -------------------------------------------------------------------------------------- errors
def test_error_missing_log(capsys, tmp_path):
    assert_error(cli(capsys, "info", str(tmp_path / "nope")), "no such log directory")
    assert_error(cli(capsys, "query", str(tmp_path / "nope"), "-q"), "no such log directory")


def test_error_not_a_log(capsys, tmp_path):
    assert_error(cli(capsys, "query", str(tmp_path), "-q"), "not an influence log")


def test_error_truncated_log(run, tmp_path, capsys):
    log = tmp_path / "truncated"
    shutil.copytree(run.log, log)
    seg = sorted((log / "rank-0").glob("seg-*.h5"))[0]
    seg.write_bytes(seg.read_bytes()[: seg.stat().st_size // 2])
    line = assert_error(cli(capsys, "info", str(log)), seg.name)
    assert "truncated" in line and "delete it" in line  # the reader says what to do
    assert_error(cli(capsys, "query", str(log), "-c", run.config, "-q"), seg.name)


@pytest.mark.parametrize("window, needle", [("0:9999", "outside the run"), ("epoch 50:60", "hold no step"),
                                            ("abc", "cannot parse window"), ("0.5:2.0", "must satisfy")])
def test_error_window_outside_the_run(run, window, needle, capsys):
    line = assert_error(cli(capsys, "query", run.log, "-c", run.config, "-m", "tracin", "-w", window, "-q"), needle)
    assert "the run has" in line and "epochs 0..2" in line


def test_error_unknown_sample_id(run, capsys):
    assert_error(cli(capsys, "query", run.log, "-c", run.config, "--query", "test:99999", "-q"),
                 "unknown test sample id 99999")
    assert_error(cli(capsys, "evaluate", run.log, "-c", run.config, "-m", "tracin", "--samples", "3,99999", "--truth",
                     "none", "-q"), "unknown sample id 99999")


@pytest.mark.parametrize("method", [m for m, spec in METHODS.items() if spec.records])
def test_error_method_lacks_records(run, no_grads_log, method, capsys):
    line = assert_error(cli(capsys, "query", no_grads_log, "-c", run.config, "-m", method, "-q"),
                        "which this log did not record")
    assert "re-train with InfluenceTracker(" in line and "or use a method this log supports: dit" in line


def test_diffin_without_hvp_products_needs_them_only_with_hvp_fd(run, direct, tmp_path, capsys):
    """--hvp exact (the default) computes H_z·G_B from the model, as Python's diffin does: a log without the products
    answers; --hvp fd reads the logged products and is refused there, saying what to do."""
    log = _without(run, tmp_path / "nohvp", hvp=False)
    line = assert_error(cli(capsys, "query", log, "-c", run.config, "-m", "diffin", "--hvp", "fd", "-q"),
                        "--method diffin --hvp fd reads the logged Hessian-gradient products (H_z·G_B), which this log "
                        "did not record")
    assert "drop --hvp fd" in line and "InfluenceTracker(record_gradients=True, record_hvp=True)" in line
    code, out, err = cli(capsys, "query", log, "-c", run.config, "-m", "diffin", "-k", "0", "-f", "json", "-q")
    assert code == 0, err
    model, dm, query = direct
    from lightning_influence.estimators.diffin import diffin

    ref = diffin(InfluenceLog(log), query, module=model, train_data=dm.train_dataset).column(0)
    np.testing.assert_allclose(scores_of(json.loads(out), len(ref)), ref, rtol=1e-10, atol=1e-15)
    code, out, _ = cli(capsys, "info", log)
    assert "not diffin" not in out and " diffin," in out


def test_error_config_problems(run, tmp_path, capsys):
    assert_error(cli(capsys, "query", run.log, "-c", str(tmp_path / "nope.yaml"), "-q"), "no such file")
    cfg = yaml.safe_load(Path(run.config).read_text())
    cfg["model"]["hidden"] = 9
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(cfg))
    assert_error(cli(capsys, "query", run.log, "-c", str(other), "-q"), "does not match the log")


def test_error_bad_arguments(run, capsys):
    assert_error(cli(capsys, "query", run.log, "--method", "nope"), "invalid choice: 'nope'")
    assert_error(cli(capsys, "query", run.log, "--query", "val:loss"), "unknown query 'val:loss'")
    assert_error(cli(capsys, "timeline", run.log, "-c", run.config, "--grid", "x", "-q"), "--grid 'x'")
    assert_error(cli(capsys, "frobnicate"), "invalid choice")
    # sizes are fractions: 5 was 750 samples of 150, refused after the leave-one-out replays as "group size 750"
    assert_error(cli(capsys, "evaluate", run.log, "--groups", "--group-sizes", "5,20"),
                 "group sizes are fractions of the training set, each in (0, 1]")


def test_debug_shows_the_traceback(run, capsys):
    code, _, err = cli(capsys, "query", run.log, "-c", run.config, "-w", "0:9999", "-q", "--debug")
    assert code == 2
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("lightning-influence query: error:")


def test_a_replay_mismatch_is_a_user_error_with_a_tolerance_to_set(run, tmp_path, capsys):
    """A log whose replay departs from its checkpoints (here: told it trained under bf16 autocast) exits 2 saying
    how far, where and what to do; --replay-tolerance sets the drift accepted."""
    from lightning_influence.log.format import read_meta
    from lightning_influence.log.writer import write_meta

    root = tmp_path / "wrong-precision"
    shutil.copytree(run.log, root)
    meta = read_meta(root)
    meta["precision"] = {"name": "bf16-mixed", "autocast_device": "cpu", "autocast_dtype": "bfloat16", "grad_scaler": False}
    write_meta(root, meta)
    line = assert_error(cli(capsys, "query", str(root), "-c", run.config, "-m", "dit", "--replay-tolerance", "0", "-q"),
                        "replay does not reproduce the logged run: at step 1")
    assert "store_inputs" in line and "--replay-tolerance" in line
    code, out, err = cli(capsys, "query", str(root), "-c", run.config, "-m", "dit", "--replay-tolerance", "1e9", "-q",
                         "--top", "3")
    assert code == 0, err
    drift = float(re.search(r"replay drift: at most ([0-9.e+-]+) of a segment's movement \(step \d+\), over 12 checkpoints",
                            out).group(1))
    assert 0 < drift < 1e9  # the scores come with the drift they were computed under


# ------------------------------------------------------------------------- issue 14: info, --top, --window, demo
def test_info_verify_checks_optimizer_state_and_exits_2_on_problems(tmp_path, capsys):
    import h5py

    from tests.test_robustness import synthetic

    log = tmp_path / "opt"
    synthetic(log, steps=6)  # SGD with a momentum buffer in every checkpoint
    assert cli(capsys, "info", str(log), "--verify", "-q")[0] == 0  # a healthy log: exit 0
    target = None
    for seg in sorted((log / "rank-0").glob("seg-*.h5")):
        with h5py.File(seg, "r") as f:
            for ck in f["checkpoints"].values():
                for state in ck["optimizer"].values():
                    for ds in state.values():
                        target = (seg, ds.id.get_chunk_info(0).byte_offset, ds.name)
                        break
                    break
                if target:
                    break
        if target:
            break
    assert target, "the run stored no optimizer state"
    seg, offset, name = target
    data = bytearray(seg.read_bytes())
    data[offset] ^= 0x10  # one bit of a momentum buffer: HDF5 itself does not notice it
    seg.write_bytes(bytes(data))
    assert cli(capsys, "info", str(log), "-q")[0] == 0  # without --verify the state is not read
    line = assert_error(cli(capsys, "info", str(log), "--verify", "-q"), seg.name)
    assert "fails its CRC-32" in line and name.rsplit("/", 1)[-1] in line


def test_info_verify_reads_a_log_started_by_a_resumed_fit(tmp_path, capsys):
    from tests.test_robustness import synthetic

    synthetic(tmp_path / "late", steps=8, first=3)
    code, out, _ = cli(capsys, "info", str(tmp_path / "late"), "--verify", "-q")
    assert code == 0 and "5 (3..7)" in out and re.search(r"integrity\s+OK", out), out
    info = json.loads(cli(capsys, "info", str(tmp_path / "late"), "--format", "json", "--verify", "-q")[1])
    assert info["steps"] == 5 and info["first_step"] == 3 and info["integrity"]["ok"]


def test_error_negative_top_and_window(run, capsys):
    line = assert_error(cli(capsys, "query", run.log, "-c", run.config, "-m", "tracin", "--top", "-3", "-q"), "--top")
    assert "must be 0 (all rows) or a positive number of rows, got -3" in line
    assert_error(cli(capsys, "timeline", run.log, "-c", run.config, "--top", "-1", "-q"), "got -1")
    for argv in (["-w", "-3:4"], ["--window", "-3:4"], ["--window=-3:4"]):
        line = assert_error(cli(capsys, "query", run.log, "-c", run.config, "-m", "tracin", *argv, "-q"),
                            "window '-3:4'")
        assert "outside the run" in line


def test_a_bad_window_is_refused_before_the_model_config_is_loaded(run, tmp_path, capsys):
    missing = str(tmp_path / "no-such-config.yaml")
    assert_error(cli(capsys, "query", run.log, "-c", missing, "-w", "0:9999", "-q"), "window '0:9999'")
    assert_error(cli(capsys, "timeline", run.log, "-c", missing, "-w", "abc", "-q"), "cannot parse window")
    assert_error(cli(capsys, "evaluate", run.log, "-c", missing, "-w", "0.5:2.0", "-q"), "must satisfy")


def test_python_function_names_are_cli_method_names(run, capsys):
    """``-m tracin_self_influence`` (the Python name) runs the same method as ``-m tracin-self``."""
    outs = []
    for name in ("tracin-self", "tracin_self_influence"):
        code, out, err = cli(capsys, "query", run.log, "-m", name, "--top", "0", "-f", "json", "-q")
        assert code == 0, err
        outs.append(json.loads(out)["results"][0]["rows"])
    assert outs[0] == outs[1] and len(outs[0]) == 60
    code, _, err = cli(capsys, "query", run.log, "-m", "tracin_selfish", "-q")
    assert code == 2 and "tracin-selfish" in err


@pytest.mark.parametrize("command, flag, first, second", [
    ("query", "-m", "tracin-self", "tracin"), ("timeline", "--method", "tracin-self", "tracin-self"),
    ("tensorboard", "-m", "tracin", "tracin-self"), ("timeline", "-w", "0:4", "4:8")])
def test_an_option_taking_one_value_given_twice_is_refused(run, capsys, tmp_path, command, flag, first, second):
    """``query -m dit -m tracin`` printed TracIn alone (argparse keeps the last value), exit 0, as if DIT had been
    asked for nothing: now one line, exit 2, naming both values and what to do instead."""
    extra = ["--logdir", str(tmp_path / "tb")] if command == "tensorboard" else []
    err = assert_error(cli(capsys, command, run.log, flag, first, flag, second, *extra, "-q"), "given twice")
    assert first in err and second in err and f"{command} takes one" in err
    assert not (tmp_path / "tb").exists()


def test_self_influence_lists_the_most_self_influential_first_by_default(run, capsys):
    """Self-influence ranks mislabelled candidates by its largest values: without ``--sort`` the query and the timeline
    list those first (a loss query keeps the most negative, most harmful, first); ``--sort negative`` still gives the
    other end."""
    from lightning_influence import InfluenceLog, tracin_self_influence
    s = tracin_self_influence(InfluenceLog(run.log)).column(0)
    for argv in (("query", "-k", "5"), ("timeline", "--grid", "2", "--top", "5")):
        code, out, err = cli(capsys, argv[0], run.log, "-m", "tracin-self", *argv[1:], "-f", "json", "-q")
        assert code == 0, err
        ids = [r["id"] for r in json.loads(out)["results"][0]["rows"]]
        expect = np.argsort(-s, kind="stable")[:5] if argv[0] == "query" else None
        if expect is not None:
            assert ids == expect.tolist()
        else:  # the timeline orders by the total over its windows, the whole run's score
            assert np.allclose(sorted(s[ids]), sorted(np.sort(s)[-5:]), rtol=1e-9)
    code, out, err = cli(capsys, "query", run.log, "-m", "tracin-self", "-k", "5", "--sort", "negative", "-f", "json", "-q")
    assert [r["id"] for r in json.loads(out)["results"][0]["rows"]] == np.argsort(s, kind="stable")[:5].tolist()
    code, out, err = cli(capsys, "query", run.log, "-m", "tracin", "-k", "3", "-q")
    assert "sorted negative first" in out
    code, out, err = cli(capsys, "query", run.log, "-m", "tracin-self", "-k", "3", "-q")
    assert "sorted positive first" in out
