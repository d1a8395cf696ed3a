"""TensorBoard: the export of a query's results and the tracker's live signals, read back with
tensorboard's own event reader and compared with the scores."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_influence import InfluenceLog, estimators, queries
from lightning_influence.cli import main
from lightning_influence.evaluation import classify_windows
from lightning_influence.tensorboard import LiveTensorBoard, diverging_rgb, render_heatmap
from tests._cli_run import train_tiny_run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
WINDOWS = [(0, 4), (4, 8), (8, 12)]
Q = "influence/val_loss"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_tiny_run(tmp_path_factory.mktemp("tb") / "run")


@pytest.fixture(scope="module")
def export(run, tmp_path_factory):
    logdir = tmp_path_factory.mktemp("tb") / "export"
    assert main(["tensorboard", run.log, "-c", run.config, "-m", "tracin", "--logdir", str(logdir), "-k", "5", "-q"]) == 0
    ea = EventAccumulator(str(logdir / "tracin"), size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0})
    ea.Reload()
    return SimpleNamespace(dir=logdir / "tracin", ea=ea)


@pytest.fixture(scope="module")
def scores(run):
    """``(N, W)`` TracIn scores of the three epoch windows, computed without the CLI."""
    from lightning_influence.examples.digits import DigitsClassifier, DigitsDataModule

    cfg = yaml.safe_load(Path(run.config).read_text())
    dm = DigitsDataModule(**cfg["data"])
    query = queries.mean_loss(tuple(dm.splits["val"]), name="val_loss")
    log = InfluenceLog(run.log)
    x = np.stack([estimators.tracin(log, query, module=DigitsClassifier(**cfg["model"]), window=w).column(0)
                  for w in WINDOWS], axis=1)
    return SimpleNamespace(x=x, flipped=set(dm.flipped.tolist()), labels=dm.splits["train"][1].numpy())


def text(ea: EventAccumulator, tag: str) -> dict[int, str]:
    return {e.step: e.tensor_proto.string_val[0].decode() for e in ea.Tensors(f"{tag}/text_summary")}


def test_export_tags_and_steps(export):
    tags = export.ea.Tags()
    assert tags["histograms"] == [f"{Q}/window_scores"]
    assert [e.step for e in export.ea.Histograms(f"{Q}/window_scores")] == [4, 8, 12]
    assert sorted(tags["images"]) == sorted([f"{Q}/timeline", f"{Q}/timeline_absolute", f"{Q}/timeline_top",
                                             f"{Q}/pattern_counts"] + [f"{Q}/samples/e{w}" for w in range(3)])
    assert [e.step for e in export.ea.Images(f"{Q}/samples/e1")] == [8]
    for w, t2 in enumerate((4, 8, 12)):  # every window's table has its own tag
        assert list(text(export.ea, f"{Q}/top_k/e{w}")) == [t2]
    assert [e.step for e in export.ea.Images(f"{Q}/timeline")] == [12]
    assert {f"{Q}/{t}/text_summary" for t in ("top_k", "patterns", "about")} <= set(tags["tensors"])
    assert sorted(text(export.ea, f"{Q}/top_k")) == [4, 8, 12]
    scalars = set(tags["scalars"])
    assert {f"{Q}/pattern_count/{p}" for p in ("early", "late", "fluctuating", "stable")} & scalars
    assert len([t for t in scalars if t.startswith(f"{Q}/top_negative/id_")]) == 5
    assert len([t for t in scalars if t.startswith(f"{Q}/top_positive/id_")]) == 5


def test_histograms_match_the_scores(export, scores):
    for w, event in enumerate(export.ea.Histograms(f"{Q}/window_scores")):
        h, s = event.histogram_value, scores.x[:, w]
        assert h.num == 60
        assert h.min == pytest.approx(s.min(), rel=1e-6) and h.max == pytest.approx(s.max(), rel=1e-6)
        assert h.sum == pytest.approx(s.sum(), rel=1e-6, abs=1e-9)
        assert h.sum_squares == pytest.approx((s**2).sum(), rel=1e-6)


def test_top_sample_scalars_are_the_cumulative_scores(export, scores):
    total = scores.x.sum(axis=1)
    cumulative = np.cumsum(scores.x, axis=1)
    for side, ids in (("top_negative", np.argsort(total)[:5]), ("top_positive", np.argsort(-total)[:5])):
        for j in ids:
            events = export.ea.Scalars(f"{Q}/{side}/id_{j}")
            assert [e.step for e in events] == [0, 4, 8, 12]
            np.testing.assert_allclose([e.value for e in events], [0.0, *cumulative[j]], rtol=1e-6, atol=1e-9)


def test_top_k_tables(export, scores):
    for (t1, t2), (step, md) in zip(WINDOWS, sorted(text(export.ea, f"{Q}/top_k").items())):
        w = WINDOWS.index((t1, t2))
        assert step == t2 and f"steps [{t1}, {t2})" in md
        negative, positive = md.split("#### Most positive")
        rows = [line for line in negative.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
        order = np.argsort(scores.x[:, w], kind="stable")
        for r, line in enumerate(rows):
            cells = [c.strip() for c in line.strip("|").split("|")]
            j = order[r]
            assert int(cells[1]) == j
            assert float(cells[2]) == pytest.approx(scores.x[j, w], rel=1e-3)
            assert int(cells[3]) == scores.labels[j]
            assert ("flipped" in cells[4]) == (j in scores.flipped)
        assert "| 1 | " + str(int(np.argmax(scores.x[:, w]))) + " |" in positive


def test_pattern_counts(export, scores):
    expected = classify_windows(scores.x).counts()
    got = {p: int(export.ea.Scalars(f"{Q}/pattern_count/{p}")[0].value)
           for p in expected if f"{Q}/pattern_count/{p}" in export.ea.Tags()["scalars"]}
    assert got == {p: c for p, c in expected.items() if c}
    md = text(export.ea, f"{Q}/patterns")[12]
    for p, c in got.items():
        assert f"| {p} | {c} |" in md


@pytest.mark.parametrize("tag", ["timeline", "timeline_absolute"])
def test_heatmap_image(export, tag):
    from PIL import Image

    event = export.ea.Images(f"{Q}/{tag}")[0]
    img = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
    assert img.shape == (event.height, event.width, 3) and event.width > 400 and event.height > 300
    reds = np.count_nonzero((img[..., 0] > 150) & (img[..., 2] < 100))
    blues = np.count_nonzero((img[..., 2] > 150) & (img[..., 0] < 100))
    assert reds > 100 and blues > 100  # a diverging map with both signs present


def test_projector(export, scores):
    config = (export.dir / "projector_config.pbtxt").read_text()
    assert "influence/val_loss/gradients" in config
    meta_path = next(export.dir.rglob("metadata.tsv"))
    lines = meta_path.read_text().splitlines()
    header = lines[0].split("\t")
    assert header == ["id", "score_bucket", "pattern", "label", "flipped", "total_score"]
    rows = {int(r.split("\t")[0]): r.split("\t") for r in lines[1:]}
    assert len(rows) == 60
    total = scores.x.sum(axis=1)
    assert rows[int(np.argmin(total))][1] == "1 most harmful 5%"
    assert rows[int(np.argmax(total))][1] == "5 most helpful 5%"
    for j in scores.flipped:
        assert rows[j][4] == "yes"
    tensors = next(export.dir.rglob("tensors.tsv")).read_text().splitlines()
    assert len(tensors) == 60 and len(tensors[0].split("\t")) == min(64, 60)  # top principal components


def test_live_signals_during_training(run):
    ea = EventAccumulator(run.tb_dir, size_guidance={"scalars": 0, "histograms": 0})
    ea.Reload()
    p = "influence_tracker"
    for tag in ("seconds_per_step", "overhead_fraction", "bytes_recorded", "bytes_on_disk"):
        events = ea.Scalars(f"{p}/{tag}")
        assert [e.step for e in events] == [1, 3, 5, 7, 9, 11]  # every log_every_n_steps=2 steps
        values = [e.value for e in events]
        assert all(v >= 0 for v in values)
        if tag.startswith("bytes"):
            assert values == sorted(values)
    assert all(0 < e.value <= 1 for e in ea.Scalars(f"{p}/overhead_fraction"))
    log = InfluenceLog(run.log)
    for tag, field_ in (("per_sample_loss", "loss"), ("per_sample_grad_norm", "grad")):
        events = ea.Histograms(f"{p}/{tag}")
        assert [e.step for e in events] == [4, 8, 12]  # one per epoch
        for e, (t1, t2) in zip(events, WINDOWS):
            recs = list(log.iter_steps(t1, t2, fields=(field_,)))
            vals = np.concatenate([r.losses if field_ == "loss" else np.linalg.norm(r.grads.astype(np.float64), axis=1)
                                   for r in recs])
            assert e.histogram_value.num == 60 == len(vals)
            assert e.histogram_value.sum == pytest.approx(vals.sum(), rel=1e-5)


def test_live_is_silent_without_a_tensorboard_logger(tmp_path):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    assert LiveTensorBoard.attach(SimpleNamespace(is_global_zero=True, loggers=[])) is None
    assert LiveTensorBoard.attach(SimpleNamespace(is_global_zero=True, loggers=[CSVLogger(tmp_path)])) is None
    tb = TensorBoardLogger(tmp_path)
    assert LiveTensorBoard.attach(SimpleNamespace(is_global_zero=False, loggers=[tb])) is None
    assert LiveTensorBoard.attach(SimpleNamespace(is_global_zero=True, loggers=[tb], log_every_n_steps=5)).every == 5


def test_render_heatmap_and_colours():
    assert tuple(diverging_rgb(np.array([0.0]), 1.0)[0]) == (247, 247, 247)
    red, blue = diverging_rgb(np.array([-1.0, 1.0]), 1.0)
    assert red[0] > red[2] and blue[2] > blue[0]
    x = np.random.default_rng(0).normal(size=(900, 4))
    patterns = np.array(["stable"] * 800 + ["early"] * 100)
    img = render_heatmap(x, ["a", "b", "c", "d"], patterns=patterns, max_rows=300)
    assert img.dtype == np.uint8 and img.shape[2] == 3 and img.shape[0] >= 300
    x[:, 3] *= 1e-3  # a late window with tiny updates: invisible on the absolute scale, readable per window
    for scale, visible in (("absolute", False), ("window", True)):
        img = render_heatmap(x, ["a", "b", "c", "d"], scale=scale, max_rows=900, max_height=900)
        column = img[56 + 10: 56 + 800, 150 + 3 * 64 + 5].astype(int)  # inside the heatmap, window "d"
        assert (np.abs(column - 247).max() > 60) == visible


# ------------------------------------------------------------------------------ sample views
def _decoded(ea: EventAccumulator, tag: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(ea.Images(tag)[-1].encoded_image_string)).convert("RGB"))


def test_sample_grid_shows_the_window_top_samples(export, scores, run):
    """Window e2's image grid: tile k of the first row is the k-th most negative sample's 8x8 digit, and the image
    is as wide as TensorBoard's image card (shown unshrunk)."""
    from PIL import Image

    from lightning_influence.examples.digits import DigitsDataModule
    from lightning_influence.tensorboard_views import WIDTH, _as_image

    cfg = yaml.safe_load(Path(run.config).read_text())
    ds = DigitsDataModule(**cfg["data"]).train_dataset
    s = scores.x[:, 2]
    order = np.argsort(s, kind="stable")
    img = _decoded(export.ea, f"{Q}/samples/e2")
    assert img.shape[1] == WIDTH
    tile, pad, y0 = 52, 10, 8 + 16 + 18  # one title line, the row title
    for k in range(5):
        digit = np.asarray(Image.fromarray(_as_image(ds[int(order[k])][0])).resize((tile, tile), Image.NEAREST))
        x0 = pad + k * (tile + pad)
        np.testing.assert_array_equal(img[y0 + 2: y0 + tile - 2, x0 + 2: x0 + tile - 2], digit[2:-2, 2:-2])
    red = np.array([214, 39, 40])
    for k in range(5):  # flipped samples are framed in red
        x0 = pad + k * (tile + pad)
        assert (img[y0 + tile // 2, x0 - 1] == red).all() == (int(order[k]) in scores.flipped)


def test_token_samples_use_the_decoder_hook():
    import torch

    from lightning_influence.tensorboard_views import sample_kind, tokens_markdown

    items = {i: (torch.tensor([i, i + 1, 2]), i % 2, i) for i in range(6)}
    assert sample_kind(items[0]) == "tokens"
    scores = np.array([0.5, -2.0, 0.1, -1.0, 3.0, 0.0])
    vocab = "abcdefgh"
    md = tokens_markdown([("most negative", [1, 3]), ("most positive", [4])], scores, items.__getitem__,
                         np.array([0, 1, 0, 1, 0, 1]), {3}, lambda t: "".join(vocab[int(v)] for v in t), "title")
    lines = md.splitlines()
    assert "| 1 | -2.000e+00 | 1 | bcc |" in lines and "| 3 | -1.000e+00 | 1 **⚑ flipped** | dec |" in lines
    assert "| 4 | 3.000e+00 | 0 | efc |" in lines
    assert "token ids shown" in tokens_markdown([("x", [0])], scores, items.__getitem__, None, None, None, "t")


def test_top_heatmap_bar_chart_and_sprites():
    from lightning_influence.tensorboard_views import (PATTERN_COLOURS, render_bar_chart, render_top_heatmap,
                                                       sprite_tiles)

    x = np.random.default_rng(0).normal(size=(200, 10))
    img = render_top_heatmap(x, [f"e{i}" for i in range(10)], None, None, "a title", k=10)
    assert img.shape[1] == 330 and img.shape[0] >= 20 * 14  # TensorBoard's card width: 11-12 px text stays legible
    bars = render_bar_chart({"stable": 100, "negligible": 50}, {"stable": 10, "negligible": 0}, "counts")
    widths = [int(np.count_nonzero((bars[y, :, :] == PATTERN_COLOURS[p]).all(axis=1)))
              for y, p in ((32 + 5, "stable"), (32 + 30 + 5, "negligible"))]
    assert widths[0] == pytest.approx(2 * widths[1], abs=2)
    tiles = sprite_tiles([0, 1], np.array(["early", "negligible"]), lambda j: (torch_digit(j), 0, j))
    assert tiles.shape == (2, 3, 32, 32)
    np.testing.assert_allclose(tiles[0, :, 0, 0] * 255, PATTERN_COLOURS["early"], atol=1e-4)  # framed in its colour
    assert tiles[1, 0, 16, 16] != tiles[1, 0, 0, 0]  # the image inside


def torch_digit(j: int):
    import torch

    return torch.arange(64, dtype=torch.float32) * (j + 1)


def test_live_overhead_fraction_is_per_step_not_per_handoff():
    """The tracker hands steps to the writer (and the live TensorBoard) a few at a time, back to back: the fraction
    divided each step's tracker time by the time since the previous hand-off, microseconds for all but the first of a
    group, so it read min(1, ...) ≈ 0.67 whatever the overhead. A step's wall time is now the time between the tracker's
    recordings of it and of the step before."""
    from lightning_influence.log.records import StepRecord

    class Experiment:
        def __init__(self):
            self.scalars = {}

        def add_scalar(self, tag, value, step):
            self.scalars.setdefault(tag.rsplit("/", 1)[1], []).append((step, value))

    live = LiveTensorBoard(Experiment(), every=6)
    wall = [0.010, 0.020, 0.010, 0.040, 0.010, 0.010]  # each step's wall time; the tracker takes 2 ms of each
    start = 100.0
    for first in (0, 3):  # handed on three at a time, back to back
        for t in range(first, first + 3):
            rec = StepRecord(step=t, epoch=0, batch_idx=t, micro_batches=1, lrs=[0.1], ids=np.arange(4),
                             tracker_seconds=0.002, recorded_at=start + sum(wall[: t + 1]))
            live.on_step(t, rec, 0)
    (step, fraction), = live.experiment.scalars["overhead_fraction"]
    assert step == 5 and fraction == pytest.approx(np.mean([0.002 / w for w in wall[1:]]))  # step 0: nothing before it
    assert live.experiment.scalars["seconds_per_step"] == [(5, pytest.approx(0.002))]
