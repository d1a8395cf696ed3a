"""Raw parameters used directly in the forward (capture/raw_params.py): their projected per-sample gradients come
from the hooked forward/backward (no vmap) and equal brute-force per-sample autograd; an unknown use falls back to
vmap; training with the tracker stays bit-identical."""

import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import InfluenceLog, InfluenceTracker, WithIds
from lightning_influence.capture import KroneckerProjector, per_sample_grads, select_params
from lightning_influence.capture.own_pass import choose_engine
from lightning_influence.capture.raw_params import _plain_view, view_vjp

B, T, D = 5, 4, 6


class ViT(nn.Module):
    """Tokens (B, T, D) -> Linear patch embedding, class token expanded and concatenated, position table (full or a
    slice), two layer scales (a broadcast and an indexed one), a parameter used twice, a head on the class token."""

    def __init__(self, pattern: str = "all", table: int = T + 1, unknown: str | None = None) -> None:
        super().__init__()
        self.pattern, self.unknown = pattern, unknown
        self.patch = nn.Linear(D, D)
        self.cls_token = nn.Parameter(torch.randn(1, 1, D) * 0.5)
        self.pos_embed = nn.Parameter(torch.randn(1, table, D) * 0.5)
        self.gamma = nn.Parameter(torch.rand(D) + 0.5)
        self.norm = nn.LayerNorm(D)
        self.fc = nn.Linear(D, D)
        self.gamma2 = nn.Parameter(torch.rand(T + 1) + 0.5)
        self.twice = nn.Parameter(torch.randn(D) * 0.5)
        self.head = nn.Linear(D, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch(x)
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1)  # (B, T+1, D)
        h = h + self.pos_embed[:, :h.shape[1]]  # a slice (the full table when it has T+1 rows)
        h = h + (2 * self.gamma) * torch.tanh(self.fc(self.norm(h)))  # layer scale (2γ: not a view, autograd's VJP)
        h = self.gamma2[:, None] * h  # a layer scale over the tokens, indexed
        h = torch.tanh(h - self.twice) * self.twice.double().to(h.dtype)  # used twice (casts: float32 under autocast)
        if self.unknown == "tensordot":  # (h @ diag(twice) is a known use: a matrix product with the batch)
            h = torch.tensordot(h, torch.diag(self.twice), dims=1)
        elif self.unknown == "einsum":
            h = torch.einsum("btd,d->btd", h, self.twice)
        return self.head(h[:, 0] + h[:, 1:].mean(1))


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def batch(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, T, D, generator=g, dtype=dtype), torch.randint(0, 3, (B,), generator=g)


def brute(model, names, projector, data):
    """Each sample alone through ordinary autograd, projected."""
    params = dict(model.named_parameters())
    rows = []
    for i in range(B):
        one = tuple(t[i:i + 1] for t in data)
        grads = torch.autograd.grad(loss_fn(model, one)[0], [params[n] for n in names])
        rows.append({n: g[None] for n, g in zip(names, grads)})
    return torch.cat([projector.project(r) for r in rows])


RAW = ["cls_token", "pos_embed", "gamma", "gamma2", "twice"]


