"""Influence in TensorBoard: live tracker signals during training, and the export of a query's results.

Presentation only: the numbers come in computed (estimators, ``evaluation.patterns``); this
module draws and writes them.

**Live** (:class:`LiveTensorBoard`, used by :class:`~lightning_influence.InfluenceTracker`
through the trainer's ``TensorBoardLogger``; silent without one). Tags::

    influence_tracker/seconds_per_step     tracker time per optimizer step (mean over log_every_n_steps): its callback
                                           hooks only, not the gradient capture inside forward and backward nor the
                                           writer thread (a GroupNorm CNN, 2026-12-01: 0.25 ms of the 2.9 ms a step
                                           the tracker added, fits of 600 steps with and without it)
    influence_tracker/overhead_fraction    tracker time / wall time of the step (the same part of the tracker)
    influence_tracker/bytes_recorded       cumulative bytes of records handed to the log writer
    influence_tracker/bytes_on_disk        cumulative bytes of closed segment files
    influence_tracker/per_sample_loss      histogram per epoch (when losses are recorded)
    influence_tracker/per_sample_grad_norm histogram per epoch (norm of the recorded, possibly
                                           projected, gradient rows)

**Export** (:func:`export`), for one query ``Q`` (tags use its name, sanitised) and the windows
``w = [t1, t2)`` of a grid; steps are each window's end step ``t2``::

    influence/Q/window_scores              histogram of the window's scores, one per window
    influence/Q/timeline                   heatmap image: samples (grouped by pattern) x windows, each
                                           window scaled by its RMS (signs kept)
    influence/Q/timeline_absolute          the same heatmap on one absolute score scale
    influence/Q/timeline_top               heatmap image: the samples with the most negative / positive total x
                                           windows, each row labelled by id (label, flipped mark)
    influence/Q/top_k                      markdown: most negative / most positive samples of each window
    influence/Q/top_k/WINDOW               the same, one tag per window (every window reachable)
    influence/Q/samples/WINDOW             image grid of the window's most negative / positive samples, captioned
                                           with id, score, label, FLIPPED (image data); markdown with the decoded
                                           text for token data (ExportData.decode, the decoder hook)
    influence/Q/pattern_counts             bar chart image of the pattern counts (flipped labels among them)
    influence/Q/patterns                   markdown: per-pattern counts (and flipped labels among them)
    influence/Q/pattern_count/P            scalar at the last step, per pattern P
    influence/Q/top_negative/id_J          cumulative influence of sample J at each window end
    influence/Q/top_positive/id_J          (the samples with the most negative / positive total)
    embedding "influence/Q/gradients"      projector: per-sample gradients, thumbnails framed in their pattern's
                                           colour (the sample itself for images); colour by score bucket, pattern,
                                           label, flipped
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from lightning_influence.log.outer import dense_rows

__all__ = ["ExportData", "LiveTensorBoard", "export", "render_heatmap", "sanitize_tag"]

# ColorBrewer RdBu (11 classes): red for negative, white at zero, blue for positive.
_RDBU = np.array([
    (103, 0, 31), (178, 24, 43), (214, 96, 77), (244, 165, 130), (253, 219, 199), (247, 247, 247),
    (209, 229, 240), (146, 197, 222), (67, 147, 195), (33, 102, 172), (5, 48, 97)], dtype=np.float64)
_PATTERN_ORDER = ("early", "late", "fluctuating", "stable", "negligible")


def sanitize_tag(name: str) -> str:
    """A query name as a TensorBoard tag component (``test:17`` -> ``test_17``)."""
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", name).strip("_") or "query"


def diverging_rgb(values: np.ndarray, vmax: float) -> np.ndarray:
    """Map values to RGB (uint8) on the RdBu scale, symmetric around 0, clipped at ``±vmax``."""
    x = np.clip(np.asarray(values, dtype=np.float64) / (vmax if vmax > 0 else 1.0), -1.0, 1.0)
    pos = (x + 1.0) / 2.0 * (len(_RDBU) - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, len(_RDBU) - 1)
    frac = (pos - lo)[..., None]
    return np.round(_RDBU[lo] * (1 - frac) + _RDBU[hi] * frac).astype(np.uint8)


# ------------------------------------------------------------------------------------ export
@dataclass
class ExportData:
    """Everything :func:`export` shows for one query.

    Attributes:
        query: the query's name.
        method: estimator name (as reported by the estimator).
        windows: ``W`` half-open step ranges ``[t1, t2)``, consecutive.
        window_labels: ``W`` short labels for the axes (e.g. ``"e3"`` or ``"100-200"``).
        window_scores: ``(N, W)`` score of every sample id in every window (docs/influence-math.md §3 sign).
        loss_query: the query is a loss (negative = harmful); otherwise an output
            (negative = the sample pushed the output up).
        patterns: ``(N,)`` temporal pattern of each sample, or ``None``.
        labels: ``(N,)`` training labels (``-1`` unknown), or ``None``.
        flipped: ids of samples known to be corrupted (flipped labels), or ``None``.
        embedding: ``(N, D)`` one gradient row per sample for the projector (``NaN`` rows:
            the sample has no gradient), or ``None``.
        embedding_note: how the embedding rows were obtained (shown in the text dashboard).
        get_item: ``get_item(id)`` the training item (``(x, y, id)``, a dict, ...) for the sample
            views: images are drawn, token ids decoded (:mod:`lightning_influence.tensorboard_views`).
        decode: ``decode(tokens) -> str`` for token data (the decoder hook), or ``None`` (ids shown).
    """

    query: str
    method: str
    windows: list[tuple[int, int]]
    window_labels: list[str]
    window_scores: np.ndarray
    loss_query: bool = True
    patterns: np.ndarray | None = None
    labels: np.ndarray | None = None
    flipped: set[int] | None = None
    embedding: np.ndarray | None = None
    embedding_note: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    get_item: Callable[[int], Any] | None = None
    decode: Callable[[Any], str] | None = None

    def __post_init__(self) -> None:
        self.window_scores = np.asarray(self.window_scores, dtype=np.float64)
        n, w = self.window_scores.shape
        if w != len(self.windows) or w != len(self.window_labels):
            raise ValueError(f"{w} score columns but {len(self.windows)} windows and {len(self.window_labels)} labels")
        for name in ("patterns", "labels", "embedding"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"{name} has {len(value)} rows, expected {n}")

    @property
    def negative_word(self) -> str:
        return "harmful" if self.loss_query else "pushes the output up"

    @property
    def positive_word(self) -> str:
        return "helpful" if self.loss_query else "pushes the output down"


def export(logdir: str | Path, data: ExportData, top_k: int = 10, scalar_k: int = 5) -> dict[str, list[str]]:
    """Write one query's results as TensorBoard events under ``logdir``.

    Args:
        logdir: the run directory (``tensorboard --logdir`` its parent, or it).
        data: the scores, windows and per-sample annotations.
        top_k: rows of each top-k table.
        scalar_k: samples with the most negative and the most positive total whose
            cumulative influence is written as scalars.

    Returns:
        The tags written, by kind (``scalars``, ``histograms``, ``images``, ``text``, ``embeddings``).
    """
    from torch.utils.tensorboard import SummaryWriter

    q = sanitize_tag(data.query)
    prefix = f"influence/{q}"
    written: dict[str, list[str]] = {"scalars": [], "histograms": [], "images": [], "text": [], "embeddings": []}
    x = data.window_scores
    n = x.shape[0]
    ends = [t2 for _, t2 in data.windows]
    last = ends[-1]
    total = x.sum(axis=1)
    cumulative = np.cumsum(x, axis=1)
    writer = SummaryWriter(log_dir=str(logdir))
    try:
        tag = f"{prefix}/window_scores"
        for w, t2 in enumerate(ends):
            writer.add_histogram(tag, x[:, w], global_step=t2)
        written["histograms"].append(tag)

        for tag, scale, what in ((f"{prefix}/timeline", "window", "score / its window's RMS"),
                                 (f"{prefix}/timeline_absolute", "absolute", "score")):
            image = render_heatmap(x, data.window_labels, patterns=data.patterns, scale=scale,
                                   title=f"{data.method}: {data.query}, {what} per window (red: negative = "
                                         f"{data.negative_word}; blue: positive = {data.positive_word})")
            writer.add_image(tag, image, global_step=last, dataformats="HWC")
            written["images"].append(tag)

        tag = f"{prefix}/top_k"
        for w, (t1, t2) in enumerate(data.windows):
            writer.add_text(tag, _top_k_markdown(data, w, top_k), global_step=t2)
            writer.add_text(f"{tag}/{sanitize_tag(data.window_labels[w])}", _top_k_markdown(data, w, top_k), global_step=t2)
            written["text"].append(f"{tag}/{sanitize_tag(data.window_labels[w])}")
        written["text"].append(tag)
        _write_views(writer, prefix, data, last, written)

        if data.patterns is not None:
            tag = f"{prefix}/patterns"
            writer.add_text(tag, _patterns_markdown(data), global_step=last)
            written["text"].append(tag)
            for p in _pattern_names(data.patterns):
                tag = f"{prefix}/pattern_count/{p}"
                writer.add_scalar(tag, float(np.count_nonzero(data.patterns == p)), global_step=last)
                written["scalars"].append(tag)

        k = min(scalar_k, n)
        order = np.argsort(total, kind="stable")
        layout_lines: dict[str, list[str]] = {}
        for side, ids in (("top_negative", order[:k]), ("top_positive", order[::-1][:k])):
            for j in ids:
                tag = f"{prefix}/{side}/id_{int(j)}"
                writer.add_scalar(tag, 0.0, global_step=data.windows[0][0])
                for w, t2 in enumerate(ends):
                    writer.add_scalar(tag, float(cumulative[j, w]), global_step=t2)
                written["scalars"].append(tag)
            layout_lines[side] = [rf"{re.escape(prefix)}/{side}/.*"]
        writer.add_custom_scalars({f"influence {data.query}": {
            f"most negative total ({data.negative_word})": ["Multiline", layout_lines["top_negative"]],
            f"most positive total ({data.positive_word})": ["Multiline", layout_lines["top_positive"]],
        }})

        if data.embedding is not None:
            rows = np.isfinite(data.embedding).all(axis=1)
            if rows.any():
                tag = f"{prefix}/gradients"
                meta, header = _embedding_metadata(data, total, np.nonzero(rows)[0])
                import torch

                from lightning_influence.tensorboard_views import sprite_tiles

                writer.add_embedding(torch.from_numpy(_reduce_dims(data.embedding[rows])), metadata=meta,
                                     metadata_header=header, global_step=last, tag=tag,
                                     label_img=torch.from_numpy(sprite_tiles(np.nonzero(rows)[0], data.patterns,
                                                                             data.get_item)))
                written["embeddings"].append(tag)
        writer.add_text(f"{prefix}/about", _about_markdown(data), global_step=last)
        written["text"].append(f"{prefix}/about")
    finally:
        writer.close()
    return written


def _write_views(writer: Any, prefix: str, data: ExportData, last: int, written: dict[str, list[str]],
                 k: int = 5) -> None:
    """Which samples, when: per window the most harmful/helpful samples (images or decoded tokens), the top
    samples' heatmap labelled by id, and the pattern counts as bars (:mod:`lightning_influence.tensorboard_views`)."""
    from lightning_influence import tensorboard_views as views

    x = data.window_scores
    tag = f"{prefix}/timeline_top"
    writer.add_image(tag, views.render_top_heatmap(x, data.window_labels, data.labels, data.flipped,
                                                   f"{data.method}: {data.query}, the samples with the most negative "
                                                   f"({data.negative_word}) and most positive total, per window"),
                     global_step=last, dataformats="HWC")
    written["images"].append(tag)
    if data.patterns is not None:
        names = _pattern_names(data.patterns)
        counts = {p: int(np.count_nonzero(data.patterns == p)) for p in names}
        flips = None if data.flipped is None else \
            {p: len(set(np.nonzero(data.patterns == p)[0].tolist()) & data.flipped) for p in names}
        tag = f"{prefix}/pattern_counts"
        writer.add_image(tag, views.render_bar_chart(counts, flips, f"temporal patterns of {data.query} "
                                                                    f"({len(data.windows)} windows)"),
                         global_step=last, dataformats="HWC")
        written["images"].append(tag)
    kind = views.sample_kind(data.get_item(0)) if data.get_item is not None and len(x) else None
    if kind is None:
        return
    for w, (t1, t2) in enumerate(data.windows):
        s = x[:, w]
        order = np.argsort(s, kind="stable")
        rows = [(f"most negative ({data.negative_word})", order[:k]), (f"most positive ({data.positive_word})",
                                                                       order[::-1][:k])]
        title = f"{data.method}: {data.query}, window {data.window_labels[w]} = steps [{t1}, {t2})"
        tag = f"{prefix}/samples/{sanitize_tag(data.window_labels[w])}"
        if kind == "image":
            writer.add_image(tag, views.render_sample_grid(rows, s, data.get_item, data.labels, data.flipped, title),
                             global_step=t2, dataformats="HWC")
            written["images"].append(tag)
        else:
            writer.add_text(tag, views.tokens_markdown(rows, s, data.get_item, data.labels, data.flipped, data.decode,
                                                       title), global_step=t2)
            written["text"].append(tag)


