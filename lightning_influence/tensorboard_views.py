"""Pictures for the TensorBoard export: which samples, when (used by :func:`lightning_influence.tensorboard.export`).

* :func:`sample_kind` / :func:`sample_input`: what a training item shows: an ``image`` (a float
  ``(C, H, W)`` / ``(H, W)`` tensor, or a flat float vector of square length such as the 8×8 digits),
  ``tokens`` (a 1-D integer tensor) or nothing;
* :func:`render_sample_grid`: the most harmful and most helpful samples of a window as image tiles,
  each captioned with id, score, label and a flipped mark;
* :func:`tokens_markdown`: the same for token data, decoded by a user-supplied
  ``decode(tokens) -> str`` (the decoder hook: ``lightning-influence tensorboard --decoder
  module:function``, or ``ExportData.decode``); without one the token ids are shown;
* :func:`render_top_heatmap`: the samples with the most negative and most positive total score x
  windows, every row labelled by id, at a size TensorBoard shows without shrinking the text;
* :func:`render_bar_chart`: pattern counts (and flipped labels among them) as bars;
* :func:`sprite_tiles`: projector thumbnails: the sample itself when it is an image, framed in its
  pattern's colour, else a tile of that colour, so the projector opens coloured.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

__all__ = ["PATTERN_COLOURS", "render_bar_chart", "render_sample_grid", "render_top_heatmap", "sample_input",
           "sample_kind", "sprite_tiles", "tokens_markdown"]

PATTERN_COLOURS = {"early": (230, 97, 1), "late": (94, 60, 153), "fluctuating": (253, 184, 99),
                   "stable": (33, 102, 172), "negligible": (200, 200, 200)}
WIDTH = 330  # px: the width of TensorBoard's image cards, so the pictures are shown unshrunk
SAMPLES_PER_ROW = 5
_INPUT_KEYS = ("x", "image", "images", "pixel_values", "input_ids", "tokens", "features", "input", "inputs")


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def sample_input(item: Any) -> Any:
    """The input of a training item: ``item[0]`` of a tuple, a dict's ``x``/``image``/``input_ids``/... entry."""
    if isinstance(item, dict):
        return next((item[k] for k in _INPUT_KEYS if k in item), None)
    if isinstance(item, (tuple, list)):
        return item[0] if item else None
    return item


def _as_image(x: Any) -> np.ndarray | None:
    """``(H, W, 3)`` uint8 of an image-like input, or ``None``."""
    import torch

    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return None
    a = x.detach().cpu().double().numpy()
    if a.ndim == 1:
        side = int(round(math.sqrt(a.size)))
        if side < 4 or side * side != a.size:
            return None
        a = a.reshape(side, side)
    if a.ndim == 3 and a.shape[0] in (1, 3):
        a = a.transpose(1, 2, 0)
    elif a.ndim == 3 and a.shape[2] in (1, 3):
        pass
    elif a.ndim != 2:
        return None
    lo, hi = float(a.min()), float(a.max())
    a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    a = np.round(a * 255).astype(np.uint8)
    if a.ndim == 2:
        a = a[:, :, None]
    return np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a


def sample_kind(item: Any) -> str | None:
    """``"image"``, ``"tokens"`` or ``None`` for a training item (see the module docstring)."""
    import torch

    x = sample_input(item)
    if _as_image(x) is not None:
        return "image"
    if isinstance(x, torch.Tensor) and x.dim() == 1 and not x.is_floating_point() and x.dtype != torch.bool:
        return "tokens"
    return None


def _caption(j: int, score: float, label: int | None, flipped: bool | None) -> str:
    text = f"#{j}\n{score:+.2e}"
    if label is not None and label >= 0:
        text += f"\ny={label}" + (" FLIP" if flipped else "")
    elif flipped:
        text += "\nFLIP"
    return text


