"""The step as Lightning ran it: per-sample weights (accumulation, incomplete accumulations) and
gradient clipping are recorded, replayed bit for bit, and what cannot be reproduced is refused."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from lightning_influence import InfluenceTracker
from lightning_influence.log import InfluenceLog
from lightning_influence.replay import batch_from_ids, replay
from lightning_influence.step.recorder import ClippingError
from lightning_influence.step.weights import LossReductionError, lightning_weights, step_weights
from tests.conftest import TinyClassifier, fit, loader, make_data

torch.set_num_threads(1)

N, BATCH = 26, 6  # 5 batches per epoch (6, 6, 6, 6, 2): with accumulation 2 the third step is one micro-batch of 2


def loss_fn(module: Any, batch: Any) -> torch.Tensor:
    return module.per_sample_loss(batch)


def tracked_run(tmp_path: Any, dtype: torch.dtype = torch.float32, module: TinyClassifier | None = None,
                epochs: int = 2, **trainer_kw: Any) -> tuple[InfluenceLog, Any, TinyClassifier]:
    torch.manual_seed(0)
    m = module if module is not None else TinyClassifier(lr=0.5, momentum=0.9)
    m = m.to(dtype)
    ds = make_data(N, dtype=dtype)
    tracker = InfluenceTracker(str(tmp_path / "log"), checkpoint_every_n_steps=1)
    fit(m, loader(ds, BATCH), tracker, epochs=epochs, **trainer_kw)
    return InfluenceLog(tmp_path / "log"), ds, m


def replay_exactly(log: InfluenceLog, ds: Any, m: TinyClassifier) -> int:
    """Replay the whole run from θ_0 with tolerance 0 (every checkpoint compared bit for bit)."""
    steps = [rs.step for rs in replay(log, m, ds, 0, None, start=0, loss_fn=loss_fn, tolerance=0.0)]
    return len(steps)


# ----------------------------------------------------------------------------- the weights
def test_lightning_weights_of_an_incomplete_accumulation() -> None:
    sw = lightning_weights([2], accumulate=2)
    assert sw.weights.tolist() == [0.25, 0.25]  # Lightning still divides the lone micro-batch by 2: not 1/2
    sw = lightning_weights([6, 4], accumulate=2, world_size=2)
    assert np.allclose(sw.weights, [1 / 24] * 6 + [1 / 16] * 4) and sw.micro.tolist() == [0] * 6 + [1] * 4
    assert [(s.start, s.stop) for s in sw.micro_slices()] == [(0, 6), (6, 10)]


def test_accumulation_with_incomplete_last_accumulation_replays_bit_exactly(tmp_path: Any) -> None:
    log, ds, m = tracked_run(tmp_path, accumulate_grad_batches=2)
    assert log.num_steps == 6  # 3 steps per epoch: (6+6), (6+6), (2)
    for t in range(log.num_steps):
        sw = step_weights(log, t)
        n = len(log.batch_ids(t))
        expected = lightning_weights([6, 6] if n == 12 else [n], 2)
        np.testing.assert_array_equal(sw.weights, expected.weights)
        np.testing.assert_array_equal(sw.micro, expected.micro)
        assert sw.accumulate == 2
    assert step_weights(log, 2).weights.tolist() == [0.25, 0.25]
    assert replay_exactly(log, ds, m) == log.num_steps + 1


def test_weights_give_the_applied_gradient(tmp_path: Any) -> None:
    """Brute force: Σ_i w_i g_i from independent per-sample gradients equals the gradient the optimizer got."""
    applied: dict[int, dict[str, torch.Tensor]] = {}

    class Spy(TinyClassifier):
        def on_before_optimizer_step(self, optimizer: Any) -> None:
            applied[self.trainer.global_step] = {n: p.grad.detach().clone() for n, p in self.named_parameters()}

    torch.manual_seed(0)
    log, ds, _ = tracked_run(tmp_path, torch.float64, Spy(lr=0.5), epochs=1, accumulate_grad_batches=2)
    for t in range(log.num_steps):
        ids = log.batch_ids(t)
        w = log.weights(t)
        params = {n: torch.from_numpy(v) for n, v in log.checkpoint(t).items()}
        m = TinyClassifier().double()
        m.load_state_dict(params, strict=False)
        for i, wi in zip(ids, w):
            m.zero_grad()
            m.per_sample_loss(batch_from_ids(ds, [i])).sum().mul(wi).backward()
            for n, p in m.named_parameters():
                applied[t][n] -= p.grad
        assert max(float(v.abs().max()) for v in applied[t].values()) < 1e-14, t


# ---------------------------------------------------------------------------- clipping
@pytest.mark.parametrize("algorithm, value", [("norm", 0.05), ("value", 0.02)])
def test_clipping_is_recorded_and_replays_bit_exactly(tmp_path: Any, algorithm: str, value: float) -> None:
    log, ds, m = tracked_run(tmp_path, gradient_clip_val=value, gradient_clip_algorithm=algorithm)
    assert log.meta["gradient_clipping"]["algorithm"] == algorithm
    coefs = np.array([log.step_column(t, "clip_coef") for t in range(log.num_steps)])
    assert (coefs < 1).mean() >= 0.8, coefs  # the threshold binds on most steps
    assert all(log.step_column(t, "clip_value") == value for t in range(log.num_steps))
    if algorithm == "norm":  # recorded coefficient = c / (‖unclipped gradient‖ + 1e-6)
        norms = np.array([log.step_column(t, "batch_grad_norm") for t in range(log.num_steps)])
        np.testing.assert_allclose(coefs, np.minimum(1, value / (norms + 1e-6)), rtol=1e-5)
    assert replay_exactly(log, ds, m) == log.num_steps + 1


def test_clipping_and_accumulation_replay_bit_exactly(tmp_path: Any) -> None:
    log, ds, m = tracked_run(tmp_path, gradient_clip_val=0.05, accumulate_grad_batches=2)
    assert replay_exactly(log, ds, m) == log.num_steps + 1


def test_without_the_recorded_clipping_replay_fails(tmp_path: Any) -> None:
    """The recorded clipping is what makes the replay exact: drop it and the replay departs from the log."""
    from lightning_influence.replay import ReplayMismatchError

    log, ds, m = tracked_run(tmp_path, gradient_clip_val=0.05)
    log.meta["gradient_clipping"] = {"algorithm": None}
    with pytest.raises(ReplayMismatchError):
        replay_exactly(log, ds, m)


# ---------------------------------------------------------------------------- refusals
class SumLoss(TinyClassifier):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.per_sample_loss(batch).sum()


class PerLayerClipping(TinyClassifier):
    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Any = None, gradient_clip_algorithm: Any = None) -> None:
        for p in self.parameters():
            torch.nn.utils.clip_grad_norm_([p], 0.01)


class LoggingClipping(TinyClassifier):
    """An override that clips exactly like the Trainer's arguments (and does something else): accepted."""

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Any = None, gradient_clip_algorithm: Any = None) -> None:
        self.calls = getattr(self, "calls", 0) + 1
        self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val, gradient_clip_algorithm=gradient_clip_algorithm)