def _pattern_names(patterns: np.ndarray) -> list[str]:
    present = set(np.unique(patterns).tolist())
    return [p for p in _PATTERN_ORDER if p in present] + sorted(present - set(_PATTERN_ORDER))


def _label_cells(data: ExportData, j: int) -> list[str]:
    cells = []
    if data.labels is not None:
        cells.append(str(int(data.labels[j])) if data.labels[j] >= 0 else "?")
    if data.flipped is not None:
        cells.append("**⚑ flipped**" if j in data.flipped else "")
    return cells


def _table(data: ExportData, rows: Sequence[int], scores: np.ndarray) -> str:
    head = ["rank", "id", "score"] + (["label"] if data.labels is not None else []) + \
        (["flipped"] if data.flipped is not None else []) + (["pattern"] if data.patterns is not None else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r, j in enumerate(rows, 1):
        cells = [str(r), str(int(j)), f"{scores[j]:.4g}", *_label_cells(data, int(j))]
        if data.patterns is not None:
            cells.append(str(data.patterns[j]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _top_k_markdown(data: ExportData, w: int, k: int) -> str:
    s = data.window_scores[:, w]
    k = min(k, len(s))
    order = np.argsort(s, kind="stable")
    t1, t2 = data.windows[w]
    parts = [f"**{data.method}**, query **{data.query}**, window **{data.window_labels[w]}** = steps [{t1}, {t2})"]
    for title, rows in ((f"Most negative ({data.negative_word})", order[:k]),
                        (f"Most positive ({data.positive_word})", order[::-1][:k])):
        parts.append(f"#### {title}\n\n" + _table(data, rows, s))
    if data.flipped:
        hits = len(set(order[: len(data.flipped)].tolist()) & data.flipped)
        parts.append(f"Flipped labels among the {len(data.flipped)} most negative: {hits} "
                     f"({hits / len(data.flipped):.0%}; {len(data.flipped) / len(s):.0%} expected by chance).")
    return "\n\n".join(parts)


def _patterns_markdown(data: ExportData) -> str:
    assert data.patterns is not None
    n = len(data.patterns)
    total = data.window_scores.sum(axis=1)
    head = ["pattern", "samples", "share", "mean total score"] + (["flipped labels"] if data.flipped is not None else [])
    lines = [f"Temporal patterns of **{data.query}** ({data.method}) over {len(data.windows)} windows",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in _pattern_names(data.patterns):
        sel = np.nonzero(data.patterns == p)[0]
        cells = [p, str(len(sel)), f"{len(sel) / n:.1%}", f"{total[sel].mean():.4g}"]
        if data.flipped is not None:
            cells.append(str(len(set(sel.tolist()) & data.flipped)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _about_markdown(data: ExportData) -> str:
    lines = [f"Method **{data.method}**, query **{data.query}**, {data.window_scores.shape[0]} training samples, "
             f"{len(data.windows)} windows from step {data.windows[0][0]} to {data.windows[-1][1]}.",
             "",
             f"Sign: a positive score means removing the sample raises the query; "
             f"negative = {data.negative_word}, positive = {data.positive_word}."]
    if data.embedding_note:
        lines += ["", f"Projector: {data.embedding_note}; each point is framed in its pattern's colour (early orange, "
                  "late purple, fluctuating light orange, stable blue, negligible grey); colour by score_bucket too."]
    if data.info:
        lines.append("")
        lines += [f"- {key}: {value}" for key, value in data.info.items()]
    return "\n".join(lines)


def score_buckets(total: np.ndarray, negative_word: str = "negative", positive_word: str = "positive") -> np.ndarray:
    """Quantile buckets of the total score: 5% / 20% tails on each side, and the middle 50%."""
    ranks = np.argsort(np.argsort(total, kind="stable"), kind="stable") / max(1, len(total) - 1)
    names = np.array([f"1 most {negative_word} 5%", f"2 {negative_word} 5-25%", "3 middle 50%",
                      f"4 {positive_word} 5-25%", f"5 most {positive_word} 5%"])
    return names[np.searchsorted([0.05, 0.25, 0.75, 0.95], ranks, side="right")]


def _embedding_metadata(data: ExportData, total: np.ndarray, rows: np.ndarray) -> tuple[list[list[str]], list[str]]:
    buckets = score_buckets(total, data.negative_word, data.positive_word)
    header = ["id", "score_bucket", "pattern", "label", "flipped", "total_score"]
    meta = []
    for j in rows:
        meta.append([str(int(j)), str(buckets[j]),
                     str(data.patterns[j]) if data.patterns is not None else "",
                     str(int(data.labels[j])) if data.labels is not None and data.labels[j] >= 0 else "?",
                     ("yes" if j in data.flipped else "no") if data.flipped is not None else "?",
                     f"{total[j]:.4g}"])
    return meta, header


def _reduce_dims(x: np.ndarray, dims: int = 64) -> np.ndarray:
    """Keep the embedding file small: project rows on their top ``dims`` principal axes (centred)."""
    x = np.asarray(x, dtype=np.float64)
    if x.shape[1] <= dims:
        return x.astype(np.float32)
    xc = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    return (xc @ vt[:dims].T).astype(np.float32)


# ----------------------------------------------------------------------------------- heatmap
def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 or without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def render_heatmap(window_scores: np.ndarray, window_labels: Sequence[str], patterns: np.ndarray | None = None,
                   title: str = "", scale: str = "absolute", vmax: float | None = None, max_rows: int = 600,
                   max_height: int = 720) -> np.ndarray:
    """Draw samples x windows as an RGB image (``H x W x 3`` uint8) with axes and a colour bar.

    Rows are grouped by pattern (early, late, fluctuating, stable) and sorted by total score
    inside a group; with more than ``max_rows`` samples, the ``max_rows`` with the largest
    RMS score are drawn (the group labels say how many of how many). ``scale="absolute"``
    colours the scores on one symmetric scale clipped at ``vmax`` (default: the 99th
    percentile of ``|score|``); ``scale="window"`` divides each window's column by its RMS over
    the samples first (signs kept; ``vmax`` default 3), so that windows with small updates
    (a decayed learning rate) stay readable, as in the pattern classification.
    """
    from PIL import Image, ImageDraw

    x = np.asarray(window_scores, dtype=np.float64)
    n, w = x.shape
    if scale == "window":
        rms = np.sqrt((x**2).mean(axis=0))
        x = x / np.where(rms > 0, rms, 1.0)
        vmax = 3.0 if vmax is None else vmax
    elif scale != "absolute":
        raise ValueError(f"scale must be 'absolute' or 'window', got {scale!r}")
    keep = np.arange(n)
    if n > max_rows:  # the largest-RMS rows of each pattern, in proportion, at least a few of every pattern
        rms = np.sqrt((x**2).mean(axis=1))
        labels = patterns if patterns is not None else np.zeros(n)
        chosen = []
        for name in np.unique(labels):
            idx = np.nonzero(labels == name)[0]
            quota = max(min(len(idx), 10), int(round(max_rows * len(idx) / n)))
            chosen.append(idx[np.argsort(-rms[idx], kind="stable")[:quota]])
        keep = np.sort(np.concatenate(chosen))
    groups = patterns[keep] if patterns is not None else np.full(len(keep), "all samples")
    total = x[keep].sum(axis=1)
    order_names = _pattern_names(groups) if patterns is not None else ["all samples"]
    rows: list[int] = []
    spans: list[tuple[str, int, int, int]] = []  # name, first row, rows shown, rows in total
    for name in order_names:
        sel = np.nonzero(groups == name)[0]
        sel = sel[np.argsort(total[sel], kind="stable")]
        spans.append((name, len(rows), len(sel), int(np.count_nonzero(patterns == name)) if patterns is not None else n))
        rows += keep[sel].tolist()
    data = x[rows]
    if vmax is None:
        vmax = float(np.percentile(np.abs(x), 99)) if x.size else 1.0
        vmax = vmax if vmax > 0 else float(np.abs(x).max() or 1.0)
    row_h = max(1, min(12, max_height // max(1, len(rows))))
    cell_w = max(14, min(64, 900 // max(1, w)))
    hm_h, hm_w = len(rows) * row_h, w * cell_w
    f_small, f_norm, f_title = _font(12), _font(14), _font(15)
    left, top, right, bottom = 150, 56, 170, 70
    width, height = left + hm_w + right, top + max(hm_h, 220) + bottom
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    cells = diverging_rgb(data, vmax)
    hm = Image.fromarray(cells).resize((hm_w, hm_h), Image.NEAREST)
    img.paste(hm, (left, top))
    draw.rectangle([left - 1, top - 1, left + hm_w, top + hm_h], outline="black")
    from lightning_influence.tensorboard_views import wrap

    for i, line in enumerate(wrap(title, max(40, width // 9))[:2]):  # two lines at most, never clipped
        draw.text((10, 6 + 20 * i), line, fill="black", font=f_title)
    # y axis: pattern groups with separators
    for name, start, shown, count in spans:
        if shown == 0:
            continue
        y0, y1 = top + start * row_h, top + (start + shown) * row_h
        if start > 0:
            draw.line([left - 6, y0, left + hm_w, y0], fill="black", width=2)
        sub = (f"{count} sample" + "s" * (count != 1)) if shown == count else f"{shown} of {count}"
        ym = (y0 + y1) // 2
        draw.text((left - 10, ym - 9), name, fill="black", font=f_norm, anchor="ra")
        draw.text((left - 10, ym + 7), sub, fill="dimgray", font=f_small, anchor="ra")
    _vertical_text(img, "samples, grouped by pattern", (14, top + hm_h // 2), f_norm)
    # x axis: window labels (thinned to fit)
    step = max(1, int(np.ceil(w * 40 / max(hm_w, 1))))
    for i in range(0, w, step):
        xc = left + i * cell_w + cell_w // 2
        draw.line([xc, top + hm_h, xc, top + hm_h + 4], fill="black")
        draw.text((xc, top + hm_h + 7), str(window_labels[i]), fill="black", font=f_small, anchor="ma")
    draw.text((left + hm_w // 2, top + hm_h + 30), "window", fill="black", font=f_norm, anchor="ma")
    # colour bar
    cb_x, cb_w, cb_h = left + hm_w + 30, 18, max(160, min(hm_h, 400))
    grad = np.linspace(vmax, -vmax, cb_h)[:, None].repeat(cb_w, axis=1)
    img.paste(Image.fromarray(diverging_rgb(grad, vmax)), (cb_x, top))
    draw.rectangle([cb_x - 1, top - 1, cb_x + cb_w, top + cb_h], outline="black")
    for frac, value in ((0.0, vmax), (0.5, 0.0), (1.0, -vmax)):
        y = top + int(round(frac * (cb_h - 1)))
        draw.line([cb_x + cb_w, y, cb_x + cb_w + 4, y], fill="black")
        draw.text((cb_x + cb_w + 7, y), f"{value:+.2g}" if value else "0", fill="black", font=f_small, anchor="lm")
    draw.text((cb_x - 4, top + cb_h + 8), "score / window RMS" if scale == "window" else "score", fill="black",
              font=f_small)
    draw.text((cb_x - 4, top + cb_h + 24), "(clipped)", fill="black", font=f_small)
    return np.asarray(img)


def _vertical_text(img, text: str, center: tuple[int, int], font) -> None:
    from PIL import Image, ImageDraw

    probe = ImageDraw.Draw(img)
    x0, y0, x1, y1 = probe.textbbox((0, 0), text, font=font)
    tile = Image.new("RGB", (x1 - x0 + 4, y1 - y0 + 4), "white")
    ImageDraw.Draw(tile).text((2 - x0, 2 - y0), text, fill="black", font=font)
    tile = tile.rotate(90, expand=True)
    img.paste(tile, (center[0] - tile.width // 2, max(0, center[1] - tile.height // 2)))


# ---------------------------------------------------------------------------------- live
class LiveTensorBoard:
    """Cheap running signals of :class:`~lightning_influence.InfluenceTracker` in the trainer's TensorBoard.

    Created by :meth:`attach`, which returns ``None`` (nothing is logged) when the trainer has
    no ``TensorBoardLogger`` or on ranks other than 0. Scalars are averaged over
    ``trainer.log_every_n_steps`` steps; histograms are written once per epoch.
    """

    PREFIX = "influence_tracker"

    def __init__(self, experiment: Any, every: int) -> None:
        self.experiment = experiment
        self.every = max(1, int(every))
        self._seconds: list[float] = []
        self._fractions: list[float] = []
        self._last_wall: float | None = None
        self._bytes_recorded = 0
        self._losses: list[np.ndarray] = []
        self._norms: list[np.ndarray] = []

    @classmethod
    def attach(cls, trainer: Any) -> "LiveTensorBoard | None":
        """The live logger for ``trainer``, or ``None`` when there is no TensorBoardLogger (silent)."""
        from lightning.pytorch.loggers import TensorBoardLogger

        if not getattr(trainer, "is_global_zero", True):
            return None
        logger = next((lg for lg in getattr(trainer, "loggers", []) if isinstance(lg, TensorBoardLogger)), None)
        if logger is None:
            return None
        return cls(logger.experiment, getattr(trainer, "log_every_n_steps", 50))

    def on_step(self, step: int, record: Any, bytes_on_disk: int) -> None:
        """After the tracker recorded optimizer step ``step`` (a ``StepRecord``). Steps reach here a few at a time
        (``tracker_inflight``), so a step's wall time is the time between the tracker's recordings of it and of the
        step before (``record.recorded_at``), not between these calls."""
        now = record.recorded_at if math.isfinite(record.recorded_at) else time.perf_counter()
        self._seconds.append(float(record.tracker_seconds))
        if self._last_wall is not None and now > self._last_wall:
            self._fractions.append(min(1.0, float(record.tracker_seconds) / (now - self._last_wall)))
        self._last_wall = now
        losses = None if record.losses is None else np.asarray(record.losses, dtype=np.float64)  # as stored
        for arr in (record.ids, losses, record.grads, record.hvps):
            if arr is not None:
                self._bytes_recorded += int(arr.nbytes)
        if losses is not None:
            self._losses.append(losses)
        if record.grads is not None:
            self._norms.append(np.linalg.norm(dense_rows(np.asarray(record.grads, dtype=np.float64), record.grad_outer),
                                              axis=1))
        if (step + 1) % self.every == 0:
            p, exp = self.PREFIX, self.experiment
            exp.add_scalar(f"{p}/seconds_per_step", float(np.mean(self._seconds)), step)
            if self._fractions:
                exp.add_scalar(f"{p}/overhead_fraction", float(np.mean(self._fractions)), step)
            exp.add_scalar(f"{p}/bytes_recorded", float(self._bytes_recorded), step)
            exp.add_scalar(f"{p}/bytes_on_disk", float(bytes_on_disk), step)
            self._seconds, self._fractions = [], []

    def on_epoch_end(self, step: int) -> None:
        """Histograms of the epoch's per-sample losses and gradient norms."""
        p, exp = self.PREFIX, self.experiment
        if self._losses:
            exp.add_histogram(f"{p}/per_sample_loss", np.concatenate(self._losses), step)
        if self._norms:
            exp.add_histogram(f"{p}/per_sample_grad_norm", np.concatenate(self._norms), step)
        self._losses, self._norms = [], []
        self._last_wall = None  # validation and epoch-end work are not a step's wall time
