"""Defects found using the package at scale (long fits, many segments, wide models), each reproduced small."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lightning_influence.step.micro import MicroBatch, Step


def test_per_sample_curvature_costs_a_few_backward_passes_per_sample():
    """Diff-In's exact per-sample ``H_i v`` (published form, batch rows) batched its second backward over the rows of
    a first backward already batched over the samples: ``B²·p`` work and memory (B = 32, a 512-wide MLP: 4.5-13 s a
    step instead of 0.13-0.18 s, and out of memory at wider layers). It now costs a few backward passes of the
    batch per sample (counted in FLOPs: at most ``4·B`` forward+backward passes), and equals double backward per
    sample."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    B = 16
    module = nn.Sequential(nn.Linear(20, 128), nn.Tanh(), nn.Linear(128, 5)).double()
    x, y = torch.randn(B, 20, dtype=torch.float64), torch.randint(0, 5, (B,))

    def loss_fn(m, batch):
        return F.cross_entropy(m(batch[0]), batch[1], reduction="none")

    params = {n: p.detach() for n, p in module.named_parameters()}
    v = {n: torch.randn_like(p) for n, p in params.items()}
    step = Step(0, [MicroBatch(np.arange(B), (x, y))])
    with FlopCounterMode(display=False) as once:
        loss_fn(module, (x, y)).sum().backward()
    with FlopCounterMode(display=False) as counted:
        hv = step.per_sample_curvature(module, loss_fn, params, v, list(params))
    assert counted.get_total_flops() <= 4 * B * once.get_total_flops()

    leaves = [p.clone().requires_grad_(True) for p in params.values()]
    losses = F.cross_entropy(torch.func.functional_call(module, dict(zip(params, leaves)), (x,)), y, reduction="none")
    for i in range(B):
        g = torch.autograd.grad(losses[i], leaves, create_graph=True)
        expected = torch.autograd.grad(sum((gi * v[n]).sum() for gi, n in zip(g, params)), leaves, retain_graph=True)
        for n, e in zip(params, expected):
            torch.testing.assert_close(hv[n][i], e, rtol=1e-12, atol=1e-14)


class _Centre(nn.Module):
    """``½ ‖θ − x_z‖²`` per sample: the exact Hessian is ``I`` (training at lr 1 jumps to each batch's mean and stays
    finite), the Gauss-Newton one ``Σ w_i g_i g_iᵀ`` grows with the spread of the samples."""

    def __init__(self) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(3, dtype=torch.float64))