def test_sum_reduction_is_refused_at_the_first_step(tmp_path: Any) -> None:
    with pytest.raises(LossReductionError, match="at step 0 .*sum of the per-sample losses"):
        tracked_run(tmp_path, module=SumLoss())
    assert InfluenceLog(tmp_path / "log").num_steps == 0


def test_unmodelled_clipping_override_is_refused_at_the_first_step(tmp_path: Any) -> None:
    with pytest.raises(ClippingError, match="at step 0 configure_gradient_clipping"):
        tracked_run(tmp_path, module=PerLayerClipping())
    assert InfluenceLog(tmp_path / "log").num_steps == 0


def test_clipping_in_the_modules_on_before_optimizer_step_is_refused_naming_it(tmp_path: Any) -> None:
    """A clip_grad_norm_ in the LightningModule's on_before_optimizer_step (no configure_gradient_clipping override):
    refused at step 0, the message naming where the clipping happened (it named configure_gradient_clipping)."""

    class HookClipping(TinyClassifier):
        def on_before_optimizer_step(self, optimizer: Any) -> None:
            torch.nn.utils.clip_grad_norm_(self.parameters(), 0.01)

    with pytest.raises(ClippingError, match="at step 0 the LightningModule's on_before_optimizer_step") as err:
        tracked_run(tmp_path, module=HookClipping(lr=0.5, momentum=0.9))
    assert "configure_gradient_clipping" not in str(err.value) and "gradient_clip_val" in str(err.value)
    assert InfluenceLog(tmp_path / "log").num_steps == 0


