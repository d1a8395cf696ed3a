"""Random state (issue 11, item 1): recorded at each micro-batch's forward, restored by every re-evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from conftest import fit, loader, make_data, no_engine_layer, tiny
from lightning_influence import InfluenceLog, InfluenceTracker
from lightning_influence.step import rng
from lightning_influence.step.micro import MicroBatch, per_sample_grads_masked
from lightning_influence.step.precision import FULL


def _masked_brute_force(module: nn.Module, params: dict[str, np.ndarray], ds, ids: np.ndarray,
                        cpu_state: np.ndarray) -> torch.Tensor:
    """Per-sample gradients of one micro-batch with the masks its forward drew: one batched forward from the
    recorded CPU state, then one autograd call per sample."""
    with torch.no_grad():
        for n, p in module.named_parameters():
            p.copy_(torch.from_numpy(params[n]))
    x = torch.stack([ds[int(i)][0] for i in ids])
    y = torch.stack([ds[int(i)][1] for i in ids])
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(torch.from_numpy(cpu_state))
        losses = module.per_sample_loss((x, y))
    rows = []
    for i in range(len(ids)):
        g = torch.autograd.grad(losses[i], list(module.parameters()), retain_graph=True)
        rows.append(torch.cat([t.reshape(-1) for t in g]))
    return torch.stack(rows)


@pytest.mark.parametrize("engine", ["hooks", "vmap", "mixed"])
def test_dropout_rows_are_taken_with_the_training_masks_and_training_is_unchanged(tmp_path, engine):
    ds = make_data(18)

    def model():  # "mixed": hooks for the Linear layers, the RNN cell's parameters (no hook) from the masked batched pass
        return tiny(dropout=0.3, extra=no_engine_layer().double() if engine == "mixed" else None)

    plain = model()
    fit(plain, loader(ds), None, epochs=2, accumulate_grad_batches=2)
    tracked = model()
    tracker = InfluenceTracker(str(tmp_path / "log"), record_gradients=True, record_hvp=True, checkpoint_every_n_steps=1,
                               gradient_engine="auto" if engine == "mixed" else engine, storage_dtype="float64")
    fit(tracked, loader(ds), tracker, epochs=2, accumulate_grad_batches=2)
    for (n, a), (_, b) in zip(plain.named_parameters(), tracked.named_parameters()):
        assert torch.equal(a, b), n  # the tracker's own passes (HVP products included) drew nothing from the stream
    log = InfluenceLog(tmp_path / "log")
    assert log.meta["precision"]["autocast_dtype"] is None and log.meta["gradient_engine"] == engine
    module = model()
    checked = 0
    for rec in log.iter_steps(fields=("grad", "loss")):
        micro = log.micro_batches(rec.step)
        assert [len(m.ids) for m in micro] == ([6, 6] if rec.step % 2 == 0 else [6])  # 3 batches an epoch, accumulate 2
        np.testing.assert_array_equal(np.concatenate([m.ids for m in micro]), rec.ids)
        rows = []
        for m in micro:
            assert m.cpu_rng is not None and m.cuda_rng is None  # dropout drew from the CPU generator
            rows.append(_masked_brute_force(module, log.checkpoint(rec.step), ds, m.ids, m.cpu_rng))
        np.testing.assert_allclose(rec.grads, torch.cat(rows).numpy(), rtol=1e-10, atol=1e-12)
        checked += 1
    assert checked == log.num_steps == 4


def test_a_forward_that_draws_nothing_stores_no_state(tmp_path):
    fit(tiny(), loader(make_data(12)), InfluenceTracker(str(tmp_path / "log")), epochs=1)
    log = InfluenceLog(tmp_path / "log")
    assert all(m.cpu_rng is None and m.cuda_rng is None for t in range(log.num_steps) for m in log.micro_batches(t))


def test_restored_sets_the_state_and_leaves_the_callers_generator_as_found():
    torch.manual_seed(5)
    state = rng.capture()
    expected = torch.rand(3)
    torch.manual_seed(7)
    caller = torch.get_rng_state()
    with rng.restored(state):
        assert torch.equal(torch.rand(3), expected)
    assert torch.equal(torch.get_rng_state(), caller)
    with rng.restored(None):
        torch.rand(2)
    assert torch.equal(torch.get_rng_state(), caller)
    torch.manual_seed(1)
    before = rng.capture()
    assert not rng.drawn(before).drew
    torch.rand(1)
    assert rng.drawn(before).drew and rng.drawn(before).cpu is before.cpu


def test_masked_per_sample_gradients_equal_one_backward_per_sample_with_the_same_masks():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(5, 9), nn.GELU(), nn.Dropout(0.4), nn.Linear(9, 3)).double()
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.randint(0, 3, (7,))

    def loss_fn(m, b):
        return nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")

    state = rng.capture()
    names = [n for n, _ in module.named_parameters()]
    got = per_sample_grads_masked(module, loss_fn, MicroBatch(np.arange(7), (x, y), state), FULL, names, chunk_size=3)
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(torch.from_numpy(state.cpu))
        losses = loss_fn(module, (x, y))
    want = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[i], list(module.parameters()),
                                                                               retain_graph=True)]) for i in range(7)])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------ estimators on a dropout run
def _query(val):
    def f(m):  # the query is evaluated without dropout
        was = m.training
        m.eval()
        try:
            return nn.functional.cross_entropy(m(val[0]), val[1])
        finally:
            m.train(was)
    return f


@pytest.fixture(scope="module")
def dropout_run(tmp_path_factory):
    from lightning_influence import WithIds

    path = tmp_path_factory.mktemp("dropout") / "log"
    ds = make_data(24)
    tracker = InfluenceTracker(str(path), record_gradients=True, record_hvp=True, checkpoint_every_n_steps=2,
                               storage_dtype="float64")
    fit(tiny(dropout=0.2, lr=0.2), loader(ds), tracker, epochs=4, accumulate_grad_batches=2)
    val = make_data(8, seed=1).tensors
    return InfluenceLog(path), WithIds(ds), _query(val)


def test_replay_reproduces_a_dropout_run_bit_for_bit(dropout_run):
    from lightning_influence.replay import DriftReport, ReplayMismatchError, replay

    log, ds, _ = dropout_run
    report = DriftReport()
    steps = [rs.step for rs in replay(log, tiny(dropout=0.2), ds, 0, None, tolerance=0.0, report=report)]
    assert steps == list(range(log.num_steps + 1)) and log.num_steps == 8
    assert [c[0] for c in report.checkpoints] == [2, 4, 6, 8] and report.max == 0.0
    # the masks matter: without the recorded random state the replay departs at the first checkpoint
    log.micro_batches, real = (lambda t: [type(m)(m.ids) for m in real(t)]), log.micro_batches
    try:
        with pytest.raises(ReplayMismatchError, match="at step 2"):
            list(replay(log, tiny(dropout=0.2), ds, 0, None, tolerance=0.0))
    finally:
        del log.micro_batches


def test_dit_and_diffin_on_a_dropout_run_agree_with_replay_loo(dropout_run):
    from lightning_influence.estimators import dit
    from lightning_influence.estimators.diffin import diffin
    from lightning_influence.evaluation import replay_loo

    log, ds, query = dropout_run
    loo = replay_loo(log, tiny(dropout=0.2), ds, query, grid=[0, log.num_steps])
    assert loo.info["replay_drift"]["max"] < 1e-12  # the stacked copies' batched kernels round differently, that is all
    y = loo.window(0, log.num_steps)
    assert np.abs(y).max() > 1e-3
    exact = dit(log, query, module=tiny(dropout=0.2), train_data=ds, hvp="exact", tolerance=0.0)
    fd = dit(log, query, module=tiny(dropout=0.2), train_data=ds, hvp="fd", tolerance=0.0)
    assert exact.info["replay_drift"]["max"] == 0.0
    for scores in (exact, fd):
        assert np.corrcoef(scores.scores[:, 0], y)[0, 1] > 0.99
    np.testing.assert_allclose(fd.scores, exact.scores, rtol=1e-4, atol=1e-7 * np.abs(exact.scores).max())
    for hvp in ("fd", "exact"):
        d = diffin(log, query, module=tiny(dropout=0.2), train_data=ds, form="step", hvp=hvp)
        assert np.corrcoef(d.scores[:, 0], y)[0, 1] > 0.9, hvp


# ------------------------------------------------------------------------ mixed precision, inputs
def test_bf16_mixed_run_replays_bit_for_bit_under_its_autocast(tmp_path):
    from lightning_influence import WithIds
    from lightning_influence.replay import ReplayMismatchError, replay

    def model():
        torch.manual_seed(0)
        from conftest import TinyClassifier

        return TinyClassifier(dropout=0.1, lr=0.2, momentum=0.9).float()

    ds = make_data(24, dtype=torch.float32)
    path = tmp_path / "log"
    fit(model(), loader(ds), InfluenceTracker(str(path), record_gradients=True, checkpoint_every_n_steps=2), epochs=2,
        precision="bf16-mixed", accumulate_grad_batches=2)
    log = InfluenceLog(path)
    assert log.meta["precision"] == {"name": "bf16-mixed", "autocast_device": "cpu", "autocast_dtype": "bfloat16",
                                     "grad_scaler": False}
    assert [rs.step for rs in replay(log, model(), WithIds(ds), 0, None, tolerance=0.0)][-1] == log.num_steps
    # the autocast matters: replayed in float32 the run departs at the first checkpoint
    log.meta["precision"] = None
    with pytest.raises(ReplayMismatchError, match="at step 2"):
        list(replay(log, model(), WithIds(ds), 0, None, tolerance=0.0))


class _Augmented(torch.utils.data.Dataset):
    """``ds[i]`` with random noise (a random augmentation): not reproducible from the ids."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        x, y = self.ds[i]
        return x + 0.1 * torch.randn_like(x), y


