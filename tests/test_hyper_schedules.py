"""Optimizer hyperparameter schedules (step/hyper.py): OneCycleLR/CyclicLR cycling the momentum (Adam: β₁) by default,
a momentum or weight decay set in training_step. Recorded per step where they differ from meta.h5's param groups,
replayed bit for bit, taken by the update rules (against torch.optim) and by DIT (against replay's linear response)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import ChangesOptimizer, TinyClassifier, fit, loader, make_data
from lightning_influence import InfluenceLog, InfluenceTracker, WithIds
from lightning_influence.estimators import dit
from lightning_influence.evaluation import replay_loo
from lightning_influence.log.format import HYPER_PREFIX
from lightning_influence.queries import mean_loss
from lightning_influence.replay import ReplayMismatchError, replay
from lightning_influence.step.hyper import ScheduleRecorder
from lightning_influence.step.optimizers import OptimizerStep, UnsupportedOptimizerError, coordinate_groups, rule_for
from test_step_optimizers import NAMES, SHAPES, SIZES, THETA0, flat, grad_at  # its gradient field, 2 param groups

FIXTURES = Path(__file__).parent / "fixtures"
SCHEDULED = {"sgd": "momentum", "adam": "betas", "adamw": "betas", "rmsprop": "momentum"}


class Cycled(TinyClassifier):
    """SGD with momentum, Adam, AdamW or RMSprop under OneCycleLR or CyclicLR with their defaults (``cycle_momentum=True``),
    stepped every batch; ``seen`` holds the cycled value each training_step saw (what the update then used)."""

    def __init__(self, kind: str = "onecycle", opt: str = "sgd", total: int = 8) -> None:
        super().__init__(lr=0.05, momentum=0.9, weight_decay=1e-3)
        self.kind, self.opt_name, self.total, self.seen = kind, opt, total, []

    def training_step(self, batch, batch_idx):
        g = self.trainer.optimizers[0].param_groups[0]
        self.seen.append(g[SCHEDULED[self.opt_name]])
        return super().training_step(batch, batch_idx)

    def configure_optimizers(self):
        if self.opt_name == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        elif self.opt_name == "rmsprop":  # momentum 0: OneCycleLR sets its own at construction
            opt = torch.optim.RMSprop(self.parameters(), lr=self.lr / 10)
        else:
            opt = (torch.optim.Adam if self.opt_name == "adam" else torch.optim.AdamW)(self.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler
        s = (sched.OneCycleLR(opt, max_lr=self.lr, total_steps=self.total) if self.kind == "onecycle" else
             sched.CyclicLR(opt, base_lr=self.lr / 10, max_lr=self.lr, step_size_up=2))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": s, "interval": "step"}}


def _cycled(kind: str = "onecycle", opt: str = "sgd", total: int = 8) -> Cycled:
    torch.manual_seed(0)
    return Cycled(kind, opt, total).double()


def _segments(path: Path, rank: int = 0) -> list[tuple[int, tuple[str, ...]]]:
    """``(format_version, hyper_* datasets)`` of every segment of ``rank``."""
    out = []
    for seg in sorted((path / f"rank-{rank}").glob("seg-*.h5")):
        with h5py.File(seg, "r") as f:
            out.append((int(f.attrs["format_version"]), tuple(sorted(k for k in f["steps"] if k.startswith(HYPER_PREFIX)))))
    return out


# ------------------------------------------------------------------------- recorded, replayed
@pytest.mark.parametrize("kind,opt", [("onecycle", "sgd"), ("onecycle", "adam"), ("onecycle", "adamw"),
                                      ("onecycle", "rmsprop"), ("cyclic", "sgd"), ("cyclic", "adam")])
def test_a_scheduler_cycling_momentum_is_recorded_and_replays_bit_for_bit(tmp_path, kind, opt, monkeypatch):
    """OneCycleLR and CyclicLR cycle the momentum (Adam: β₁) of every step by default. They were refused before the
    first step (the log recorded the learning rates only); now each step's value is recorded, equals what the update
    used, and replay reproduces every checkpoint with tolerance 0; replayed with meta.h5's constant value instead, it
    leaves the run at the first checkpoint after the schedule moved."""
    ds = make_data(16)
    module = _cycled(kind, opt)
    fit(module, loader(ds, batch_size=4), InfluenceTracker(str(tmp_path / "log"), checkpoint_every_n_steps=1), epochs=2)
    log = InfluenceLog(tmp_path / "log")
    key = SCHEDULED[opt]
    assert key in log.scheduled and log.num_steps == len(module.seen) == 8
    recorded = [tuple(np.atleast_1d(log.hyper(t)[key][0]).tolist()) for t in range(8)]
    assert recorded == [tuple(np.atleast_1d(v).tolist()) for v in module.seen]  # exactly what training used
    assert len(set(recorded)) >= 3  # the schedule moved
    assert [rs.step for rs in replay(log, _cycled(kind, opt), WithIds(ds), tolerance=0.0)][-1] == 8
    monkeypatch.setattr(InfluenceLog, "hyper", lambda self, step: None)  # meta.h5's value at every step
    with pytest.raises(ReplayMismatchError):
        list(replay(log, _cycled(kind, opt), WithIds(ds), tolerance=0.0))


class Ramped(ChangesOptimizer):
    """SGD with momentum; from step ``at`` on, ``where`` sets momentum 0.5 and weight decay 0.01."""

    def __init__(self, where: str = "training_step", at: int = 3, key: str = "momentum", value=0.5,
                 momentum: float = 0.9) -> None:
        super().__init__(lr=0.1, momentum=momentum)
        self.where, self.at, self.key, self.value = where, at, key, value

    def change(self, optimizer) -> None:
        if self.trainer.global_step >= self.at:
            for g in optimizer.param_groups:
                g[self.key] = self.value
                g["weight_decay"] = 0.01


def test_a_momentum_set_in_training_step_is_recorded_from_the_step_it_changes(tmp_path):
    """A hand-written schedule (momentum 0.9 -> 0.5, weight decay 0 -> 0.01 from step 3) killed the fit at step 3
    (UnsupportedOptimizerError). Now it is recorded: segments whose steps all used meta.h5's values stay format
    version 2 without new columns; the others hold ``steps/hyper_*`` (NaN rows before the change) and are version 3,
    which a version-2 reader refuses rather than replay them with the wrong momentum. Replay is bit-exact."""
    ds = make_data(24)
    torch.manual_seed(0)
    fit(Ramped().double(), loader(ds), InfluenceTracker(str(tmp_path / "log"), checkpoint_every_n_steps=1,
                                                       flush_every_n_steps=2))
    log = InfluenceLog(tmp_path / "log")
    assert _segments(tmp_path / "log")[0] == (2, ())  # steps 0, 1: as meta.h5
    assert _segments(tmp_path / "log")[1] == (3, ("hyper_dampening", "hyper_momentum", "hyper_weight_decay"))
    with h5py.File(tmp_path / "log" / "rank-0" / "seg-00000001.h5", "r") as f:  # steps 2, 3
        assert np.isnan(f["steps/hyper_momentum"][0]).all() and f["steps/hyper_momentum"][1].tolist() == [0.5]
    assert [float(log.hyper(t)["momentum"][0]) for t in range(5)] == [0.9, 0.9, 0.9, 0.5, 0.5]
    assert [float(log.hyper(t)["weight_decay"][0]) for t in range(5)] == [0.0, 0.0, 0.0, 0.01, 0.01]
    assert log.scheduled["momentum"][:, 0].tolist() == [0.9] * 3 + [0.5] * (log.num_steps - 3)
    torch.manual_seed(0)
    assert [rs.step for rs in replay(log, Ramped().double(), WithIds(ds), tolerance=0.0)][-1] == log.num_steps


def test_a_resumed_fit_records_its_schedule_against_the_logs_param_groups(tmp_path):
    """A fit resumed from an end-of-epoch checkpoint continues the log: its steps' momentum is recorded against the
    log's meta.h5 (0.95, OneCycleLR's start), not against the optimizer's own at the resume (the momentum its first
    step then uses, which would have been left unrecorded and read back as 0.95). The log equals an uninterrupted
    run's and replays bit for bit across the resume."""
    from test_robustness import epoch_fit

    epoch_fit(tmp_path / "once", None, epochs=3, module=_cycled(total=12))
    epoch_fit(tmp_path / "log", tmp_path / "ckpt", epochs=1, module=_cycled(total=12))
    epoch_fit(tmp_path / "log", None, epochs=3, ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt"),
              module=_cycled(total=12))
    once, log = InfluenceLog(tmp_path / "once"), InfluenceLog(tmp_path / "log")
    assert log.meta.get("resumes") and log.num_steps == once.num_steps == 12
    assert [float(log.hyper(t)["momentum"][0]) for t in range(12)] == [float(once.hyper(t)["momentum"][0]) for t in range(12)]
    assert [rs.step for rs in replay(log, _cycled(total=12), WithIds(make_data(24)), tolerance=0.0)][-1] == 12


