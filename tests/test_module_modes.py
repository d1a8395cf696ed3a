"""Submodule train/eval modes of training, recorded (meta ``eval_modules``) and set again by every re-evaluation of a step.

The common setup: BatchNorm kept in eval mode during training (frozen, as the tracker's refusal of train-mode
BatchNorm suggests), dropout elsewhere. Before, replay ran its steps with the whole module switched to train mode (a
module given in eval mode, for micro-batches that drew dropout masks) or as given (a fresh module, in train mode): the
BatchNorm normalised with batch statistics and replay failed at the first checkpoint ("θ differs from the stored θ_2 by
3.76 of how far training moved"); every estimator replaying the run (DIT, Diff-In, ground truth) with it.
"""

from __future__ import annotations

import json
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import TinyClassifier, loader, make_data
from lightning_influence import InfluenceLog, InfluenceTracker, WithIds
from lightning_influence.log.format import read_meta
from lightning_influence.log.writer import write_meta
from lightning_influence.queries import mean_loss
from lightning_influence.replay import batch_from_ids, replay
from lightning_influence.replay_drift import ReplayMismatchError
from lightning_influence.step import modes as modes_module
from lightning_influence.step.modes import ModeSchedule, exact_modes, with_modes


class FrozenBN(TinyClassifier):
    """Linear → BatchNorm → Tanh → Dropout → Linear, float64, SGD with momentum; the BatchNorm in eval mode from epoch
    ``freeze_from`` (in ``on_train_epoch_start``), with running statistics away from 0/1 so batch statistics differ."""

    def __init__(self, dropout: float = 0.3, freeze_from: int = 0, lr: float = 0.1, unfreeze_from: int | None = None
                 ) -> None:
        super().__init__(dropout=dropout, batchnorm=True, lr=lr, momentum=0.9)
        self.save_hyperparameters()
        g = torch.Generator().manual_seed(0)
        self.net[1].running_mean.uniform_(-1, 1, generator=g)
        self.net[1].running_var.uniform_(0.5, 2.0, generator=g)
        self.double()

    def on_train_epoch_start(self) -> None:
        if self.current_epoch >= self.hparams.freeze_from:
            self.net[1].eval()
        if self.hparams.unfreeze_from is not None and self.current_epoch >= self.hparams.unfreeze_from:
            self.net[1].train()


def _fit(log_dir: str, ds: TensorDataset, epochs: int = 2, val: Any = None, every: int | None = 2,
         tracker_kw: dict | None = None, **module_kw: Any) -> FrozenBN:
    module = FrozenBN(**module_kw)
    pl.seed_everything(0, verbose=False)
    trains = module_kw.get("freeze_from", 0) > 0 or module_kw.get("unfreeze_from") is not None  # a train-mode BatchNorm
    kw = {"allow_train_batchnorm": True, "record_losses": False} if trains else {}
    kw = tracker_kw if tracker_kw is not None else kw
    pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, deterministic=True, num_sanity_val_steps=0,
               callbacks=[InfluenceTracker(log_dir, checkpoint_every_n_steps=every, **kw)]
               ).fit(module, loader(ds, batch_size=4), val)
    return module


def _replay_to_end(log: InfluenceLog, module: nn.Module, ds: TensorDataset) -> dict[str, torch.Tensor]:
    """``θ_T`` replayed from step 0 at tolerance 0 (every checkpoint on the way bit for bit), on ``module``."""
    *_, last = replay(log, module, WithIds(ds), 0, None, tolerance=0.0)
    assert last.step == log.num_steps
    return last.params


def _modes(module: nn.Module) -> list[bool]:
    return [m.training for m in module.modules()]


@pytest.mark.parametrize("dropout", [0.3, 0.0])
def test_frozen_batchnorm_replays_exactly_in_either_given_mode(log_dir, dropout):
    """Replay reproduces θ_T bit for bit (tolerance 0 at each checkpoint) on a fresh module (train mode, as the CLI
    rebuilds it) and on one given in eval mode; the module's own modes are left as given. Without dropout too: a
    fresh module's BatchNorm ran in train mode there before (nothing drew random numbers, so nothing set modes)."""
    ds = make_data(16)
    trained = _fit(log_dir, ds, dropout=dropout)
    log = InfluenceLog(log_dir)
    assert log.meta["eval_modules"] == [{"step": 0, "eval": ["net.1"]}]
    final = {n: torch.from_numpy(np.array(v)) for n, v in log.checkpoint(log.num_steps).items()}
    for given in (FrozenBN(dropout=dropout), FrozenBN(dropout=dropout).eval()):
        before = _modes(given)
        params = _replay_to_end(log, given, ds)
        assert all(torch.equal(params[n].detach(), final[n]) for n in final)
        assert all(torch.equal(params[n].detach(), p.detach()) for n, p in trained.named_parameters())
        assert _modes(given) == before


