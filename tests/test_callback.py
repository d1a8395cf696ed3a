"""InfluenceTracker: what it records equals brute-force recomputation, and it never changes training."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from conftest import TinyClassifier, fit, loader, make_data, no_engine_layer, tiny
from lightning_influence import InfluenceLog, InfluenceTracker, WithIds


def brute_grads(module: nn.Module, params: dict[str, np.ndarray], ds, ids: np.ndarray, names: list[str]) -> torch.Tensor:
    """Per-sample gradients by one autograd call per sample at the given parameters (float64)."""
    module = module.double()
    with torch.no_grad():
        for n, p in module.named_parameters():
            p.copy_(torch.from_numpy(params[n]))
    rows = []
    for i in ids:
        x, y = ds[int(i)]
        loss = module.per_sample_loss((x[None], y[None]))[0]
        g = torch.autograd.grad(loss, [dict(module.named_parameters())[n] for n in names])
        rows.append(torch.cat([t.reshape(-1) for t in g]))
    return torch.stack(rows)


def test_records_ids_lrs_and_losses(log_dir):
    ds = make_data(24)
    fit(tiny(), loader(ds), InfluenceTracker(log_dir, checkpoint_every_n_steps=1), epochs=3)
    log = InfluenceLog(log_dir)
    assert log.num_steps == 12 and log.dataset_size == 24
    for epoch in range(3):
        t1, t2 = log.window(("epoch", epoch, epoch + 1))
        ids = np.concatenate([log.batch_ids(t) for t in range(t1, t2)])
        assert sorted(ids.tolist()) == list(range(24))  # every sample exactly once per epoch
    np.testing.assert_allclose(log.lrs[:, 0], [0.1] * 8 + [0.05] * 4)  # StepLR(step_size=2, gamma=0.5)
    module = tiny()
    for rec in log.iter_steps(fields=("loss",)):
        with torch.no_grad():
            for n, p in module.named_parameters():
                p.copy_(torch.from_numpy(log.checkpoint(rec.step)[n]))
            x = torch.stack([ds[int(i)][0] for i in rec.ids])
            y = torch.stack([ds[int(i)][1] for i in rec.ids])
            np.testing.assert_allclose(rec.losses, module.per_sample_loss((x, y)).numpy(), rtol=1e-12)
    assert log.checkpoint_steps == list(range(13))  # θ_0 .. θ_11 and the final θ_12


@pytest.mark.parametrize("engine,routed", [("hooks", True), ("hooks", False), ("vmap", True)])
@pytest.mark.parametrize("projection_dim", [None, 8])
def test_gradients_equal_brute_force(log_dir, engine, routed, projection_dim):
    ds = make_data(18)
    tracker = InfluenceTracker(log_dir, record_gradients=True, checkpoint_every_n_steps=1, gradient_engine=engine,
                               projection_dim=projection_dim, projection_seed=3)
    fit(tiny(routed=routed, momentum=0.9, weight_decay=0.01), loader(ds), tracker, epochs=2)
    log = InfluenceLog(log_dir)
    assert log.meta["gradient_engine"] == engine
    names = log.param_names
    projector = log.projector()  # the layout the log records (biases folded where the weight is projected)
    for rec in log.iter_steps(fields=("grad",)):
        g = brute_grads(tiny(), log.checkpoint(rec.step), ds, rec.ids, names)
        if projection_dim is not None:
            shapes = log.param_shapes
            parts, o = {}, 0
            for n in names:
                k = int(np.prod(shapes[n]))
                parts[n] = g[:, o : o + k].reshape(len(g), *shapes[n])
                o += k
            g = projector.project(parts)
        np.testing.assert_allclose(rec.grads, g.numpy(), rtol=1e-5, atol=1e-7)  # float32 storage


class _Shift(nn.Module):
    """A bare parameter used in forward: no layer engine covers it, the raw-parameter engine does (x + P)."""

    def __init__(self) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(3, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.shift


_EXTRA = {"hooks": _Shift, "mixed": lambda: no_engine_layer().double()}  # a bare parameter: raw engine; a weight-normed LSTM cell: vmap


@pytest.mark.parametrize("engine", ["hooks", "mixed"])
@pytest.mark.parametrize("routed", [True, False])
def test_mixed_engine_rows_equal_brute_force(log_dir, routed, engine):
    """Hooks for the Linear layers, the raw-parameter engine for a bare parameter or vmap for a weight-normed LSTM cell's, in one step
    (float64 storage: exact)."""
    ds = make_data(12)
    tracker = InfluenceTracker(log_dir, record_gradients=True, checkpoint_every_n_steps=1, storage_dtype="float64")
    fit(tiny(extra=_EXTRA[engine](), routed=routed), loader(ds, batch_size=4), tracker, epochs=1)
    log = InfluenceLog(log_dir)
    assert log.meta["gradient_engine"] == engine and log.param_names[-1].startswith("extra.")
    assert log.meta["demoted"] == {}
    for rec in log.iter_steps(fields=("grad",)):
        expected = brute_grads(tiny(extra=_EXTRA[engine]()), log.checkpoint(rec.step), ds, rec.ids, log.param_names)
        np.testing.assert_allclose(rec.grads, expected.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mixed", [None, "hooks", "mixed"])
def test_float64_storage_is_exact_and_hvp_products_match_exact_hvp(log_dir, mixed):
    """Also with a bare parameter no layer engine covers (``hooks``: the raw-parameter engine, in the step and in the
    HVP passes) or a weight-normed LSTM cell's (``mixed``: vmap)."""
    model = (lambda: tiny(extra=_EXTRA[mixed]())) if mixed else tiny
    ds = make_data(12)
    tracker = InfluenceTracker(log_dir, record_gradients=True, record_hvp=True, checkpoint_every_n_steps=1,
                               storage_dtype="float64", hvp_eps=1e-4)
    fit(model(), loader(ds, batch_size=4), tracker, epochs=1)
    log = InfluenceLog(log_dir)
    assert log.meta["gradient_engine"] == (mixed or "hooks") and log.meta["demoted"] == {}
    module = model()
    names = log.param_names
    for rec in log.iter_steps(fields=("grad", "hvp")):
        theta = {n: torch.from_numpy(v) for n, v in log.checkpoint(rec.step).items()}
        assert np.abs(rec.grads - brute_grads(model(), log.checkpoint(rec.step), ds, rec.ids, names).numpy()).max() < 1e-12
        x = torch.stack([ds[int(i)][0] for i in rec.ids])
        y = torch.stack([ds[int(i)][1] for i in rec.ids])

        def loss_of(*flat, rows=slice(None)):
            p = dict(zip(names, flat))
            return torch.func.functional_call(module, p, (x[rows],)).log_softmax(-1).gather(1, y[rows, None]).neg()

        flat = tuple(theta[n] for n in names)
        g_batch = torch.autograd.functional.jacobian(lambda *f: loss_of(*f).mean(), flat)
        for b in range(len(rec.ids)):
            _, hv = torch.autograd.functional.hvp(lambda *f: loss_of(*f, rows=slice(b, b + 1)).sum(), flat, g_batch)
            exact = torch.cat([h.reshape(-1) for h in hv]).numpy()
            rel = np.linalg.norm(rec.hvps[b] - exact) / np.linalg.norm(exact)
            assert rel < 1e-5, (rec.step, b, rel)


