"""A user's mistakes on the command line, met dogfooding real runs: one line saying what to do, exit code 2, and
refused before any work (never a hang, a silent fallback or a result lost after the computation)."""

from __future__ import annotations

import os

import pytest

from lightning_influence.cli import main
from tests._cli_run import train_tiny_run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_tiny_run(tmp_path_factory.mktemp("cli") / "run")


def _error(capsys, *argv: str) -> str:
    code = main(list(argv))
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and out == "" and "Traceback" not in err, err
    return lines[-1]


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@pytest.mark.parametrize("command", ["query", "timeline", "evaluate", "tensorboard"])
def test_more_cpu_processes_than_cores_is_refused(run, command, tmp_path, capsys, monkeypatch):
    """``--devices 64`` on a 2-core machine started 64 processes that each rebuilt the model (the query ran for
    minutes, thrashing); it is refused up front, naming the cores."""
    for key in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    extra = ["--logdir", str(tmp_path / "tb")] if command == "tensorboard" else []
    line = _error(capsys, command, run.log, "-m", "tracin", "-q", "--devices", str(_cores() + 1), *extra)
    assert f"--devices {_cores() + 1}: more processes than the {_cores()} CPU core(s)" in line
    assert f"use --devices {_cores()} or fewer" in line


@pytest.mark.parametrize("workers", ["0", str(_cores() + 1)])
def test_evaluate_workers_beyond_the_cores_or_below_one_is_refused(run, workers, capsys):
    """``evaluate --workers 64`` forked 64 retraining processes on a 2-core machine; ``--workers 0`` was an internal
    ValueError of the evaluator."""
    line = _error(capsys, "evaluate", run.log, "-c", run.config, "--samples", "top:2", "--datamodel", "--workers", workers)
    assert f"--workers {workers}: give 1 to {_cores()} (the CPU cores this command may use)" in line


def test_cuda_without_a_gpu_is_refused(run, capsys, monkeypatch):
    """``--accelerator cuda`` on a machine without CUDA ran on the CPU and exited 0, as if the GPU had been used."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = _error(capsys, "query", run.log, "-m", "tracin", "-q", "--accelerator", "cuda")
    assert "--accelerator cuda: this machine has no usable CUDA device" in line
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    line = _error(capsys, "query", run.log, "-m", "tracin", "-q", "--accelerator", "cuda", "--devices", "3")
    assert "--devices 3: this machine has 2 CUDA device(s); use --devices 2 or fewer" in line


def test_several_nodes_without_a_launcher_is_refused(run, capsys, monkeypatch):
    """``--num-nodes 2`` started alone waited for a second node that never comes (killed after minutes); without
    torchrun, SLURM or MASTER_ADDR/NODE_RANK it is refused."""
    for key in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "MASTER_ADDR", "NODE_RANK"):
        monkeypatch.delenv(key, raising=False)
    line = _error(capsys, "query", run.log, "-m", "tracin", "-q", "--num-nodes", "2")
    assert "--num-nodes 2: the command must be started on every node" in line


def test_a_query_on_an_unfinished_log_says_which_steps_it_covers(run, tmp_path, capsys):
    """A crashed or killed fit's log is answered over its complete steps; the answer said "whole run" and nothing
    else, as if training had finished there."""
    import shutil

    from lightning_influence import InfluenceLog

    copy = tmp_path / "crashed"
    shutil.copytree(run.log, copy)
    last = sorted((copy / "rank-0").glob("seg-*.h5"))[-1]
    last.unlink()  # the final θ_T (and the last steps) never reached the disk
    log = InfluenceLog(copy)
    assert not log.finished
    code = main(["query", str(copy), "-m", "tracin", "-c", run.config, "-k", "1"])
    out, err = capsys.readouterr()
    assert code == 0 and "tracin: query val_loss" in out, err
    assert f"note: {log.end_note}; the answers cover these steps only" in err
    code = main(["query", run.log, "-m", "tracin", "-c", run.config, "-k", "1"])  # a finished log: no note
    assert code == 0 and "note:" not in capsys.readouterr().err


def test_an_output_that_cannot_be_written_is_refused_before_the_work(run, tmp_path, capsys, monkeypatch):
    """``-o`` on a read-only folder (or through a file) failed with a bare ``[Errno 13]`` only after the scores were
    computed, losing them; now refused first, in one line, before the model is rebuilt."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [(["query", run.log, "-m", "tracin", "-c", run.config, "-o", str(tmp_path)], "is a directory; give --out a file"),
             (["query", run.log, "-m", "tracin", "-c", run.config, "-o", str(afile / "x.csv")], "is a file, not a directory"),
             (["tensorboard", run.log, "-m", "tracin", "-c", run.config, "--logdir", str(afile)], "is a file; give --logdir a directory")]
    for argv, needle in cases:
        assert main(argv) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and needle in err, err
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path / "ro") else real_access(p, mode))
    (tmp_path / "ro").mkdir()
    for argv in (["query", run.log, "-m", "tracin", "-c", run.config, "-o", str(tmp_path / "ro" / "top.csv")],
                 ["tensorboard", run.log, "-m", "tracin", "-c", run.config, "--logdir", str(tmp_path / "ro" / "tb")]):
        assert main(argv) == 2
        out, err = capsys.readouterr()
        assert err.count("\n") == 1 and f"cannot write there ({tmp_path / 'ro'} is not writable)" in err, err
    assert not list((tmp_path / "ro").iterdir())