@pytest.mark.parametrize("dim", [None, 8])
@pytest.mark.parametrize("table", [T + 1, T + 3])  # the whole table, a slice of it
def test_raw_parameters_are_hooked_and_equal_brute_force(dim, table):
    torch.manual_seed(0)
    model = ViT(table=table).double()
    names = select_params(model)
    projector = KroneckerProjector({n: p.shape for n, p in model.named_parameters()}, dim, seed=3)
    capture, rest, engine = choose_engine(model, names, projector, "auto")
    assert engine == "hooks" and rest == [] and capture.raw is not None and sorted(capture.raw.names) == sorted(RAW)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no demotion
        rows, losses = per_sample_grads(model, loss_fn, batch(), names, projector, capture)
    assert capture.demoted == [] and sorted(capture.param_names) == sorted(names)
    expected = brute(model, names, projector, batch())
    torch.testing.assert_close(rows, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(losses, loss_fn(model, batch()), rtol=0, atol=0)


@pytest.mark.parametrize("unknown", ["tensordot", "einsum"])
def test_an_unknown_use_falls_back_to_vmap_and_still_matches(unknown):
    torch.manual_seed(0)
    model = ViT(unknown=unknown).double()
    names = select_params(model)
    projector = KroneckerProjector({n: p.shape for n, p in model.named_parameters()}, 8, seed=3)
    capture, rest, _ = choose_engine(model, names, projector, "auto")
    with pytest.warns(UserWarning, match=r"raw-parameter engine does not know.*\['twice'\]"):
        rows, _ = per_sample_grads(model, loss_fn, batch(), names, projector, capture)
    assert capture.demoted == ["twice"] and "twice" not in capture.raw.names
    torch.testing.assert_close(rows, brute(model, names, projector, batch()), rtol=1e-10, atol=1e-10)
    rows, _ = per_sample_grads(model, loss_fn, batch(), names, projector, capture)  # from now on by vmap
    torch.testing.assert_close(rows, brute(model, names, projector, batch()), rtol=1e-10, atol=1e-10)


def test_the_mode_is_on_the_stack_only_while_watching_and_leaves_on_an_error():
    model = ViT().double()
    names = select_params(model)
    capture, _, _ = choose_engine(model, names, KroneckerProjector({n: p.shape for n, p in model.named_parameters()},
                                                                   8), "auto")
    depth = torch._C._len_torch_function_stack()

    def failing(m, b):
        loss_fn(m, b)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        per_sample_grads(model, failing, batch(), names, capture.projector, capture)
    assert torch._C._len_torch_function_stack() == depth
    capture.enable()
    capture.watch(B)
    assert torch._C._len_torch_function_stack() == depth + 1
    other = torch.overrides.TorchFunctionMode()
    other.__enter__()  # a mode pushed after the watch (by the model) stays, alone
    capture.remove()
    assert torch._C._len_torch_function_stack() == depth + 1 and torch._C._get_function_stack_at(depth) is other
    other.__exit__(None, None, None)
    assert torch._C._len_torch_function_stack() == depth


def test_torch_nn_modules_without_an_engine_stay_on_vmap():
    model = nn.Sequential(nn.Linear(3, 3), nn.GRU(3, 2, num_layers=2, dropout=0.5))  # dropout between layers: no engine
    names = select_params(model)
    _, rest, engine = choose_engine(model, names, KroneckerProjector({n: p.shape for n, p in model.named_parameters()},
                                                                     None), "auto")
    assert rest == [n for n in names if n.startswith("1.")] and len(rest) == 8 and engine == "mixed"


class LitViT(pl.LightningModule):
    """:class:`ViT` plus raw parameters used outside any module, in ``per_sample_loss`` (a temperature and a shift
    of the logits); ``fail_at``: ``training_step`` raises at that batch, after the forward."""

    def __init__(self, fail_at: int | None = None, unknown: str | None = None) -> None:
        super().__init__()
        self.vit = ViT(table=T + 2, unknown=unknown)
        self.temp = nn.Parameter(torch.tensor([1.5]))
        self.shift = nn.Parameter(torch.randn(3) * 0.1)
        self.fail_at = fail_at

    def per_sample_loss(self, batch):
        x, y = batch[0], batch[1]
        logits = self.vit(x) * self.temp + self.shift
        return F.cross_entropy(logits, y, reduction="none")

    def training_step(self, batch, batch_idx):
        loss = self.per_sample_loss(batch).mean()
        if batch_idx == self.fail_at:
            raise RuntimeError("training_step failed")
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _data(n=15, dtype=torch.float64):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, T, D, generator=g, dtype=torch.float64).to(dtype)
    return WithIds(TensorDataset(x, torch.randint(0, 3, (n,), generator=g)))


