"""Capture layer: projected per-sample gradients and Hessian-vector products (pure torch).

``own_pass`` (the tracker's own passes, over :mod:`lightning_influence.step.micro`) is imported by its full name,
not from here: ``step.micro`` itself imports this package.
"""

from .hvp import KINK_GUARD
from .hvp import SCHEMES as HVP_SCHEMES
from .hvp import exact_hvp, fd_directional_derivative, flatten, parameter_epsilon, unflatten
from .per_sample import (
    HookGradientCapture,
    call_with_params,
    LossFn,
    per_sample_grads,
    per_sample_grads_hooks,
    per_sample_grads_vmap,
    select_params,
)
from .projection import KroneckerProjector, TensorProjection

__all__ = [
    "KroneckerProjector",
    "TensorProjection",
    "LossFn",
    "select_params",
    "HookGradientCapture",
    "call_with_params",
    "per_sample_grads_vmap",
    "per_sample_grads",
    "per_sample_grads_hooks",
    "parameter_epsilon",
    "HVP_SCHEMES",
    "KINK_GUARD",
    "fd_directional_derivative",
    "exact_hvp",
    "flatten",
    "unflatten",
]