def test_faithful_clipping_override_is_accepted(tmp_path: Any) -> None:
    m = LoggingClipping(lr=0.5, momentum=0.9)
    log, ds, m = tracked_run(tmp_path, module=m, gradient_clip_val=0.05)
    assert m.calls == log.num_steps and log.meta["gradient_clipping"]["configure_gradient_clipping"].startswith("overridden")
    assert replay_exactly(log, ds, TinyClassifier(lr=0.5, momentum=0.9).float()) == log.num_steps + 1


def test_reduction_check_tolerates_rounding_not_other_reductions() -> None:
    from lightning_influence.step.weights import check_reduction

    losses = torch.rand(8, generator=torch.Generator().manual_seed(0)) + 0.5
    check_reduction(float(losses.mean() / 2), losses, 2, 0)  # the mean, divided by A: accepted
    bf16 = losses.to(torch.bfloat16)
    check_reduction(float(bf16.mean()), bf16, 1, 0, torch.bfloat16)  # a bfloat16 mean: accepted at its precision
    with pytest.raises(LossReductionError, match="sum of the per-sample losses"):
        check_reduction(float(losses.sum()), losses, 1, 3)
    with pytest.raises(LossReductionError, match="neither their mean nor their sum"):
        check_reduction(float(losses.mean() + 0.01), losses, 1, 3)  # an added regulariser


def test_info_describes_accumulation_and_clipping(tmp_path: Any, capsys: Any) -> None:
    from lightning_influence.cli import main

    log, _, _ = tracked_run(tmp_path, gradient_clip_val=0.05, accumulate_grad_batches=2)
    assert main(["info", str(tmp_path / "log")]) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")][0]
    assert "accumulate_grad_batches 2, 2 incomplete accumulation step(s)" in row
    assert "norm clipping at 0.05, bound on" in row


def test_value_clipping_with_projected_rows_is_named_not_run(tmp_path: Any) -> None:
    from lightning_influence.cli.methods import unmet_needs
    from lightning_influence.estimators import tracin

    torch.manual_seed(0)
    m = TinyClassifier(lr=0.5).float()
    tracker = InfluenceTracker(str(tmp_path / "log"), record_gradients=True, projection_dim=2, checkpoint_every_n_steps=1)
    fit(m, loader(make_data(N, dtype=torch.float32), BATCH), tracker, epochs=1, gradient_clip_val=0.01,
        gradient_clip_algorithm="value")
    log = InfluenceLog(tmp_path / "log")
    assert any("unprojected gradient rows" in n for n in unmet_needs("tracin", log))
    assert not unmet_needs("dit", log)  # the model-based sweep clips the full gradient
    with pytest.raises(ValueError, match="value clipping cannot be applied to projected gradient rows"):
        tracin(log, lambda mod: mod.per_sample_loss(make_data(4, dtype=torch.float32)[:]).mean(), module=TinyClassifier().float())


def test_accumulation_schedule_is_recorded_per_step_and_replays_bit_exactly(tmp_path: Any) -> None:
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    torch.manual_seed(0)
    m = TinyClassifier(lr=0.5, momentum=0.9).float()
    ds = make_data(N, dtype=torch.float32)
    tracker = InfluenceTracker(str(tmp_path / "log"), checkpoint_every_n_steps=1)
    import lightning.pytorch as pl

    pl.seed_everything(0, verbose=False)
    pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, deterministic=True,
               callbacks=[tracker, GradientAccumulationScheduler({0: 1, 1: 3})]).fit(m, loader(ds, BATCH))
    log = InfluenceLog(tmp_path / "log")
    assert [int(log.step_column(t, "accumulate")) for t in range(log.num_steps)] == [1] * 5 + [3, 3]
    assert step_weights(log, 6).weights.tolist() == pytest.approx([1 / 18] * 6 + [1 / 6] * 2)  # (6, 2) of 3
    assert replay_exactly(log, ds, TinyClassifier(lr=0.5, momentum=0.9).float()) == log.num_steps + 1


