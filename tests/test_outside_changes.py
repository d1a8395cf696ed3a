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


def _dit(tmp_path, cls, name: str, tolerance=None, **attrs):
    torch.manual_seed(0)
    module = cls().double()
    for k, v in attrs.items():
        setattr(module, k, v)
    fit(module, loader(DS), InfluenceTracker(str(tmp_path / name), checkpoint_every_n_steps=1), epochs=2)
    log = InfluenceLog(tmp_path / name)
    torch.manual_seed(0)
    fresh = cls().double()
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        scores = dit(log, _query, module=fresh, train_data=WithIds(DS), tolerance=tolerance)
    return log, scores, [str(w.message) for w in got if "outside" in str(w.message) or "changed them" in str(w.message)]


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