def test_a_resume_truncating_a_segment_keeps_the_schedule_of_the_steps_it_keeps(tmp_path):
    """A resumed fit shrinks the segment straddling its step (log/segment.py ``_shrink``): the ``steps/hyper_*``
    columns shrink with the step table; the steps kept read their recorded values, meta.h5's where NaN."""
    from lightning_influence.log.writer import LogWriter, StepRecord, truncate_log, write_meta

    meta = {"dataset_size": 4, "run_id": "r", "tracked_params": [], "param_shapes": {"w": [1]},
            "optimizer": {"class": "torch.optim.adam.Adam", "param_groups": [{"betas": [0.9, 0.999], "params": ["w"]}]}}
    write_meta(tmp_path, meta)
    writer = LogWriter(tmp_path, 0, flush_every_n_steps=4, background=False)
    for t in range(4):
        hyper = None if t == 0 else {"betas": [(0.9 - 0.01 * t, 0.999)]}
        writer.add_step(StepRecord(step=t, epoch=0, batch_idx=t, micro_batches=1, lrs=[0.1], ids=np.array([t]),
                                   hyper=hyper))
    writer.close()
    assert [float(InfluenceLog(tmp_path).hyper(t)["betas"][0, 0]) for t in range(4)] == [0.9, 0.89, 0.88, 0.87]
    truncate_log(tmp_path, 0, 3)
    log = InfluenceLog(tmp_path)
    assert log.num_steps == 3 and log.hyper(2)["betas"].tolist() == [[0.88, 0.999]]
    assert [float(log.hyper(t)["betas"][0, 0]) for t in range(3)] == [0.9, 0.89, 0.88]