@pytest.mark.parametrize("sizes, accumulate, world_size", [([6, 6], 2, 1), ([2], 2, 1), ([6, 4, 6, 4], 2, 2), ([5, 5], 1, 2)])
def test_micro_batch_losses_add_up_to_the_weighted_step_loss(sizes: list[int], accumulate: int, world_size: int) -> None:
    """Replay's per-micro-batch losses (as trained, and with multipliers) sum to Σ w_i ℓ_i, DDP's average included."""
    sw = lightning_weights(sizes, accumulate, world_size)
    losses = torch.rand(sum(sizes), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want = float((torch.from_numpy(sw.weights) * losses).sum())
    ones = torch.ones(len(losses), dtype=torch.float64)
    for mult in (None, ones):
        got = sum(float(sw.micro_loss(losses[r], r, None if mult is None else mult[r])) for r in sw.micro_slices())
        assert got == pytest.approx(want, rel=1e-14)


def test_a_tensor_learning_rate_replays_bit_exactly(tmp_path: Any, capsys: Any) -> None:
    """``Adam(lr=torch.tensor(...), betas=(torch.tensor(...), ...))`` under a per-step schedule (which fills the lr
    tensor): replayed with tensors, as trained, bit for bit (a float lr takes other kernels: drift 1.8e-7 on the digits
    MLP, and ``meta.h5`` had no lr; tensor betas stopped the fit at its start, a tensor is not JSON)."""

    class TensorLr(TinyClassifier):
        def configure_optimizers(self) -> Any:
            opt = torch.optim.Adam(self.parameters(), lr=torch.tensor(0.05), betas=(torch.tensor(0.9), torch.tensor(0.95)),
                                   weight_decay=0.01)
            sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.9)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    log, ds, _ = tracked_run(tmp_path, module=TensorLr())
    group = log.meta["optimizer"]["param_groups"][0]
    assert {"lr", "betas"} <= set(group["tensors"]) and group["lr"] == pytest.approx(0.05) and group["betas"][1] == pytest.approx(0.95)
    assert len(set(log.lrs[:, 0].tolist())) == log.num_steps  # the schedule moved it every step
    assert replay_exactly(log, ds, TensorLr()) == log.num_steps + 1
    from lightning_influence.cli import main

    assert main(["info", str(tmp_path / "log")]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("optimizer"))
    assert "lr=0.05" in line and "tensor lr, tensor betas" in line  # info named no lr (the log had none)


class _ClipFirst(pl.Callback):
    """A callback listed before the tracker that clips the gradients in its on_before_optimizer_step."""

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        torch.nn.utils.clip_grad_norm_(pl_module.parameters(), 0.01)


class _HookClamped(TinyClassifier):
    """A gradient hook on a parameter (Tensor.register_hook) that clamps its gradient during the backward."""

    def __init__(self) -> None:
        super().__init__(lr=0.5, momentum=0.9)
        self.net[0].weight.register_hook(lambda g: g.clamp(-1e-3, 1e-3))


@pytest.mark.parametrize("case", ["callback before the tracker", "parameter hook", "as trained"])
def test_gradients_changed_before_the_trackers_hook_are_refused_at_the_first_step(tmp_path: Any, case: str) -> None:
    """The applied gradient against Σ w_i g_i of the step's rows (full, and projected to 8 columns per tensor), at
    the first step: a clip in a callback listed before the tracker, or a clamping gradient hook, was accepted and the
    replay stopped epochs later blaming the data (TracIn silently used the unclipped rows); a plain run (accumulation
    2, incomplete last accumulation) passes."""
    from lightning_influence.tracker_checks import GradientMismatchError

    for dim in (None, 8):
        torch.manual_seed(0)
        module = _HookClamped() if case == "parameter hook" else TinyClassifier(lr=0.5, momentum=0.9)
        log_dir = tmp_path / f"log{dim}"
        tracker = InfluenceTracker(str(log_dir), record_gradients=True, projection_dim=dim, checkpoint_every_n_steps=1)
        callbacks = [_ClipFirst(), tracker] if case == "callback before the tracker" else [tracker]
        trainer_kw = dict(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                          accumulate_grad_batches=2)
        run = lambda: pl.Trainer(**trainer_kw).fit(module, loader(make_data(N, dtype=torch.float32), BATCH))
        if case == "as trained":
            run()
            assert InfluenceLog(log_dir).num_steps == 3
            continue
        with pytest.raises(GradientMismatchError, match="at step 0 the gradient the optimizer receives is not"):
            run()
        assert InfluenceLog(log_dir).num_steps == 0


class _LateClip(TinyClassifier):
    """Clips by hand in its on_before_optimizer_step from the second epoch on (the first step's check sees nothing)."""

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        if self.current_epoch >= 1:
            torch.nn.utils.clip_grad_norm_(self.parameters(), 1e-3)