def test_dit_equals_the_linear_response_of_replay_loo_with_frozen_batchnorm_and_dropout(log_dir):
    """DIT with linear removal is ``−∂f/∂w_j``: replay leave-one-out at removal weight ``1 − ε`` divided by ``ε`` (and
    the central difference with ``1 + ε``) measures it with torch.optim on the run, float64. Both re-run every step
    with the training modes (frozen BatchNorm, dropout with training's masks) on a module given in eval mode."""
    from lightning_influence.estimators import dit
    from lightning_influence.evaluation import replay_loo

    eps = 1e-4
    ds = make_data(16)
    _fit(log_dir, ds, epochs=2)
    log = InfluenceLog(log_dir)
    val = make_data(6, seed=1)
    query = mean_loss((val.tensors[0], val.tensors[1]), lambda m, b: m.per_sample_loss(b))
    f = {w: replay_loo(log, FrozenBN().eval(), WithIds(ds), query, removal_weight=w, tolerance=0.0).at(log.num_steps)[:, 0]
         for w in (1 - eps, 1 + eps)}
    one_sided, central = f[1 - eps] / eps, (f[1 - eps] - f[1 + eps]) / (2 * eps)
    scores = dit(log, query, module=FrozenBN().eval(), train_data=WithIds(ds), removal="linear", tolerance=0.0).column(0)
    rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))  # noqa: E731
    assert np.abs(central).max() > 1e-3
    assert rel(scores, central) < 1e-8, rel(scores, central)  # measured 4e-10
    assert rel(scores, one_sided) < 1e-4, rel(scores, one_sided)  # 1.8e-5: the O(ε) term alone


def test_diffin_does_not_depend_on_the_modes_the_module_is_given_in(log_dir):
    """Diff-In re-runs the steps' batches (HVPs, dropout masks of training) with training's modes: a module given in
    eval mode and one given as training ran it (train mode, BatchNorm frozen) give the same scores bit for bit (the
    queries, in evaluation mode, are the same on both). Before, the first was switched to train mode whole."""
    from lightning_influence import diffin

    ds, val = make_data(16), make_data(6, seed=1)
    pl.seed_everything(0, verbose=False)
    pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, deterministic=True,
               callbacks=[InfluenceTracker(log_dir, record_gradients=True, record_hvp=True, storage_dtype="float64",
                                           checkpoint_every_n_steps=2)]).fit(FrozenBN(), loader(ds, batch_size=4))
    log = InfluenceLog(log_dir)
    query = mean_loss((val.tensors[0], val.tensors[1]), lambda m, b: m.per_sample_loss(b))
    as_trained = FrozenBN()
    as_trained.net[1].eval()
    scores = [diffin(log, query, module=m, train_data=WithIds(ds), steps="all").scores
              for m in (FrozenBN().eval(), as_trained)]
    assert np.abs(scores[0]).max() > 1e-4
    np.testing.assert_array_equal(scores[0], scores[1])


def test_a_mode_change_at_an_epoch_boundary_replays_exactly(log_dir):
    """BatchNorm in train mode in epoch 0 (allowed), frozen from epoch 1: the schedule says so with the step of the
    change, and replay runs each step with its own modes (bit for bit, a fresh module and one in eval mode)."""
    ds = make_data(16)
    _fit(log_dir, ds, epochs=3, freeze_from=1)
    log = InfluenceLog(log_dir)
    assert log.meta["eval_modules"] == [{"step": 0, "eval": []}, {"step": 4, "eval": ["net.1"]}]
    final = {n: torch.from_numpy(np.array(v)) for n, v in log.checkpoint(log.num_steps).items()}
    for given in (FrozenBN(freeze_from=1), FrozenBN(freeze_from=1).eval()):
        params = _replay_to_end(log, given, ds)
        assert all(torch.equal(params[n].detach(), final[n]) for n in final)