def test_a_second_tensorboard_export_into_the_same_run_is_refused_or_replaces_the_first(run, tmp_path, capsys):
    """Exporting again into the same run (after training more, another grid) added a second event file beside the
    first: TensorBoard showed both exports' tags mixed. Now refused before the work, saying what to do; --replace
    replaces this command's own export, and never a training run's events."""
    base = ["tensorboard", run.log, "-c", run.config, "-m", "tracin", "--logdir", str(tmp_path), "-q", "--no-embedding"]
    assert main(base) == 0
    first = sorted((tmp_path / "tracin").glob("events.out.tfevents.*"))
    assert len(first) == 1
    capsys.readouterr()
    assert main([*base, "--grid", "2"]) == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "already holds TensorBoard events (an earlier export)" in err and "--replace" in err
    assert sorted((tmp_path / "tracin").glob("events.out.tfevents.*")) == first
    assert main([*base, "--grid", "2", "--replace"]) == 0
    again = sorted((tmp_path / "tracin").glob("events.out.tfevents.*"))
    assert len(again) == 1 and again != first
    training = tmp_path / "lightning_logs"  # a training run's events: never replaced
    training.mkdir()
    (training / "events.out.tfevents.1.vm.1.0").write_bytes(b"")
    for extra, needle in (([], "(not written by this command)"), (["--replace"], "this command did not write")):
        assert main([*base, "--run", "lightning_logs", *extra]) == 2
        assert needle in capsys.readouterr().err
    assert (training / "events.out.tfevents.1.vm.1.0").exists()


