"""DIT holds constant whatever a run changes other than by its logged optimizer steps and forwards (a weight
renormalised in a hook, an EMA buffer). Replay tells: the stored checkpoints differ from the replayed steps by more
than rounding. DIT now says so (warning, ``info['changed_outside_optimizer']``, a method tag); before it was silent."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TinyClassifier, fit, loader, make_data
from lightning_influence import InfluenceLog, InfluenceTracker, WithIds, dit
from lightning_influence.replay import replay


class Renormed(TinyClassifier):
    """Shrinks the first layer's weight by ``shrink`` after every optimizer step (outside the optimizer)."""

    shrink = 0.0

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        with torch.no_grad():
            self.net[0].weight.mul_(1.0 - self.shrink)


class WithEma(TinyClassifier):
    """Keeps an EMA of the first layer's weight in a buffer, updated after every step (outside the forward)."""

    decay = 1.0  # 1: the buffer never changes

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.register_buffer("ema", self.net[0].weight.detach().clone())

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        with torch.no_grad():
            self.ema.mul_(self.decay).add_((1.0 - self.decay) * self.net[0].weight)


def _query(m):
    return F.cross_entropy(m(XQ), YQ)


DS = make_data(24)
XQ, YQ = make_data(6, seed=1).tensors


def _fit(tmp_path, cls, name: str, **attrs) -> InfluenceLog:
    torch.manual_seed(0)
    module = cls().double()
    for k, v in attrs.items():
        setattr(module, k, v)
    fit(module, loader(DS), InfluenceTracker(str(tmp_path / name), checkpoint_every_n_steps=1, record_gradients=True,
                                             projection_dim=None, storage_dtype="float64"), epochs=2)
    return InfluenceLog(tmp_path / name)


def _scores(log, cls, estimator=dit, query=_query, **kw):
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        scores = estimator(log, query, module=cls().double(), **kw)
    return scores, [str(w.message) for w in got if "outside" in str(w.message) or "changed them" in str(w.message)]


def _dit(tmp_path, cls, name: str, tolerance=None, **attrs):
    log = _fit(tmp_path, cls, name, **attrs)
    return (log, *_scores(log, cls, train_data=WithIds(DS), tolerance=tolerance))


def test_a_weight_renormalised_in_a_hook_is_reported(tmp_path):
    log, plain, said = _dit(tmp_path, Renormed, "plain", shrink=0.0)
    assert not said and "changed_outside_optimizer" not in plain.info and "outside" not in plain.method
    log, shrunk, said = _dit(tmp_path, Renormed, "shrunk", shrink=1e-4)
    assert len(said) == 1 and "θ at the checkpoint" in said[0] and "constants" in said[0]
    assert "changed outside the optimizer" in shrunk.method and shrunk.info["changed_outside_optimizer"]
    # the reported drift is the one a replay of step 0 measures by hand: ‖θ_1^stored − θ_1^replay‖ / ‖θ_1 − θ_0‖
    stored = [{n: torch.as_tensor(v) for n, v in log.checkpoint(t).items()} for t in (0, 1)]
    torch.manual_seed(0)
    steps = replay(log, Renormed().double(), WithIds(DS), 0, 1, verify=False)
    replayed = [s.params for s in steps][-1]
    err = sum(float(((replayed[n].double() - stored[1][n]) ** 2).sum()) for n in stored[1]) ** 0.5
    move = sum(float(((stored[1][n] - stored[0][n]) ** 2).sum()) for n in stored[1]) ** 0.5
    assert err / move > 1e-6
    assert shrunk.info["replay_drift"]["max"] >= err / move * (1 - 1e-9)


def test_a_buffer_updated_outside_the_forward_is_refused_or_reported(tmp_path):
    """Replay cannot run a hook: an EMA buffer it never updates drifts by its whole movement and is refused, naming
    what to do; accepted (``tolerance=inf``), the scores say they held it constant."""
    from lightning_influence.replay_drift import ReplayMismatchError

    _, still, said = _dit(tmp_path, WithEma, "still", decay=1.0)
    assert not said and "changed_outside_optimizer" not in still.info
    with pytest.raises(ReplayMismatchError, match="a buffer updated outside the forward"):
        _dit(tmp_path, WithEma, "ema", decay=0.999)
    _, moving, said = _dit(tmp_path, WithEma, "ema2", tolerance=float("inf"), decay=0.999)
    assert len(said) == 1 and "buffers at the checkpoint" in said[0]
    assert moving.info["replay_drift"]["buffers_max"] == pytest.approx(1.0) and "outside the optimizer" in moving.method