def test_gradient_accumulation_one_record_per_optimizer_step(log_dir):
    ds = make_data(24)
    tracker = InfluenceTracker(log_dir, record_gradients=True, checkpoint_every_n_steps=1)
    fit(tiny(), loader(ds, batch_size=4), tracker, epochs=1, accumulate_grad_batches=3)
    log = InfluenceLog(log_dir)
    assert log.num_steps == 2
    for rec in log.iter_steps(fields=("grad",)):
        assert len(rec.ids) == 12
        g = brute_grads(tiny(), log.checkpoint(rec.step), ds, rec.ids, log.param_names)
        np.testing.assert_allclose(rec.grads, g.numpy(), rtol=1e-5, atol=1e-7)
    with h5py_file(log) as f:
        assert f["steps/micro_batches"][()].tolist() == [3, 3]


def h5py_file(log: InfluenceLog):
    import h5py

    return h5py.File(log._segments[0], "r")


@pytest.mark.parametrize("engine", ["hooks", "vmap"])
def test_training_is_bit_identical_with_and_without_tracker(tmp_path, engine):
    ds = make_data(30)
    plain = tiny(dropout=0.3, momentum=0.9)
    fit(plain, loader(ds), None, epochs=2)
    tracked = tiny(dropout=0.3, momentum=0.9)
    tracker = InfluenceTracker(str(tmp_path / "log"), record_gradients=True, record_hvp=True, projection_dim=4,
                               checkpoint_every_n_steps=1, gradient_engine=engine)
    fit(tracked, loader(ds), tracker, epochs=2)
    for (n, a), (_, b) in zip(plain.named_parameters(), tracked.named_parameters()):
        assert torch.equal(a, b), n
    assert not hasattr(tracked.__dict__, "per_sample_loss")  # the tracker removed its wrapper


