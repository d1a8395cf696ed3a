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