def test_a_resumed_fit_records_its_own_modes_from_its_first_step(tmp_path):
    """A first fit freezes the BatchNorm from epoch 1 (step 4); the fit resumed at step 4 from the end of epoch 0 freezes
    it from epoch 2 only (step 8): the schedule keeps the log's entries before step 4 and the resumed fit's from there
    (the first fit's entry at step 4 goes with its steps), and replay reproduces the resumed log bit for bit."""
    ds = make_data(16)
    log_dir = str(tmp_path / "log")

    def fit(epochs: int, freeze_from: int, ckpt_path: str | None = None) -> None:
        pl.seed_everything(0, verbose=False)
        tracker = InfluenceTracker(log_dir, checkpoint_every_n_steps=2, allow_train_batchnorm=True, record_losses=False)
        saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)
        pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, deterministic=True, callbacks=[tracker, saver]
                   ).fit(FrozenBN(freeze_from=freeze_from), loader(ds, batch_size=4), ckpt_path=ckpt_path)

    fit(2, 1)
    assert read_meta(log_dir)["eval_modules"] == [{"step": 0, "eval": []}, {"step": 4, "eval": ["net.1"]}]
    fit(3, 2, str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt"))
    log = InfluenceLog(log_dir)
    assert log.meta["resumes"][0]["step"] == 4 and log.num_steps == 12
    assert log.meta["eval_modules"] == [{"step": 0, "eval": []}, {"step": 8, "eval": ["net.1"]}]
    final = {n: torch.from_numpy(np.array(v)) for n, v in log.checkpoint(log.num_steps).items()}
    params = _replay_to_end(log, FrozenBN().eval(), ds)
    assert all(torch.equal(params[n].detach(), final[n]) for n in final)


class UnfreezesMidEpoch(FrozenBN):
    """Frozen at each epoch's start, but unfrozen in the module's own ``on_train_batch_start`` at step 5 (epoch 1)."""

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.global_step == 5:
            self.net[1].train()


def test_a_change_in_the_middle_of_an_epoch_is_seen_at_the_next_checkpoint(log_dir):
    """Unfrozen at step 5, in the middle of epoch 1 (steps 4..7): the tracker sees it at the checkpointed step 6 and
    warns; the schedule switches there. Replay stops at that checkpoint (step 5 ran with other modes than recorded)
    instead of going on silently, and from the checkpoint on it reproduces the run bit for bit."""
    ds = make_data(16)
    pl.seed_everything(0, verbose=False)
    tracker = InfluenceTracker(log_dir, checkpoint_every_n_steps=2, allow_train_batchnorm=True, record_losses=False)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, deterministic=True, callbacks=[tracker])
    with pytest.warns(RuntimeWarning, match=r"changed in the middle of an epoch, seen at step 6 .* steps 4\.\.5"):
        trainer.fit(UnfreezesMidEpoch(), loader(ds, batch_size=4))
    log = InfluenceLog(log_dir)
    assert log.meta["eval_modules"] == [{"step": 0, "eval": ["net.1"]}, {"step": 6, "eval": []}]
    with pytest.raises(ReplayMismatchError, match="at step 6"):
        _replay_to_end(log, FrozenBN(), ds)
    *_, last = replay(log, FrozenBN(), WithIds(ds), 6, None, tolerance=0.0)
    final = {n: torch.from_numpy(np.array(v)) for n, v in log.checkpoint(log.num_steps).items()}
    assert last.step == 8 and all(torch.equal(last.params[n].detach(), final[n]) for n in final)


def _retrain(log: InfluenceLog, ds: TensorDataset, drop: int | None, frozen_until: int) -> FrozenBN:
    """A plain torch.optim loop (SGD, momentum 0.9) on the logged batches and rates from θ_0 and its statistics, the
    BatchNorm in eval mode before step ``frozen_until`` and in train mode after, sample ``drop`` out of every batch (its
    forward too), the others' weights ``1/|B_t|`` kept (docs/influence-math.md §2)."""
    module = FrozenBN(dropout=0.0)
    module.load_state_dict({**{n: torch.from_numpy(np.array(v)) for n, v in log.checkpoint(0).items()},
                            **{n: torch.from_numpy(np.array(v)) for n, v in log.checkpoint_buffers(0).items()}})
    opt = torch.optim.SGD(module.parameters(), lr=1.0, momentum=0.9)
    for t in log.steps:
        module.train()
        module.net[1].train(int(t) >= frozen_until)
        ids = log.batch_ids(int(t))
        for g in opt.param_groups:
            g["lr"] = float(log.lr(int(t))[0])
        opt.zero_grad()
        (module.per_sample_loss(batch_from_ids(WithIds(ds), ids[ids != drop])).sum() / len(ids)).backward()
        opt.step()
    return module.eval()