def test_random_augmentation_is_refused_at_the_first_step_unless_inputs_are_stored(tmp_path):
    from lightning_influence import WithIds
    from lightning_influence.replay import replay

    ds = _Augmented(make_data(18))
    with pytest.raises(RuntimeError, match=r"ds\[0\] on two calls.*store_inputs=True"):
        fit(tiny(), loader(ds), InfluenceTracker(str(tmp_path / "refused")), epochs=1)
    plain = tiny(dropout=0.2)
    fit(plain, loader(ds), None, epochs=2)
    tracked = tiny(dropout=0.2)
    fit(tracked, loader(ds), InfluenceTracker(str(tmp_path / "log"), store_inputs=True, checkpoint_every_n_steps=3),
        epochs=2)
    for a, b in zip(plain.parameters(), tracked.parameters()):
        assert torch.equal(a, b)  # storing inputs (and the dataset check, not run here) leaves training unchanged
    log = InfluenceLog(tmp_path / "log")
    assert log.meta["inputs_stored"] and all(m.inputs for m in log.micro_batches(0))
    # replay needs no dataset: the stored augmented inputs reproduce the run exactly
    steps = [rs.step for rs in replay(log, tiny(dropout=0.2), None, 0, None, tolerance=0.0)]
    assert steps[-1] == log.num_steps == 6
    with pytest.raises(Exception, match="at step 3"):  # the dataset by id gives other (freshly augmented) inputs
        log.micro_batches, real = (lambda t: [type(m)(m.ids, m.cpu_rng) for m in real(t)]), log.micro_batches
        list(replay(log, tiny(dropout=0.2), WithIds(ds), 0, None, tolerance=0.0))


