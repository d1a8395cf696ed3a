"""Training windows: ``None``, steps, fractions, epochs or a string, as a half-open step range of a log
(:meth:`lightning_influence.log.reader.InfluenceLog.window`)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from lightning_influence.log.reader import InfluenceLog

__all__ = ["fraction_step", "step_window"]

_WINDOW_RE = re.compile(r"^\s*(epochs?\s+)?([-+0-9.eE]*)\s*:\s*([-+0-9.eE]*)\s*$")


def fraction_step(log: "InfluenceLog", fraction: float) -> int:
    """The step a fraction of training is at: of the log's steps ``[first_step, T]`` (a log a resumed fit started at
    ``t0 > 0`` holds only those), rounded. One meaning for a window's fractions and a grid's (``replay.grid_bounds``)."""
    first = int(log.first_step)
    return first + int(round(float(fraction) * (log.num_steps - first)))


def _window_form(spec: Any) -> bool:
    """``spec`` is ``(t1, t2)`` of numbers or ``("epoch", a, b)`` of ints (what :func:`step_window` reads after
    parsing a string)."""
    def number(v: Any) -> bool:
        return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))

    if not isinstance(spec, (tuple, list, np.ndarray)) or np.ndim(spec) != 1:
        return False
    if len(spec) == 3:
        return spec[0] in ("epoch", "epochs") and all(number(v) and float(v).is_integer() for v in spec[1:])
    return len(spec) == 2 and all(number(v) for v in spec)


def step_window(log: "InfluenceLog", spec: Any) -> tuple[int, int]:
    """:meth:`InfluenceLog.window <lightning_influence.log.reader.InfluenceLog.window>` of ``log`` (the accepted
    forms are listed there)."""
    T = log.num_steps
    first = log.first_step
    if spec is None:
        return first, T
    if isinstance(spec, str):
        m = _WINDOW_RE.match(spec)
        if not m:
            raise ValueError(f"cannot parse window {spec!r}: use '100:500' (steps), '0.8:1.0' (fractions) or 'epoch 3:5'")
        lo, hi = m.group(2), m.group(3)
        if m.group(1):
            spec = ("epoch", int(lo) if lo else int(log.epochs[0]), int(hi) if hi else int(log.epochs[-1]) + 1)
        elif "." in lo + hi or "e" in (lo + hi).lower():
            spec = (float(lo) if lo else 0.0, float(hi) if hi else 1.0)
        else:
            spec = (int(lo) if lo else 0, int(hi) if hi else T)
    if not _window_form(spec):
        raise ValueError(f"cannot read window {spec!r}: use (t1, t2) (steps), (0.8, 1.0) (fractions), ('epoch', 3, 5) "
                         "(epochs 3 and 4), None (the whole run), or a string '100:500', '0.8:1.0', 'epoch 3:5'")
    if len(spec) == 3:
        a, b = int(spec[1]), int(spec[2])
        lo, hi = int(log.epochs.min()), int(log.epochs.max())
        sel = np.nonzero((log.epochs_of_step >= a) & (log.epochs_of_step < b))[0]
        if not len(sel):
            raise ValueError(f"epochs [{a}, {b}) hold no step; the run has epochs {lo}..{hi}")
        if not lo <= a < b <= hi + 1:  # as a step window outside the run: never cut to the part that exists
            raise ValueError(f"epoch window [{a}, {b}) reaches outside the run: need {lo} <= a < b <= {hi + 1} "
                             f"(epochs count from {lo}; the run has epochs {lo}..{hi}; 'epoch {hi}:' is the last one)")
        return int(log.steps[sel[0]]), int(log.steps[sel[-1]]) + 1
    a, b = spec
    if isinstance(a, float) or isinstance(b, float):
        if not (0.0 <= a < b <= 1.0):
            raise ValueError(f"fractional window ({a}, {b}) must satisfy 0 <= a < b <= 1")
        t1, t2 = fraction_step(log, a), fraction_step(log, b)
        t1 = min(t1, T - 1)  # both ends rounded to the same step: the one step the fractions lie in (the last: T-1)
        return t1, max(t2, t1 + 1)
    t1, t2 = int(a), int(b)
    if not (first <= t1 < t2 <= T):
        raise ValueError(f"step window [{t1}, {t2}) is outside the run: need {first} <= t1 < t2 <= T = {T}")
    return t1, t2