def test_a_batchnorm_unfrozen_later_is_refused_or_carried_by_the_ground_truth(log_dir):
    """BatchNorm frozen in epoch 0 and unfrozen from epoch 1 (step 4): without ``allow_train_batchnorm`` the tracker
    refuses it at step 4, as it would at the first step; with it, replay reproduces the run and replay leave-one-out
    trains its copies with the unit out of the forward from step 4 on (batch statistics without it), as a plain
    torch.optim retraining does (before, the copies ran stacked, the unit's rows in the batch statistics)."""
    from lightning_influence.evaluation import replay_loo

    ds = make_data(16)
    with pytest.raises(RuntimeError, match="BatchNorm layer 'net.1' is in train mode"):
        _fit(log_dir + "-refused", ds, dropout=0.0, unfreeze_from=1, tracker_kw={})
    assert InfluenceLog(log_dir + "-refused").num_steps == 4
    _fit(log_dir, ds, dropout=0.0, unfreeze_from=1)
    log = InfluenceLog(log_dir)
    assert log.meta["eval_modules"] == [{"step": 0, "eval": ["net.1"]}, {"step": 4, "eval": []}]
    assert "train_batchnorm" not in log.meta  # the first step's
    _replay_to_end(log, FrozenBN(dropout=0.0).eval(), ds)
    x = ds.tensors[0]
    query = lambda m: m(x[:4])[:, 0].sum()  # noqa: E731
    T = log.num_steps
    result = replay_loo(log, FrozenBN(dropout=0.0).eval(), WithIds(ds), query, sample_ids=[0, 5, 11], grid=[T],
                        copies=2, tolerance=0.0)
    reference = float(query(_retrain(log, ds, None, 4)).detach())
    assert result.base[-1, 0] == pytest.approx(reference, abs=1e-13)
    for row, j in enumerate([0, 5, 11]):
        expected = float(query(_retrain(log, ds, j, 4)).detach()) - reference
        assert abs(expected) > 1e-4  # the removal matters
        assert result.values[row, -1, 0] == pytest.approx(expected, rel=1e-9, abs=1e-13)


def test_the_modes_are_read_per_epoch_and_checkpoint_never_per_step(log_dir, monkeypatch):
    """The tracker walks the modules at each epoch's first batch and each checkpointed step's only, never per step:
    3 epochs of 4 steps, 3 walks; with checkpoints every 2 steps, 6 (steps 0, 2, ..., 10)."""
    calls = []
    walk = modes_module.eval_module_names
    monkeypatch.setattr(modes_module, "eval_module_names", lambda m: calls.append(1) or walk(m))
    for every, walks in ((None, 3), (2, 6)):
        calls.clear()
        _fit(log_dir + str(every), make_data(16), epochs=3, every=every)
        assert len(calls) == walks


