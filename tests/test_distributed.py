"""Distributed log-only estimators (``lightning_influence.distributed``): 2 gloo processes against one process."""

from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import pytest
import torch.distributed as dist

from conftest import fit, loader, make_data, tiny
from lightning_influence import InfluenceLog, InfluenceTracker, tracin
from lightning_influence.distributed import DistributedQueryError, Processes, map_blocks, run, shard_steps, split_range
from lightning_influence.evaluation.ground_truth import replay_loo
from lightning_influence.evaluation.groups import replay_group_removal
from lightning_influence.estimators import tracin_self_influence
from lightning_influence.queries import mean_loss


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dist") / "log"
    tracker = InfluenceTracker(str(path), record_gradients=True, projection_dim=5, checkpoint_every_n_steps=3,
                               storage_dtype="float64", flush_every_n_steps=4)
    fit(tiny(weight_decay=0.01), loader(make_data(24, seed=1), batch_size=4), tracker, epochs=3)  # 18 steps, 5 segments
    return str(path)


def test_shards_are_contiguous_balanced_and_cut_at_segment_starts(log_dir):
    with InfluenceLog(log_dir) as log:
        assert log.segment_starts() == [0, 4, 8, 12, 16]
        assert shard_steps(log, 0, 18, 2) == [(0, 8), (8, 18)]  # ideal cut 9: the segment start 8 is within 25%
        assert shard_steps(log, 0, 18, 3) == [(0, 6), (6, 12), (12, 18)]  # 6 is 2 from a start: exact cut
        assert sorted(b - a for a, b in shard_steps(log, 3, 5, 4)) == [0, 0, 1, 1]  # fewer steps than processes
        for n in (1, 2, 5, 7):
            cuts = shard_steps(log, 2, 17, n)
            assert cuts[0][0] == 2 and cuts[-1][1] == 17 and all(a[1] == b[0] for a, b in zip(cuts, cuts[1:]))


def test_one_process_is_the_estimator_itself(log_dir):
    query = mean_loss(make_data(6, seed=2).tensors)
    with InfluenceLog(log_dir) as log:
        want = tracin(log, query, module=tiny(), window=(2, 15)).scores
    got = run("tracin", log_dir, query, module=tiny(), window=(2, 15))
    np.testing.assert_array_equal(got.scores, want)
    with pytest.raises(ValueError, match="not distributed; distributed log-only estimators"):
        run("dit", log_dir, query, module=tiny())


def _kill_rank_1(done: int, total: int) -> None:
    if dist.is_initialized() and dist.get_rank() == 1 and done >= 2:
        os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process(log_dir):
    query = mean_loss(make_data(6, seed=2).tensors)
    with InfluenceLog(log_dir) as log:
        want = tracin(log, query, module=tiny()).scores
        want_self = tracin_self_influence(log, window=(1, 17)).scores
    got = run("tracin", log_dir, query, module=tiny(), devices=2)
    assert got.info["processes"] == 2 and [r["steps"] for r in got.info["per_rank"]] == [[0, 8], [8, 18]]
    np.testing.assert_allclose(got.scores, want, rtol=1e-12, atol=1e-15)
    got_self = run("tracin_self_influence", log_dir, window=(1, 17), devices=2)
    np.testing.assert_allclose(got_self.scores, want_self, rtol=1e-12, atol=1e-15)


@pytest.mark.slow
def test_a_result_larger_than_a_pipe_comes_back_from_spawned_processes(log_dir, tmp_path):
    """400 KB of scores (a dataset of 50 000 ids): a spawned rank 0 would block returning it through the launcher."""
    import shutil

    from lightning_influence.log.format import read_meta
    from lightning_influence.log.writer import write_meta

    big = tmp_path / "big"
    shutil.copytree(log_dir, big)
    meta = read_meta(big)
    meta["dataset_size"] = 50_000
    write_meta(big, meta)
    with InfluenceLog(big) as log:
        want = tracin_self_influence(log).scores
    got = run("tracin_self_influence", big, devices=2, timeout_s=120)
    assert got.scores.shape == (50_000, 1)
    np.testing.assert_allclose(got.scores, want, rtol=1e-12, atol=1e-15)


