"""The CLI on several processes (``--devices``, torchrun): a user error is printed once, by the first process, and
every process exits with code 2."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from conftest import fit, loader, make_data, tiny
from lightning_influence import InfluenceTracker


@pytest.mark.parametrize("rank_vars", [{}, {"LOCAL_RANK": "1"}, {"RANK": "1", "LOCAL_RANK": "0"}])
def test_a_user_error_is_printed_by_the_first_process_only(tmp_path, capsys, monkeypatch, rank_vars):
    """Before any process group exists, a process is the first by its launcher's variables: the others exit with code 2
    in silence (every process runs the same command, so they printed the same line once each)."""
    from lightning_influence.cli import main

    for k in ("RANK", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(k, raising=False)
    for k, v in rank_vars.items():
        monkeypatch.setenv(k, v)
    assert main(["query", str(tmp_path / "missing"), "-m", "tracin"]) == 2
    err = capsys.readouterr().err
    if rank_vars:
        assert err == ""
    else:
        assert err.count("error:") == 1 and "no such log directory" in err, err


@pytest.mark.slow
def test_two_processes_print_a_user_error_once_and_both_exit_2(tmp_path):
    """Two processes as torchrun starts them (its environment variables, a gloo group formed by the query): DIT fails on
    both with the same user error (float32 query data for a float64 run); one line in all, both exit codes 2 (each
    process printed it)."""
    log_dir = str(tmp_path / "log")
    fit(tiny(), loader(make_data(12)), InfluenceTracker(log_dir, record_gradients=True, checkpoint_every_n_steps=2),
        epochs=1)
    builder = tmp_path / "build.py"
    builder.write_text("import torch\nfrom conftest import TinyClassifier, make_data\n"
                       "def build(log):\n"
                       "    return {'module': TinyClassifier(), 'val_data': make_data(4, seed=5, dtype=torch.float32).tensors}\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tests = os.path.dirname(__file__)
    path = os.pathsep.join([os.path.dirname(tests), tests, os.environ.get("PYTHONPATH", "")])
    procs = []
    for rank in range(2):
        env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "TORCHELASTIC_RUN_ID": "test"}
        procs.append(subprocess.Popen([sys.executable, "-m", "lightning_influence", "query", log_dir, "-q", "-m", "dit",
                                       "--builder", f"{builder}:build", "--devices", "2"], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    assert [code for code, _ in results] == [2, 2], results
    lines = [line for _, err in results for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "mixed dtypes" in lines[0] and "internal error" not in lines[0], results
    assert "error:" in results[0][1]  # the first process's