def render_sample_grid(rows: Sequence[tuple[str, Sequence[int]]], scores: np.ndarray, get_item: Callable[[int], Any],
                       labels: np.ndarray | None, flipped: set[int] | None, title: str, tile: int = 52,
                       pad: int = 10) -> np.ndarray:
    """Image tiles of samples in titled rows (``[("most harmful", ids), ...]``), each captioned; ``H x W x 3`` uint8.

    Five tiles per row make it ``WIDTH`` px wide: TensorBoard's image card shows it unshrunk, text legible."""
    from PIL import Image, ImageDraw

    f_cap, f_row, f_title = _font(11), _font(12), _font(12)
    per_row = max((len(ids) for _, ids in rows), default=1)
    cap_h, row_title_h = 44, 18
    lines = wrap(title, 52)[:2]
    head = 8 + 16 * len(lines)
    width = max(pad + per_row * (tile + pad), WIDTH)
    height = head + len(rows) * (row_title_h + tile + cap_h + pad)
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(lines):
        draw.text((pad, 4 + 16 * i), line, fill="black", font=f_title)
    y = head
    for name, ids in rows:
        draw.text((pad, y), name, fill="black", font=f_row)
        y += row_title_h
        for k, j in enumerate(ids):
            x0 = pad + k * (tile + pad)
            pix = _as_image(sample_input(get_item(int(j))))
            if pix is not None:
                img.paste(Image.fromarray(pix).resize((tile, tile), Image.NEAREST), (x0, y))
            is_flipped = flipped is not None and int(j) in flipped
            draw.rectangle([x0 - 1, y - 1, x0 + tile, y + tile], outline=(214, 39, 40) if is_flipped else "gray",
                           width=3 if is_flipped else 1)
            label = None if labels is None else int(labels[int(j)])
            draw.multiline_text((x0, y + tile + 3), _caption(int(j), float(scores[int(j)]), label,
                                                             None if flipped is None else is_flipped),
                                fill=(214, 39, 40) if is_flipped else "black", font=f_cap, spacing=2)
        y += tile + cap_h + pad
    return np.asarray(img)


def tokens_markdown(rows: Sequence[tuple[str, Sequence[int]]], scores: np.ndarray, get_item: Callable[[int], Any],
                    labels: np.ndarray | None, flipped: set[int] | None, decode: Callable[[Any], str] | None,
                    title: str) -> str:
    """Markdown tables of token samples, decoded by ``decode`` (else their ids)."""
    parts = [title]
    for name, ids in rows:
        lines = [f"#### {name}", "", "| id | score | label | text |", "|---|---|---|---|"]
        for j in ids:
            tokens = sample_input(get_item(int(j)))
            text = decode(tokens) if decode is not None else " ".join(str(int(t)) for t in tokens)
            text = str(text).replace("|", "\\|").replace("\n", " ")
            label = "?" if labels is None or labels[int(j)] < 0 else str(int(labels[int(j)]))
            if flipped is not None and int(j) in flipped:
                label += " **⚑ flipped**"
            lines.append(f"| {int(j)} | {float(scores[int(j)]):.3e} | {label} | {text} |")
        parts.append("\n".join(lines))
    if decode is None:
        parts.append("_token ids shown: pass a decoder (`--decoder module:function`, ExportData.decode) for text_")
    return "\n\n".join(parts)