@pytest.mark.slow
def test_a_killed_process_ends_the_query_with_a_clear_error(log_dir):
    t0 = time.perf_counter()
    with pytest.raises(DistributedQueryError, match="distributed tracin_self_influence query on 2 processes failed"):
        run("tracin_self_influence", log_dir, devices=2, progress=_kill_rank_1, timeout_s=60)
    assert time.perf_counter() - t0 < 60


# ------------------------------------------------------------------------------------- replay LOO and groups
class ValLoss:
    """A picklable query (``ddp_spawn`` sends it to every process): the mean loss on a fixed batch."""

    query_names = ["val"]

    def __init__(self, n: int = 6, seed: int = 2) -> None:
        self.batch = make_data(n, seed=seed).tensors

    def __call__(self, module):
        return module.per_sample_loss(self.batch).mean()


def test_split_range_and_one_process_map():
    assert split_range(7, 3) == [(0, 2), (2, 4), (4, 7)] and split_range(1, 3) == [(0, 0), (0, 0), (0, 1)]
    assert map_blocks(lambda a, b, d: list(range(a, b)), 4, None, "x")[0][:3] == (0, 4, [0, 1, 2, 3])


@pytest.mark.slow
def test_replay_loo_and_group_removal_on_two_gloo_processes_equal_one_process(log_dir):
    """5 samples (copies=2: passes of 2 and 1 here, 3 and 2 in one process) and 3 groups, split 2 + 3 / 1 + 2."""
    data, query, ids = make_data(24, seed=1), ValLoss(), [0, 3, 7, 11, 20]
    groups = [[1, 2], [5], [4, 8, 9]]
    with InfluenceLog(log_dir) as log:
        want = replay_loo(log, tiny(), data, query, sample_ids=ids, grid=[0, 9, 18], copies=3)
        got = replay_loo(log, tiny(), data, query, sample_ids=ids, grid=[0, 9, 18], copies=2,
                         processes=Processes(devices=2, timeout_s=120))
        want_g = replay_group_removal(log, tiny(), data, query, groups)
        got_g = replay_group_removal(log, tiny(), data, query, groups, processes=2)
    assert got.ids.tolist() == ids and got.info["processes"] == 2
    assert [r["units"] for r in got.info["per_rank"]] == [[0, 2], [2, 5]] and got.info["passes"] == 3
    assert np.abs(want.values).max() > 1e-4  # removals that move the query
    np.testing.assert_allclose(got.values, want.values, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(got.base, want.base, rtol=1e-12, atol=1e-15)
    assert got.info["replay_drift"]["checkpoints_compared"] > 0
    np.testing.assert_allclose(got_g, want_g, rtol=1e-12, atol=1e-15)
    assert got_g.shape == (3, 1) and np.abs(want_g).min() > 1e-5


def _kill_rank_1_replay(done: int, total: int) -> None:
    if dist.is_initialized() and dist.get_rank() == 1 and done >= 3:
        os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.slow
def test_a_killed_process_ends_a_distributed_replay_with_a_clear_error(log_dir):
    t0 = time.perf_counter()
    with InfluenceLog(log_dir) as log, pytest.raises(DistributedQueryError, match="replay leave-one-out on 2 processes"):
        replay_loo(log, tiny(), make_data(24, seed=1), ValLoss(), sample_ids=[0, 1, 2, 3],
                   processes=Processes(devices=2, timeout_s=60), progress=_kill_rank_1_replay)
    assert time.perf_counter() - t0 < 60


# ------------------------------------------------------------------------------- DIT, timeline, Diff-In
class ValLosses:
    """A picklable 3-output query: the losses of 3 fixed samples."""

    query_names = ["a", "b", "c"]

    def __init__(self) -> None:
        self.batch = make_data(3, seed=4).tensors

    def __call__(self, module):
        return module.per_sample_loss(self.batch)


@pytest.mark.slow
def test_dit_timeline_and_diffin_split_by_query_column_on_two_gloo_processes_equal_one_process(log_dir):
    from lightning_influence import dit, diffin, timeline
    from lightning_influence.distributed import by_columns
    from lightning_influence.estimators.dit import dit_local

    data, query = make_data(24, seed=1), ValLosses()
    kw = {"module": tiny(), "train_data": data}
    with InfluenceLog(log_dir) as log:
        for est, extra in ((dit, {"window": (4, 14)}), (dit_local, {"window": (4, 14)}),
                           (diffin, {"form": "step", "window": (4, 14)}),
                           (diffin, {"form": "published", "samples": "all", "steps": 3})):
            want = est(log, query, **kw, **extra)
            got = by_columns(est, log, query, Processes(devices=2, timeout_s=120), **kw, **extra)
            assert got.query_names == ["a", "b", "c"] and got.method == want.method
            assert [r["columns"] for r in got.info["per_rank"]] == [[0, 1], [1, 3]]
            assert np.abs(want.scores).max() > 1e-6
            np.testing.assert_allclose(got.scores, want.scores, rtol=1e-12, atol=1e-15 * np.abs(want.scores).max())
        want_t = timeline(log, query, grid=[0, 6, 12, 18], **kw)
        got_t = by_columns(timeline, log, query, 2, grid=[0, 6, 12, 18], **kw)
    assert got_t.values.shape == want_t.values.shape == (24, 4, 3) and got_t.grid.tolist() == [0, 6, 12, 18]
    np.testing.assert_allclose(got_t.values, want_t.values, rtol=1e-12, atol=1e-15 * np.abs(want_t.values).max())


@pytest.mark.slow
def test_gauss_newton_dit_and_diffin_self_influence_on_two_gloo_processes_equal_one_process(log_dir):
    """Gauss-Newton DIT split by query column (a callable query, its local form, precomputed gradients); Diff-In
    self-influence split by steps: the step form (both window ends, cut at checkpoint 6: the later process's product
    carries the earlier one's sum) and the published form over the logged rows and over every sample."""
    from lightning_influence.distributed import by_columns, by_steps
    from lightning_influence.estimators import diffin_self_influence
    from lightning_influence.estimators.dit import dit_gauss_newton
    from lightning_influence.estimators.tracin import checkpoint_query_gradients

    procs = Processes(devices=2, timeout_s=120)
    with InfluenceLog(log_dir) as log:
        pre, _ = checkpoint_query_gradients(log, tiny(), ValLosses(), log.checkpoint_steps)
        for query, extra in ((ValLosses(), {"module": tiny(), "window": (4, 14)}),
                             (ValLosses(), {"module": tiny(), "window": (4, 14), "local": True}),
                             (pre, {"window": (5, 17), "query_names_": ["a", "b", "c"]})):
            want = dit_gauss_newton(log, query, **extra)
            got = by_columns(dit_gauss_newton, log, query, procs, **extra)
            assert got.query_names == ["a", "b", "c"] and got.method == want.method
            assert [r["columns"] for r in got.info["per_rank"]] == [[0, 1], [1, 3]] and np.abs(want.scores).max() > 1e-6
            np.testing.assert_allclose(got.scores, want.scores, rtol=1e-12, atol=1e-15 * np.abs(want.scores).max())
        kw = {"module": tiny(), "train_data": make_data(24, seed=1)}
        for extra, steps in (({"form": "step", "window": (4, 14)}, [[0, 6], [6, 14]]),
                             ({"form": "published", "samples": "batch", "window": (2, 15)}, [[2, 8], [8, 15]]),
                             ({"form": "published", "samples": "all", "steps": 5}, [[0, 5], [8, 18]])):  # 0 4 | 8 13 17
            want = diffin_self_influence(log, **kw, **extra)
            got = by_steps(diffin_self_influence, log, None, procs, **kw, **extra)
            assert got.method == want.method and got.info["processes"] == 2
            assert [r["steps"] for r in got.info["per_rank"]] == steps
            assert got.info["hvp_products"] == want.info["hvp_products"] and np.abs(want.scores).max() > 1e-6
            assert got.info["replay_drift"] == want.info["replay_drift"]
            np.testing.assert_allclose(got.scores, want.scores, rtol=1e-12, atol=1e-15 * np.abs(want.scores).max())


@pytest.mark.slow
def test_a_killed_process_ends_a_distributed_diffin_self_influence_with_a_clear_error(log_dir):
    from lightning_influence.distributed import by_steps
    from lightning_influence.estimators import diffin_self_influence

    t0 = time.perf_counter()
    with InfluenceLog(log_dir) as log, pytest.raises(DistributedQueryError,
                                                     match="distributed diffin_self_influence query on 2 processes"):
        by_steps(diffin_self_influence, log, None, Processes(devices=2, timeout_s=60), module=tiny(),
                 train_data=make_data(24, seed=1), form="step", progress=_kill_rank_1)
    assert time.perf_counter() - t0 < 60


# ------------------------------------------------------------------------------------------------------ CLI
def _cli_json(*argv: str, env_extra: dict | None = None) -> tuple[int, dict | None, str]:
    import json
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    proc = subprocess.run([sys.executable, "-m", "lightning_influence", *argv, "--format", "json", "--quiet"],
                          capture_output=True, text=True, timeout=300, env=env)
    return proc.returncode, json.loads(proc.stdout) if proc.returncode == 0 else None, proc.stderr


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    from tests._cli_run import train_tiny_run

    return train_tiny_run(tmp_path_factory.mktemp("cli") / "run")


def _one_and_two_processes(*argv: str) -> tuple[dict, dict]:
    """The CLI's JSON for ``argv`` on one process and with ``--devices 2`` (checked to start 2 processes)."""
    code1, one, err1 = _cli_json(*argv)
    code2, two, err2 = _cli_json(*argv, "--devices", "2")
    assert code1 == 0 and code2 == 0, err1 + err2
    assert "MEMBER: 2/2" in err2 and "MEMBER: 2/2" not in err1
    return one, two


def test_cli_tracin_self_and_devices_for_every_method_but_not_for_pbrf_or_datamodel(log_dir, capsys):
    from lightning_influence.cli import main
    from lightning_influence.cli.methods import BY_COLUMNS, BY_STEPS, DISTRIBUTED, METHODS

    assert main(["query", log_dir, "-m", "tracin-self", "-k", "0", "-f", "json", "-q"]) == 0
    import json

    res = json.loads(capsys.readouterr().out)["results"][0]
    with InfluenceLog(log_dir) as log:
        want = tracin_self_influence(log).column(0)
    got = np.zeros_like(want)
    for row in res["rows"]:
        got[row["id"]] = row["score"]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert sorted(METHODS) == sorted([*DISTRIBUTED, *BY_COLUMNS, *BY_STEPS])  # each method says how it splits
    assert main(["evaluate", log_dir, "--datamodel", "--devices", "2", "-q"]) == 2
    assert "--pbrf, --gap and --datamodel run in one process" in capsys.readouterr().err
    assert main(["tensorboard", log_dir, "--logdir", "unused", "--devices", "0", "-q"]) == 2
    assert "--devices and --num-nodes must be >= 1" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_cli_tensorboard_on_2_devices_writes_the_events_once(digits_run, tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "lightning_influence", "tensorboard", digits_run.log, "-c",
                           digits_run.config, "-m", "tracin-self", "--grid", "3", "--logdir", str(tmp_path), "--devices",
                           "2"], capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "MEMBER: 2/2" in proc.stderr and proc.stdout.count("wrote tracin-self") == 1, proc.stdout
    assert len(list((tmp_path / "tracin-self").glob("events.out.tfevents.*"))) == 1


@pytest.mark.slow
def test_cli_devices_2_equals_one_process(log_dir):
    code1, one, err1 = _cli_json("query", log_dir, "-m", "tracin-self", "-k", "0")
    code2, two, err2 = _cli_json("query", log_dir, "-m", "tracin-self", "-k", "0", "--devices", "2")
    assert code1 == 0 and code2 == 0, err1 + err2
    a, b = one["results"][0], two["results"][0]
    assert [r["id"] for r in a["rows"]] == [r["id"] for r in b["rows"]]
    np.testing.assert_allclose([r["score"] for r in b["rows"]], [r["score"] for r in a["rows"]], rtol=1e-12)
    assert b["info"]["processes"] == 2 and a["info"].get("processes", 1) == 1


def test_eval_mode_query_turns_dropout_off_and_restores_the_mode():
    import torch

    from lightning_influence.queries import eval_mode

    module = tiny(dropout=0.5).train()
    batch = make_data(8, seed=3).tensors
    plain, wrapped = mean_loss(batch, name="v"), eval_mode(mean_loss(batch, name="v"))
    assert wrapped.query_names == ["v"]
    first, second = wrapped(module), wrapped(module)
    assert module.training and torch.equal(first, second)  # no dropout: deterministic, and train mode restored
    assert not torch.equal(plain(module), plain(module))  # the plain query draws dropout masks


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_cli_evaluate_devices_2_equals_one_process(digits_run):
    """The digits run (float32): the ground truth and the group removals on 2 processes against 1."""
    run_ = digits_run
    argv = ("evaluate", run_.log, "-c", run_.config, "-m", "tracin", "--samples", "3,7,11,20,41", "--groups",
            "--group-sizes", "0.1", "--group-kinds", "random")
    one, two = _one_and_two_processes(*argv)
    truth1, truth2 = [s["truth"] for s in one["samples"]], [s["truth"] for s in two["samples"]]
    assert [s["id"] for s in two["samples"]] == [3, 7, 11, 20, 41] and max(map(abs, truth1)) > 0
    np.testing.assert_allclose(truth2, truth1, rtol=0, atol=1e-5 * max(map(abs, truth1)))  # float32 replay
    a1, a2 = [r["actual"] for r in one["groups"]["rows"]], [r["actual"] for r in two["groups"]["rows"]]
    np.testing.assert_allclose(a2, a1, rtol=1e-4)
    code, _, err = _cli_json(*argv[:4], "--devices", "0")
    assert code == 2 and "--devices and --num-nodes must be >= 1" in err


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_cli_query_dit_local_split_by_batch_on_2_devices_equals_one_process(digits_run):
    one, two = _one_and_two_processes("query", digits_run.log, "-c", digits_run.config, "-m", "dit-local", "-w", "4:10",
                                      "--query", "val_loss", "--query", "test:3", "-k", "0")
    info = two["results"][0]["info"]
    assert info["processes"] == 2 and info["split"] == "batch" and min(r["rows"] for r in info["per_rank"]) > 0
    assert [r["query"] for r in two["results"]] == [r["query"] for r in one["results"]] and len(one["results"]) == 2
    for a, b in zip(one["results"], two["results"]):
        sa = {r["id"]: r["score"] for r in a["rows"]}
        sb = {r["id"]: r["score"] for r in b["rows"]}
        assert sa.keys() == sb.keys() and max(map(abs, sa.values())) > 0
        np.testing.assert_allclose([sb[k] for k in sa], list(sa.values()), rtol=0, atol=1e-5 * max(map(abs, sa.values())))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_cli_timeline_dit_split_by_query_on_2_devices_equals_one_process(digits_run):
    run_ = digits_run
    one, two = _one_and_two_processes("timeline", run_.log, "-c", run_.config, "-m", "dit", "--grid", "3", "--query",
                                      "val_loss", "--query", "test:3", "-k", "0", "--split", "columns")
    assert [r["columns"] for r in two["info"]["per_rank"]] == [[0, 1], [1, 2]]
    a, b = json.dumps(one, sort_keys=True), json.dumps(two, sort_keys=True)
    assert len(one["results"]) == 2 and a.count('"id"') == b.count('"id"') > 0

    def values(res):
        return np.array([[row[k] for k in sorted(row) if isinstance(row[k], float)] for r in res["results"]
                         for row in sorted(r["rows"], key=lambda row: row["id"])])

    va, vb = values(one), values(two)
    assert va.shape == vb.shape and va.size and np.abs(va).max() > 0
    np.testing.assert_allclose(vb, va, rtol=0, atol=1e-5 * np.abs(va).max())


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_cli_query_diffin_self_and_dit_gn_on_2_devices_equal_one_process(digits_run):
    """Diff-In self-influence split by steps, Gauss-Newton DIT by each step's rows (the digits run: float32)."""
    def scores(res):
        out = np.full(res["n_samples"], np.nan)
        for row in res["rows"]:
            out[row["id"]] = row["score"]
        return out

    for method in ("diffin-self", "dit-gn"):
        one, two = _one_and_two_processes("query", digits_run.log, "-c", digits_run.config, "-m", method, "-k", "0",
                                          "--query", "val_loss", "--query", "test:3")
        assert len(one["results"]) == len(two["results"]) == (1 if method == "diffin-self" else 2)
        for a, b in zip(one["results"], two["results"]):
            assert b["info"]["processes"] == 2 and a["method"] == b["method"]
            if method == "dit-gn":  # the default split: each process read its part of every step's rows
                assert b["info"]["split"] == "batch" and len(b["info"]["per_rank"]) == 2
                assert sum(r["bytes_read"] for r in b["info"]["per_rank"]) == b["info"]["bytes_read"] > 0
            sa, sb = scores(a), scores(b)
            assert np.abs(sa).max() > 0
            np.testing.assert_allclose(sb, sa, rtol=0, atol=1e-5 * np.abs(sa).max())


# ------------------------------------------------------------------------------- DIT split by batch rows
def _batch_runs(tmp):
    """Three float64 runs of 16 samples in batches of 4: SGD with momentum, norm clipping that binds and 2
    micro-batches per step (rows split inside each micro-batch); AdamW, with its inputs stored in the log (each
    process slices its rows out of them); dropout (each step whole on one process)."""
    runs = {}
    for name, kw, fit_kw in (("sgd-clip", {"momentum": 0.9, "lr": 0.5}, {"gradient_clip_val": 0.05, "accumulate_grad_batches": 2}),
                             ("adamw", {"optimizer": "adamw", "lr": 0.05, "weight_decay": 0.1}, {}),
                             ("dropout", {"dropout": 0.3, "momentum": 0.5}, {})):
        path = tmp / name
        tracker = InfluenceTracker(str(path), checkpoint_every_n_steps=3, storage_dtype="float64",
                                   store_inputs=name == "adamw")
        fit(tiny(**kw), loader(make_data(16, seed=5), batch_size=4), tracker, epochs=2, **fit_kw)
        runs[name] = (str(path), kw)
    return runs


@pytest.fixture(scope="module")
def batch_runs(tmp_path_factory):
    return _batch_runs(tmp_path_factory.mktemp("batch"))


def _sweeps(log_path: str, kw: dict) -> list:
    """(estimator, kwargs) of the three model sweeps on one run."""
    from lightning_influence import dit, timeline
    from lightning_influence.estimators.dit import dit_local

    base = {"module": tiny(**kw), "train_data": make_data(16, seed=5)}
    with InfluenceLog(log_path) as log:
        T = log.num_steps
    return [(dit, {**base, "window": (2, T)}), (dit_local, {**base, "window": (2, T)}),
            (timeline, {**base, "grid": [0, 3, T]})]


def _all_batch_sweeps(fabric, jobs):
    """Every job through the batch-split worker of ``distributed`` in one pair of processes."""
    from lightning_influence.distributed import _batch_worker

    return [_batch_worker(fabric, est, path, ValLosses(), kw, "test sweep") for path, est, kw in jobs]


def _values(res):
    return res.scores if hasattr(res, "scores") else res.values


@pytest.mark.slow
def test_dit_timeline_and_local_dit_split_by_batch_on_two_gloo_processes_equal_one_process(batch_runs):
    """SGD with clipping and 2 micro-batches, AdamW and dropout: 2 processes (rows split) against one, to 1e-12."""
    from lightning_influence.distributed import launch

    jobs = [(path, est, ekw) for path, kw in batch_runs.values() for est, ekw in _sweeps(path, kw)]
    got = launch(_all_batch_sweeps, jobs, devices=2, timeout_s=120)
    for (path, est, ekw), two in zip(jobs, got):
        with InfluenceLog(path) as log:
            one = est(log, ValLosses(), **ekw)
        want = _values(one)
        assert two.method == one.method and two.query_names == ["a", "b", "c"]
        assert two.info["split"] == "batch" and two.info["processes"] == 2
        rows = [r["rows"] for r in two.info["per_rank"]]
        assert sum(rows) == two.info["rows_evaluated"] and min(rows) > 0
        assert np.abs(want).max() > 1e-6
        np.testing.assert_allclose(_values(two), want, rtol=1e-12, atol=1e-13 * np.abs(want).max(), err_msg=f"{path} {est.__name__}")
    by_run = {p: [r.info["per_rank"] for (pp, _, _), r in zip(jobs, got) if pp == p] for p, _ in batch_runs.values()}
    clip_rows = [r["rows"] for r in by_run[batch_runs["sgd-clip"][0]][0]]
    assert clip_rows[0] == clip_rows[1]  # every micro-batch of 4 cut 2 + 2


@pytest.mark.slow
def test_a_killed_process_ends_a_batch_split_sweep_with_a_clear_error(batch_runs):
    from lightning_influence import dit
    from lightning_influence.distributed import sweep

    path, kw = batch_runs["adamw"]
    t0 = time.perf_counter()
    with InfluenceLog(path) as log, pytest.raises(DistributedQueryError, match=r"dit \(batch split\) on 2 processes"):
        sweep(dit, log, ValLosses(), Processes(devices=2, timeout_s=60), module=tiny(**kw),
              train_data=make_data(16, seed=5), progress=_kill_rank_1)
    assert time.perf_counter() - t0 < 60


def test_batch_shard_rows_split_plain_micro_batches_and_rotate_the_ones_that_drew():
    import torch

    from lightning_influence.step.shard import BatchShard, check_row_split, positions, take_rows

    shards = [BatchShard(r, 3, lambda x: x) for r in range(3)]
    parts = [s.rows(7, [5, 4, 2], [False, True, True]) for s in shards]
    assert [p[0] for p in parts] == [slice(0, 1), slice(1, 3), slice(3, 5)]  # 5 rows: 1 + 2 + 2
    assert [p[1] for p in parts] == [slice(0, 0), slice(0, 0), slice(0, 4)]  # drew: whole on rank (7 + 1) mod 3
    assert [p[2] for p in parts] == [slice(0, 2), slice(0, 0), slice(0, 0)]  # (7 + 2) mod 3 = 0
    pos = [positions([5, 4, 2], p) for p in parts]
    assert sorted(np.concatenate(pos).tolist()) == list(range(11))
    assert pos[0].tolist() == [0, 9, 10] and pos[1].tolist() == [1, 2] and pos[2].tolist() == [3, 4, 5, 6, 7, 8]
    batch = (torch.arange(10).reshape(5, 2), torch.arange(5), torch.tensor(3.0), "tag")
    x, y, c, tag = take_rows(batch, slice(1, 3), 5)
    assert x.tolist() == [[2, 3], [4, 5]] and y.tolist() == [1, 2] and float(c) == 3.0 and tag == "tag"
    check_row_split(tiny(batchnorm=True).eval())
    with pytest.raises(ValueError, match="BatchNorm layer 'net.1' is in train mode"):
        check_row_split(tiny(batchnorm=True))


def test_sweep_picks_the_split_and_refuses_a_batch_split_it_cannot_do(log_dir):
    from lightning_influence import diffin, dit
    from lightning_influence.distributed import by_batch, split_for, sweep

    with InfluenceLog(log_dir) as log:
        kw = {"module": tiny(), "train_data": make_data(24, seed=1), "window": (10, 12)}
        want = dit(log, ValLosses(), **kw).scores
        np.testing.assert_array_equal(sweep(dit, log, ValLosses(), None, **kw).scores, want)  # one process: itself
        with pytest.raises(ValueError, match="diffin has no batch split"):
            by_batch(diffin, log, ValLosses(), 2, **kw)
        with pytest.raises(ValueError, match="split must be one of"):
            sweep(dit, log, ValLosses(), 2, split="rows", **kw)
    assert split_for(dit, tiny()) == "batch" and split_for(diffin, tiny()) == "columns"
    assert split_for(dit, tiny(batchnorm=True)) == "columns" and split_for(dit, tiny(batchnorm=True).eval()) == "batch"
    assert split_for(dit, tiny(), "columns") == "columns"


class _ThreadSum:
    """``world`` threads standing for processes: ``reducer(rank)`` sums a tensor over them (same order on each)."""

    def __init__(self, world: int) -> None:
        import threading

        self.barrier, self.parts = threading.Barrier(world, timeout=60), [None] * world

    def reducer(self, rank: int):
        def all_reduce(x):
            self.parts[rank] = x.clone()
            self.barrier.wait()
            total = sum(self.parts[1:], self.parts[0].clone())
            self.barrier.wait()
            return total

        return all_reduce


class _Counted:
    """Training data by id that counts the ids it served."""

    def __init__(self, ds) -> None:
        self.ds, self.served = ds, 0

    def __call__(self, ids):
        from lightning_influence.replay import batch_from_ids

        self.served += len(ids)
        return batch_from_ids(self.ds, ids)


def _in_threads(world: int, fn) -> list:
    """``fn(rank, all_reduce)`` on ``world`` threads; their results in rank order."""
    from concurrent.futures import ThreadPoolExecutor

    total = _ThreadSum(world)
    with ThreadPoolExecutor(world) as pool:
        return [f.result() for f in [pool.submit(fn, r, total.reducer(r)) for r in range(world)]]


@pytest.mark.parametrize("name", ["sgd-clip", "adamw"])
def test_replay_and_dit_with_every_step_split_over_two_processes_equal_one_process(batch_runs, name):
    """Two threads standing for processes (the collective a sum over them): the replay and DIT of the SGD + clipping +
    2-micro-batch run (each thread loading half the rows from the data) and of the AdamW run (each slicing its rows
    out of the inputs stored in the log) equal one process to 1e-12."""
    from lightning_influence import dit
    from lightning_influence.replay import replay
    from lightning_influence.step.shard import BatchShard

    path, kw = batch_runs[name]
    data = make_data(16, seed=5)
    with InfluenceLog(path) as log:
        T = log.num_steps
        rows = sum(len(log.batch_ids(t)) for t in range(T))
        one_data = _Counted(data)
        want_theta = [rs.params for rs in replay(log, tiny(**kw), one_data, 0, T)]
        want = dit(log, ValLosses(), module=tiny(**kw), train_data=data, window=(1, T))
    assert one_data.served == (0 if name == "adamw" else rows)  # stored inputs: the data is not asked

    def both(rank, all_reduce):
        shard, counted = BatchShard(rank, 2, all_reduce), _Counted(data)
        with InfluenceLog(path) as own:  # a reader per thread, as per process
            theta = [rs.params for rs in replay(own, tiny(**kw), counted, 0, T, shard=shard)]
            served = counted.served
            scores = dit(own, ValLosses(), module=tiny(**kw), train_data=data, window=(1, T), shard=shard)
        return theta, served, scores

    got = _in_threads(2, both)
    assert [g[1] for g in got] == [one_data.served // 2] * 2  # each replayed half of every step's rows
    for theta, _, scores in got:
        for a, b in zip(theta, want_theta):
            for n in a:
                np.testing.assert_allclose(a[n].numpy(), b[n].numpy(), rtol=1e-12, atol=1e-14)
        assert scores.info["rows_evaluated"] == rows // 2
        np.testing.assert_allclose(scores.scores, want.scores, rtol=1e-12, atol=1e-13 * np.abs(want.scores).max())