def _fit(module, tracker=None, precision=None, steps=6, accumulate=1):
    kw = {"precision": precision} if precision else {}
    kw["accumulate_grad_batches"] = accumulate
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[tracker] if tracker else [],
                         **kw)
    data = _data(dtype=next(module.parameters()).dtype)
    trainer.fit(module, DataLoader(data, batch_size=B, shuffle=True, generator=torch.Generator().manual_seed(0)))
    return module, data


def _lit(seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    return LitViT(**kw).to(dtype)


def _expected(log, rec, data, dtype=torch.float64, **kw):
    """Brute-force rows of step ``rec`` at its checkpoint, projected with the log's projector."""
    module = _lit(dtype=dtype, **kw)
    module.load_state_dict({n: torch.from_numpy(v) for n, v in log.checkpoint(rec.step).items()}, strict=False)
    samples = [data[int(i)] for i in rec.ids]
    x, y = torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])
    params = dict(module.named_parameters())
    rows = []
    for i in range(len(y)):
        loss = module.per_sample_loss((x[i:i + 1], y[i:i + 1]))[0]
        grads = torch.autograd.grad(loss, [params[n] for n in log.param_names])
        rows.append(log.projector().project({n: g[None].double() for n, g in zip(log.param_names, grads)}))
    return torch.cat(rows).numpy()


@pytest.mark.parametrize("hvp,accumulate", [(False, 1), (True, 1), (False, 2)])
def test_tracked_vit_training_is_bit_identical_and_rows_equal_brute_force(tmp_path, hvp, accumulate):
    plain, _ = _fit(_lit(), accumulate=accumulate)
    tracker = InfluenceTracker(str(tmp_path / "log"), record_gradients=True, record_hvp=hvp, projection_dim=16,
                               checkpoint_every_n_steps=1, storage_dtype="float64")
    tracked, data = _fit(_lit(), tracker, accumulate=accumulate)
    for (n, a), (_, b) in zip(plain.named_parameters(), tracked.named_parameters()):
        assert torch.equal(a, b), n
    log = InfluenceLog(tmp_path / "log")
    assert log.meta["gradient_engine"] == "hooks" and log.meta["demoted"] == {}
    assert {"vit.pos_embed", "vit.cls_token", "temp", "shift"} <= set(log.param_names)
    steps = 0
    for rec in log.iter_steps(fields=("grad",)):
        np.testing.assert_allclose(rec.grads, _expected(log, rec, data), rtol=1e-10, atol=1e-12)
        steps += 1
    assert steps == 6
    assert torch._C._len_torch_function_stack() == 0


def test_a_tracked_fit_hands_an_unknown_use_to_vmap_at_its_first_step(tmp_path):
    tracker = InfluenceTracker(str(tmp_path / "log"), record_gradients=True, projection_dim=16,
                               checkpoint_every_n_steps=1, storage_dtype="float64")
    with pytest.warns(UserWarning, match=r"raw-parameter engine does not know.*\['vit.twice'\]"):
        _, data = _fit(_lit(unknown="einsum"), tracker, steps=3)
    log = InfluenceLog(tmp_path / "log")
    assert log.meta["gradient_engine"] == "mixed" and log.meta["demoted"] == {"vit.twice": 0}
    for rec in log.iter_steps(fields=("grad",)):
        np.testing.assert_allclose(rec.grads, _expected(log, rec, data, unknown="einsum"), rtol=1e-10, atol=1e-12)


def test_an_error_inside_training_step_leaves_no_mode_pushed(tmp_path):
    tracker = InfluenceTracker(str(tmp_path / "log"), record_gradients=True, projection_dim=16)
    with pytest.raises(RuntimeError, match="training_step failed"):
        _fit(_lit(fail_at=1), tracker)
    assert torch._C._len_torch_function_stack() == 0


