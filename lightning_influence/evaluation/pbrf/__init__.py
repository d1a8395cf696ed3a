"""PBRF: what influence estimates answer for a trained network (docs/influence-math.md §6; Bae et al. 2022).

The *proximal Bregman response function* of removing training sample ``z_m`` from the
final parameters ``θ^s = θ_T`` is the solution of

    θ^s(ε) = argmin_θ  (1/N) Σ_i D_ℓ(h(θ, x_i), h(θ^s, x_i))  +  ε ℓ(z_m; θ)
                       + (λ/2) ‖θ − θ^s‖²  +  (κ/2) ‖θ − θ^s‖²,         ε = −1/N,

where ``h(θ, x) = module(x)`` are the network outputs, ``D_ℓ`` is the Bregman divergence of
the loss in output space (softmax cross-entropy: ``KL(p(h^s) ‖ p(h))``; squared error:
``½‖h − h^s‖²``), ``λ`` the damping (proximity) and ``κ`` the training run's own L2 weight
decay (the Bregman divergence of the regulariser ``(κ/2)‖θ‖²``; 0 without one). The PBRF
response of a query is ``f(θ^s(ε)) − f(θ^s)``, with the project's sign: positive = removing
the sample raises ``f``.

For a model whose outputs are linear in ``θ`` and a squared loss, the objective is quadratic
and the PBRF is exactly the leave-one-out retraining of the regularised objective from its
minimiser when ``λ = 0`` (tests check this in closed form). For a network it answers a
different, local question than replay LOO; :func:`gap_decomposition` measures the gap stage
by stage:

    loo        cold-start retraining from θ_0 without z_m on the recorded batches (replay LOO)
    warm       warm start: the logged optimizer, schedule and batches from θ_T without z_m
    warm_prox  ... plus the proximity term (λ/2)‖θ − θ_T‖²
    bregman    ... with each loss ℓ_i replaced by its Bregman divergence around θ_T (θ_T
               treated as a minimiser: the training non-convergence term); this is the PBRF
               objective run by the logged optimizer
    pbrf       the PBRF solved to convergence (solver non-convergence term)
    linear     the linearised PBRF −ε qᵀ(G + (λ+κ)I)⁻¹∇ℓ_m, G the Gauss-Newton matrix at θ_T
               (influence-function form; linearisation term)

Every stage is a response of the same chosen samples; adjacent stages differ in one thing,
so the differences telescope from LOO to the influence function.

Pure torch: no Lightning imports.
"""

from lightning_influence.evaluation.pbrf.gap import STAGES, GapDecomposition, gap_decomposition
from lightning_influence.evaluation.pbrf.linear import linear_pbrf
from lightning_influence.evaluation.pbrf.problem import BREGMAN_LOSSES, bregman_divergence
from lightning_influence.evaluation.pbrf.result import PBRFResult
from lightning_influence.evaluation.pbrf.solve import SOLVERS, pbrf

__all__ = [
    "BREGMAN_LOSSES",
    "GapDecomposition",
    "PBRFResult",
    "SOLVERS",
    "STAGES",
    "bregman_divergence",
    "gap_decomposition",
    "linear_pbrf",
    "pbrf",
]