def test_a_recorded_key_without_a_value_in_meta_is_named_as_a_format_error():
    """A NaN row means meta.h5's value: a meta.h5 without one is a damaged log, not a NaN momentum."""
    from lightning_influence.log.format import LogFormatError
    from lightning_influence.log.schedule import logged_schedule

    meta = {"optimizer": {"param_groups": [{"momentum": 0.9}]}}
    tables = [{"step": np.arange(2), "hyper_momentum": np.array([[np.nan], [0.5]])}, {"step": np.arange(2, 3)}]
    assert logged_schedule(Path("log"), meta, tables, 3)["momentum"].tolist() == [[0.9], [0.5], [0.9]]
    with pytest.raises(LogFormatError, match=r"log: optimizer hyperparameter 'momentum' is recorded at some steps but "
                                             r"meta\.h5's param groups have no finite value"):
        logged_schedule(Path("log"), {"optimizer": {"param_groups": [{}]}}, tables, 3)


def test_a_log_without_a_schedule_is_unchanged_and_old_logs_read_as_before(tmp_path):
    """No schedule (StepLR changes the learning rate only): no new column, format version 2, ``hyper`` None; the
    version-1 and version-2 fixtures read without a schedule too."""
    ds = make_data(24)
    torch.manual_seed(0)
    fit(TinyClassifier(momentum=0.9).double(), loader(ds), InfluenceTracker(str(tmp_path / "log"), flush_every_n_steps=3))
    assert set(_segments(tmp_path / "log")) == {(2, ())}
    for path in (tmp_path / "log", FIXTURES / "log_v1", FIXTURES / "log_v2_unfolded"):
        log = InfluenceLog(path)
        assert log.scheduled == {} and all(log.hyper(t) is None for t in range(log.first_step, log.num_steps))