@pytest.mark.parametrize("form", ["published", "step"])
def test_diffin_reports_a_weight_renormalised_in_a_hook_as_dit_does(tmp_path, form):
    """Diff-In had no check: with a checkpoint at every step it replays nothing, and a run whose hook shrank the weights
    gave scores without a word. It now replays the window's first segment where nothing else was replayed, and says
    what DIT says (warning, info["changed_outside_optimizer"], method tag), the same drift."""
    from lightning_influence import diffin

    kw = dict(estimator=diffin, train_data=WithIds(DS), form=form)
    plain = _fit(tmp_path, Renormed, "plain", shrink=0.0)
    scores, said = _scores(plain, Renormed, **kw)
    assert not said and "changed_outside_optimizer" not in scores.info and "outside" not in scores.method
    assert scores.info["replay_drift"]["checkpoints_compared"] >= 1
    shrunk = _fit(tmp_path, Renormed, "shrunk", shrink=1e-4)
    scores, said = _scores(shrunk, Renormed, **kw)
    assert len(said) == 1 and said[0].startswith("Diff-In: θ at the checkpoint") and "constants" in said[0]
    assert "changed outside the optimizer" in scores.method and scores.info["changed_outside_optimizer"]
    # the same measurement as DIT's: the replay of step 0 against the stored θ_1
    by_dit, _ = _scores(shrunk, Renormed, train_data=WithIds(DS), window=(0, 1))
    assert scores.info["replay_drift"]["at_step"] == 1 == by_dit.info["replay_drift"]["at_step"]
    assert scores.info["replay_drift"]["max"] == pytest.approx(by_dit.info["replay_drift"]["max"], rel=1e-9)


def test_diffin_refuses_a_buffer_updated_outside_the_forward_unless_its_tolerance_accepts_it(tmp_path):
    from lightning_influence import diffin_self_influence
    from lightning_influence.replay_drift import ReplayMismatchError

    log = _fit(tmp_path, WithEma, "ema", decay=0.999)
    with pytest.raises(ReplayMismatchError, match="a buffer updated outside the forward"):
        _scores(log, WithEma, estimator=diffin_self_influence, query=None, train_data=WithIds(DS))
    torch.manual_seed(0)
    with pytest.warns(RuntimeWarning, match="Diff-In: the buffers at the checkpoint"):
        scores = diffin_self_influence(log, module=WithEma().double(), train_data=WithIds(DS), tolerance=float("inf"))
    assert scores.info["replay_drift"]["buffers_max"] == pytest.approx(1.0) and "outside the optimizer" in scores.method


def test_tracin_on_a_run_changed_outside_the_optimizer_is_its_formula_on_the_trajectory_the_run_took(tmp_path):
    """TracIn replays nothing: its gradients were logged at the weights training had after each hook, and its query
    gradients are taken at the stored checkpoints, so a change outside the optimizer leaves its inputs exact; what
    such a change does to a removal's later steps is beyond its first-order sum anyway (docs/trust.md). Its scores
    are Σ_t η_t/|B_t| ⟨∇f(θ_t), ∇ℓ_j(θ_t)⟩ on the stored θ_t, by float64 autograd, and it reports no check."""
    from lightning_influence import tracin
    from lightning_influence.replay import checkpoint_params

    log = _fit(tmp_path, Renormed, "shrunk", shrink=1e-3)
    model = Renormed().double()
    scores, said = _scores(log, Renormed, estimator=tracin)
    assert not said and "changed_outside_optimizer" not in scores.info
    want = np.zeros(len(DS))
    names = [n for n, _ in model.named_parameters()]
    for t in range(log.first_step, log.num_steps):
        params = checkpoint_params(log, model, t)
        theta = {n: params[n].detach().double().clone().requires_grad_(True) for n in names}
        q = torch.autograd.grad(F.cross_entropy(torch.func.functional_call(model, theta, (XQ,)), YQ), list(theta.values()))
        ids = log.batch_ids(t)
        x, y = DS.tensors[0][ids], DS.tensors[1][ids]
        for j, xi, yi in zip(ids, x, y):
            g = torch.autograd.grad(F.cross_entropy(torch.func.functional_call(model, theta, (xi[None],)), yi[None]),
                                    list(theta.values()))
            want[j] += log.lr(t)[0] / len(ids) * sum(float((a * b).sum()) for a, b in zip(q, g))
    np.testing.assert_allclose(scores.column(0), want, rtol=1e-9, atol=1e-15)


def test_a_replay_on_another_number_of_cpu_threads_says_so(tmp_path):
    """A small transformer trained with 1 thread and analysed with 2 drifted by 6.3e-4 of a segment's movement (CPU
    kernels sum in another order) and DIT said something had changed θ outside the optimizer ('a clamp or
    renormalisation in a hook, an EMA...'). The fit's threads are in the log now, and a drift on another number of
    threads is reported as that, with the setting that replays bit for bit."""
    from lightning_influence.log.format import read_meta
    from lightning_influence.log.writer import write_meta

    log = _fit(tmp_path, Renormed, "shrunk", shrink=1e-4)  # a drift beyond rounding: the hook's
    assert log.meta["cpu_threads"] == torch.get_num_threads()
    meta = read_meta(tmp_path / "shrunk")
    meta["cpu_threads"] = torch.get_num_threads() + 1  # as if trained on another number of threads
    write_meta(tmp_path / "shrunk", meta)
    scores, said = _scores(InfluenceLog(tmp_path / "shrunk"), Renormed, train_data=WithIds(DS))
    n = torch.get_num_threads()
    assert len(said) == 1 and f"runs torch with {n} CPU threads where the fit ran with {n + 1}" in said[0]
    assert f"torch.set_num_threads({n + 1})" in said[0] and "θ at the checkpoint" in said[0]
    assert scores.method.endswith(f" [replayed on {n} threads, trained on {n + 1}]")
    assert scores.info["replay_threads"] == {"fit": n + 1, "now": n} and "changed_outside_optimizer" not in scores.info
