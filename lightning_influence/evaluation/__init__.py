"""Evaluation: agreement metrics, temporal patterns, datamodel quality (docs/influence-math.md §6)."""

from lightning_influence.evaluation.metrics import (
    auroc,
    jaccard_at_k,
    kendall_tau,
    linear_datamodeling_score,
    pearson,
    precision_at_k,
    rankdata,
    recall_at_k,
    spearman,
    summarize,
)
from lightning_influence.evaluation.patterns import (
    Pattern,
    PatternResult,
    PatternThresholds,
    classify_timeline,
    classify_windows,
)
from lightning_influence.evaluation.stability import (
    FourierMass,
    LinearDatamodel,
    biased_coordinates,
    datamodel_residual,
    fit_linear_datamodel,
    fourier_mass_from_stability,
    noise_stability,
    sample_correlated_pairs,
)

__all__ = [
    "FourierMass",
    "LinearDatamodel",
    "Pattern",
    "PatternResult",
    "PatternThresholds",
    "auroc",
    "biased_coordinates",
    "classify_timeline",
    "classify_windows",
    "datamodel_residual",
    "fit_linear_datamodel",
    "fourier_mass_from_stability",
    "jaccard_at_k",
    "kendall_tau",
    "linear_datamodeling_score",
    "noise_stability",
    "pearson",
    "precision_at_k",
    "rankdata",
    "recall_at_k",
    "sample_correlated_pairs",
    "spearman",
    "summarize",
]
from lightning_influence.evaluation.ground_truth import LOOResult, replay_loo  # noqa: E402

__all__ += ["LOOResult", "replay_loo"]

# PBRF, datamodel quality and group additivity (issue #7): what the scores answer and how far to trust them
from lightning_influence.evaluation.datamodels import (  # noqa: E402
    DatamodelQuality,
    ReplaySubsets,
    datamodel_quality,
    datamodel_quality_of,
)
from lightning_influence.evaluation.groups import GroupAdditivity, group_additivity, replay_group_removal  # noqa: E402
from lightning_influence.evaluation.pbrf import (  # noqa: E402
    GapDecomposition,
    PBRFResult,
    bregman_divergence,
    gap_decomposition,
    linear_pbrf,
    pbrf,
)

__all__ += ["DatamodelQuality", "GapDecomposition", "GroupAdditivity", "PBRFResult", "ReplaySubsets",
            "bregman_divergence", "datamodel_quality", "datamodel_quality_of", "gap_decomposition",
            "group_additivity", "linear_pbrf", "pbrf", "replay_group_removal"]
