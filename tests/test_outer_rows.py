"""Gradient rows stored with factored outer-product blocks (log/outer.py, docs/log-format.md Version 4): written by the
tracker and the writer, expanded by every reader path to the projector's columns."""

import glob

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_influence import InfluenceLog, InfluenceTracker
from lightning_influence.cli import main
from lightning_influence.capture import HookGradientCapture, KroneckerProjector, select_params
from lightning_influence.log import prefetch
from lightning_influence.log.format import LogFormatError
from lightning_influence.log.outer import OuterColumns
from lightning_influence.log.shares import RowShares
from lightning_influence.log.writer import LogWriter, StepRecord, write_meta
from conftest import fit, loader, make_data, tiny

LAYOUT = OuterColumns(width=3 * 4 + 5 + 2 * 2, blocks=((0, 3, 4), (17, 2, 2)))


def _by_hand(stored: np.ndarray) -> np.ndarray:
    """LAYOUT's expansion written out: block (3, 4), five stored columns, block (2, 2)."""
    a, b, mid, c, d = stored[:, :3], stored[:, 3:7], stored[:, 7:12], stored[:, 12:14], stored[:, 14:16]
    return np.concatenate([np.einsum("ni,nj->nij", a, b).reshape(-1, 12), mid,
                           np.einsum("ni,nj->nij", c, d).reshape(-1, 4)], axis=1)


def test_expand_numpy_and_torch_and_attr_round_trip():
    stored = np.random.default_rng(0).standard_normal((5, LAYOUT.stored_width))
    assert LAYOUT.stored_width == 16
    np.testing.assert_array_equal(LAYOUT.expand(stored), _by_hand(stored))
    np.testing.assert_array_equal(LAYOUT.expand(torch.from_numpy(stored)).numpy(), _by_hand(stored))
    assert OuterColumns.from_attr(LAYOUT.to_attr()) == LAYOUT
    assert OuterColumns.from_attr(LAYOUT.to_attr().encode()) == LAYOUT


def _write(log_dir, layouts, n=4, flush=3):
    """A log of one step per entry of ``layouts`` (``None``: that step's rows dense); returns the dense rows."""
    rng = np.random.default_rng(1)
    write_meta(log_dir, {"dataset_size": n * len(layouts), "recorded": {
        "ids": True, "lrs": True, "losses": False, "gradients": True, "hvp": False, "checkpoints": False}})
    w = LogWriter(log_dir, background=False, flush_every_n_steps=flush)
    dense = []
    for t, outer in enumerate(layouts):
        stored = rng.standard_normal((n, LAYOUT.stored_width)).astype(np.float32)
        dense.append(LAYOUT.expand(stored))
        w.add_step(StepRecord(step=t, epoch=0, batch_idx=t, micro_batches=1, ids=np.arange(n) + n * t, lrs=[0.1],
                              grads=stored if outer else dense[-1], grad_outer=outer))
    w.close()
    return dense


@pytest.mark.parametrize("prefetched", [True, False])
def test_every_reader_path_expands_and_a_layout_change_closes_the_segment(tmp_path, monkeypatch, prefetched):
    layouts = [LAYOUT, LAYOUT, LAYOUT, None, LAYOUT, LAYOUT, LAYOUT]
    dense = _write(str(tmp_path), layouts)
    if not prefetched:
        monkeypatch.setattr(prefetch, "AVAILABLE", False)
    log = InfluenceLog(tmp_path)
    assert log.segment_starts() == [0, 3, 4]  # 3 steps a segment; step 3 (dense) closes one and is one alone
    versions = {}
    for f in sorted(glob.glob(str(tmp_path / "rank-0" / "seg-*.h5"))):
        with h5py.File(f) as g:
            versions[int(g.attrs["first_step"])] = (int(g.attrs["format_version"]), g["grads/grad"].shape[1])
    assert versions == {0: (4, 16), 3: (2, 21), 4: (4, 16)}
    for rec in log.iter_steps(0, 7):
        np.testing.assert_array_equal(rec.grads, dense[rec.step])
    blocks = list(log.iter_blocks(0, 7))
    np.testing.assert_array_equal(np.concatenate([b.grads for b in blocks]), np.concatenate(dense))
    for world in (1, 2):
        with RowShares(log, 0, world) as first, RowShares(log, world - 1, world) as last:
            parts = [first.read(5).grads] + ([last.read(5).grads] if world > 1 else [])
        np.testing.assert_array_equal(np.concatenate(parts), dense[5])


def test_a_corrupted_factor_fails_its_crc(tmp_path):
    _write(str(tmp_path), [LAYOUT] * 2)
    path = sorted(glob.glob(str(tmp_path / "rank-0" / "seg-*.h5")))[0]
    with h5py.File(path, "r+") as f:
        f["grads/grad"][1, 0] += 1.0
    with pytest.raises(LogFormatError, match="CRC-32"):
        list(InfluenceLog(tmp_path).iter_steps(0, 2))


