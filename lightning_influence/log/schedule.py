"""A log's optimizer hyperparameter schedule (format version 3, ``steps/hyper_*``; ``docs/log-format.md``).

The tracker records the update rule's hyperparameters besides the learning rates (momentum, betas, weight decay, ...)
at the steps where they differ from ``meta.h5``'s param groups (``step/hyper.py``); :func:`logged_schedule` turns a
rank's step tables into every step's values for :meth:`InfluenceLog.hyper <lightning_influence.log.reader.InfluenceLog.hyper>`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from lightning_influence.log.format import HYPER_PREFIX, LogFormatError

__all__ = ["logged_schedule"]


def logged_schedule(path: Path, meta: Mapping[str, Any], tables: Sequence[Mapping[str, np.ndarray]], n_steps: int
                    ) -> dict[str, np.ndarray] | None:
    """``{key: (n_steps, n_groups[, 2])}`` of the hyperparameters recorded in ``tables`` (one rank's segments' step
    tables, in order), ``meta.h5``'s values where a step recorded none (a NaN row, or a segment without the column);
    ``None`` for a log without any (no schedule, every log before version 3)."""
    keys = sorted({c[len(HYPER_PREFIX):] for table in tables for c in table if c.startswith(HYPER_PREFIX)})
    if not keys:
        return None
    groups = meta["optimizer"]["param_groups"]
    out = {}
    for key in keys:
        logged = np.asarray([g.get(key, np.nan) for g in groups], dtype=np.float64)
        parts = [table.get(HYPER_PREFIX + key) for table in tables]
        parts = [np.broadcast_to(logged, (len(table["step"]), *logged.shape)) if a is None else a
                 for table, a in zip(tables, parts)]
        values = np.concatenate(parts)[:n_steps]
        values = np.where(np.isnan(values), logged, values)
        if not np.isfinite(values).all():
            raise LogFormatError(path, f"optimizer hyperparameter {key!r} is recorded at some steps but meta.h5's "
                                       "param groups have no finite value for it")
        out[key] = values
    return out
