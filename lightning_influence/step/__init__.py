"""The training step as Lightning ran it, as data and pure functions (docs/optimizer-adjoint.md).

:mod:`~lightning_influence.step.optimizers`: each supported optimizer's update rule
``(θ, state, g, hyper) -> (θ', state')`` over flat tensors, its registry, the refusal of
unsupported optimizers, and the VJP the DIT adjoint uses; ``hyper``: the hyperparameters a schedule changes
from step to step (recorded, set again by replay, taken by the rules). Siblings: ``weights`` (per-sample
loss weights), ``clipping`` (gradient clipping, forward and as a pure function: it enters the
adjoint as ``OptimizerStep.vjp(transform=...)``), ``rng`` (random state), ``precision``
(autocast, GradScaler), ``micro`` (a step's micro-batches), ``buffers`` (the module's buffers at a step: running
statistics), ``recorder`` and ``pending`` (what
the tracker records: weights and clipping, the step's record and rows). Pure torch: no Lightning imports.
"""

from lightning_influence.step.optimizers import (
    RULES,
    OptimizerStep,
    UnsupportedOptimizerError,
    UpdateRule,
    check_optimizer,
    coordinate_groups,
    rule_for,
)

__all__ = ["RULES", "OptimizerStep", "UnsupportedOptimizerError", "UpdateRule", "check_optimizer", "coordinate_groups",
           "rule_for"]