class _LogsGradNorms(TinyClassifier):
    """The common harmless override: reads the gradients' norms in on_before_optimizer_step, changes nothing."""

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        self.seen = float(torch.stack([p.grad.norm() for p in self.parameters() if p.grad is not None]).norm())


class _NoiseLater(pl.Callback):
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if trainer.global_step >= 3:
            for p in pl_module.parameters():
                p.grad.add_(1e-2)


@pytest.mark.parametrize("clip", [None, 0.05])
def test_gradients_changed_after_the_first_step_are_refused_at_their_step(tmp_path: Any, clip: float | None) -> None:
    """A hook that runs after the tracker's (the module's on_before_optimizer_step, a callback listed after the
    tracker) is watched at every step by the gradients' norms: a clip from the second epoch on, noise from step 3, are
    refused at that step, nothing of it stored (accepted before; replay stopped at the next checkpoint blaming the
    data); a hook that only reads the gradients passes, with the Trainer's norm clipping binding or without, and the
    run replays bit for bit."""
    kw = {} if clip is None else {"gradient_clip_val": clip}
    with pytest.raises(ClippingError, match="at step 5 the LightningModule's on_before_optimizer_step"):
        tracked_run(tmp_path / "late", module=_LateClip(lr=0.5, momentum=0.9), **kw)  # 5 steps per epoch
    assert InfluenceLog(tmp_path / "late" / "log").num_steps == 5
    tracker = InfluenceTracker(str(tmp_path / "noise"), checkpoint_every_n_steps=1)
    with pytest.raises(ClippingError, match="at step 3 the LightningModule's on_before_optimizer_step .*or a callback"):
        pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, callbacks=[tracker, _NoiseLater()], **kw).fit(
            TinyClassifier(lr=0.5, momentum=0.9), loader(make_data(N, dtype=torch.float32), BATCH))
    assert InfluenceLog(tmp_path / "noise").num_steps == 3
    log, ds, m = tracked_run(tmp_path / "reads", module=_LogsGradNorms(lr=0.5, momentum=0.9), **kw)
    if clip is not None:  # the clip binds: the norms checked against the clipped ones
        assert all(float(log.step_column(t, "clip_coef")) < 1 for t in range(log.num_steps))
    assert replay_exactly(log, ds, TinyClassifier(lr=0.5, momentum=0.9)) == log.num_steps + 1


def test_the_per_step_gradient_check_allows_float16_rounding(tmp_path: Any) -> None:
    """precision="16-true" (float16 parameters and gradients), the Trainer's norm clipping binding and a module hook
    that reads the gradients: the clipped norms differ from the expected ones by float16 rounding only, accepted (it
    was refused at step 1 with a tolerance of 1e-5); a hand-written clip in the same run is still refused."""
    log, _, _ = tracked_run(tmp_path / "reads", module=_LogsGradNorms(lr=0.5, momentum=0.9), precision="16-true",
                            gradient_clip_val=0.05)
    assert log.num_steps == 10 and float(log.step_column(9, "clip_coef")) < 1
    with pytest.raises(ClippingError, match="at step 5"):
        tracked_run(tmp_path / "late", module=_LateClip(lr=0.5, momentum=0.9), precision="16-true", gradient_clip_val=0.05)


def test_the_first_step_gradient_check_warns_nothing_on_read_only_weights() -> None:
    """The step's weights are a read-only array: the check copied them into torch without a copy, and torch printed
    'The given NumPy array is not writable' into every fit with gradient rows (once a process: a fresh one here)."""
    import subprocess
    import sys
    code = """
import types, warnings, numpy as np, torch
from lightning_influence.tracker_checks import check_applied_gradient
lin = torch.nn.Linear(3, 2, bias=False)
rows = torch.randn(4, 6)
weights = np.full(4, 0.25); weights.flags.writeable = False
lin.weight.grad = (torch.from_numpy(weights.copy()).float() @ rows).reshape(2, 3)
project = lambda grads: torch.cat([g.flatten(1) for g in grads.values()], 1)
warnings.simplefilter("error")
assert check_applied_gradient(0, rows, weights, project, lin, ["weight"], types.SimpleNamespace(autocast_dtype=None))["checked"]
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "not writable" not in out.stderr, out.stderr[-2000:]
