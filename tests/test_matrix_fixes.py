"""Defects found by the configuration matrix (estimators against replay LOO; log and CLI robustness), one test each."""

from __future__ import annotations

import os

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from conftest import ChangesOptimizer, TinyClassifier, fit, loader, make_data
from lightning_influence import InfluenceLog, InfluenceTracker, WithIds
from lightning_influence.evaluation import replay_loo
from lightning_influence.queries import evaluate_query, mean_loss
from lightning_influence.replay import replay


def _bf16_model() -> TinyClassifier:
    torch.manual_seed(0)
    return TinyClassifier(optimizer="adamw", lr=0.01).float()


def test_replay_loo_of_a_bf16_mixed_run_without_dropout_reproduces_training(tmp_path):
    """Under bf16 autocast the counterfactual copies ran as one vmapped (batched) forward and backward, whose bfloat16
    rounding is not training's: the reference copy left the logged trajectory (0.2-0.7% at a checkpoint, 7% with value
    clipping, refused as a replay mismatch). They run copy by copy as trained now, so the reference copy is bit-exact
    and each removal equals the plain replay of the run with that sample's weight 0."""
    ds = make_data(20, dtype=torch.float32)
    path = tmp_path / "log"
    fit(_bf16_model(), loader(ds, batch_size=6), InfluenceTracker(str(path), checkpoint_every_n_steps=3), epochs=2,
        precision="bf16-mixed", gradient_clip_val=0.05, gradient_clip_algorithm="value")
    log = InfluenceLog(path)
    T = log.num_steps
    query = mean_loss((ds.tensors[0], ds.tensors[1]))
    loo = replay_loo(log, _bf16_model(), WithIds(ds), query, sample_ids=[2, 5], grid=[0, T], tolerance=0.0)
    assert loo.info["replay_drift"]["max"] == 0.0

    def f_without(j: int) -> float:
        w = lambda t, ids: torch.tensor([0.0 if i == j else 1.0 for i in ids])  # noqa: E731
        last = list(replay(log, _bf16_model(), WithIds(ds), 0, None, weights=w, verify=False))[-1]
        return float(evaluate_query(_bf16_model(), query, last.params))

    base = f_without(-1)
    assert loo.base[-1, 0] == base
    for row, j in enumerate([2, 5]):
        assert loo.at(T)[row, 0] == pytest.approx(f_without(j) - base, rel=1e-3, abs=1e-7)


# ------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from tests._cli_run import train_tiny_run

    return train_tiny_run(tmp_path_factory.mktemp("cli") / "run")


def _one_line_error(capsys, *argv: str) -> str:
    from lightning_influence.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "internal error" not in err and out == "", err
    return lines[0]


@pytest.mark.parametrize("query", ["pred:0:10", "margin:0:99", "pred:0:-1"])
def test_a_class_outside_the_models_outputs_is_a_user_error(run, capsys, query):
    """``pred:ID:CLASS`` with a class the model has no logit for failed as "internal error (IndexError ...)" (exit 1);
    a negative class silently took a logit counted from the end."""
    line = _one_line_error(capsys, "query", run.log, "-q", "--method", "tracin", "--query", query)
    assert "class" in line and "10 outputs" in line, line


def test_a_model_class_that_is_no_module_is_a_user_error(run, capsys):
    """``--model`` naming a class that is not a LightningModule (here the datamodule) failed as "internal error
    (AttributeError: ... no attribute 'named_parameters')"."""
    line = _one_line_error(capsys, "query", run.log, "-q", "--model", "lightning_influence.examples.digits.DigitsDataModule")
    assert "DigitsDataModule" in line and "not a LightningModule" in line, line


@pytest.mark.parametrize("value", ["-1", "nan"])
def test_a_negative_or_non_finite_replay_tolerance_is_refused_by_name(run, capsys, value):
    """``--replay-tolerance -1`` (or nan) ran the replay and then reported a replay mismatch of drift 0."""
    line = _one_line_error(capsys, "query", run.log, "-q", "--replay-tolerance", value)
    assert "--replay-tolerance" in line and "mismatch" not in line and "reproduce" not in line, line