def test_train_mode_batchnorm_is_refused_naming_the_layer(log_dir):
    with pytest.raises(RuntimeError, match=r"BatchNorm layer 'net\.1' is in train mode"):
        fit(tiny(batchnorm=True), loader(make_data(12)), InfluenceTracker(log_dir, record_gradients=True))
    fit(tiny(batchnorm=True), loader(make_data(12)),
        InfluenceTracker(log_dir + "2", record_gradients=True, params=["net.0.*", "net.4.*"], allow_train_batchnorm=True),
        epochs=1)
    assert InfluenceLog(log_dir + "2").meta["gradient_engine"] == "hooks"
    with pytest.raises(RuntimeError, match=r"vmap gradient engine cannot.*'extra\.weight_hh'"):
        fit(tiny(batchnorm=True, extra=no_engine_layer()), loader(make_data(12)),
            InfluenceTracker(log_dir + "3", record_gradients=True, allow_train_batchnorm=True), epochs=1)


def test_unsupported_optimizer_is_refused_before_the_first_step(log_dir):
    from lightning_influence.step import UnsupportedOptimizerError

    with pytest.raises(UnsupportedOptimizerError, match=r"does not support.*torch\.optim\.nadam\.NAdam.*RMSprop, Adagrad"):
        fit(tiny(optimizer="nadam"), loader(make_data(12)), InfluenceTracker(log_dir))
    from pathlib import Path

    assert not Path(log_dir).exists() or not any(p.is_file() for p in Path(log_dir).rglob("*"))  # nothing trained or written


def test_missing_and_duplicated_ids_fail_at_the_first_step(log_dir):
    ds = make_data(12)
    with pytest.raises(ValueError, match="Labels are never taken for sample ids"):  # (x, y): no ids
        fit(tiny(), loader(ds, ids=False), InfluenceTracker(log_dir))
    dup = torch.utils.data.TensorDataset(ds.tensors[0], ds.tensors[1], torch.zeros(12, dtype=torch.long))
    with pytest.raises(ValueError, match=r"sample ids \[0\] appear more than once in one batch"):
        fit(tiny(), loader(dup, ids=False), InfluenceTracker(log_dir, overwrite=True))
    with pytest.raises(ValueError, match="1-D integer tensor"):
        fit(tiny(), loader(ds, ids=False), InfluenceTracker(log_dir, overwrite=True, ids_fn=lambda b: b[0]))


def test_module_without_per_sample_loss_is_refused(log_dir):
    class NoHook(TinyClassifier):
        per_sample_loss = None

    with pytest.raises(TypeError, match="has no per_sample_loss"):
        fit(NoHook().double(), loader(make_data(12)), InfluenceTracker(log_dir))


def test_unsupported_params_fall_back_to_vmap_alone_or_are_refused_for_hooks(log_dir):
    ds = make_data(12)
    fit(tiny(extra=nn.LayerNorm(3).double()), loader(ds), InfluenceTracker(log_dir, record_gradients=True), epochs=1)
    assert InfluenceLog(log_dir).meta["gradient_engine"] == "hooks"  # LayerNorm has a hook engine
    fit(tiny(extra=_Shift()), loader(ds), InfluenceTracker(log_dir, record_gradients=True, overwrite=True), epochs=1)
    assert InfluenceLog(log_dir).meta["gradient_engine"] == "hooks"  # a bare parameter: the raw-parameter engine
    fit(tiny(extra=_EXTRA["mixed"]()), loader(ds), InfluenceTracker(log_dir, record_gradients=True, overwrite=True),
        epochs=1)
    assert InfluenceLog(log_dir).meta["gradient_engine"] == "mixed"
    with pytest.raises(ValueError, match=r"no hook captures \['extra.weight_hh', 'extra.bias_ih'"):
        fit(tiny(extra=_EXTRA["mixed"]()), loader(ds),
            InfluenceTracker(log_dir, record_gradients=True, gradient_engine="hooks", overwrite=True))


