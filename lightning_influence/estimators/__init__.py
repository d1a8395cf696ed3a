"""Reduction: estimators that turn an influence log into per-sample scores. No Lightning imports."""

from lightning_influence.estimators.scores import InfluenceScores
from lightning_influence.estimators.tracin import checkpoint_query_gradients, tracin, tracin_self_influence

__all__ = ["InfluenceScores", "checkpoint_query_gradients", "tracin", "tracin_self_influence"]

from lightning_influence.estimators.dit import Timeline, dit, dit_gauss_newton, dit_local, timeline  # noqa: E402

__all__ += ["Timeline", "dit", "dit_gauss_newton", "dit_local", "timeline"]

from lightning_influence.estimators.diffin import diffin, diffin_self_influence  # noqa: E402

__all__ += ["diffin", "diffin_self_influence"]