def test_bf16_autocast_rows_are_hooked_and_close_to_autograd(tmp_path):
    """Under bf16 autocast (the Linear outputs in bfloat16, the raw parameters float32): no demotion, the rows
    within bfloat16's rounding of float64 autograd at the same parameters."""
    tracker = InfluenceTracker(str(tmp_path / "log"), record_gradients=True, projection_dim=16,
                               checkpoint_every_n_steps=1)
    _, data = _fit(_lit(dtype=torch.float32), tracker, precision="bf16-mixed", steps=2)
    log = InfluenceLog(tmp_path / "log")
    assert log.meta["gradient_engine"] == "hooks" and log.meta["demoted"] == {}
    projector = log.projector()
    for rec in log.iter_steps(fields=("grad",)):
        expected = _expected(log, rec, _data(dtype=torch.float64))
        for spec in projector.specs:  # (measured: 0.02 % to 1.6 % a block, raw or layer alike)
            got, want = rec.grads[:, projector.slices[spec.name]], expected[:, projector.slices[spec.name]]
            assert np.linalg.norm(got - want) < 0.03 * np.linalg.norm(want), spec.name


@pytest.mark.parametrize("view,plain", [
    (lambda p: p, True), (lambda p: p[:], True), (lambda p: p[1:3], True), (lambda p: p[:, ::2], True),
    (lambda p: p.t(), True), (lambda p: p[None, :, 1], True), (lambda p: p.view(2, 10), True),
    (lambda p: p.unfold(0, 2, 1), False), (lambda p: p.expand(3, 4, 5), False), (lambda p: p.float(), False)])
def test_the_view_vjp_equals_autograds(view, plain):
    p = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    v = view(p)
    assert _plain_view(v, p) is plain
    if plain:
        g = torch.randn(3, *v.shape, dtype=torch.float64)
        expected, = torch.autograd.grad(v, p, g, is_grads_batched=True, allow_unused=True)
        torch.testing.assert_close(view_vjp(g, v, p), expected if expected is not None else g, rtol=0, atol=0)


class Arith(nn.Module):
    """Signs, ``alpha``, operand order, an in-place sum, a quotient, a tensor derived from two parameters; ``unknown``:
    ``P / x`` (a use this engine does not know) or a derived tensor changed in place after its use."""

    def __init__(self, unknown: str | None = None) -> None:
        super().__init__()
        self.a, self.b, self.c = (nn.Parameter(torch.randn(D) * 0.5) for _ in range(3))
        self.d = nn.Parameter(torch.rand(T, D) + 0.5)
        self.lin = nn.Linear(D, 3)
        self.unknown = unknown

    def forward(self, x):
        h = torch.sub(torch.tanh(x), self.a, alpha=2)  # x − 2a
        h = torch.add(self.b, torch.tanh(h), alpha=3)  # b + 3x
        h = self.c - torch.tanh(h)
        h = h.clone()
        h.add_(self.a)  # in place
        h = self.d / (2 + torch.tanh(h)) if self.unknown == "divide" else torch.tanh(h) * self.d
        h = h / (1 + self.a.square())  # a temperature
        both = self.b * self.c  # derived from two parameters: autograd's VJP to both
        h = h + both
        if self.unknown == "in-place":
            both.mul_(2)  # after its use: that use's VJP would change
        return self.lin(h.mean(1))


@pytest.mark.parametrize("unknown,demoted", [(None, []), ("divide", ["d"]), ("in-place", ["b", "c"])])  # P / x
def test_signs_alpha_order_and_in_place_sums(unknown, demoted):
    torch.manual_seed(0)
    model = Arith(unknown).double()
    names = select_params(model)
    projector = KroneckerProjector({n: p.shape for n, p in model.named_parameters()}, 8, seed=1)
    capture, _, engine = choose_engine(model, names, projector, "auto")
    assert engine == "hooks" and sorted(capture.raw.names) == ["a", "b", "c", "d"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows, _ = per_sample_grads(model, loss_fn, batch(), names, projector, capture)
    assert capture.demoted == demoted and len(caught) == int(bool(demoted))
    torch.testing.assert_close(rows, brute(model, names, projector, batch()), rtol=1e-10, atol=1e-10)
