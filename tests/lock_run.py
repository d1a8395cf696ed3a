"""Concurrent-writer driver for ``test_reliability.py``: real processes writing one log at the same time.

Run as ``python tests/lock_run.py WORKDIR``. It imports torch/Lightning once and forks (the
parent never runs torch code, so forking is safe):

1. ``ref``: an uninterrupted fit into its own log (the reference).
2. ``a``: the same fit into ``a/log``, paused after 10 of its 32 steps (``crash_run.train(hold=...)``).
3. While ``a`` is paused: ``fresh``, a new fit with ``overwrite=True`` into ``a/log``, and ``resume``,
   a fit resumed from ``a``'s first epoch checkpoint into ``a/log``. Both must be refused at once.
4. ``a`` is released and finishes.

Writes ``WORKDIR/report.json``: exit codes, errors, seconds from fit start to refusal, pids.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crash_run import last_step, train  # noqa: E402


def fork(work: Path, name: str, log_dir: Path, ckpt_dir: Path, progress: Path | None = None, hold=None) -> int:
    """Fork a child running ``train``; its exception (type and message) and timing go to ``work/name.json``."""
    pid = os.fork()
    if pid == 0:
        code, out = 0, {}
        t0 = time.monotonic()
        try:
            train(log_dir, ckpt_dir, 2, progress, 0.0, hold)
        except BaseException as err:  # noqa: BLE001
            traceback.print_exc()
            out = {"error_type": type(err).__name__, "error": str(err)}
            code = 1
        finally:
            out["seconds"] = round(time.monotonic() - t0, 3)
            (work / f"{name}.json").write_text(json.dumps(out))
            os._exit(code)
    return pid


def main() -> None:
    work = Path(sys.argv[1])
    work.mkdir(parents=True, exist_ok=True)
    import lightning.pytorch  # noqa: F401 - imported once, shared by the forked children
    import lightning.pytorch.callbacks  # noqa: F401

    import conftest  # noqa: F401
    from lightning_influence import InfluenceTracker  # noqa: F401

    report: dict = {}
    ref = fork(work, "ref", work / "ref" / "log", work / "ref" / "ckpt")
    (work / "a").mkdir()
    a = fork(work, "a", work / "a" / "log", work / "a" / "ckpt", work / "a" / "progress", (10, work / "a" / "release"))
    report["a_pid"] = a
    deadline = time.monotonic() + 120
    while last_step(work / "a" / "progress") < 10 and time.monotonic() < deadline:
        time.sleep(0.02)
    for name in ("fresh", "resume"):
        ckpt = work / name / "ckpt"
        ckpt.mkdir(parents=True)
        if name == "resume":
            shutil.copy(next((work / "a" / "ckpt").glob("epoch=0-*.ckpt")), ckpt)
        pid = fork(work, name, work / "a" / "log", ckpt)
        report[name] = {"exit": os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]),
                        "a_still_paused": last_step(work / "a" / "progress") == 10,
                        **json.loads((work / f"{name}.json").read_text())}
    (work / "a" / "release").touch()
    for name, pid in (("a", a), ("ref", ref)):
        report[name] = {"exit": os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), **json.loads((work / f"{name}.json").read_text())}
    (work / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