def test_a_negative_tolerance_is_refused_by_the_estimators(run):
    from lightning_influence.replay_drift import resolve_tolerance

    assert resolve_tolerance(None) == 0.01 and resolve_tolerance(0) == 0.0 and resolve_tolerance(float("inf")) > 1e300
    for bad in (-1e-3, float("nan")):
        with pytest.raises(ValueError, match="tolerance must be a number >= 0"):
            resolve_tolerance(bad)


# --------------------------------------------------------------------------- ground truth
def test_a_fractional_grid_is_a_fraction_of_the_logs_steps_as_a_window(tmp_path):
    """On a log a resumed fit started at step 4 (T = 12), window (0.5, 1.0) is steps [8, 12) (fractions of [4, 12]) but
    grid=[0.0, 0.5, 1.0] (timeline, replay_loo) was the steps 0, 6, 12 (fractions of T): the same fraction, two steps.
    Both are fractions of [first_step, T] now (one function); a bare float grid is refused with what to pass."""
    from test_robustness import synthetic

    from lightning_influence.replay import grid_bounds

    synthetic(tmp_path / "late", steps=12, first=4)
    log = InfluenceLog(tmp_path / "late")
    assert (log.first_step, log.num_steps) == (4, 12)
    assert grid_bounds(log, [0.0, 0.25, 0.5, 1.0]).tolist() == [4, 6, 8, 12]  # 4 + f * 8
    assert [log.window((0.0, 0.25)), log.window((0.25, 0.5)), log.window((0.5, 1.0))] == [(4, 6), (6, 8), (8, 12)]
    assert grid_bounds(log, [0.5, 1.0], span=log.window("0.5:1.0")).tolist() == [8, 12]
    with pytest.raises(ValueError, match=r"grid=0.5: .*list of boundaries, e.g. \[0.0, 0.5, 1.0\]"):
        grid_bounds(log, 0.5)


def test_a_python_grid_below_a_resumed_logs_first_step_is_refused(tmp_path):
    """``grid_bounds`` (``timeline(grid=...)``, ``replay_loo``'s grid) took steps from 0 on a log a resumed fit started at
    step 4: a boundary at 0 made a window [0, 6) that holds only the recorded steps [4, 6) (the CLI refused it, Python
    did not). Steps before the log's first are refused with why; the log's own steps pass."""
    from test_robustness import synthetic

    from lightning_influence.replay import grid_bounds

    synthetic(tmp_path / "late", steps=12, first=4)
    log = InfluenceLog(tmp_path / "late")
    with pytest.raises(ValueError, match=r"grid steps must lie in \[4, 12\] \(the log starts at step 4: the fit that "
                                         r"wrote it was resumed from a checkpoint of that step into a new log.*got \[0, 6, 12\]"):
        grid_bounds(log, [0, 6, 12])
    assert grid_bounds(log, [4, 6, 12]).tolist() == [4, 6, 12]
    with pytest.raises(ValueError, match=r"grid steps must lie in \[6, 12\], got \[4, 12\]"):
        grid_bounds(log, [4, 12], span=(6, 12))  # a span's own bounds: no word about the log


