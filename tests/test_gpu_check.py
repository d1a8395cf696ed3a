"""``benchmarks/gpu_check.py`` as a CPU dry run: every check runs and reports, and a broken tracker is caught."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Every check passes on the CPU (the dropout ones since the random state is recorded and replayed); no_sync and
# mixed[fp16] (float16 autocast with a GradScaler) are CUDA only.

def _run(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick",
                           "--out", str(out), *extra], capture_output=True, text=True, env=env, timeout=300)
    assert out.exists(), proc.stdout + proc.stderr
    return proc, json.loads(out.read_text())


def test_dry_run_reports_every_check(tmp_path: Path) -> None:
    proc, res = _run(tmp_path)
    status = {c["check"]: c["status"] for c in res["checks"]}
    lines = [ln for ln in proc.stdout.splitlines() if ln.split(" ")[0] in ("PASS", "FAIL", "SKIP")]
    assert len(lines) == len(status) >= 18  # one line per check, every check reported
    assert status.pop("no_sync[mlp]") == "SKIP" and status.pop("mixed[fp16]") == "SKIP"  # CUDA only
    assert {"mixed[bf16]", "replay_cpu[mlp]", "replay_cpu[mlp-nodrop]"} <= set(status)  # autocast, cpu-vs-device replay
    assert [c for c, st in status.items() if st != "PASS"] == [], proc.stdout
    assert proc.returncode == 0
    from benchmarks.overhead import LEVELS

    assert set(res["overhead"]["ratios"]["mlp"]) == {"baseline_s", *LEVELS}


def test_a_tracker_that_draws_random_numbers_fails_bit_identical(tmp_path: Path) -> None:
    proc, res = _run(tmp_path, "--inject-fault", "rng", "--only", "bit_identical*")
    status = {c["check"]: c for c in res["checks"]}
    assert set(status) == {"bit_identical[mlp]", "bit_identical[transformer]"}
    assert status["bit_identical[mlp]"]["status"] == "FAIL"
    assert "the tracker changes training" in status["bit_identical[mlp]"]["detail"]
    assert proc.returncode == 1