def render_top_heatmap(window_scores: np.ndarray, window_labels: Sequence[str], labels: np.ndarray | None,
                       flipped: set[int] | None, title: str, k: int = 10) -> np.ndarray:
    """The ``k`` samples with the most negative and the ``k`` with the most positive total x windows, labelled by id.

    About 560 px wide (TensorBoard's image card shows it unshrunk), 14 px text; colours on one
    symmetric scale (red negative, blue positive) clipped at the largest ``|score|`` shown.
    """
    from PIL import Image, ImageDraw

    from lightning_influence.tensorboard import diverging_rgb

    x = np.asarray(window_scores, dtype=np.float64)
    total = x.sum(axis=1)
    order = np.argsort(total, kind="stable")
    k = min(k, max(1, len(total) // 2))
    ids = list(order[:k]) + list(order[::-1][:k])[::-1]  # most negative on top, most positive at the bottom
    data = x[ids]
    vmax = float(np.percentile(np.abs(data), 95)) or float(np.abs(data).max()) or 1.0  # one outlier cell stays legible
    f_small, f_norm = _font(11), _font(12)
    n_w = x.shape[1]
    lines = wrap(title, 50)[:3]
    left, top, row_h = 96, 10 + 15 * len(lines), 14
    cell_w = max(8, min(36, (WIDTH - left - 10) // max(1, n_w)))
    hm_w, hm_h = n_w * cell_w, len(ids) * row_h
    width, height = max(left + hm_w + 10, WIDTH), top + hm_h + 52
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(lines):
        draw.text((6, 4 + 15 * i), line, fill="black", font=f_norm)
    img.paste(Image.fromarray(diverging_rgb(data, vmax)).resize((hm_w, hm_h), Image.NEAREST), (left, top))
    draw.line([left - 4, top + k * row_h, left + hm_w, top + k * row_h], fill="black", width=2)
    for r, j in enumerate(ids):
        lab = "" if labels is None or labels[j] < 0 else f" y={int(labels[j])}"
        mark = " flip" if flipped is not None and int(j) in flipped else ""
        draw.text((left - 6, top + r * row_h + row_h // 2), f"#{int(j)}{lab}{mark}", anchor="rm", font=f_small,
                  fill=(214, 39, 40) if mark else "black")
    step = max(1, int(math.ceil(n_w * 30 / max(hm_w, 1))))
    for i in range(0, n_w, step):
        draw.text((left + i * cell_w + cell_w // 2, top + hm_h + 4), str(window_labels[i]), anchor="ma", font=f_small,
                  fill="black")
    draw.text((6, top + hm_h + 20), "top: most negative total; bottom: most positive", font=f_small, fill="dimgray")
    draw.text((6, top + hm_h + 34), f"red <= {-vmax:+.1e} (negative), blue >= {vmax:+.1e}", font=f_small, fill="black")
    return np.asarray(img)


def render_bar_chart(counts: dict[str, int], flipped: dict[str, int] | None, title: str) -> np.ndarray:
    """Horizontal bars of ``counts`` (and, darker, the flipped labels among them); ``H x W x 3`` uint8."""
    from PIL import Image, ImageDraw

    f_norm = _font(12)
    names = list(counts)
    left, top, bar_h, width = 80, 32, 22, WIDTH
    height = top + len(names) * (bar_h + 8) + 30
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((8, 8), title, fill="black", font=f_norm)
    biggest = max(counts.values(), default=0) or 1
    span = width - left - 110
    for i, name in enumerate(names):
        y = top + i * (bar_h + 8)
        w = int(round(span * counts[name] / biggest))
        colour = PATTERN_COLOURS.get(name, (120, 120, 120))
        draw.rectangle([left, y, left + max(w, 1), y + bar_h], fill=colour)
        if flipped is not None and flipped.get(name):
            fw = int(round(span * flipped[name] / biggest))
            draw.rectangle([left, y + bar_h - 8, left + max(fw, 1), y + bar_h], fill=(214, 39, 40))
        draw.text((left - 8, y + bar_h // 2), name, anchor="rm", font=f_norm, fill="black")
        extra = f" ({flipped[name]} flip.)" if flipped is not None else ""
        draw.text((left + w + 6, y + bar_h // 2), f"{counts[name]}{extra}", anchor="lm", font=f_norm, fill="black")
    if flipped is not None:
        draw.text((8, height - 22), "red strip: flipped labels among them", font=_font(11), fill=(214, 39, 40))
    return np.asarray(img)


def sprite_tiles(ids: Sequence[int], patterns: np.ndarray | None, get_item: Callable[[int], Any] | None,
                 size: int = 32) -> np.ndarray:
    """``(n, 3, size, size)`` float32 in [0, 1]: each sample's thumbnail framed in its pattern's colour."""
    from PIL import Image

    out = np.zeros((len(ids), 3, size, size), dtype=np.float32)
    for k, j in enumerate(ids):
        colour = np.array(PATTERN_COLOURS.get(str(patterns[j]) if patterns is not None else "", (120, 120, 120)))
        tile = np.empty((size, size, 3), dtype=np.float64)
        tile[:] = colour
        pix = _as_image(sample_input(get_item(int(j)))) if get_item is not None else None
        if pix is not None:
            inner = np.asarray(Image.fromarray(pix).resize((size - 8, size - 8), Image.NEAREST), dtype=np.float64)
            tile[4:-4, 4:-4] = inner
        out[k] = (tile / 255.0).transpose(2, 0, 1)
    return out


def wrap(text: str, width: int) -> list[str]:
    """``text`` in lines of at most ``width`` characters (split at spaces)."""
    words, lines, cur = text.split(), [], ""
    for w in words:
        if cur and len(cur) + 1 + len(w) > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    return lines + ([cur] if cur else [])