def _builder():
    """--builder of the CLI test: the OneCycleLR SGD classifier and its data."""
    ds = make_data(16)
    return {"module": _cycled(), "train_data": WithIds(ds), "val_data": (ds.tensors[0][:6], ds.tensors[1][:6])}


def test_the_cli_reads_scores_and_measures_a_log_with_a_schedule(tmp_path, capsys):
    """``info`` names the schedule (the per-step range of what moved); ``query`` (DIT, which replays under its
    tolerance 0 here) and ``evaluate`` (replay leave-one-out against DIT) run on the log."""
    from lightning_influence.cli import main

    fit(_cycled(), loader(make_data(16), batch_size=4),
        InfluenceTracker(str(tmp_path / "log"), checkpoint_every_n_steps=2, store_data=False), epochs=2)
    log = str(tmp_path / "log")
    assert main(["info", log]) == 0
    assert "; per step momentum 0.85" in capsys.readouterr().out
    assert main(["info", log, "-f", "json"]) == 0
    assert list(__import__("json").loads(capsys.readouterr().out)["scheduled"]) == ["momentum"]
    builder = f"{__file__}:_builder"
    assert main(["query", log, "-q", "--builder", builder, "-m", "dit", "--replay-tolerance", "0", "--top", "3"]) == 0
    assert "dit" in capsys.readouterr().out
    code = main(["evaluate", log, "-q", "--builder", builder, "--samples", "1,2"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "replay drift (dit): at most 0 of" in out and "verdict: dit agrees best" in out


# --------------------------------------------------------------------------------- refusals
def test_a_hyperparameter_set_after_the_trackers_hook_is_refused_at_that_step(tmp_path):
    """Set in the LightningModule's on_before_optimizer_step (Lightning calls it after the callbacks'), the momentum
    was recorded one change late: refused at that step, naming what to do."""
    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match=r"step 3 updated the parameters with momentum, weight_decay \[\[0\.5, 0\.01\]\] "
                                           r".*\[\[0\.9, 0(\.0)?\]\] were recorded.*training_step"):
        fit(Ramped("on_before_optimizer_step").double(), loader(make_data(24)), InfluenceTracker(str(tmp_path / "a")))
    assert InfluenceLog(tmp_path / "a").steps.tolist() == [0, 1, 2]  # the refused step 3 is not kept


@pytest.mark.parametrize("key,value,momentum,match", [
    ("nesterov", True, 0.9, r"nesterov of param group 0 changed from False to True.*keep nesterov fixed"),
    ("momentum", 0.5, 0.0, r"momentum of param group 0 became 0\.5 after starting at 0.*non-zero momentum"),
    ("momentum", float("nan"), 0.9, r"momentum of param group 0 is nan, not a finite number"),
])
def test_a_change_the_update_rules_do_not_model_is_refused_at_that_step(tmp_path, key, value, momentum, match):
    torch.manual_seed(0)
    with pytest.raises(UnsupportedOptimizerError, match=rf"at step 3 SGD's {match}"):
        fit(Ramped(key=key, value=value, momentum=momentum).double(), loader(make_data(24)),
            InfluenceTracker(str(tmp_path / "log")))
    assert InfluenceLog(tmp_path / "log").num_steps == 3  # the steps before it are kept


# ------------------------------------------------------------------- the rules vs torch.optim
STEPS = 60
CONFIGS = {  # (class, group w, group b, {key: (low, high)} cycled per step)
    "sgd-momentum": (torch.optim.SGD, dict(momentum=0.9, dampening=0.2, weight_decay=0.01), dict(momentum=0.5),
                     {"momentum": (0.8, 0.95), "dampening": (0.0, 0.3), "weight_decay": (0.0, 0.02)}),
    "sgd-nesterov": (torch.optim.SGD, dict(momentum=0.8, nesterov=True), dict(momentum=0.5, nesterov=True),
                     {"momentum": (0.85, 0.95), "weight_decay": (0.0, 0.02)}),
    "adam": (torch.optim.Adam, dict(weight_decay=0.01), dict(betas=(0.8, 0.99)),
             {"betas": ((0.85, 0.99), (0.95, 0.999)), "eps": (1e-8, 1e-6), "weight_decay": (0.0, 0.02)}),
    "adam-amsgrad": (torch.optim.Adam, dict(amsgrad=True), dict(weight_decay=0.1), {"betas": ((0.85, 0.99), (0.95, 0.999))}),
    "adamw": (torch.optim.AdamW, dict(weight_decay=0.05), dict(), {"betas": ((0.85, 0.999), (0.95, 0.999)),
                                                                  "weight_decay": (0.01, 0.1)}),
    "rmsprop-centered": (torch.optim.RMSprop, dict(momentum=0.9, centered=True), dict(alpha=0.95, momentum=0.5),
                         {"alpha": (0.9, 0.99), "eps": (1e-8, 1e-6), "momentum": (0.5, 0.9), "weight_decay": (0.0, 0.01)}),
    "adagrad": (torch.optim.Adagrad, dict(lr_decay=0.01), dict(eps=1e-8),
                {"lr_decay": (0.0, 0.02), "eps": (1e-10, 1e-8), "weight_decay": (0.0, 0.01)}),
}
def _cycle(low, high, t: int):
    """A triangle between ``low`` and ``high`` with period 8 (pairs elementwise, as CyclicLR's betas)."""
    a = abs((t % 8) - 4) / 4
    return tuple(lo + a * (hi - lo) for lo, hi in zip(low, high)) if isinstance(low, tuple) else low + a * (high - low)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_update_rules_take_each_steps_recorded_hyperparameters_as_torch_optim_does(name):
    """Every scheduled hyperparameter of every rule cycled per step in torch.optim; the tracker's record of each step
    (ScheduleRecorder, as the reader returns it) fed to the functional rule: equal to torch.optim to 1e-12 in float64.
    Without the per-step values the rule runs with the groups' start values and leaves torch.optim's trajectory."""
    cls, hw, hb, cycled = CONFIGS[name]
    lr = {torch.optim.SGD: 0.05, torch.optim.RMSprop: 0.01, torch.optim.Adagrad: 0.1}.get(cls, 0.01)
    params = {n: THETA0[sum(SIZES[:i]):sum(SIZES[: i + 1])].reshape(SHAPES[n]).clone().requires_grad_(True)
              for i, n in enumerate(NAMES)}
    opt = cls([{"params": [params["w"]], **hw}, {"params": [params["b"]], **hb}], lr=lr)
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [n]} for g, n in zip(opt.param_groups, NAMES)]
    rule = rule_for(f"{type(opt).__module__}.{type(opt).__qualname__}")
    step = OptimizerStep(rule, groups, coordinate_groups(groups, NAMES, SIZES))
    recorder = ScheduleRecorder(rule, groups)
    theta, state = THETA0.clone(), step.init_state()
    fixed, fixed_state = THETA0.clone(), step.init_state()
    worst = 0.0
    for t in range(STEPS):
        for g in opt.param_groups:
            for key, (low, high) in cycled.items():
                g[key] = _cycle(low, high, t)
        _, record = recorder.values(t, opt.param_groups)
        values = None if record is None else {k: np.asarray(v, dtype=np.float64) for k, v in record.items()}
        lrs = [lr, lr / 2]
        theta, state = step.update(theta, state, grad_at(theta, t), lrs, values=values)
        fixed, fixed_state = step.update(fixed, fixed_state, grad_at(fixed, t), lrs)
        g = grad_at(flat(params), t)
        for n, part in zip(NAMES, torch.split(g, SIZES)):
            params[n].grad = part.reshape(SHAPES[n]).clone()
        for pg, rate in zip(opt.param_groups, lrs):
            pg["lr"] = rate
        opt.step()
        ref = flat(params)
        worst = max(worst, float((theta - ref).abs().max() / ref.abs().max()))
    assert worst < 1e-12, (name, worst)
    assert float((fixed - ref).abs().max() / ref.abs().max()) > 1e-6  # the schedule matters