def _centre_log(path, spread: float, lr: float, epochs: int):
    from torch.utils.data import TensorDataset

    from lightning_influence import InfluenceLog
    from tests._tinylog import epoch_batches, train_and_log

    x = spread * torch.randn(8, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    batches, epoch_of = epoch_batches(8, 4, epochs)
    m = _Centre()
    train_and_log(str(path), m, lambda m, b: 0.5 * ((m.theta - b[0]) ** 2).sum(1), TensorDataset(x), batches,
                  [lr] * len(batches), torch.optim.SGD(m.parameters(), lr=lr, momentum=0.5), checkpoint_every=None,
                  epochs=epoch_of)
    return InfluenceLog(path), {0: np.ones((1, 3))}


def test_a_diverging_gauss_newton_adjoint_is_reported_and_an_overflow_refused(tmp_path):
    """Gauss-Newton DIT over a long window can run an unstable recursion where training was stable (a digits MLP,
    1920 steps at lr 0.05 with momentum 0.9: scores of 1e59 where replay leave-one-out changed the loss by 0.02): it
    returned them silently, and inf/NaN once the adjoint overflowed. A growth beyond 1e6x is now warned about (and
    tagged, ``info['adjoint_growth']``); an overflow is refused at its step."""
    import pytest

    from lightning_influence import dit_gauss_newton

    log, q = _centre_log(tmp_path / "stable", spread=0.3, lr=0.5, epochs=30)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ok = dit_gauss_newton(log, q)
    assert np.isfinite(ok.scores).all() and 1 <= ok.info["adjoint_growth"] < 10 and "grew" not in ok.method

    log, q = _centre_log(tmp_path / "grows", spread=10.0, lr=1.0, epochs=4)
    with pytest.warns(RuntimeWarning, match="the adjoint grew .* Use dit"):
        grown = dit_gauss_newton(log, q)
    assert np.isfinite(grown.scores).all() and grown.info["adjoint_growth"] > 1e6 and "adjoint grew" in grown.method

    log, q = _centre_log(tmp_path / "overflows", spread=10.0, lr=1.0, epochs=150)
    with pytest.raises(FloatingPointError, match="the adjoint overflowed at step"):
        dit_gauss_newton(log, q)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()

    def forward(self, x):
        return self.net(x)

    def per_sample_loss(self, batch):
        return F.cross_entropy(self(batch[0]), batch[1], reduction="none")


def test_the_dit_sweep_holds_about_two_root_interval_states_at_once(tmp_path, monkeypatch):
    """DIT replays each checkpoint interval in segments from in-memory anchors when the interval exceeds
    ``max_memory_bytes``. It took the anchors of the whole run in one forward pass and kept them all, and a smaller
    budget made the segments shorter and so the anchors more: on a 2.5M-parameter MLP (600 steps, a checkpoint every
    100) a 128 MB budget held 2.6 GB, a 512 MB one 1.8 GB, while ``info['peak_trajectory_bytes']`` said 119 / 505 MB.
    Now each interval's anchors live only while it is swept, segments are never shorter than ``⌈√L⌉`` and the info
    counts the anchors: 48 steps, a checkpoint every 16, a budget of 3 states: at most ``2·4`` states (+ the replay's
    own) alive at once, the same scores as without a budget."""
    import weakref

    from torch.utils.data import TensorDataset

    from lightning_influence import InfluenceLog, dit
    from lightning_influence.estimators import sweep
    from lightning_influence.queries import mean_loss
    from tests._tinylog import epoch_batches, train_and_log

    g = torch.Generator().manual_seed(1)
    ds = TensorDataset(torch.randn(24, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (24,), generator=g))
    batches, epoch_of = epoch_batches(24, 4, 8)  # 48 steps
    m = _Net()
    train_and_log(str(tmp_path), m, lambda m, b: m.per_sample_loss(b), ds, batches, [0.1] * 48,
                  torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), checkpoint_every=16, epochs=epoch_of)
    log = InfluenceLog(tmp_path)
    assert log.checkpoint_steps == [0, 16, 32, 48]

    alive: weakref.WeakSet = weakref.WeakSet()
    most = [0]

    def spied(fn):
        def wrapper(*args, **kwargs):
            for rs in fn(*args, **kwargs):
                alive.add(next(iter(rs.params.values())))
                most[0] = max(most[0], len(alive))
                yield rs
        return wrapper

    query = mean_loss((ds.tensors[0][:8], ds.tensors[1][:8]), lambda m, b: m.per_sample_loss(b))
    free = dit(log, query, module=_Net(), train_data=ds, window=(5, 48), loss_fn=lambda m, b: m.per_sample_loss(b))
    monkeypatch.setattr(sweep, "replay", spied(sweep.replay))
    monkeypatch.setattr(sweep, "replay_from", spied(sweep.replay_from))
    per = sum(p.numel() for p in _Net().parameters()) * 8 * 3  # θ, momentum and step count, float64
    tight = dit(log, query, module=_Net(), train_data=ds, window=(5, 48), loss_fn=lambda m, b: m.per_sample_loss(b),
                max_memory_bytes=3 * per)
    np.testing.assert_allclose(tight.scores, free.scores, rtol=1e-12, atol=1e-15)
    assert most[0] <= 4 + 3 + 2, most[0]  # ⌈√16⌉ = 4 steps a segment, 3 anchors, the replay's and the sweep's state
    # (before: 19, the anchors of the whole run)
    assert tight.info["peak_trajectory_bytes"] == (4 + 2) * per  # a segment's 4 and the 2 anchors not yet replayed


def test_a_log_storing_training_data_without_validation_data_says_so():
    """A plain-DataLoader fit without a validation loader stores its training set alone; ``query`` then said the recipe
    "gives no data (no datamodule, no *_dataloader hooks, no stored data)" and to re-train with ``store_data=True``,
    which stores nothing more. It now names what is missing."""
    import pytest

    from lightning_influence.cli.common import UserError
    from lightning_influence.cli.context import RunContext

    ctx = RunContext(nn.Linear(2, 2), None, "the log's recipe", None, {"train": [(torch.zeros(2), 0)]})
    assert ctx.train_dataset is not None
    with pytest.raises(UserError, match="no validation set: the log's recipe stores data without a validation set .* "
                                        "--builder module:function") as err:
        ctx.val_batch
    assert "store_data" not in str(err.value) and "no stored data" not in str(err.value)
