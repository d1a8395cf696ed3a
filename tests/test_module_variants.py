"""Model constructions users train with (parametrizations, checkpointing, adapters, recurrent layers, ...): the logged
rows, DIT and replay against independent references (float64 autograd, finite differences of replay)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from conftest import TinyClassifier, fit, loader, make_data, tiny
from lightning_influence import InfluenceLog, InfluenceTracker, WithIds, dit
from lightning_influence.capture.hvp import exact_hvp
from lightning_influence.evaluation.ground_truth import replay_loo
from lightning_influence.queries import mean_loss
from lightning_influence.step.micro import exact_kernels


def _weight_norm_loss(composite: bool):
    x = torch.randn(7, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def loss(p):
        w = p["v"] * (p["g"] / p["v"].norm(dim=1, keepdim=True)) if composite else torch._weight_norm(p["v"], p["g"], 0)
        return torch.tanh(x @ w.T).pow(2).sum()
    return loss


def test_weight_norm_hvp_is_exact_in_every_hvp_pass():
    """torch's fused ``_weight_norm`` has no forward AD and a wrong double backward in ``v``: the HVP passes run its
    composite form. Reference: reverse-over-reverse through the hand-written ``v g / ‖v‖``."""
    g = torch.Generator().manual_seed(0)
    p = {"v": torch.randn(5, 4, dtype=torch.float64, generator=g), "g": torch.randn(5, 1, dtype=torch.float64, generator=g)}
    t = {n: torch.randn(a.shape, dtype=torch.float64, generator=g) for n, a in p.items()}
    leaves = {n: a.clone().requires_grad_() for n, a in p.items()}
    first = torch.autograd.grad(_weight_norm_loss(True)(leaves), list(leaves.values()), create_graph=True)
    ref = torch.autograd.grad(sum((a * t[n]).sum() for a, n in zip(first, leaves)), list(leaves.values()))
    ref = dict(zip(leaves, ref))
    fwd = exact_hvp(_weight_norm_loss(False), p, t)  # forward-over-reverse: NotImplementedError before
    leaves = {n: a.clone().requires_grad_() for n, a in p.items()}
    with exact_kernels():  # reverse-over-reverse (Step.curvature_products): 80% off in v before
        first = torch.autograd.grad(_weight_norm_loss(False)(leaves), list(leaves.values()), create_graph=True)
        rr = dict(zip(leaves, torch.autograd.grad(sum((a * t[n]).sum() for a, n in zip(first, leaves)), list(leaves.values()))))
    for n in p:
        torch.testing.assert_close(fwd[n], ref[n], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rr[n], ref[n], rtol=1e-12, atol=1e-12)
    with exact_kernels():  # the forward is the same function
        torch.testing.assert_close(_weight_norm_loss(False)(p), _weight_norm_loss(True)(p), rtol=1e-14, atol=0)


class WeightNormed(TinyClassifier):
    def __init__(self) -> None:
        super().__init__(d_in=5, hidden=6, classes=3, lr=0.5)
        weight_norm(self.net[0])
        weight_norm(self.net[-1])


def test_dit_on_a_weight_normed_model_is_the_derivative_of_replay(tmp_path):
    """DIT (linear removal) equals the derivative of replay in the removed sample's weight, by finite differences
    (``removal_weight = 1 − ε``): 2.5e-3 off before, through torch's weight-norm double backward."""
    data, val = make_data(24, seed=0), make_data(12, seed=1)
    torch.manual_seed(0)
    module = WeightNormed().double()
    tracker = InfluenceTracker(str(tmp_path / "log"), checkpoint_every_n_steps=1, storage_dtype="float64")
    fit(module, loader(data), tracker, epochs=2)
    log = InfluenceLog(tmp_path / "log")
    query, ids, eps = mean_loss(tuple(val.tensors)), [0, 3, 7, 11], 1e-6
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        scores = dit(log, query, module=WeightNormed().double(), train_data=WithIds(data), removal="linear").column()[ids]
    assert not [w for w in seen if "DIT takes the buffers" in str(w.message)]  # weight norm keeps no state
    truth = replay_loo(log, WeightNormed().double(), WithIds(data), query, sample_ids=ids, removal_weight=1 - eps)
    derivative = truth.values[:, -1, 0] / eps
    np.testing.assert_allclose(scores, derivative, rtol=1e-4, atol=1e-4 * np.abs(derivative).max())


