"""Gradient rows stored with some column blocks as the two factors of an outer product (docs/log-format.md).

A hooked ``nn.Linear`` on ``(B, in)`` inputs (one token per sample: an MLP, a classifier head) has the per-sample
gradient ``g_b x̃_bᵀ``, so its projected block ``(P_rᵀ g_b)(P̃_cᵀ x̃_b)ᵀ`` is the outer product of a ``k_rows`` and a
``k_cols`` vector. Stored as those two factors it takes ``k_rows + k_cols`` values a sample instead of
``k_rows · k_cols`` (the benchmark MLP: 99 instead of 762 a sample). :class:`OuterColumns` describes which blocks of
a row are stored so; the writer stores the rows as they come, readers expand them (:meth:`OuterColumns.expand`)
after checking their CRC-32 (which is over the stored bytes), so every estimator sees the rows of the projector's
layout. Works on numpy arrays and torch tensors alike (the tracker expands the first step's rows for its checks).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["OUTER_ATTR", "OuterColumns", "SAFE_FACTOR", "dense_rows"]

OUTER_ATTR = "outer_columns"  # attribute of a segment's grads/grad dataset: OuterColumns.to_attr()
SAFE_FACTOR = 1.8e19  # below sqrt(float32 max) = 1.84e19, no product of two factors overflows float32


@dataclass(frozen=True)
class OuterColumns:
    """The column layout of a step's gradient rows when some blocks are stored as factors.

    ``width``: the columns of a row as the projector lays them out (``out_dim``); ``blocks``: ``(start, k_rows,
    k_cols)`` of each factored block, ``start`` its first column there, in increasing order. A stored row is the
    projector's row with each factored block's ``k_rows · k_cols`` columns replaced by its ``k_rows`` row factor
    followed by its ``k_cols`` column factor; the columns between blocks are stored as they are.
    """

    width: int
    blocks: tuple[tuple[int, int, int], ...]

    @property
    def stored_width(self) -> int:
        return self.width - sum(r * c - r - c for _, r, c in self.blocks)

    def pieces(self) -> list[tuple[int, int, int, int, int]]:
        """``(stored start, dense start, k_rows, k_cols, kind)`` runs covering a row: kind 0 a run of ``k_rows``
        columns stored as they are (``k_cols`` 0), kind 1 a factored block."""
        out, src, dst = [], 0, 0
        for start, r, c in self.blocks:
            if start > dst:
                out.append((src, dst, start - dst, 0, 0))
                src += start - dst
            out.append((src, start, r, c, 1))
            src, dst = src + r + c, start + r * c
        if dst < self.width:
            out.append((src, dst, self.width - dst, 0, 0))
        return out

    def expand(self, stored: Any) -> Any:
        """The rows ``(n, width)`` of ``stored`` ``(n, stored_width)`` (a numpy array or a torch tensor, same dtype)."""
        n = stored.shape[0]
        out = np.empty((n, self.width), stored.dtype) if isinstance(stored, np.ndarray) else stored.new_empty((n, self.width))
        for src, dst, r, c, kind in self.pieces():
            if kind == 0:
                out[:, dst:dst + r] = stored[:, src:src + r]
            else:
                a, b = stored[:, src:src + r], stored[:, src + r:src + r + c]
                out[:, dst:dst + r * c] = (a[:, :, None] * b[:, None, :]).reshape(n, r * c)
        return out

    def to_attr(self) -> str:
        return json.dumps({"width": self.width, "blocks": [list(b) for b in self.blocks]})

    @classmethod
    def from_attr(cls, value: Any) -> OuterColumns:
        raw = json.loads(value.decode() if isinstance(value, bytes) else str(value))
        return cls(int(raw["width"]), tuple((int(s), int(r), int(c)) for s, r, c in raw["blocks"]))


def dense_rows(rows: Any, outer: OuterColumns | None) -> Any:
    """``rows`` in the projector's columns: expanded where ``outer`` stores some blocks as factors, else ``rows``."""
    return rows if outer is None else outer.expand(rows)