# ------------------------------------------------------------------------------------ attention
class _TinyTransformer(nn.Module):
    """Embedding, LayerNorm, one TransformerEncoderLayer (dropout 0.1), mean pooling, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tok = nn.Embedding(7, 8)
        self.norm = nn.LayerNorm(8)
        self.enc = nn.TransformerEncoderLayer(8, nhead=2, dim_feedforward=16, dropout=0.1, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.norm(self.tok(x))).mean(1))

    def per_sample_loss(self, batch) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch[0]), batch[1], reduction="none")


@pytest.mark.parametrize("train_mode", [True, False])
def test_exact_hvp_through_attention_with_the_training_masks(train_mode):
    """H v and (<g_i, v>)_i through a TransformerEncoderLayer (scaled_dot_product_attention), with its dropout masks in
    train mode, equal central differences of plain gradients taken under the same random state (float64); in eval
    mode (no dropout, the fused attention kernel) forward-over-reverse also works, through the math kernel only."""
    from torch.func import grad, jvp

    from lightning_influence.step.micro import Step

    module = _TinyTransformer().double().train(train_mode)
    x, y = torch.randint(0, 7, (5, 6)), torch.randint(0, 3, (5,))
    step = _step_of(x, y) if train_mode else Step(0, [MicroBatch(np.arange(5), (x, y))])  # eval mode draws nothing
    loss_fn = lambda m, b: m.per_sample_loss(b)  # noqa: E731
    params = {n: p.detach() for n, p in module.named_parameters()}
    v = {n: torch.randn_like(p) for n, p in params.items()}
    w = torch.rand(5, dtype=torch.float64)
    (hv,), jv = step.curvature_products(module, loss_fn, params, w, [v])

    def grads_and_losses(p):
        leaves = {n: t.clone().requires_grad_(True) for n, t in p.items()}
        losses = step.losses(module, loss_fn, leaves)  # the recorded random state: the training masks
        return torch.autograd.grad((w * losses).sum(), list(leaves.values())), losses.detach()

    eps = 1e-6
    (gp, lp), (gm, lm) = [grads_and_losses({n: params[n] + s * eps * v[n] for n in params}) for s in (1, -1)]
    for (n, a), b, c in zip(hv.items(), gp, gm):
        torch.testing.assert_close(a, (b - c) / (2 * eps), rtol=1e-6, atol=1e-8, msg=n)
    torch.testing.assert_close(jv[0], (lp - lm) / (2 * eps), rtol=1e-6, atol=1e-8)
    if not train_mode:
        def loss(p, exact):
            return (w * step.losses(module, loss_fn, p, exact=exact)).sum()

        _, fwd = jvp(grad(lambda p: loss(p, True)), (params,), (v,))
        for n in hv:
            torch.testing.assert_close(fwd[n], hv[n], rtol=1e-9, atol=1e-11)
        with pytest.raises(Exception, match="forward AD|not implemented|jvp"):  # the fused kernel has no forward AD
            jvp(grad(lambda p: loss(p, False)), (params,), (v,))


def _step_of(x, y):
    from lightning_influence.step.micro import Step

    return Step(0, [MicroBatch(np.arange(len(y)), (x, y), rng.capture())])


def test_16_mixed_grad_scaler_scales_and_skipped_steps_replay_bit_for_bit(tmp_path):
    """float16 autocast with a GradScaler on the CPU (the GPU code path): the factor of every step and the steps the
    scaler skipped (non-finite gradients) are recorded; replay scales, unscales and skips as the scaler did."""
    from lightning.pytorch.plugins import MixedPrecision

    from conftest import TinyClassifier
    from lightning_influence import WithIds
    from lightning_influence.estimators import dit
    from lightning_influence.replay import ReplayMismatchError, replay

    def model():
        torch.manual_seed(0)
        return TinyClassifier(dropout=0.1, lr=0.2).float()

    ds = make_data(24, dtype=torch.float32)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 20)  # overflows float16 gradients at first: skipped steps
    fit(model(), loader(ds), InfluenceTracker(str(tmp_path / "log"), record_gradients=True, checkpoint_every_n_steps=1),
        epochs=2, plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
    log = InfluenceLog(tmp_path / "log")
    assert log.meta["precision"] == {"name": "16-mixed", "autocast_device": "cpu", "autocast_dtype": "float16",
                                     "grad_scaler": True}
    skipped = [log.skipped(t) for t in range(log.num_steps)]
    assert skipped == [True, True, False, False, False, True, False, False]
    assert [log.grad_scale(t) for t in range(3)] == [2.0 ** 20, 2.0 ** 19, 2.0 ** 18]  # halved after each skip
    for t in np.flatnonzero(skipped):  # θ did not move, and no gradient row was stored
        assert all(np.array_equal(a, b) for a, b in zip(log.checkpoint(t).values(), log.checkpoint(t + 1).values()))
        assert not log.has_grads(t)
    assert [rs.step for rs in replay(log, model(), WithIds(ds), 0, None, tolerance=0.0)][-1] == log.num_steps
    scores = dit(log, _query(make_data(8, seed=1, dtype=torch.float32).tensors), module=model(), train_data=WithIds(ds),
                 tolerance=0.0)
    assert np.isfinite(scores.scores).all() and np.abs(scores.scores).max() > 0
    log.skipped = lambda t: False  # replaying the skipped steps as if they had run departs at once
    with pytest.raises(ReplayMismatchError, match="at step 1"):
        list(replay(log, model(), WithIds(ds), 0, None, tolerance=0.0))


def test_a_damaged_random_state_is_detected(tmp_path):
    import h5py

    from lightning_influence.log.format import LogFormatError

    fit(tiny(dropout=0.3), loader(make_data(12)), InfluenceTracker(str(tmp_path / "log")), epochs=1)
    seg = next((tmp_path / "log" / "rank-0").glob("seg-*.h5"))
    with h5py.File(seg, "r+") as f:  # one bit of the CPU generator state of the first micro-batch
        f["rng/cpu"][0, 100] ^= 1
    log = InfluenceLog(tmp_path / "log")
    with pytest.raises(LogFormatError, match="micro-batch rows of step 0 fail their CRC-32"):
        log.micro_batches(0)
    assert log.micro_batches(1)[0].cpu_rng is not None  # the other steps still read


def test_per_sample_hvps_through_attention_with_the_training_masks():
    """Diff-In's exact per-sample H_i v of a step: central differences of the per-sample gradients taken with the
    training masks (float64, a TransformerEncoderLayer with dropout)."""
    from lightning_influence.step.micro import per_sample_grads_masked
    from lightning_influence.step.precision import FULL

    module = _TinyTransformer().double().train()
    x, y = torch.randint(0, 7, (5, 6)), torch.randint(0, 3, (5,))
    step = _step_of(x, y)
    loss_fn = lambda m, b: m.per_sample_loss(b)  # noqa: E731
    params = {n: p.detach() for n, p in module.named_parameters()}
    v = {n: torch.randn_like(p) for n, p in params.items()}
    names = ["enc.linear1.weight", "tok.weight"]
    hv = step.per_sample_curvature(module, loss_fn, params, v, names)
    eps = 1e-6

    def rows(sign):
        p = {n: params[n] + sign * eps * v[n] for n in params}
        return per_sample_grads_masked(module, loss_fn, step.micro[0], FULL, names, p, chunk_size=3)

    fd = (rows(1) - rows(-1)) / (2 * eps)
    got = torch.cat([hv[n].reshape(5, -1) for n in names], dim=1)
    torch.testing.assert_close(got, fd, rtol=1e-6, atol=1e-8)


def test_every_replaying_estimator_reports_its_drift(dropout_run):
    from lightning_influence.estimators import dit
    from lightning_influence.estimators.diffin import diffin

    log, ds, query = dropout_run
    window = (2, log.num_steps)  # the odd steps are replayed from the checkpoints of the even ones
    for scores in (dit(log, query, module=tiny(dropout=0.2), train_data=ds, window=window),
                   diffin(log, query, module=tiny(dropout=0.2), train_data=ds, form="step", window=window)):
        drift = scores.info["replay_drift"]
        assert drift["checkpoints_compared"] > 0 and drift["max"] == 0.0 and drift["max_abs"] == 0.0, scores.method


def test_a_micro_batch_table_that_does_not_tile_its_steps_is_refused(tmp_path):
    import h5py

    from lightning_influence.log.format import LogFormatError

    fit(tiny(), loader(make_data(12)), InfluenceTracker(str(tmp_path / "log")), epochs=1)
    seg = next((tmp_path / "log" / "rank-0").glob("seg-*.h5"))
    with h5py.File(seg, "r+") as f:  # a writer that lost the last micro-batch row
        f["micro/size"].resize(len(f["micro/size"]) - 1, axis=0)
    with pytest.raises(LogFormatError, match="micro-batch offsets/counts do not tile"):
        InfluenceLog(tmp_path / "log")


def test_exact_kernels_are_per_thread_and_leave_the_process_flags_alone():
    """exact_kernels from four threads at once: the process-wide SDPA flags end as they began (``sdpa_kernel`` per
    thread left the fused kernels switched off when the threads' enters and exits interleaved), and inside it
    attention gives the values ``sdpa_kernel(MATH)`` gives."""
    import threading

    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lightning_influence.step.micro import exact_kernels

    flags = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
             torch.backends.cuda.math_sdp_enabled())

    def churn():
        for _ in range(3000):
            with exact_kernels():
                pass

    threads = [threading.Thread(target=churn) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
            torch.backends.cuda.math_sdp_enabled()) == flags
    q, k, v = (torch.randn(2, 3, 5, 4, dtype=torch.float64) for _ in range(3))
    for kw in ({"attn_mask": torch.rand(5, 5) > 0.3, "dropout_p": 0.3}, {"is_causal": True, "scale": 0.7}):
        torch.manual_seed(1)
        with sdpa_kernel(SDPBackend.MATH):
            expected = F.scaled_dot_product_attention(q, k, v, **kw)
        torch.manual_seed(1)
        with exact_kernels():
            got = F.scaled_dot_product_attention(q, k, v, **kw)
        assert torch.equal(got, expected)


def test_dit_on_stored_inputs_needs_no_dataset(tmp_path):
    """``store_inputs=True`` promises estimators that need no dataset (a randomly augmented one cannot give the inputs
    back): DIT refused ``train_data=None`` up front although its replay and step batches read the stored inputs; it
    now runs, and equals the call given a dataset (whose samples the stored inputs override)."""
    from lightning_influence.estimators import dit, timeline
    from lightning_influence.queries import mean_loss

    ds = _Augmented(make_data(12))
    fit(tiny(dropout=0.2, momentum=0.9), loader(ds), InfluenceTracker(str(tmp_path), store_inputs=True,
                                                                       checkpoint_every_n_steps=2), epochs=1)
    log = InfluenceLog(tmp_path)
    query = mean_loss(make_data(4, seed=5).tensors)
    got = dit(log, query, module=tiny(dropout=0.2, momentum=0.9))
    given = dit(log, query, module=tiny(dropout=0.2, momentum=0.9), train_data=ds)
    assert np.isfinite(got.column(0)).all() and np.abs(got.column(0)).max() > 0
    np.testing.assert_array_equal(got.column(0), given.column(0))
    tl = timeline(log, query, module=tiny(dropout=0.2, momentum=0.9))  # F_j(T) - F_j(0): the whole run's DIT
    np.testing.assert_allclose(tl.values[:, -1, 0] - tl.values[:, 0, 0], got.column(0), rtol=1e-9, atol=1e-15)
    with pytest.raises(ValueError, match="DIT needs `train_data`"):  # without stored inputs it is still needed
        fit(tiny(), loader(make_data(12)), InfluenceTracker(str(tmp_path / "plain")), epochs=1)
        dit(InfluenceLog(tmp_path / "plain"), query, module=tiny())


def test_diffin_on_stored_inputs_needs_no_dataset(tmp_path):
    """As DIT: Diff-In on a log with stored inputs runs with ``train_data=None`` wherever it reads only the steps'
    batches (a query's step and published forms, self-influence from the batch rows; replayed between checkpoints)
    and equals the call given the dataset; what evaluates samples by id is refused, saying what to do, and a log
    without stored inputs still needs the dataset."""
    from lightning_influence.estimators import diffin, diffin_self_influence
    from lightning_influence.queries import mean_loss

    ds = _Augmented(make_data(12))
    fit(tiny(dropout=0.2), loader(ds), InfluenceTracker(str(tmp_path), store_inputs=True, record_gradients=True,
                                                        checkpoint_every_n_steps=2), epochs=1)
    log = InfluenceLog(tmp_path)
    query = mean_loss(make_data(4, seed=5).tensors)
    for fn, kw in ((diffin, {"query": query, "form": "published"}), (diffin, {"query": query, "form": "step"}),
                   (diffin_self_influence, {"form": "published", "samples": "batch"})):
        got = fn(log, module=tiny(dropout=0.2), **kw)
        given = fn(log, module=tiny(dropout=0.2), train_data=ds, **kw)
        assert np.isfinite(got.column(0)).all() and np.abs(got.column(0)).max() > 0
        np.testing.assert_array_equal(got.column(0), given.column(0))
    with pytest.raises(ValueError, match=r"samples='all' evaluates every training sample by id, which needs `train_data`"):
        diffin(log, query, module=tiny(dropout=0.2), form="published", samples="all")
    with pytest.raises(ValueError, match=r"self-influence in the step form .* needs `train_data`.*samples='batch'"):
        diffin_self_influence(log, module=tiny(dropout=0.2))
    fit(tiny(), loader(make_data(12)), InfluenceTracker(str(tmp_path / "plain"), record_gradients=True), epochs=1)
    with pytest.raises(ValueError, match=r"Diff-In needs `train_data`.*store_inputs=True"):
        diffin(InfluenceLog(tmp_path / "plain"), query, module=tiny())


def test_cli_diffin_and_dit_on_stored_inputs_need_no_training_set(tmp_path, capsys):
    """``query --builder`` returning the model and the validation set only: on a log with stored inputs, Diff-In and
    DIT run from those (the CLI asked for the training set and stopped: 'no training set'), as the API without
    train_data; what needs samples by id says so (exit code 2)."""
    import functools
    import json

    from lightning_influence.cli import main
    from lightning_influence.estimators import diffin, dit
    from lightning_influence.queries import mean_loss
    from tests._cli_run import scores_of

    ds, val = _Augmented(make_data(12)), make_data(4, seed=5)
    tracker = InfluenceTracker(str(tmp_path / "log"), store_inputs=True, store_data=False, record_gradients=True,
                               checkpoint_every_n_steps=2)  # no data.pt: the CLI has no training set
    fit(tiny(), loader(ds), tracker, epochs=1)
    builder = tmp_path / "build.py"
    builder.write_text("import torch\nfrom conftest import make_data, tiny\n"
                       "def build(log):\n    return {'module': tiny(), 'val_data': make_data(4, seed=5).tensors}\n")
    log = InfluenceLog(tmp_path / "log")
    for method, fn in (("diffin-step", functools.partial(diffin, form="step")), ("dit", dit)):
        code = main(["query", str(tmp_path / "log"), "-m", method, "--builder", f"{builder}:build", "-k", "0",
                     "-f", "json", "-q"])
        out, err = capsys.readouterr()
        assert code == 0, err
        expected = fn(log, mean_loss(val.tensors), module=tiny()).column(0)
        np.testing.assert_allclose(scores_of(json.loads(out), 12), expected, rtol=1e-12, atol=1e-15)
    code = main(["query", str(tmp_path / "log"), "-m", "diffin-self", "--builder", f"{builder}:build", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "self-influence in the step form" in err and "needs `train_data`" in err, err