@pytest.mark.parametrize(
    "kwargs,match",
    [({"every_n_steps": 0}, "every_n_steps"), ({"projection_dim": 0}, "projection_dim"),
     ({"storage_dtype": "bfloat16"}, "storage_dtype"), ({"record_hvp": True}, "needs record_gradients"),
     ({"gradient_engine": "magic"}, "gradient_engine"), ({"checkpoint_every_n_steps": -1}, "checkpoint_every_n_steps"),
     ({"compression": "zstd"}, "compression"), ({"hvp_scheme": "backward"}, "hvp_scheme")],
)
def test_invalid_configuration_fails_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        InfluenceTracker("unused", **kwargs)


def test_existing_log_is_not_overwritten_silently(log_dir):
    ds = make_data(12)
    fit(tiny(), loader(ds), InfluenceTracker(log_dir), epochs=1)
    with pytest.raises(FileExistsError, match=r"already holds an influence log \(run [0-9a-f]+, steps 0\.\.1\)"):
        fit(tiny(), loader(ds), InfluenceTracker(log_dir), epochs=1)  # names what it would replace


@pytest.mark.parametrize("grads", [False, True])
def test_loss_observer_hooks_the_backward_only_when_gradients_are_recorded(grads):
    """Without gradient rows the step's backward runs no tracker hook on the loss (nothing would read it)."""
    from lightning_influence.capture.own_pass import LossObserver

    module = tiny()
    observer = LossObserver(module, grads=grads)
    observer.capturing = True
    x, y = make_data()[:6]
    module.per_sample_loss((x, y)).mean().backward()
    assert len(observer.losses) == 1 and len(observer.grads) == int(grads)
    if grads:
        assert torch.equal(observer.grads[0], torch.full((6,), 1 / 6, dtype=torch.float64))
    observer.remove()


@pytest.mark.parametrize("level", ["ids", "gradients"])
def test_train_mode_batchnorm_is_recorded_and_replayed_in_train_mode(log_dir, level):
    """With allow_train_batchnorm (or at ids + lr, which records nothing per sample) the log names the train-mode
    BatchNorm layers; replay runs every step in train mode though the module is given in eval mode and no step drew
    random numbers (it replayed such steps in eval mode: the running statistics instead of the batch's); the
    checkpoints hold the running statistics (tests/test_batchnorm_state.py), so loading one warns of nothing."""
    from lightning_influence.replay import checkpoint_params, replay

    kw = (dict(record_losses=False) if level == "ids" else
          dict(record_gradients=True, params=["net.0.*", "net.4.*"], allow_train_batchnorm=True))
    ds = make_data(12)
    fit(tiny(batchnorm=True), loader(ds), InfluenceTracker(log_dir, checkpoint_every_n_steps=1, **kw), epochs=2)
    log = InfluenceLog(log_dir)
    assert log.meta["train_batchnorm"] == ["net.1"]
    module = tiny(batchnorm=True).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [rs.step for rs in replay(log, module, WithIds(ds), 0, None, tolerance=0.0)][-1] == log.num_steps
    assert not module.training and not module.net[1].training  # the mode given is restored
    fit(tiny(), loader(ds), InfluenceTracker(log_dir + "-plain", **kw), epochs=1)
    plain = InfluenceLog(log_dir + "-plain")
    assert "train_batchnorm" not in plain.meta
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        checkpoint_params(plain, tiny(), 0)


def test_the_optimizer_is_checked_once_at_the_fit_start(log_dir, monkeypatch):
    """check_optimizer (the update rule of the run's optimizer, its param groups) ran twice at every fit start:
    check_optimizers and UpdateWatch.install each called it; the rule is now handed on."""
    import lightning_influence.tracker_checks as checks

    calls = []
    real = checks.check_optimizer
    monkeypatch.setattr(checks, "check_optimizer", lambda opt: calls.append(opt) or real(opt))
    fit(tiny(), loader(make_data(12)), InfluenceTracker(log_dir), epochs=1)
    assert len(calls) == 1
