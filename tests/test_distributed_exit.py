"""How a process of a distributed query ends: nothing of the query (the prefetch threads, gloo's C++ threads, the TCP
store) may still run when the interpreter tears down, on success and after an error
(``distributed.leave_process_group``).

A gloo worker thread that frees the last collective's tensors during teardown takes the GIL of a finalizing
interpreter and the runtime aborts ("terminate called without an active exception"): a finished query then ended with
a DistributedQueryError (SIGABRT), rarely, as the race allows. The tests look at every thread of each process at its
``atexit`` (the start of the teardown), where that race would start.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import fit, loader, make_data, tiny
from lightning_influence import InfluenceLog, InfluenceTracker
from lightning_influence.distributed import DistributedQueryError, _reduce, launch
from lightning_influence.estimators import tracin_self_influence

_QUERY_THREADS = ("gloo", "pt_", "influence-log")  # gloo's transport loop and workers, the TCP store, log prefetch


def _threads() -> dict[str, list[str]]:
    """This process's threads: the kernel's names (C++ threads included) and Python's."""
    tasks = []
    for task in os.listdir("/proc/self/task"):
        try:
            tasks.append(Path(f"/proc/self/task/{task}/comm").read_text().strip())
        except OSError:  # ended meanwhile
            pass
    return {"os": sorted(tasks), "python": sorted(t.name for t in threading.enumerate())}


class _FailAt:
    """Progress callback: rank 1 raises at its first block, with the prefetch thread reading the blocks after it."""

    def __call__(self, done: int, total: int) -> None:
        import torch.distributed as dist

        if dist.is_initialized() and dist.get_rank() == 1:
            raise ValueError("rank 1 fails mid-iteration")


def _census_worker(fabric, out_dir: str, log_path: str, window: tuple[int, int], fail: bool):
    rank = fabric.global_rank
    atexit.register(lambda: Path(out_dir, f"rank-{rank}.json").write_text(json.dumps(_threads())))
    return _reduce(fabric, "tracin_self_influence", log_path, None, [], window, _FailAt() if fail else None)


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("exit") / "log"
    tracker = InfluenceTracker(str(path), record_gradients=True, projection_dim=5, checkpoint_every_n_steps=3,
                               storage_dtype="float64", flush_every_n_steps=4)
    fit(tiny(weight_decay=0.01), loader(make_data(24, seed=1), batch_size=4), tracker, epochs=3)  # 18 steps
    return str(path)


def _query_threads_at_exit(out_dir: Path) -> dict[int, list[str]]:
    """Each process's threads of the query at its exit (a process the launcher terminated records none)."""
    seen = {int(f.stem.split("-")[1]): json.loads(f.read_text()) for f in out_dir.glob("rank-*.json")}
    for got in seen.values():
        assert got["python"] == ["MainThread"]
    return {rank: [name for name in got["os"] if name.startswith(_QUERY_THREADS)] for rank, got in seen.items()}


@pytest.mark.slow
def test_spawned_processes_end_their_threads_and_process_group_before_they_exit(log_dir, tmp_path):
    with InfluenceLog(log_dir) as log:
        want = tracin_self_influence(log).scores
    got = launch(_census_worker, str(tmp_path), log_dir, (0, 18), False, devices=2, timeout_s=60)
    np.testing.assert_allclose(got.scores, want, rtol=1e-12, atol=1e-15)
    assert sorted(p.name for p in tmp_path.glob("rank-*.json")) == ["rank-0.json", "rank-1.json"]
    assert _query_threads_at_exit(tmp_path) == {0: [], 1: []}  # before the fix: gloo_tcp_loop, pt_gloo_runloop, ...


@pytest.mark.slow
def test_a_process_that_raises_mid_iteration_ends_its_threads_and_the_query(log_dir, tmp_path):
    """Rank 1 raises with blocks still queued for its prefetch thread, rank 0 waits in the all-reduce: rank 1 joins the
    thread, leaves the group (so rank 0's all-reduce fails at once) and exits without a thread of the query."""
    t0 = time.perf_counter()
    with pytest.raises(DistributedQueryError, match="failing query on 2 processes failed"):
        launch(_census_worker, str(tmp_path), log_dir, (0, 18), True, devices=2, timeout_s=60, what="failing query")
    assert time.perf_counter() - t0 < 60  # rank 0 is not left waiting for the timeout
    left = _query_threads_at_exit(tmp_path)  # rank 0 records its threads unless the launcher terminated it first
    assert left.pop(1) == [] and all(v == [] for v in left.values())