# ----------------------------------------------------------- DIT vs replay's linear response
EPS = 1e-4


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_dit_equals_the_linear_response_of_replay_under_a_cycled_momentum(tmp_path, opt, monkeypatch):
    """DIT with linear removal is ``−∂f/∂w_j``; replay leave-one-out at removal weight ``1 − ε`` divided by ``ε``
    measures it with torch.optim, up to ``O(ε)`` from the curvature in ``w`` (the central difference with ``1 + ε``
    removes that term). OneCycleLR with its default cycle_momentum (SGD momentum, Adam β₁), float64: one-sided
    7e-6 (SGD), 7e-5 (Adam), as with constant hyperparameters on this run (7e-6, 6e-5); central 4e-11 and 2e-8.
    With the schedule dropped from the adjoint (meta.h5's momentum at every step) DIT misses it by far more."""
    ds = make_data(12)
    fit(_cycled("onecycle", opt, total=9), loader(ds, batch_size=4),
        InfluenceTracker(str(tmp_path / "log"), checkpoint_every_n_steps=3), epochs=3)
    log = InfluenceLog(tmp_path / "log")
    assert SCHEDULED[opt] in log.scheduled
    val = make_data(6, seed=1)
    query = mean_loss((val.tensors[0], val.tensors[1]), lambda m, b: m.per_sample_loss(b))
    loss_fn = lambda m, b: m.per_sample_loss(b)  # noqa: E731
    f = {w: replay_loo(log, _cycled("onecycle", opt, 9), WithIds(ds), query, loss_fn=loss_fn,
                       removal_weight=w).at(log.num_steps)[:, 0] for w in (1 - EPS, 1 + EPS)}
    one_sided, central = f[1 - EPS] / EPS, (f[1 - EPS] - f[1 + EPS]) / (2 * EPS)
    scores = dit(log, query, module=_cycled("onecycle", opt, 9), train_data=WithIds(ds), loss_fn=loss_fn,
                 removal="linear", tolerance=0.0).column(0)

    def rel(a: np.ndarray) -> float:
        return float(np.linalg.norm(a - central) / np.linalg.norm(central))

    assert rel(scores) < {"sgd": 1e-9, "adam": 1e-7}[opt], rel(scores)
    assert rel(one_sided) < {"sgd": 1e-5, "adam": 1e-4}[opt]  # the O(ε) term alone
    values = OptimizerStep.hyper
    monkeypatch.setattr(OptimizerStep, "hyper", lambda self, lrs, v=None: values(self, lrs))
    constant = dit(log, query, module=_cycled("onecycle", opt, 9), train_data=WithIds(ds), loss_fn=loss_fn,
                   removal="linear", tolerance=0.0).column(0)
    assert rel(constant) > 1e-4, rel(constant)


