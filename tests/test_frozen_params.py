"""Frozen parameters (``requires_grad=False``), which the checkpoints do not hold: stored once with the log
(``step/frozen.py``), loaded into the module the CLI rebuilds, and a module with other values refused by every
estimator (they would run another model: a freshly built module's random backbone)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_influence import InfluenceLog, dit, queries, restore_frozen, tracin
from lightning_influence.replay import DriftReport, replay
from tests._cli_run import scores_of
from tests.test_script_runs import cli_json, load_script, train_script

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("frozen")
    script, log_dir = train_script("frozen_backbone", root)
    return root, load_script(script), InfluenceLog(log_dir)


def test_the_log_stores_the_frozen_parameters(run):
    _, mod, log = run
    trained = mod.pretrained(mod.Head(hidden=8, lr=0.02))
    assert sorted(log.meta["frozen"]["names"]) == sorted(n for n, p in trained.named_parameters() if not p.requires_grad)
    assert len(log.meta["frozen"]["names"]) == 4  # backbone Linear + LayerNorm
    stored = torch.load(log.path / "frozen.pt", weights_only=True)
    for n, p in trained.named_parameters():
        if not p.requires_grad:
            assert torch.equal(stored[n], p.detach())
    assert all(n.startswith("head.") for g in log.param_groups() for n in g)  # the optimizer's groups: trainable only


def test_a_fresh_module_is_refused_and_restore_frozen_makes_it_the_run(run):
    _, mod, log = run
    q = queries.mean_loss(mod.data(20, 1).tensors)
    train = mod.data(40, 0)
    expected = tracin(log, q, module=mod.pretrained(mod.Head(hidden=8, lr=0.02))).column(0)
    fresh = mod.Head(hidden=8, lr=0.02)  # random backbone, every parameter trainable
    with pytest.raises(ValueError, match="restore_frozen"):
        tracin(log, q, module=fresh)
    fresh.backbone.requires_grad_(False)  # frozen, but not training's values: still refused
    with pytest.raises(ValueError, match="frozen parameter 'backbone.0.weight' differs"):
        tracin(log, q, module=fresh)
    restore_frozen(log, mod.Head(hidden=8, lr=0.02))  # freezes too
    rebuilt = restore_frozen(log, mod.Head(hidden=8, lr=0.02))
    assert not any(p.requires_grad for p in rebuilt.backbone.parameters())
    np.testing.assert_array_equal(tracin(log, q, module=rebuilt).column(0), expected)
    report = DriftReport()
    for _ in replay(log, rebuilt, train, tolerance=0.0, report=report):
        pass
    assert [d for _, d, _ in report.checkpoints] == [0.0] * len(report.checkpoints) and report.checkpoints


def test_the_cli_rebuilds_the_run_with_its_frozen_parameters(run):
    """The CLI builds Head from its hyperparameters (a random backbone, trainable): its scores equal the trained
    objects' (before, the backbone was a fresh random one at every call and DIT's replay stopped at the first
    checkpoint)."""
    root, mod, log = run
    q = queries.mean_loss(mod.data(20, 1).tensors)
    model = mod.pretrained(mod.Head(hidden=8, lr=0.02))
    for method, kw in (("tracin", {}), ("dit", {"train_data": mod.data(40, 0)})):
        got = scores_of(cli_json("query", str(log.path), "-m", method, "-k", "0", cwd=root), log.dataset_size)
        expected = (tracin if method == "tracin" else dit)(log, q, module=model, **kw).column(0)
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-12)
        assert np.abs(expected).max() > 1e-4


def test_frozen_parameters_changed_during_the_fit_are_refused(tmp_path):
    """An EMA teacher (frozen, updated by hand after every step): the log marks it at the fit's end and every estimator
    and the CLI's rebuild refuse it (the log stores the start values; replay stopped blaming the data, or TracIn ran
    on the teacher's start values with a trained module refused as 'freshly built')."""
    import lightning.pytorch as pl

    from lightning_influence import InfluenceTracker, WithIds
    from tests.conftest import TinyClassifier

    class Teacher(TinyClassifier):
        def __init__(self) -> None:
            super().__init__(lr=0.2)
            self.teacher = torch.nn.Linear(3, 3)
            self.teacher.requires_grad_(False)

        def forward(self, x):
            return self.teacher(self.net(x))

        def on_train_batch_end(self, *args) -> None:
            with torch.no_grad():
                self.teacher.weight.mul_(0.99)

    g = torch.Generator().manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.randn(24, 5, generator=g), torch.randint(0, 3, (24,), generator=g))
    module = Teacher()
    tracker = InfluenceTracker(str(tmp_path / "log"), record_gradients=True, checkpoint_every_n_steps=2)
    with pytest.warns(UserWarning, match=r"changed frozen .*\['teacher.weight'\]"):
        pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, callbacks=[tracker]).fit(
            module, torch.utils.data.DataLoader(WithIds(ds), batch_size=8))
    log = InfluenceLog(tmp_path / "log")
    assert log.meta["frozen"]["changed"] == ["teacher.weight"]
    q = queries.mean_loss(ds.tensors)
    for m in (module, Teacher()):
        with pytest.raises(ValueError, match=r"changed its frozen .*\['teacher.weight'\] during the fit"):
            tracin(log, q, module=m)
    with pytest.raises(ValueError, match="changed its frozen"):
        restore_frozen(log, Teacher())


def test_info_names_the_frozen_parameters_and_verify_reads_them(run, tmp_path, capsys):
    import shutil

    from lightning_influence.cli import main

    _, _, log = run
    assert main(["info", str(log.path)]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("frozen"))
    assert "4 parameter tensors not trained" in line and "frozen.pt" in line
    damaged = tmp_path / "log"
    shutil.copytree(log.path, damaged)
    (damaged / "frozen.pt").unlink()
    assert main(["info", "--verify", str(damaged)]) == 2
    assert "frozen parameters" in capsys.readouterr().out
    assert main(["query", str(damaged), "-m", "tracin", "-q"]) == 2  # one line, exit 2, not an internal error
    assert "frozen parameters" in capsys.readouterr().err


def test_the_frozen_check_is_redone_only_after_a_change(run):
    """checkpoint_params checks the module's frozen parameters at every checkpoint it reads: compared once, again only
    when one changed in place (its version counter moved), and then refused."""
    from lightning_influence.replay import checkpoint_params

    _, mod, log = run
    module = restore_frozen(log, mod.Head(hidden=8, lr=0.02))
    calls = []
    real = torch.equal
    torch.equal = lambda a, b: calls.append(1) or real(a, b)
    try:
        for t in log.checkpoint_steps:
            checkpoint_params(log, module, t)
        assert len(calls) == 4  # the 4 frozen tensors, once
        with torch.no_grad():
            module.backbone[0].weight.add_(1e-3)
        with pytest.raises(ValueError, match="frozen parameter 'backbone.0.weight' differs"):
            checkpoint_params(log, module, log.checkpoint_steps[0])
    finally:
        torch.equal = real