def _record(stored, dtype=np.float32):
    return StepRecord(step=0, epoch=0, batch_idx=0, micro_batches=1, ids=np.arange(2), lrs=[0.1],
                      grads=np.asarray(stored, dtype), grad_outer=OuterColumns(4, ((0, 2, 2),)))


def test_factors_whose_products_overflow_are_refused():
    _record([[1e19, 1.0, 1e19, 1.0], [1.0, 1.0, 1.0, 1.0]]).validate()  # 1e38 fits float32
    with pytest.raises(FloatingPointError, match=r"non-finite per-sample gradient for sample ids \[0\]"):
        _record([[1e20, 1.0, 1e20, 1.0], [1.0, 1.0, 1.0, 1.0]]).validate()  # 1e40 does not
    with pytest.raises(FloatingPointError, match=r"non-finite per-sample gradient for sample ids \[1\]"):
        _record([[1.0, 1.0, 1.0, 1.0], [1.0, np.nan, 1.0, 1.0]]).validate()
    with pytest.raises(FloatingPointError, match=r"non-finite per-sample gradient for sample ids \[1\]"):
        _record([[1.0, 1.0, 1.0, 1.0], [-1e20, 1.0, -1e20, 1.0]]).validate()  # large by its smallest factors
    with pytest.raises(ValueError, match="stored columns of their factored blocks"):
        _record([[1.0, 1.0, 1.0, 1.0, 1.0], [1.0] * 5]).validate()
    big = _record([[1e20, 1.0, 1e20, 1.0], [1.0, 1.0, 1.0, 1.0]], np.float64)  # finite in float64, not in float32
    big.validate()
    with pytest.raises(FloatingPointError, match="storage_dtype='float32'"):
        big.check_storable(np.dtype(np.float32))


class Head(nn.Module):
    """A Linear on (B, in) (factored), a Linear on (B, T, in) (a dense block) and a second factored Linear."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Linear(3, 4)
        self.fc = nn.Linear(4, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.tok(x.view(x.shape[0], 2, 3))).mean(1)
        return self.out(torch.tanh(self.fc(h)))


def test_collect_factored_expands_to_collect():
    torch.manual_seed(0)
    model = Head().double()
    x, y = torch.randn(6, 6, dtype=torch.float64), torch.randint(0, 3, (6,))
    names = select_params(model)
    params = dict(model.named_parameters())
    proj = KroneckerProjector({n: params[n].shape for n in names}, dim=8, seed=3)
    capture = HookGradientCapture(model, names, proj)
    weights = torch.tensor([0.3, -1.7, 2.0, 0.11, 5.0, 1.0], dtype=torch.float64)

    def rows(factored):
        capture.enable()
        (F.cross_entropy(model(x), y, reduction="none") * weights).sum().backward()
        capture.disable()
        return capture.collect_factored(weights) if factored else capture.collect(weights)

    stored, blocks = rows(True)
    assert [b[1:] for b in blocks] == [(proj.spec(n).k_rows, proj.spec(n).k_cols) for n in ("fc.weight", "out.weight")]
    layout = OuterColumns(proj.out_dim, blocks)
    assert stored.shape == (6, layout.stored_width) and layout.stored_width < proj.out_dim
    torch.testing.assert_close(layout.expand(stored), rows(False), rtol=1e-14, atol=0)


def test_tracker_stores_factored_rows_only_where_nothing_reads_them_dense(tmp_path, capsys):
    """An MLP's rows are stored factored and read back as the dense rows of the same fit with HVP products (which
    keeps them dense), to float64 rounding (the row factor divided by the sample's weight, not the product: 1 ulp);
    float16 storage keeps them dense."""
    ds = make_data(12)
    logs = {}
    for name, kw in {"factored": {}, "hvp": {"record_hvp": True}, "half": {"storage_dtype": "float16"}}.items():
        fit(tiny(), loader(ds), InfluenceTracker(str(tmp_path / name), record_gradients=True, projection_dim=16,
                                                 storage_dtype=kw.get("storage_dtype", "float64"),
                                                 record_hvp=kw.get("record_hvp", False)), epochs=1)
        logs[name] = InfluenceLog(tmp_path / name)
        with h5py.File(sorted(glob.glob(str(tmp_path / name / "rank-0" / "seg-*.h5")))[0]) as f:
            logs[name + "_attr"] = "outer_columns" in f["grads/grad"].attrs
    assert (logs["factored_attr"], logs["hvp_attr"], logs["half_attr"]) == (True, False, False)
    for a, b in zip(logs["factored"].iter_steps(fields=("grad",)), logs["hvp"].iter_steps(fields=("grad",))):
        np.testing.assert_allclose(a.grads, b.grads, rtol=1e-14, atol=1e-16)
    assert logs["factored"].num_steps == logs["hvp"].num_steps > 1
    assert logs["factored"].stored_widths() == [16] and logs["hvp"].stored_widths() == [27]  # (2+6)+(3+5) against 2*6+3*5
    assert main(["info", str(tmp_path / "factored")]) == 0
    assert "27 columns per sample (projected, 16 per tensor, float64; outer-product blocks stored as factors: 16 values a " \
           "sample)" in capsys.readouterr().out
