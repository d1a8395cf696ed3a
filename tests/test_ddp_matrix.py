"""DDP on CPU (2 gloo processes, ``ddp_matrix_run.py``): the processes agree on the gradient engine of every tensor;
the log of a multi-process fit under accumulation, clipping, AdamW, each record level, resumes and a killed process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lightning_influence import InfluenceLog

HERE = Path(__file__).resolve().parent


def matrix_fit(timeout: int = 300, **cfg) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HERE / "ddp_matrix_run.py"), json.dumps(cfg)], capture_output=True,
                          text=True, timeout=timeout)


def ok_fit(**cfg) -> None:
    run = matrix_fit(**cfg)
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.mark.slow
def test_processes_agree_on_the_tensors_the_hooks_demote(tmp_path):
    """The logits mix the samples of a batch holding a flagged sample: rank 1's first batch holds one, so its first-step
    check against autograd demotes every tensor; rank 0's first batch holds none, its second does. Every process
    takes the union at the first step: meta.h5 says vmap from step 0, and every rank's rows equal those of the same
    fit with gradient_engine='vmap' (rank 0 kept the hooks, its step-1 rows 20-46% off, and meta.h5 said 'hooks')."""
    ok_fit(log_dir=str(tmp_path / "auto"), model="flagmix")
    ok_fit(log_dir=str(tmp_path / "vmap"), model="flagmix", engine="vmap")
    auto, ref = InfluenceLog(tmp_path / "auto"), InfluenceLog(tmp_path / "vmap")
    names = ["net.0.weight", "net.0.bias", "net.3.weight", "net.3.bias"]
    assert auto.meta["gradient_engine"] == "vmap" and auto.meta["gradient_engines"] == dict.fromkeys(names, "vmap")
    assert auto.meta["demoted"] == dict.fromkeys(names, 0)
    steps = 0
    for a, b in zip(auto.iter_steps(fields=("loss", "grad")), ref.iter_steps(fields=("loss", "grad")), strict=True):
        assert a.ids.tolist() == b.ids.tolist()
        np.testing.assert_array_equal(a.losses, b.losses)
        np.testing.assert_allclose(a.grads, b.grads, rtol=1e-12, atol=1e-15)
        steps += 1
    assert steps == auto.num_steps == 8
