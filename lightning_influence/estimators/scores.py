"""``InfluenceScores``: what every estimator returns (one score per training-sample id)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class InfluenceScores:
    """Scores of every training sample id for one or several queries over one window.

    Sign (math reference §2): a positive score means removing the sample *raises* the query
    ``f``; for a loss query, positive = helpful, negative = harmful.

    Attributes:
        scores: ``(N, Q)`` float64; row ``i`` is sample id ``i``.
        method: estimator name, e.g. ``"tracin"``, ``"dit"``, ``"dit-local (approx.)"``.
        window: the half-open step range ``[t1, t2)``.
        query_names: names of the ``Q`` query columns.
        info: estimator details (steps swept, approximations, timings).
    """

    scores: np.ndarray
    method: str
    window: tuple[int, int]
    query_names: list[str]
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.scores = np.asarray(self.scores, dtype=np.float64)
        if self.scores.ndim == 1:
            self.scores = self.scores[:, None]
        if self.scores.shape[1] != len(self.query_names):
            raise ValueError(f"{self.scores.shape[1]} score columns but {len(self.query_names)} query names")

    def column(self, query: int | str = 0) -> np.ndarray:
        """The ``(N,)`` scores of one query (by index or name)."""
        q = self.query_names.index(query) if isinstance(query, str) else query
        return self.scores[:, q]

    def top(self, k: int, harmful: bool = True, query: int | str = 0) -> np.ndarray:
        """Ids of the ``k`` most harmful (most negative) or most helpful (most positive) samples."""
        s = self.column(query)
        order = np.argsort(s, kind="stable") if harmful else np.argsort(-s, kind="stable")
        return order[:k]
