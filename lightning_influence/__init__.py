"""lightning-influence: which training samples shaped a Lightning model, and when.

Capture (``capture``) → storage (``log``) → reduction (``estimators``) → evaluation and
presentation. The callback (:class:`InfluenceTracker`) records; estimators compute offline.
``InfluenceTracker`` is imported lazily so that reading logs and computing scores never
imports Lightning.
"""

from typing import Any

from lightning_influence.data import WithCollate, WithIds
from lightning_influence.estimators import (InfluenceScores, diffin, diffin_self_influence, dit, dit_gauss_newton, dit_local,
                                            timeline, tracin, tracin_self_influence)
from lightning_influence.log import InfluenceLog, LogFormatError
from lightning_influence.step.frozen import restore_frozen

# Every estimator is called as f(log, query, *, module=None, train_data=None, window=None, ...).
__all__ = ["InfluenceLog", "InfluenceScores", "InfluenceTracker", "LogFormatError", "WithCollate", "WithIds", "diffin",
           "diffin_self_influence", "dit", "dit_gauss_newton", "dit_local", "restore_frozen", "timeline", "tracin",
           "tracin_self_influence"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "InfluenceTracker":
        from lightning_influence.callback import InfluenceTracker

        return InfluenceTracker
    raise AttributeError(f"module 'lightning_influence' has no attribute {name!r}")