def test_cuda_on_one_process_says_that_it_runs_on_the_cpu(run, capsys, monkeypatch):
    """``--accelerator cuda`` without ``--devices`` computed on the CPU without a word."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main(["query", run.log, "-m", "tracin", "-c", run.config, "--accelerator", "cuda", "-k", "1"]) == 0
    assert "note: one process computes on the CPU; --accelerator cuda applies to --devices 2 or more" in \
        capsys.readouterr().err


def test_info_names_the_fits_a_resumed_log_was_written_by(run, tmp_path, capsys):
    """A log continued by resumed fits (each cutting it at its step, some with harmless changes) read as one run:
    `info` now lists them; JSON carries the records."""
    import json
    import shutil

    from lightning_influence.log.format import read_meta
    from lightning_influence.log.writer import write_meta

    copy = tmp_path / "resumed"
    shutil.copytree(run.log, copy)
    meta = read_meta(copy)
    meta["resumes"] = [{"step": 8, "time": None, "changed": {}},
                       {"step": 4, "time": None, "changed": {"checkpoint_every_n_steps": [1, 2], "versions": [{}, {}]}}]
    write_meta(copy, meta)
    assert main(["info", str(copy)]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("fits"))
    assert line.split(None, 1)[1] == ("3: started at step 0, resumed at step 8 (?), resumed at step 4 (?; changed "
                                      "checkpoint_every_n_steps, versions) (each resume cut the log at its step)")
    assert main(["info", str(copy), "-f", "json"]) == 0
    assert [r["step"] for r in json.loads(capsys.readouterr().out)["resumes"]] == [8, 4]
    assert main(["info", run.log]) == 0 and "\nfits " not in capsys.readouterr().out


def test_tensorboard_refuses_a_run_outside_the_logdir_and_a_bad_decoder_before_the_work(run, tmp_path, capsys):
    """``--run ../x`` wrote the events outside --logdir (where `tensorboard --logdir` never looks); a --decoder that
    cannot be imported failed only after the scores were computed."""
    base = ["tensorboard", run.log, "-c", run.config, "-m", "tracin", "--logdir", str(tmp_path / "tb")]
    for extra, needle in ((["--run", "../escape"], "--run '../escape': a run is a folder inside --logdir"),
                          (["--run", str(tmp_path / "abs")], "a run is a folder inside --logdir"),
                          (["--decoder", "no_such_module_x:f"], "--decoder 'no_such_module_x:f': cannot load it")):
        assert main([*base, *extra]) == 2
        out, err = capsys.readouterr()
        assert err.count("\n") == 1 and needle in err, err  # one line: refused before the model was rebuilt
    assert not (tmp_path / "escape").exists() and not (tmp_path / "abs").exists() and not (tmp_path / "tb").exists()


def test_builder_returning_a_plain_module_names_it(run, tmp_path, capsys):
    """A --builder returning {"module": <nn.Module>, ...} was told it 'returned dict' (it had, with a 'module'): the
    message names what its 'module' is and what the CLI needs instead."""
    builder = tmp_path / "build_plain.py"
    builder.write_text("import torch\n\n"
                       "def as_dict():\n    return {'module': torch.nn.Linear(64, 10), 'train_data': None}\n\n"
                       "def as_tuple():\n    return torch.nn.Linear(64, 10), None\n\n"
                       "def no_module():\n    return {'model': torch.nn.Linear(64, 10)}\n")
    line = _error(capsys, "query", run.log, "-m", "tracin", "-q", "--builder", f"{builder}:as_dict")
    assert "it returned a dict whose 'module' is a Linear (a torch.nn.Module, not a LightningModule)" in line
    line = _error(capsys, "query", run.log, "-m", "tracin", "-q", "--builder", f"{builder}:as_tuple")
    assert "it returned a tuple whose first item is a Linear (a torch.nn.Module, not a LightningModule)" in line
    line = _error(capsys, "query", run.log, "-m", "tracin", "-q", "--builder", f"{builder}:no_module")
    assert "it returned a dict without 'module' (keys: model)" in line


def test_deleted_segment_files_are_named(run, tmp_path, capsys):
    """A finished log whose segment files were deleted was described as 'the run just started, or was killed before
    its first flush'; with no writer holding it, info names deleted segment files and exits 2."""
    import shutil
    from pathlib import Path

    log = tmp_path / "log"
    shutil.copytree(run.log, log)
    for seg in Path(log).glob("rank-*/seg-*.h5"):
        seg.unlink()
    assert main(["info", str(log)]) == 2
    out = capsys.readouterr().out
    assert "integrity    PROBLEMS: no step is in a closed segment yet (no writer holds it: the fit stopped before its " \
           "first flush, or its segment files (rank-*/seg-*.h5) were deleted or moved since; restore them from a " \
           "backup)" in out
