"""The tracker's HVP passes: what they reuse of the training step (capture/own_pass.py, capture/layers.py InputMemo)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import fit, loader, make_data
from torch import nn

from lightning_influence import InfluenceLog, InfluenceTracker
from lightning_influence.capture import HookGradientCapture, KroneckerProjector, per_sample_grads_hooks
from lightning_influence.capture.layers import InputMemo
from conftest import TinyClassifier


class _ConvNet(TinyClassifier):
    """A Conv1d fed the batch (its column side is memoised) before a Linear fed an activation (never memoised)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(1, 3, 3, padding=1, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(9, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.reshape(x.shape[0], 1, -1))


def _hvp_rows(log_dir, monkeypatch, memo: bool, scheme: str) -> tuple[np.ndarray, list[int]]:
    hits: list[int] = []
    get = InputMemo.get

    def counted(self, mod, inp):
        out = get(self, mod, inp) if memo else None
        hits.append(out is not None)
        return out

    monkeypatch.setattr(InputMemo, "get", counted)
    torch.manual_seed(0)
    tracker = InfluenceTracker(log_dir, record_gradients=True, record_hvp=True, projection_dim=4, hvp_scheme=scheme,
                               storage_dtype="float64")
    fit(_ConvNet().double(), loader(make_data(24), batch_size=6), tracker, epochs=1)
    log = InfluenceLog(log_dir)
    return np.concatenate([rec.hvps for rec in log.iter_steps(fields=("hvp",))]), hits


@pytest.mark.parametrize("scheme", ["forward", "central"])
def test_hvp_passes_reuse_the_batch_column_side_exactly(tmp_path, monkeypatch, scheme):
    """The passes at θ ± ε v̂ take the first layer's projected input from the step (the same batch, reshaped by the
    model: another view at every call): the HVP rows are bit for bit those computed without the memo, and every pass
    after the first one reuses it."""
    with_memo, hits = _hvp_rows(str(tmp_path / "a"), monkeypatch, True, scheme)
    without, _ = _hvp_rows(str(tmp_path / "b"), monkeypatch, False, scheme)
    assert np.array_equal(with_memo, without) and np.isfinite(with_memo).all() and np.abs(with_memo).max() > 0
    passes = 4 * (2 if scheme == "central" else 1)  # 4 steps; the conv layer is looked up once per pass
    assert sum(hits) == passes - 1  # the first step's first pass fills it


def test_memo_is_exact_only_for_the_same_unchanged_input():
    """A lookup hits only for the same tensor at the same version, only while reuse is on, never for an input that
    needs a gradient (an activation); a hooked pass with the memo equals one without."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    proj = KroneckerProjector({n: p.shape for n, p in model.named_parameters()}, 4)
    capture = HookGradientCapture(model, [n for n, _ in model.named_parameters()], proj)
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))

    def loss(m, batch):
        return F.cross_entropy(m(batch[0]), batch[1], reduction="none")

    memo = capture.inputs
    memo.keep = True
    reference, _ = per_sample_grads_hooks(model, loss, (x, y), capture)
    assert memo.get(model[0], x) is None  # reuse off
    memo.reuse = True
    assert memo.get(model[0], x) is not None and memo.get(model[2], x) is None
    assert memo.get(model[0], x.clone()) is None  # another tensor with the same values: not assumed equal
    assert memo.get(model[0], x.view(6, 5)) is not None and memo.get(model[0], x[:3]) is None  # a view of it / a part

    class Wrapped(torch.Tensor):  # a subclass's memory need not be what data_ptr says: never matched
        pass

    assert memo.get(model[0], x.as_subclass(Wrapped)) is None
    params = {n: p.detach() + 0.1 for n, p in model.named_parameters()}
    with_memo, _ = per_sample_grads_hooks(model, loss, (x, y), capture, params)
    memo.reuse = False
    without, _ = per_sample_grads_hooks(model, loss, (x, y), capture, params)
    assert torch.equal(with_memo, without) and not torch.equal(with_memo, reference)
    memo.reuse = True
    x.mul_(2.0)  # changed in place: its version moves on
    assert memo.get(model[0], x) is None
    stale, _ = per_sample_grads_hooks(model, loss, (x, y), capture, params)
    memo.reuse = False
    fresh, _ = per_sample_grads_hooks(model, loss, (x, y), capture, params)
    assert torch.equal(stale, fresh)


def test_bf16_autocast_hvp_passes_keep_float32_columns(tmp_path, monkeypatch):
    """Under ``bf16-mixed`` the passes at θ ± ε v̂ run the forward under the run's autocast, and the conv's column side
    (memoised, so made in the forward hook) came out in bfloat16: the block's product with the float32 output gradient
    failed at the first step. The engines' forward-side products now run outside autocast (float32, as ``_wide``
    means them)."""
    from lightning_influence.capture.layers import ConvEngine

    dtypes: list[torch.dtype] = []
    columns = ConvEngine._columns

    def recorded(self, *args):
        out = columns(self, *args)
        dtypes.append(out.dtype)
        return out

    monkeypatch.setattr(ConvEngine, "_columns", recorded)
    torch.manual_seed(0)
    tracker = InfluenceTracker(str(tmp_path / "log"), record_gradients=True, record_hvp=True, projection_dim=4)
    fit(_ConvNet().float(), loader(make_data(24, dtype=torch.float32), batch_size=6), tracker, epochs=1,
        precision="bf16-mixed")
    log = InfluenceLog(tmp_path / "log")
    assert log.meta["precision"]["autocast_dtype"] == "bfloat16"
    rows = np.concatenate([np.concatenate([r.grads, r.hvps]) for r in log.iter_steps(fields=("grad", "hvp"))])
    assert len(rows) == 2 * 24 and np.isfinite(rows).all() and np.abs(rows).max() > 0
    assert dtypes and set(dtypes) == {torch.float32}
