"""lightning-influence: which training samples shaped a Lightning model, and when.

Capture (``capture``) → storage (``log``) → reduction (``estimators``) → evaluation and
presentation. The callback (:class:`InfluenceTracker`) records; estimators compute offline.
"""

from lightning_influence.callback import InfluenceTracker
from lightning_influence.data import WithIds
from lightning_influence.estimators import InfluenceScores, tracin
from lightning_influence.log import InfluenceLog, LogFormatError

__all__ = ["InfluenceLog", "InfluenceScores", "InfluenceTracker", "LogFormatError", "WithIds", "tracin"]
__version__ = "0.1.0"