def test_gauss_newton_dit_takes_each_steps_momentum(tmp_path):
    """The log-only Gauss-Newton sweep (SGD) against its recursion written out with each step's recorded momentum
    (OneCycleLR's cycle): ``δv = dg`` (first step) or ``μ_t δv + (1 − τ) dg``, ``δθ −= η_t δv``."""
    from lightning_influence.estimators import checkpoint_query_gradients, dit_gauss_newton

    ds = make_data(16)
    fit(_cycled(), loader(ds, batch_size=4), InfluenceTracker(str(tmp_path / "log"), record_gradients=True,
                                                             storage_dtype="float64", checkpoint_every_n_steps=4), epochs=2)
    log = InfluenceLog(tmp_path / "log")
    val = make_data(6, seed=1)
    query = mean_loss((val.tensors[0], val.tensors[1]), lambda m, b: m.per_sample_loss(b))
    s = dit_gauss_newton(log, query, module=_cycled(), window=(0, log.num_steps))
    qg, _ = checkpoint_query_gradients(log, _cycled(), query, [log.num_steps])
    p, N = qg[log.num_steps].shape[1], log.dataset_size
    delta, dv = np.zeros((p, N)), np.zeros((p, N))
    momenta = []
    for rec in log.iter_steps(0, log.num_steps, fields=("grad",)):
        h = log.hyper(rec.step)
        mu, lam, damp = float(h["momentum"][0]), float(h["weight_decay"][0]), float(h["dampening"][0])
        momenta.append(mu)
        G, B = rec.grads, len(rec.ids)
        E = np.zeros((p, N))
        E[:, rec.ids] = G.T / B
        dg = (G.T @ G / B + lam * np.eye(p)) @ delta - E
        dv = dg if rec.step == 0 else mu * dv + (1 - damp) * dg
        delta = delta - rec.lrs[0] * dv
    assert len(set(momenta)) >= 3
    want = (qg[log.num_steps] @ delta)[0]
    assert np.linalg.norm(s.column(0) - want) / np.linalg.norm(want) < 1e-10


