"""What ``storage_dtype="float16"`` costs the gradient rows: entries below float16's normal range and the rows'
relative rounding error, measured on the rows the writer stores (warned once) and bounded from the stored rows
(``lightning-influence info``).

float16 has 11 significant bits down to its smallest normal value ``2^-14 ≈ 6.1e-5``; below it the spacing is a
fixed ``2^-24`` (subnormals), and values under ``2^-25`` become 0. Per-sample gradients shrink as a model fits (a
30-epoch run: 15 % of the entries below the normal range, rows off by up to 1.2e-3 relative), which nothing
reported before.
"""

from __future__ import annotations

from dataclasses import dataclass
import numpy as np

__all__ = ["HALF_TINY", "HalfRounding", "merge", "rounding_of_cast", "rounding_of_stored"]

CHECK_EVERY = 64  # the writer measures every 64th step's rows (one pass over them), and warns once

HALF_TINY = float(np.finfo(np.float16).tiny)  # 6.1e-5: the smallest normal float16
_HALF_ULP_SUB = 2.0 ** -25  # the largest rounding error of a value stored below the normal range
_HALF_REL = 2.0 ** -11  # the largest relative rounding error of a normal float16
WARN_FRACTION, WARN_ERROR = 0.05, 1e-3  # significant: 5 % of the entries below the normal range, or a row off by 1e-3


@dataclass
class HalfRounding:
    """``below``: entries below the normal range (nonzero, or stored as 0 but not known to be 0) out of ``entries``;
    ``worst``/``median``: the rows' relative error ``‖fp16(g) − g‖ / ‖g‖`` (measured, or its bound)."""

    below: int
    entries: int
    worst: float
    median: float

    @property
    def fraction(self) -> float:
        return self.below / self.entries if self.entries else 0.0

    def significant(self) -> bool:
        return self.fraction > WARN_FRACTION or self.worst > WARN_ERROR

    def text(self, how: str) -> str:
        return (f"float16 rows: {self.fraction:.1%} of the entries below float16's normal range ({HALF_TINY:.1e}), "
                f"rows' relative rounding error {how} {self.worst:.1e} (median {self.median:.1e})")


def rounding_of_cast(rows: np.ndarray) -> HalfRounding:
    """Measured on rows before they are cast to float16 (``(B, K)``, wider dtype)."""
    x = np.asarray(rows, dtype=np.float64).reshape(len(rows), -1)
    err = np.linalg.norm(x.astype(np.float16).astype(np.float64) - x, axis=1)
    norm = np.linalg.norm(x, axis=1)
    rel = np.divide(err, norm, out=np.zeros_like(err), where=norm > 0)
    below = int(np.count_nonzero((np.abs(x) < HALF_TINY) & (x != 0)))
    return HalfRounding(below, x.size, float(rel.max(initial=0)), float(np.median(rel)) if len(rel) else 0.0)


def rounding_of_stored(rows: np.ndarray) -> HalfRounding:
    """A bound from rows read back as float16: each entry is off by at most ``2^-11`` of itself, or ``2^-25`` below the
    normal range (zeros included: a stored 0 may be an underflow)."""
    v = np.abs(np.asarray(rows, dtype=np.float64).reshape(len(rows), -1))
    small = v < HALF_TINY
    bound = np.linalg.norm(np.where(small, _HALF_ULP_SUB, v * _HALF_REL), axis=1)
    norm = np.linalg.norm(v, axis=1)
    rel = np.divide(bound, norm, out=np.full_like(bound, np.inf), where=norm > 0)
    rel = rel[norm > 0]
    below = int(np.count_nonzero(small & (v != 0)))
    return HalfRounding(below, v.size, float(rel.max(initial=0)), float(np.median(rel)) if len(rel) else 0.0)


def merge(parts: list[HalfRounding]) -> HalfRounding:
    """The rounding over several steps (the worst row, the median of the steps' medians)."""
    if not parts:
        return HalfRounding(0, 0, 0.0, 0.0)
    return HalfRounding(sum(p.below for p in parts), sum(p.entries for p in parts), max(p.worst for p in parts),
                        float(np.median([p.median for p in parts])))