_ONE_PROCESS_GROUP = r"""
import os, sys, tempfile, threading
import torch, torch.distributed as dist
from lightning_influence.distributed import leave_process_group
dist.init_process_group("gloo", init_method="file://" + os.path.join(tempfile.mkdtemp(), "store"), rank=0, world_size=1)
dist.all_reduce(torch.ones(3))
names = lambda: sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
before = [n for n in names() if n.startswith(("gloo", "pt_"))]
leave_process_group(ok=sys.argv[1] == "ok")
after = [n for n in names() if n.startswith(("gloo", "pt_"))]
leave_process_group()  # again: nothing to do
print(bool(before), dist.is_initialized(), after)
"""


@pytest.mark.parametrize("ok", ["ok", "after-error"])
def test_leave_process_group_joins_gloo_threads_and_ends_the_group(ok):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p)}
    out = subprocess.run([sys.executable, "-c", _ONE_PROCESS_GROUP, ok], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[-2] == "True False []"


_DDP_SCRIPT = r"""
import atexit, os, sys
from pathlib import Path
from lightning_influence import distributed

def query_threads():
    names = (Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in os.listdir("/proc/self/task"))
    return sorted(n for n in names if n.startswith(("gloo", "pt_", "influence-log")))

# registered before the query: runs after distributed's own exit handler (atexit is last in, first out)
atexit.register(lambda: print(f"EXIT {os.environ.get('LOCAL_RANK', '0')} {query_threads()}", flush=True))
if __name__ == "__main__":
    res = distributed.run("tracin_self_influence", sys.argv[1], devices=2, strategy="ddp", timeout_s=60)
    print(f"RESULT {res.scores.shape} {len(query_threads()) > 0}", flush=True)
"""


@pytest.mark.slow
def test_ddp_processes_that_go_on_after_the_query_end_its_group_at_exit(log_dir, tmp_path):
    """Under ``strategy="ddp"`` (the CLI's ``--devices``) each process goes on after the query, with the group alive;
    it ends the group at its exit, before the interpreter's teardown."""
    script = tmp_path / "query.py"
    script.write_text(_DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p)}
    out = subprocess.run([sys.executable, str(script), log_dir], capture_output=True, text=True, env=env, timeout=300,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    # the two processes share the pipe: a line of one can land inside a line of the other, so match, not split
    assert sorted(re.findall(r"RESULT \([^)]*\) (?:True|False)", out.stdout)) == ["RESULT (24, 1) True"] * 2  # alive after
    assert sorted(re.findall(r"EXIT \d+ \[[^\]]*\]", out.stdout)) == ["EXIT 0 []", "EXIT 1 []"]


_TORCHRUN_SCRIPT = r"""
import os, sys
from lightning_influence import distributed

if __name__ == "__main__":
    res = distributed.run("tracin_self_influence", sys.argv[1], devices=2, timeout_s=60)  # default strategy: ddp_spawn
    print(f"TORCHRUN {os.environ['RANK']} {float(res.scores.sum())!r}", flush=True)
"""


@pytest.mark.slow
def test_torchrun_processes_are_the_query_processes_whatever_the_strategy(log_dir, tmp_path):
    """Under ``torchrun`` the launched processes are the query's processes: ``strategy="ddp_spawn"`` (the Python
    default) spawns none of its own (it used to spawn 2 per torchrun process and fail), and the result equals one
    process's."""
    script = tmp_path / "query.py"
    script.write_text(_TORCHRUN_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p)}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), log_dir], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    got = sorted(re.findall(r"TORCHRUN (\d) ([-+0-9.e]+)", out.stdout))  # the processes share the pipe
    assert [r for r, _ in got] == ["0", "1"], out.stdout
    one = float(tracin_self_influence(InfluenceLog(log_dir)).scores.sum())
    for _, total in got:
        assert abs(float(total) - one) <= 1e-12 * abs(one)