def test_diffin_takes_each_steps_weight_decay(tmp_path):
    """Diff-In's curvature ``⟨v, (cH + λ_t) v⟩/‖v‖²`` (docs/diffin.md) takes the step's recorded weight decay: with
    ``H v = 0`` it is ``λ_t`` itself, 0 before the schedule set 0.01 at step 3."""
    from lightning_influence.estimators.diffin_context import _Context, _curvature

    ds = make_data(24)
    torch.manual_seed(0)
    fit(Ramped().double(), loader(ds), InfluenceTracker(str(tmp_path / "log"), record_gradients=True))
    log = InfluenceLog(tmp_path / "log")
    ctx = _Context(log, Ramped().double(), WithIds(ds), lambda m, b: m.per_sample_loss(b), "exact", None, True, 8)
    V = {n: torch.ones(1, *ctx.shapes[n], dtype=torch.float64) for n in ctx.names}
    zero = {n: torch.zeros_like(v) for n, v in V.items()}
    assert [float(_curvature(ctx, t, V, zero)[0, 0]) for t in (0, 2, 3, 5)] == pytest.approx([0, 0, 0.01, 0.01], rel=1e-12)


def test_the_pbrf_gaps_warm_stage_runs_each_steps_momentum(tmp_path):
    """The gap decomposition's warm stage reruns the logged steps from θ_T (tests/test_pbrf.py): with a momentum
    schedule, each step's recorded momentum, as a hand-written momentum SGD from θ_T and its buffer shows."""
    from test_pbrf import KAPPA, PHI, Y, Lin, fq, lin_data, lin_query, theta_of

    from lightning_influence.evaluation.pbrf import gap_decomposition
    from tests._tinylog import epoch_batches, train_and_log

    torch.manual_seed(1)
    model = Lin().double()
    batches, epochs = epoch_batches(12, 4, 2, seed=0)
    momenta = [0.9 - 0.05 * (t % 5) for t in range(len(batches))]
    train_and_log(str(tmp_path), model, lambda m, b: m.per_sample_loss(b), lin_data, batches, [0.2] * len(batches),
                  torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, weight_decay=KAPPA), checkpoint_every=None,
                  record_gradients=False, dataset_size=12, epochs=epochs,
                  schedule=[None if mu == 0.9 else {"momentum": [mu]} for mu in momenta])
    log = InfluenceLog(tmp_path)
    T = log.num_steps
    state = log.optimizer_state(T)
    buf0 = torch.cat([torch.as_tensor(state["lin.weight"]["momentum_buffer"]).reshape(-1),
                      torch.as_tensor(state["lin.bias"]["momentum_buffer"]).reshape(-1)])

    def run(drop: int | None) -> torch.Tensor:
        th, buf = theta_of(log, T).clone(), buf0.clone()
        for t in range(T):
            ids = log.batch_ids(t)
            w = torch.as_tensor(ids != (-1 if drop is None else drop), dtype=torch.float64)
            g = (w * (PHI[ids] @ th - Y[ids, 0])) @ PHI[ids] / len(ids) + KAPPA * th
            buf = momenta[t] * buf + g
            th = th - 0.2 * buf
        return th

    gd = gap_decomposition(log, Lin().double(), lin_data, lin_query, samples=[1, 7], damping=0.3,
                           output_loss="squared_error", loo=np.zeros((2, 2)))
    base = fq(run(None))
    expected = np.stack([fq(run(m)) - base for m in (1, 7)])
    assert np.abs(gd.stages["warm"] - expected).max() <= 1e-13 * np.abs(expected).max()