def test_cli_dit_on_a_frozen_batchnorm_run(log_dir, capsys):
    """``query -m dit`` rebuilds the model from the recipe (a fresh module, train mode) and answers (before: the replay
    mismatch at step 2, exit code 2); its scores are DIT's in-process on a fresh module. (The query keeps a given
    module's BatchNorm mode, ``queries.evaluation_mode``: on the fresh module it normalises by the validation batch.)"""
    from lightning_influence.cli import main
    from lightning_influence.estimators import dit
    from tests._cli_run import scores_of

    ds, val = make_data(16), make_data(8, seed=1)
    _fit(log_dir, ds, val=DataLoader(WithIds(val), batch_size=8))
    assert main(["query", log_dir, "-m", "dit", "--query", "val_loss", "-k", "0", "-f", "json", "-q"]) == 0
    got = scores_of(json.loads(capsys.readouterr().out), 16)
    assert main(["info", log_dir]) == 0
    assert "modules in eval mode: net.1 from step 0" in capsys.readouterr().out
    assert main(["info", log_dir, "-f", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["eval_modules"] == [{"step": 0, "eval": ["net.1"]}]
    expected = dit(InfluenceLog(log_dir), mean_loss((val.tensors[0], val.tensors[1]), lambda m, b: m.per_sample_loss(b)),
                   module=FrozenBN(), train_data=WithIds(ds)).column(0)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-12)
    assert np.abs(expected).max() > 1e-4


def test_a_log_without_the_field_keeps_the_former_rule(log_dir):
    """A log without ``eval_modules`` (written before modes were recorded) is replayed as before: a module given in
    eval mode is switched to train mode whole for micro-batches that drew dropout masks (right for a run without
    frozen submodules, bit for bit; wrong for a frozen BatchNorm, which stops at the first checkpoint as it did)."""
    from conftest import fit, tiny

    ds = make_data(16)
    fit(tiny(dropout=0.3), loader(ds, batch_size=4), InfluenceTracker(log_dir, checkpoint_every_n_steps=2))
    meta = read_meta(log_dir)
    assert meta["eval_modules"] == [{"step": 0, "eval": []}]
    write_meta(log_dir, {k: v for k, v in meta.items() if k != "eval_modules"})
    log = InfluenceLog(log_dir)
    assert "eval_modules" not in log.meta
    _replay_to_end(log, tiny(dropout=0.3).eval(), ds)

    frozen = log_dir + "-frozen"
    _fit(frozen, ds)
    meta = read_meta(frozen)
    write_meta(frozen, {k: v for k, v in meta.items() if k != "eval_modules"})
    with pytest.raises(ReplayMismatchError, match="at step 2"):
        _replay_to_end(InfluenceLog(frozen), FrozenBN().eval(), ds)


def test_schedule_cut_at_a_resume_and_exact_modes_restore():
    """``with_modes``: entries from the resumed step on dropped, an entry only where the modes change; ``at`` reads
    the modes of any step; ``exact_modes`` sets every flag and restores the module's own, and refuses unknown names."""
    meta = {"eval_modules": [{"step": 0, "eval": []}, {"step": 4, "eval": ["net.1"]}, {"step": 8, "eval": []}]}
    assert with_modes(meta, 6, ["net.1"])["eval_modules"] == meta["eval_modules"][:2]
    assert with_modes(meta, 4, [])["eval_modules"] == meta["eval_modules"][:1]
    assert with_modes(meta, 6, [])["eval_modules"] == [*meta["eval_modules"][:2], {"step": 6, "eval": []}]
    schedule = ModeSchedule.from_meta(meta)
    assert [schedule.at(t) for t in (0, 3, 4, 7, 8, 100)] == [(), (), ("net.1",), ("net.1",), (), ()]
    assert ModeSchedule.from_meta({}) is None
    assert ModeSchedule.from_meta({"eval_modules": [{"step": 5, "eval": []}]}).at(4) is None
    module = FrozenBN().eval()
    with exact_modes(module, ["net.1", "net.3"]):
        assert [(n, m.training) for n, m in module.named_modules()] == [
            ("", True), ("net", True), ("net.0", True), ("net.1", False), ("net.2", True), ("net.3", False),
            ("net.4", True)]
    assert not any(_modes(module))
    with pytest.raises(ValueError, match="does not match the log"):
        with exact_modes(module, ["net.9"]):
            pass
    assert not any(_modes(module))
    fresh = FrozenBN()
    with exact_modes(fresh, ["", "net.1"]):
        assert [m.training for m in fresh.modules()] == [False, True, True, False, True, True, True]
    assert all(_modes(fresh))


def test_the_row_split_follows_the_recorded_modes():
    """A batch split over processes needs samples that do not interact: with the modes recorded, a frozen BatchNorm of
    a fresh module (train mode) splits by rows, and one that trained in train mode at some step does not, even on a
    module given in eval mode; a log without the record keeps the module's own modes."""
    from lightning_influence.distributed import split_for
    from lightning_influence.estimators import dit
    from lightning_influence.step.shard import check_row_split

    frozen = {"eval_modules": [{"step": 0, "eval": ["net.1"]}]}
    unfrozen = {"eval_modules": [{"step": 0, "eval": ["net.1"]}, {"step": 8, "eval": []}]}
    assert split_for(dit, FrozenBN(), "auto", frozen) == "batch"
    assert split_for(dit, FrozenBN(), "auto", {}) == "columns"
    assert split_for(dit, FrozenBN().eval(), "auto", unfrozen) == "columns"
    assert split_for(dit, FrozenBN().eval(), "auto", {}) == "batch"
    with pytest.raises(ValueError, match="BatchNorm layer 'net.1' is in train mode"):
        check_row_split(FrozenBN().eval(), unfrozen)