def test_replay_loo_of_a_log_started_by_a_resumed_fit_removes_from_its_first_step(tmp_path):
    """A fit resumed from a Lightning checkpoint into a new log_dir starts its log at step ``t0 > 0`` (θ_t0 and the
    optimizer state stored there); DIT scores such a log from ``t0``. replay_loo refused it ("retrains from θ_0, but the
    log has no checkpoint at step 0"), so `evaluate` could not run at all. It retrains from θ_t0 now: equal to the plain
    replay of the log with the sample's weight 0 (momentum SGD: the stored optimizer state matters)."""
    from test_robustness import epoch_fit

    from conftest import tiny

    epoch_fit(tmp_path / "log", tmp_path / "ckpt", epochs=1)
    epoch_fit(tmp_path / "late", None, epochs=3, ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt"), overwrite=True)
    log = InfluenceLog(tmp_path / "late")
    assert log.first_step == 4 and log.num_steps == 12
    ds = WithIds(make_data(24))
    query = mean_loss((make_data(24).tensors[0][:10], make_data(24).tensors[1][:10]))
    loo = replay_loo(log, tiny(momentum=0.9), ds, query, sample_ids=[1, 7])
    drift = loo.info["replay_drift"]
    assert loo.grid.tolist() == [4, 8, 12] and drift["checkpoints_compared"] == 8 and drift["max"] < 1e-12

    def f_without(j: int, until: int) -> float:
        w = lambda t, ids: torch.tensor([0.0 if i == j else 1.0 for i in ids], dtype=torch.float64)  # noqa: E731
        last = list(replay(log, tiny(momentum=0.9), ds, 4, until, weights=w, verify=False))[-1]
        assert last.step == until
        return float(evaluate_query(tiny(momentum=0.9), query, last.params))

    for row, j in enumerate([1, 7]):
        for t in (8, 12):
            assert loo.at(t)[row, 0] == pytest.approx(f_without(j, t) - f_without(-1, t), rel=1e-9, abs=1e-14)
        assert loo.window(4, 12)[row] == loo.at(12)[row, 0]
    assert np.isclose(loo.base[-1, 0], f_without(-1, 12), rtol=1e-12)


# -------------------------------------------------------------------------------- the API
@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    from conftest import tiny

    path = tmp_path_factory.mktemp("api") / "log"
    ds = make_data(18)
    fit(tiny(momentum=0.9), loader(ds), InfluenceTracker(str(path), record_gradients=True, checkpoint_every_n_steps=2))
    return InfluenceLog(path), ds


def _estimators():
    from conftest import tiny

    from lightning_influence import diffin, dit, tracin

    return {"dit": lambda log, ds, q: dit(log, q, module=tiny(), train_data=WithIds(ds)),
            "tracin": lambda log, ds, q: tracin(log, q, module=tiny()),
            "diffin": lambda log, ds, q: diffin(log, q, module=tiny(), train_data=WithIds(ds), form="step")}


@pytest.mark.parametrize("estimator", ["dit", "tracin", "diffin"])
def test_a_query_that_is_not_finite_or_not_a_function_of_the_parameters_is_refused(small_run, estimator):
    """A query whose value is NaN gave every score NaN without a word; a query returning a float failed with
    "AttributeError: 'float' object has no attribute 'reshape'", a detached one with torch's "element 0 of tensors does
    not require grad"."""
    log, ds = small_run
    x = ds.tensors[0][:5]
    run = _estimators()[estimator]
    with pytest.raises(ValueError, match=r"query.*not finite"):
        run(log, ds, lambda m: m(x).sum() * float("nan"))
    with pytest.raises(TypeError, match=r"query returned a float.*tensor"):
        run(log, ds, lambda m: 1.0)
    with pytest.raises(ValueError, match=r"query does not depend on the model's parameters"):
        run(log, ds, lambda m: m(x).detach().sum())
    assert np.isfinite(run(log, ds, lambda m: m(x).sum()).scores).all()


def test_a_training_set_shorter_than_the_logs_ids_is_named(small_run):
    """``train_data`` holding fewer samples than the run's ids failed deep in torch ("IndexError: index 12 is out of
    bounds for dimension 0 with size 10")."""
    from conftest import tiny

    from lightning_influence import dit

    log, ds = small_run
    short = WithIds(torch.utils.data.TensorDataset(*(t[:10] for t in ds.tensors)))
    with pytest.raises(ValueError, match=r"train_data has 10 samples but the log holds sample id 1[0-7]"):
        dit(log, mean_loss((ds.tensors[0], ds.tensors[1])), module=tiny(), train_data=short)


@pytest.mark.parametrize("kw,match", [({"copies": 0}, r"copies must be an int >= 1"),
                                      ({"removal_weight": float("nan")}, r"removal_weight must be a finite")])
def test_replay_loo_refuses_meaningless_settings_by_name(small_run, kw, match):
    """``copies=0`` failed with "range() arg 3 must not be zero"; ``removal_weight=nan`` returned NaN values silently."""
    from conftest import tiny

    log, ds = small_run
    with pytest.raises(ValueError, match=match):
        replay_loo(log, tiny(), WithIds(ds), mean_loss((ds.tensors[0], ds.tensors[1])), sample_ids=[1], **kw)


def test_evaluate_reports_an_estimators_error_as_itself_not_as_a_bad_samples_spec(run, capsys):
    """``evaluate --samples top:K`` caught every ValueError of the estimate it ranks by, so a bad query (or seed) was
    reported as "--samples 'top:2': use ids '3,17,42', ..."."""
    line = _one_line_error(capsys, "evaluate", run.log, "-q", "--samples", "top:2", "--method", "tracin", "--query",
                           "pred:0:12", "--truth", "none")
    assert "class 12" in line and "--samples" not in line, line
    line = _one_line_error(capsys, "evaluate", run.log, "-q", "--samples", "random:3", "--seed", "-1", "--truth", "none")
    assert "--seed" in line, line
    line = _one_line_error(capsys, "evaluate", run.log, "-q", "--samples", "top:x")
    assert "--samples 'top:x'" in line, line


# ------------------------------------------------------------------------------ resumes
def test_a_checkpoint_without_tracker_state_does_not_continue_an_existing_log(tmp_path):
    """A checkpoint of a run trained without the tracker carries no run id; resumed with the tracker into the log of
    another run that happened to end at the checkpoint's step, it was continued: the log then held that run's steps and
    the resumed run's after them (replay failed at the next checkpoint, blaming data or round-off). Refused now, with
    nothing of the log touched; overwrite=True starts a new log at the checkpoint's step."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from conftest import tiny
    from test_robustness import epoch_fit
    from tests.test_reliability import file_bytes

    epoch_fit(tmp_path / "other", None, epochs=1)  # another run's finished log: steps 0..3
    untracked = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                           enable_model_summary=False, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt")])
    untracked.fit(tiny(momentum=0.9), loader(make_data(24)))
    ckpt = str(next((tmp_path / "ckpt").iterdir()))
    assert "step=4" in ckpt
    before = file_bytes(tmp_path / "other")
    with pytest.raises(ValueError, match=r"holds no InfluenceTracker state.*new log_dir.*overwrite=True"):
        epoch_fit(tmp_path / "other", None, epochs=2, ckpt_path=ckpt)
    assert file_bytes(tmp_path / "other") == before
    epoch_fit(tmp_path / "other", None, epochs=2, ckpt_path=ckpt, overwrite=True)
    log = InfluenceLog(tmp_path / "other")
    assert log.steps.tolist() == [4, 5, 6, 7] and log.checkpoint_steps[0] == 4 and log.finished


def test_replay_of_a_log_started_by_a_resumed_fit_starts_at_its_first_step(tmp_path):
    """``replay(log, module, data)`` defaulted to step 0 and failed on such a log ("no checkpoint at or before step 0
    to replay from"); it starts at the log's first step now, bit for bit, and step 0 is named as outside the log."""
    from conftest import tiny
    from test_robustness import epoch_fit

    epoch_fit(tmp_path / "log", tmp_path / "ckpt", epochs=1)
    epoch_fit(tmp_path / "late", None, epochs=2, ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt"), overwrite=True)
    log = InfluenceLog(tmp_path / "late")
    steps = [rs.step for rs in replay(log, tiny(momentum=0.9), WithIds(make_data(24)), tolerance=0.0)]
    assert steps == [4, 5, 6, 7, 8]
    with pytest.raises(ValueError, match=r"outside the run: need 4 <= t1 .* holds steps 4\.\.7"):
        list(replay(log, tiny(momentum=0.9), WithIds(make_data(24)), 0))


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_data_file_is_named_with_what_to_do(tmp_path, capsys, damage):
    """A log's stored data (``data.pt``) overwritten failed as "internal error (UnpicklingError: ...)" (exit 1), truncated
    as "[Errno 22] Invalid argument"; the CLI turns this error into one line and exit code 2 (load_context), and
    `info --verify` (which said OK) lists it as a problem."""
    from lightning_influence.recipe import DATA_FILE, RecipeError, stored_data

    ds = make_data(12)
    path = tmp_path / "log"
    fit(TinyClassifier().double(), loader(ds), InfluenceTracker(str(path), checkpoint_every_n_steps=2), epochs=1)
    data = path / DATA_FILE
    assert set(stored_data(path)) == {"train", "val"}
    if damage == "garbage":
        data.write_bytes(b"not a torch file" * 10)
    else:
        with open(data, "r+b") as f:
            f.truncate(data.stat().st_size // 2)
    with pytest.raises(RecipeError, match=r"data\.pt: the training and validation data stored with the log cannot be "
                                          r"read .*--builder"):
        stored_data(path)
    from lightning_influence.cli import main

    assert main(["info", str(path)]) == 0  # not read without --verify (it may be large)
    assert main(["info", str(path), "--verify"]) == 2
    assert "data.pt: the training and validation data stored with the log cannot be read" in capsys.readouterr().out


class _WarmedUp(ChangesOptimizer):
    """Sets the learning rate of every step in ``where`` (from step ``start`` on)."""

    def __init__(self, where: str, start: int = 0) -> None:
        super().__init__(lr=0.1, momentum=0.9)
        self.where, self.start = where, start

    def change(self, optimizer) -> None:
        if self.trainer.global_step >= self.start:
            for g in optimizer.param_groups:
                g["lr"] = 0.02 * (1 + self.trainer.global_step)


@pytest.mark.parametrize("start", [0, 3])
def test_a_learning_rate_set_after_the_trackers_hook_is_refused_at_that_step(tmp_path, start):
    """A rate set in the LightningModule's on_before_optimizer_step (Lightning calls it after the callbacks') was
    recorded one change late: the log's rates were not the ones the updates used (replay stopped 900% off at the next
    checkpoint, blaming data or round-off). Refused at the step it happens; set in training_step it is recorded."""
    ds = make_data(24)
    with pytest.raises(RuntimeError, match=rf"step {start} updated the parameters with learning rates .* "
                                           r"on_before_optimizer_step.*training_step"):
        torch.manual_seed(0)
        fit(_WarmedUp("on_before_optimizer_step", start).double(), loader(ds), InfluenceTracker(str(tmp_path / "a")))
    # the refused step is not in the log (it kept its recorded rates, which the update did not use): the steps before
    logged = InfluenceLog(tmp_path / "a")
    assert logged.steps.tolist() == list(range(start)) and not logged.finished
    torch.manual_seed(0)
    fit(_WarmedUp("training_step", start).double(), loader(ds),
        InfluenceTracker(str(tmp_path / "b"), checkpoint_every_n_steps=1))
    log = InfluenceLog(tmp_path / "b")
    assert [float(log.lr(t)[0]) for t in range(start, start + 2)] == pytest.approx([0.02 * (1 + start), 0.02 * (2 + start)])
    torch.manual_seed(0)
    assert [rs.step for rs in replay(log, _WarmedUp("training_step", start).double(), WithIds(ds), tolerance=0.0)][-1] == 8


def _resumed_builder():
    """--builder of the resumed-log CLI test: the tiny momentum classifier and its data."""
    from conftest import tiny

    ds = make_data(24)
    return {"module": tiny(momentum=0.9), "train_data": WithIds(ds), "val_data": (ds.tensors[0][:8], ds.tensors[1][:8])}


def test_evaluate_trust_tools_run_on_a_log_started_by_a_resumed_fit(tmp_path, capsys):
    """`evaluate --datamodel` (and --pbrf, --gap, --groups) took the whole run to be steps [0, T): on a log started by a
    resumed fit (steps [4, T)) they were refused with "measure the whole run; drop --window", no --window given."""
    from test_robustness import epoch_fit

    from lightning_influence.cli import main

    epoch_fit(tmp_path / "log", tmp_path / "ckpt", epochs=1)
    epoch_fit(tmp_path / "late", None, epochs=2, ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt"), overwrite=True)
    builder = f"{__file__}:_resumed_builder"
    code = main(["evaluate", str(tmp_path / "late"), "-q", "--builder", builder, "--samples", "1,2", "--datamodel",
                 "--pairs", "2", "--truth", "none"])
    out, err = capsys.readouterr()
    assert code == 0 and "datamodel" in out.lower(), err
    assert _one_line_error(capsys, "evaluate", str(tmp_path / "late"), "-q", "--builder", builder, "--samples", "1,2",
                           "--datamodel", "--window", "5:8").endswith("drop --window")


def test_timeline_grid_boundaries_before_a_resumed_logs_first_step_are_refused(tmp_path, capsys):
    """`timeline --grid 0,4,8` on a log of steps [4, 8) showed a window 0-4 of zeros (DIT) as if it were measured."""
    from test_robustness import epoch_fit

    epoch_fit(tmp_path / "log", tmp_path / "ckpt", epochs=1)
    epoch_fit(tmp_path / "late", None, epochs=2, ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt"), overwrite=True)
    line = _one_line_error(capsys, "timeline", str(tmp_path / "late"), "-q", "--builder",
                           f"{__file__}:_resumed_builder", "--grid", "0,4,8")
    assert "boundaries must lie in 4..8" in line, line


def test_an_unfinished_log_says_whether_its_writer_still_runs(tmp_path):
    """`info` on a log being written said "still being written or ended without finishing" (and PROBLEMS) whether the
    fit was running or long killed; the lock file names the writer, whose process is checked on this host (read
    without locking: a reader never makes a starting writer fail)."""
    import json
    import socket
    import subprocess
    import sys

    from lightning_influence.log.lock import writer_state

    fit(TinyClassifier().double(), loader(make_data(24)), InfluenceTracker(str(tmp_path / "log"), flush_every_n_steps=2))
    segments = sorted((tmp_path / "log" / "rank-0").glob("seg-*.h5"))
    segments[-1].unlink()  # the final segment (θ_T): the log is unfinished
    assert writer_state(tmp_path / "log") == ("none", {})
    note = InfluenceLog(tmp_path / "log").end_note  # the lock released: a fit that stopped (exception, Ctrl+C), not one
    assert "the fit stopped before on_train_end" in note and "still being written" not in note, note  # running
    lock = tmp_path / "log" / "rank-0" / "writer.lock"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for pid, state, text in [(os.getpid(), "live", "the run is being written now by pid"),
                             (int(dead.stdout), "gone", "the run ended without finishing: its writer, pid"),
                             (1, "unknown", "still being written or ended without finishing")]:
        host = socket.gethostname() if state != "unknown" else "another-host"
        lock.write_text(json.dumps({"pid": pid, "host": host, "started": 0.0}) + "\n")
        assert writer_state(tmp_path / "log")[0] == state
        note = InfluenceLog(tmp_path / "log").end_note
        assert text in note and "are complete" in note, note
        # a live writer is not an integrity problem (exit 0, the note beside OK); a gone or unknown one is (exit 2)
        proc = subprocess.run([sys.executable, "-m", "lightning_influence", "info", str(tmp_path / "log")],
                              capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        integrity = next(line for line in proc.stdout.splitlines() if line.startswith("integrity"))
        if state == "live":
            assert proc.returncode == 0 and "OK (" in integrity and "being written now" in integrity, proc.stdout
        else:
            assert proc.returncode == 2 and "PROBLEMS" in integrity, proc.stdout