@pytest.mark.slow
def test_a_ddp_run_records_the_schedule_on_every_rank_as_one_process_does(tmp_path):
    """2 gloo processes under OneCycleLR: every rank's segments hold the cycled momentum, the log's values equal a
    single-process run of the same global batches, and the DDP log replays (tests/test_ddp.py's tolerance)."""
    from ddp_run import EPOCHS, N
    from test_ddp import ddp_and_single

    ddp, single = ddp_and_single(tmp_path, "+onecycle")
    assert ddp.ranks == [0, 1] and ddp.num_steps == single.num_steps == 4 * EPOCHS
    for rank in (0, 1):  # every segment holding steps (rank 0's last one holds θ_T alone)
        assert [names for _, names in _segments(tmp_path / "ddp", rank)][:4] == [("hyper_dampening", "hyper_momentum",
                                                                                 "hyper_weight_decay")] * 4
    momenta = [float(ddp.hyper(t)["momentum"][0]) for t in range(ddp.num_steps)]
    assert momenta == [float(single.hyper(t)["momentum"][0]) for t in range(ddp.num_steps)] and len(set(momenta)) > 5
    from conftest import tiny

    steps = [rs.step for rs in replay(ddp, tiny(), make_data(N), 0, None, loss_fn=lambda m, b: m.per_sample_loss(b),
                                      tolerance=1e-9)]
    assert steps == list(range(ddp.num_steps + 1))


def test_the_pbrf_takes_the_weight_decay_of_the_step_that_reached_theta(tmp_path):
    """The PBRF's proximity holds the run's coupled L2 weight decay: under a schedule (κ doubled from step 4 on), the
    value at θ_T's last step, as the closed form with 2κ shows (tests/test_pbrf.py; meta.h5's κ was used before)."""
    from test_pbrf import KAPPA, Lin, closed_form_pbrf, fq, lin_data, lin_query, theta_of

    from lightning_influence.evaluation.pbrf import pbrf
    from tests._tinylog import epoch_batches, train_and_log

    torch.manual_seed(1)
    model = Lin().double()
    batches, epochs = epoch_batches(12, 4, 2, seed=0)
    train_and_log(str(tmp_path), model, lambda m, b: m.per_sample_loss(b), lin_data, batches, [0.2] * len(batches),
                  torch.optim.SGD(model.parameters(), lr=0.2, weight_decay=KAPPA), checkpoint_every=None,
                  record_gradients=False, dataset_size=12, epochs=epochs,
                  schedule=[None] * 4 + [{"weight_decay": [2 * KAPPA]}] * (len(batches) - 4))
    log = InfluenceLog(tmp_path)
    theta_s = theta_of(log, log.num_steps)
    res = pbrf(log, Lin().double(), lin_data, lin_query, samples=range(12), damping=0.1, output_loss="squared_error")
    expected = np.stack([fq(theta_s + closed_form_pbrf(theta_s, m, 0.1 + KAPPA)) - fq(theta_s) for m in range(12)])
    assert np.abs(res.scores - expected).max() <= 1e-12 * max(1.0, np.abs(expected).max())
    assert res.info["weight_decay_max"] == pytest.approx(2 * KAPPA) and "scheduled" in res.info["weight_decay_note"]