def assert_rows_are_autograd(log: InfluenceLog, make, data, rtol: float = 1e-10) -> None:
    """Every logged row equals autograd on its sample alone at the step's checkpoint (buffers too), projected as
    logged: the float64 reference, one sample at a time."""
    names, projector, reference = log.param_names, log.projector(), make()
    for rec in log.iter_steps(fields=("grad",)):
        state = {n: torch.from_numpy(np.asarray(v)) for n, v in log.checkpoint(rec.step).items()}
        state.update({n: torch.from_numpy(np.asarray(v)) for n, v in (log.checkpoint_buffers(rec.step) or {}).items()})
        rows = []
        for i in rec.ids:
            reference.load_state_dict(state, strict=False)  # a forward may change buffers: each sample from θ_t's
            params = dict(reference.named_parameters())
            loss = reference.per_sample_loss(tuple(t[int(i)][None] for t in data.tensors))[0]
            grads = torch.autograd.grad(loss, [params[n] for n in names])
            rows.append(projector.project({n: g[None] for n, g in zip(names, grads)}))
        np.testing.assert_allclose(rec.grads, torch.cat(rows).numpy(), rtol=rtol, atol=rtol * np.abs(rec.grads).max())


class RawAdapter(TinyClassifier):
    """A frozen base with LoRA matrices as raw parameters: ``x @ A.T`` then ``F.linear(·, B)`` (on tokens with
    ``tokens``), or through ``torch.einsum``, which the raw-parameter engine does not know (every hooked tensor is
    demoted at the first step)."""

    def __init__(self, use: str = "einsum", tokens: bool = False) -> None:
        super().__init__(d_in=5, hidden=6, classes=3, lr=0.3)
        self.net.requires_grad_(False)
        self.use, self.tokens = use, tokens
        self.A, self.B = nn.Parameter(0.3 * torch.randn(2, 5)), nn.Parameter(0.3 * torch.randn(3, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use == "einsum":
            return self.net(x) + torch.einsum("br,or->bo", torch.einsum("bi,ri->br", x, self.A), self.B)
        t = torch.stack([x, x.flip(1)], 1) if self.tokens else x  # (B, 2, 5): two tokens a sample
        low = nn.functional.linear(t @ self.A.T, self.B)
        return self.net(x) + (low.mean(1) if self.tokens else low)


def test_raw_adapter_demoted_entirely_at_the_first_step_keeps_training(tmp_path):
    """The first step's self-check ran autograd on no tensor at all and crashed the fit (``inputs`` of ``grad()``
    empty) when every hooked tensor had been demoted: now vmap takes all of them and the rows are exact."""
    data = make_data(18, seed=0)
    torch.manual_seed(0)
    tracker = InfluenceTracker(str(tmp_path / "log"), record_gradients=True, projection_dim=4,
                               checkpoint_every_n_steps=1, storage_dtype="float64")
    with pytest.warns(UserWarning, match="raw-parameter engine does not know"):
        fit(RawAdapter().double(), loader(data), tracker, epochs=1)
    log = InfluenceLog(tmp_path / "log")
    assert log.param_names == ["A", "B"] and log.meta["gradient_engines"] == {"A": "vmap", "B": "vmap"}
    assert_rows_are_autograd(log, lambda: RawAdapter().double(), data)


class Recurrent(TinyClassifier):
    """A text classifier: ``nn.Embedding(padding_idx=0)``, an LSTM or a GRU over packed sequences (no layer engine and
    no vmap batching rule: ``aten::lstm``, ``.item()`` in ``pack_padded_sequence``), a linear head."""

    def __init__(self, cell: str = "lstm") -> None:
        super().__init__(lr=0.5)
        self.net = None
        self.cell, self.emb = cell, nn.Embedding(9, 4, padding_idx=0)
        self.rnn, self.head = (nn.LSTM if cell == "lstm" else nn.GRU)(4, 5, batch_first=True), nn.Linear(5, 2)

    def per_sample_loss(self, batch):
        tokens, y, lengths = batch[0], batch[1], batch[2]
        e = self.emb(tokens)
        if self.cell == "gru":
            e = nn.utils.rnn.pack_padded_sequence(e, lengths, batch_first=True, enforce_sorted=False)
        _, h = self.rnn(e)
        h = h[0] if isinstance(h, tuple) else h
        return nn.functional.cross_entropy(self.head(h[-1]), y, reduction="none")


def _token_data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    tokens, lengths = torch.randint(1, 9, (n, 6), generator=g), torch.randint(2, 7, (n,), generator=g)
    tokens[torch.arange(6)[None, :] >= lengths[:, None]] = 0
    return torch.utils.data.TensorDataset(tokens, (tokens == 3).any(1).long(), lengths)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_recurrent_models_train_and_replay_without_vmap(tmp_path, cell):
    """vmap has no batching rule for an LSTM (nor a packed GRU): the tracker crashed at the first step and replay
    leave-one-out in its batched copies. Rows now come from backward passes (equal to autograd on each sample alone),
    the copies run one by one, and DIT's linear removal is the derivative of that replay. (``gradient_engine="vmap"``:
    the recurrent modules have a hook engine now, ``tests/test_recurrent.py``; this is the fallback's test.)"""
    data, val = _token_data(16, 0), _token_data(8, 1)
    torch.manual_seed(0)
    tracker = InfluenceTracker(str(tmp_path / "log"), record_gradients=True, projection_dim=6,
                               checkpoint_every_n_steps=1, storage_dtype="float64", gradient_engine="vmap")
    with pytest.warns(UserWarning, match="vmap cannot evaluate"):
        fit(Recurrent(cell).double(), loader(data, batch_size=4), tracker, epochs=1)
    log = InfluenceLog(tmp_path / "log")
    assert_rows_are_autograd(log, lambda: Recurrent(cell).double(), data)
    query, ids, eps = mean_loss(tuple(val.tensors)), [0, 5, 9], 1e-6
    scores = dit(log, query, module=Recurrent(cell).double(), train_data=WithIds(data), removal="linear").column()[ids]
    truth = replay_loo(log, Recurrent(cell).double(), WithIds(data), query, sample_ids=ids, removal_weight=1 - eps)
    derivative = truth.values[:, -1, 0] / eps
    np.testing.assert_allclose(scores, derivative, rtol=1e-4, atol=1e-4 * np.abs(derivative).max())


class Skips(TinyClassifier):
    """``training_step`` returns ``None`` for the batches in ``skip`` (Lightning then runs no backward)."""

    def __init__(self, skip: tuple[int, ...]) -> None:
        super().__init__(lr=0.3, momentum=0.5)
        self.skip = skip

    def training_step(self, batch, batch_idx):
        return None if batch_idx in self.skip else super().training_step(batch, batch_idx)


@pytest.mark.parametrize("accumulate, skip, skipped", [(1, (1, 3), [1, 3]), (2, (1, 2, 3), [1])])
def test_a_training_step_returning_none_is_left_out_of_its_step(tmp_path, accumulate, skip, skipped):
    """A ``training_step`` returning ``None`` crashed the tracker (``'NoneType' object has no attribute 'is_cpu'``).
    Its micro-batch now takes no part in the step (the others keep Lightning's weights); a step with no backward at
    all is recorded as skipped. Replay without verification from θ_0 ends bit for bit at the trained parameters, the
    rows equal autograd, ``info`` says OK."""
    from lightning_influence.cli import main
    from lightning_influence.replay import replay

    data = make_data(24, seed=0)
    torch.manual_seed(0)
    module = Skips(skip).double()
    tracker = InfluenceTracker(str(tmp_path / "log"), record_gradients=True, projection_dim=4,
                               checkpoint_every_n_steps=1, storage_dtype="float64")
    fit(module, loader(data, batch_size=4), tracker, epochs=1, accumulate_grad_batches=accumulate)
    log = InfluenceLog(tmp_path / "log")
    assert [t for t in log.steps if log.skipped(int(t))] == skipped
    assert not any(log.has_grads(t) for t in skipped)
    if accumulate == 2:  # step 0: micro-batch 0 alone, weight 1/(2·4); step 1: none
        np.testing.assert_array_equal(log.weights(0), np.full(4, 1 / 8))
    for last in replay(log, Skips(skip).double(), WithIds(data), verify=False):
        pass
    for n, p in module.named_parameters():
        assert torch.equal(last.params[n], p.detach()), n
    assert_rows_are_autograd(log, lambda: Skips(skip).double(), data)
    assert main(["info", str(tmp_path / "log")]) == 0
    assert main(["info", "--verify", str(tmp_path / "log")]) == 0  # its NaN losses are a skipped step's


class SpectralNormed(TinyClassifier):
    """``spectral_norm`` on the hidden layer: each train-mode forward runs a power iteration on its buffers ``_u``,
    ``_v`` in place and normalises by the σ they give."""

    def __init__(self) -> None:
        super().__init__(d_in=5, hidden=6, classes=3, lr=0.3, momentum=0.5)
        torch.nn.utils.parametrizations.spectral_norm(self.net[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


def test_spectral_norm_rows_and_leave_one_out_follow_its_buffers(tmp_path):
    """The tracker's vmap pass started the power iteration from the buffers training's forward had already advanced
    (rows 1e-3 off autograd), and replay leave-one-out failed in vmap (``div.out`` has no batching rule: an internal
    error in ``evaluate``). Rows now equal autograd from θ_t's buffers; each leave-one-out copy carries its own ``_u``,
    ``_v`` and equals a plain torch retraining without the sample."""
    data, val = make_data(16, seed=0), make_data(8, seed=1)
    torch.manual_seed(0)
    tracker = InfluenceTracker(str(tmp_path / "log"), record_gradients=True, projection_dim=6,
                               checkpoint_every_n_steps=1, storage_dtype="float64")
    fit(SpectralNormed().double(), loader(data, batch_size=4), tracker, epochs=2)
    log = InfluenceLog(tmp_path / "log")
    assert_rows_are_autograd(log, lambda: SpectralNormed().double(), data)
    query, ids = mean_loss(tuple(val.tensors)), [0, 5]
    truth = replay_loo(log, SpectralNormed().double(), WithIds(data), query, sample_ids=ids)
    assert truth.info["replay_drift"]["max"] == 0

    def retrained(drop: int | None) -> float:  # plain torch: the logged batches, the dropped sample's weight 0
        module = SpectralNormed().double()
        module.load_state_dict({**{n: torch.from_numpy(np.asarray(v)) for n, v in log.checkpoint(0).items()},
                                **{n: torch.from_numpy(np.asarray(v)) for n, v in log.checkpoint_buffers(0).items()}})
        opt = torch.optim.SGD(module.parameters(), lr=0.3, momentum=0.5)
        for t in log.steps:
            batch_ids = torch.as_tensor(log.batch_ids(int(t)))
            keep = torch.ones(len(batch_ids), dtype=torch.float64) if drop is None else (batch_ids != drop).double()
            losses = module.per_sample_loss((data.tensors[0][batch_ids], data.tensors[1][batch_ids]))
            opt.zero_grad()
            ((losses * keep).sum() / len(batch_ids)).backward()
            opt.step()
        return float(query(module.eval()))

    base = retrained(None)
    expected = [retrained(j) - base for j in ids]
    np.testing.assert_allclose(truth.values[:, -1, 0], expected, rtol=1e-9, atol=1e-13)


class Checkpointed(TinyClassifier):
    """Two residual blocks under activation checkpointing (``use_reentrant`` either way; ``None``: none, the reference)
    in train mode."""

    def __init__(self, reentrant: bool | None) -> None:
        super().__init__(lr=0.5, momentum=0.5)
        self.reentrant = reentrant
        self.blocks = nn.ModuleList([nn.Sequential(nn.LayerNorm(7), nn.Linear(7, 7), nn.Tanh()) for _ in range(2)])

    def forward(self, x):
        h = torch.tanh(self.net[0](x))
        for block in self.blocks:
            checkpointed = self.training and self.reentrant is not None
            h = h + (torch.utils.checkpoint.checkpoint(block, h, use_reentrant=self.reentrant) if checkpointed
                     else block(h))
        return self.net[-1](h)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_replays_bit_for_bit(tmp_path, reentrant):
    """A checkpointed block recomputes its forward in the backward, after ``functional_call`` has put the live
    parameters back: every replayed gradient through it was the gradient at the live module's parameters (replay left
    the run from its second step on, and ``evaluate`` stopped on the drift). The package's passes run ``checkpoint``
    as a plain call: replay without re-anchoring ends bit for bit at the trained parameters; rows equal autograd."""
    from lightning_influence.replay import replay

    data = make_data(24, seed=0)
    torch.manual_seed(0)
    module = Checkpointed(reentrant).double()
    tracker = InfluenceTracker(str(tmp_path / "log"), record_gradients=True, projection_dim=6,
                               checkpoint_every_n_steps=1, storage_dtype="float64")
    fit(module, loader(data, batch_size=6), tracker, epochs=2)
    log = InfluenceLog(tmp_path / "log")
    torch.manual_seed(1)  # a module whose own parameters are not θ_0: only the replayed ones may enter the gradients
    for step in replay(log, Checkpointed(reentrant).double(), WithIds(data), verify=False):
        for n, stored in log.checkpoint(step.step).items():
            assert torch.equal(step.params[n], torch.from_numpy(np.asarray(stored))), (step.step, n)
    assert step.step == log.num_steps == 8
    assert_rows_are_autograd(log, lambda: Checkpointed(None).double(), data)  # the same function, not recomputed


def _per_row_contributions(module: TinyClassifier, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each row's part of the batch gradient of ``net = Linear, BatchNorm1d (train mode), Tanh, Dropout(0), Linear``:
    the model run with a copy of every parameter per row (row ``b`` uses copy ``b``), the gradient of the mean loss
    w.r.t. copy ``b`` times the batch size. The batch statistics couple the rows, so this is not ``∇ℓ_b``; it is what
    every engine's row is under train-mode BatchNorm, and the rows sum to the batch gradient."""
    bn, B = module.net[1], len(x)
    copies = {n: p.detach()[None].repeat(B, *[1] * p.dim()).requires_grad_(True)
              for n, p in module.named_parameters()}
    h = torch.einsum("bi,boi->bo", x, copies["net.0.weight"]) + copies["net.0.bias"]
    var, mean = torch.var_mean(h, 0, correction=0)
    z = torch.tanh(copies["net.1.weight"] * (h - mean) / torch.sqrt(var + bn.eps) + copies["net.1.bias"])
    out = torch.einsum("bi,boi->bo", z, copies["net.4.weight"]) + copies["net.4.bias"]
    loss = nn.functional.cross_entropy(out, y)
    grads = torch.autograd.grad(loss, list(copies.values()))
    return {n: g * B for n, g in zip(copies, grads)}


def test_train_mode_batchnorm_parameters_are_hooked(tmp_path):
    """``allow_train_batchnorm=True`` refused every model whose BatchNorm has affine parameters (they went to vmap,
    which cannot run train-mode BatchNorm a sample at a time), unless the user listed the other parameters. A
    BatchNorm engine captures them: every row equals its row's part of the batch gradient (a model with a copy of the
    parameters per row), the decomposition all engines give under train-mode BatchNorm."""
    data = make_data(24, seed=0)
    torch.manual_seed(0)
    tracker = InfluenceTracker(str(tmp_path / "log"), record_gradients=True, projection_dim=None,
                               checkpoint_every_n_steps=1, storage_dtype="float64", allow_train_batchnorm=True)
    fit(tiny(batchnorm=True), loader(data, batch_size=6), tracker, epochs=1)
    log = InfluenceLog(tmp_path / "log")
    assert log.meta["gradient_engine"] == "hooks" and log.meta["train_batchnorm"] == ["net.1"]
    reference = tiny(batchnorm=True)
    for rec in log.iter_steps(fields=("grad",)):
        reference.load_state_dict({n: torch.from_numpy(np.asarray(v)) for n, v in log.checkpoint(rec.step).items()},
                                  strict=False)
        ids = torch.as_tensor(rec.ids)
        parts = _per_row_contributions(reference, data.tensors[0][ids], data.tensors[1][ids])
        expected = torch.cat([parts[n].reshape(len(ids), -1) for n in log.param_names], 1)
        np.testing.assert_allclose(rec.grads, expected.numpy(), rtol=1e-10, atol=1e-12)
    with pytest.warns(RuntimeWarning, match=r"DIT takes the buffers \['net.1.running_mean'"):  # not differentiated
        dit(log, mean_loss(tuple(make_data(6, seed=1).tensors)), module=tiny(batchnorm=True), train_data=WithIds(data))


class MaxNormed(TinyClassifier):
    """A bag of ``nn.Embedding(max_norm=1)`` vectors: each forward renormalises the rows it looks up, in place."""

    def __init__(self) -> None:
        super().__init__(lr=0.5, momentum=0.5)
        self.net = None
        self.emb, self.head = nn.Embedding(9, 4, max_norm=1.0), nn.Linear(4, 2)

    def per_sample_loss(self, batch):
        return nn.functional.cross_entropy(self.head(self.emb(batch[0]).mean(1)), batch[1], reduction="none")


def test_a_forward_that_renormalises_its_embedding_in_place_replays(tmp_path):
    """``Embedding(max_norm)`` changes its weight in the forward; the checkpoints took ``θ_t`` after it, replay (which
    repeats it) met none of them (drift 0.68 at step 1: ``evaluate`` stopped), and replay leave-one-out's query
    renormalised its copies' rows. Now the checkpoints hold θ_t from before the forward (``meta``
    ``forward_changes_params``): replay meets every one bit for bit, leave-one-out without drift; DIT warns."""
    from lightning_influence.replay import replay

    data, val = _token_data(16, 0), _token_data(8, 1)
    torch.manual_seed(0)
    tracker = InfluenceTracker(str(tmp_path / "log"), record_gradients=True, projection_dim=6,
                               checkpoint_every_n_steps=1, storage_dtype="float64")
    fit(MaxNormed().double(), loader(data, batch_size=4), tracker, epochs=2)
    log = InfluenceLog(tmp_path / "log")
    assert log.meta["forward_changes_params"] == ["emb.weight"]
    for step in replay(log, MaxNormed().double(), WithIds(data), verify=False):
        for n, stored in log.checkpoint(step.step).items():
            assert torch.equal(step.params[n], torch.from_numpy(np.asarray(stored))), (step.step, n)
    query = mean_loss(tuple(val.tensors))
    truth = replay_loo(log, MaxNormed().double(), WithIds(data), query, sample_ids=[0, 3])
    assert truth.info["replay_drift"]["max"] < 1e-12
    with pytest.warns(RuntimeWarning, match=r"DIT takes the buffers \['emb.weight'\]"):
        dit(log, query, module=MaxNormed().double(), train_data=WithIds(data))


@pytest.mark.parametrize("tokens", [False, True])
def test_raw_lora_factors_are_hooked(tmp_path, tokens):
    """LoRA factors as raw parameters (``x @ A.T``, ``F.linear(h, B)``) went to vmap, which re-runs the whole model per
    sample; the raw-parameter engine takes matrix products with the batch: ``Σ_l x_lᵀ g_l`` per sample, through the
    transpose's VJP. The rows equal autograd on each sample alone."""
    data = make_data(18, seed=0)
    torch.manual_seed(0)
    tracker = InfluenceTracker(str(tmp_path / "log"), record_gradients=True, projection_dim=4,
                               checkpoint_every_n_steps=1, storage_dtype="float64")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no demotion
        fit(RawAdapter("products", tokens).double(), loader(data), tracker, epochs=1)
    log = InfluenceLog(tmp_path / "log")
    assert log.meta["gradient_engine"] == "hooks"
    assert_rows_are_autograd(log, lambda: RawAdapter("products", tokens).double(), data)


class SkipsThenSums(Skips):
    def training_step(self, batch, batch_idx):
        return None if batch_idx == 0 else self.per_sample_loss(batch).sum()


def test_the_reduction_is_checked_at_the_first_step_with_a_loss(tmp_path):
    """The loss reduction is checked once, at the fit's first step; a first step whose ``training_step`` returned
    ``None`` used that check up, and a summed loss from the second step on was recorded as a mean."""
    from lightning_influence.step.weights import LossReductionError

    tracker = InfluenceTracker(str(tmp_path / "log"), checkpoint_every_n_steps=1)
    with pytest.raises(LossReductionError, match="at step 1 .*the sum of the per-sample losses"):
        fit(SkipsThenSums((0,)).double(), loader(make_data(12), batch_size=4), tracker, epochs=1)


def test_a_sparse_embedding_is_refused_before_the_first_step(tmp_path):
    """``nn.Embedding(sparse=True)`` crashed the tracker at its first step (``reshape is not implemented for sparse
    tensors``, then the clipping check's ``aten::max``); refused before training, nothing written."""
    module = MaxNormed().double()
    module.emb = nn.Embedding(9, 4, sparse=True).double()
    with pytest.raises(RuntimeError, match=r"sparse gradients: \['emb'\].*sparse=False"):
        fit(module, loader(_token_data(8, 0), batch_size=4), InfluenceTracker(str(tmp_path / "log")), epochs=1)
    assert not any(p.is_file() for p in (tmp_path / "log").rglob("*"))


def test_hvp_rows_of_a_checkpointed_model_are_those_of_the_same_model_without(tmp_path):
    """The tracker's HVP passes evaluate gradients at ``θ ± εv``; a checkpointed block recomputed its forward at the
    live ``θ`` in their backward. The rows now equal those of the same run without checkpointing."""
    data, rows = make_data(18, seed=0), {}
    for mode in (False, None):
        torch.manual_seed(0)
        tracker = InfluenceTracker(str(tmp_path / str(mode)), record_gradients=True, record_hvp=True, projection_dim=6,
                                   storage_dtype="float64")
        fit(Checkpointed(mode).double(), loader(data, batch_size=6), tracker, epochs=1)
        rows[mode] = [rec.hvps for rec in InfluenceLog(tmp_path / str(mode)).iter_steps(fields=("hvp",))]
    for checkpointed, plain in zip(rows[False], rows[None]):
        np.testing.assert_allclose(checkpointed, plain, rtol=1e-9, atol=1e-12 * np.abs(plain).max())


class PaddedEncoder(TinyClassifier):
    """``nn.TransformerEncoder`` with ``src_key_padding_mask``, pooled over every position, padded ones included."""

    def __init__(self) -> None:
        super().__init__()
        self.net = None
        self.emb, self.head = nn.Embedding(9, 8, padding_idx=0), nn.Linear(8, 2)
        layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=True)

    def per_sample_loss(self, batch):
        h = self.enc(self.emb(batch[0]), src_key_padding_mask=batch[0] == 0)
        return nn.functional.cross_entropy(self.head(h.mean(1)), batch[1], reduction="none")


def test_query_values_and_gradients_are_of_one_function_under_a_padding_mask():
    """Without gradients, an eval-mode ``TransformerEncoder`` takes PyTorch's fused path, whose outputs at padded
    positions are zeros; with gradients it computes them. A query's value (the ground truth's, ``evaluate_query``) and
    its gradient (DIT's, TracIn's) were of two functions. Now both are the differentiable path's; Lightning-style
    fast-path use outside the package is left as it is."""
    from lightning_influence.queries import evaluate_query, query_gradients

    torch.manual_seed(0)
    module, val = PaddedEncoder().double(), _token_data(6, 1)
    query = mean_loss(tuple(val.tensors))
    names = [n for n, _ in module.named_parameters()]
    with torch.no_grad():
        value = evaluate_query(module, query)
    _, with_grad = query_gradients(module, query, names)
    reference = query(module.train())  # dropout 0: train mode computes every position (no fast path)
    torch.testing.assert_close(value.reshape(-1), with_grad.reshape(-1), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(value.reshape(-1), reference.detach().reshape(-1), rtol=1e-12, atol=1e-14)
    assert torch.backends.mha.get_fastpath_enabled()
