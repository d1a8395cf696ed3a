"""Optimizer hyperparameters a schedule changes during a fit, step by step (``docs/log-format.md``, ``steps/hyper_*``).

The log records every step's learning rates (``steps/lr``) and, only where they differ from ``meta.h5``'s param
groups, the update rule's other hyperparameters a schedule may change (:attr:`UpdateRule.scheduled`: SGD's momentum,
Adam's ``betas`` as ``OneCycleLR``/``CyclicLR`` cycle them by default, weight decay, ...). :class:`ScheduleRecorder`
reads them from the live optimizer at each step (one tuple comparison when nothing changed) and refuses a change
the rules cannot reproduce; :func:`set_step_values` puts a step's recorded values back into an optimizer for replay;
the update rules take them through :meth:`OptimizerStep.hyper <lightning_influence.step.optimizers.OptimizerStep.hyper>`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from lightning_influence.step.optimizers import UnsupportedOptimizerError, UpdateRule

__all__ = ["ScheduleRecorder", "group_values", "set_step_values"]


def _plain(value: Any) -> Any:
    """A param-group value as a comparable Python value (a 0-d tensor as its float, ``betas`` as a tuple)."""
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    if isinstance(value, torch.Tensor):
        return value.item()
    return value


def group_values(groups: Sequence[Mapping[str, Any]], keys: Sequence[str], plain: bool = True) -> list[tuple[Any, ...]]:
    """The values of ``keys`` in each param group (live ``torch.optim`` groups or ``meta.h5``'s), comparable;
    ``plain=False`` takes them as they are (at every step: Python floats and tuples compare as they are, at a third
    of the cost)."""
    if not plain:
        return [tuple(map(g.get, keys)) for g in groups]
    return [tuple(_plain(g.get(k)) for k in keys) for g in groups]


def _has_tensor(values: list[tuple[Any, ...]]) -> bool:
    return any(isinstance(v, torch.Tensor) for g in values for v in g)


class ScheduleRecorder:
    """The scheduled hyperparameters of each step of a fit, against the log's param groups.

    Args:
        rule: the optimizer's update rule.
        logged: the param groups ``meta.h5`` holds (a new log's: the optimizer's at the fit's start; a resumed
            fit's: the log's), against which a step's values are recorded.
    """

    def __init__(self, rule: UpdateRule, logged: Sequence[Mapping[str, Any]]) -> None:
        self.rule = rule
        self.keys = (*rule.scheduled, *rule.fixed)
        self._base = group_values(logged, self.keys)
        self._last: list[tuple[Any, ...]] = self._base
        self._values: dict[str, list[Any]] | None = None
        # values read as they are; as floats once one is a tensor (changed in place, it would equal itself)
        self._plain = _has_tensor(group_values(logged, self.keys, plain=False))

    def read(self, groups: Sequence[Mapping[str, Any]]) -> list[tuple[Any, ...]]:
        """The values of :attr:`keys` in each of ``groups`` (a live optimizer's), comparable with the log's."""
        return group_values(groups, self.keys, self._plain)

    def values(self, step: int, groups: Sequence[Mapping[str, Any]]) -> tuple[list[tuple[Any, ...]], dict[str, list[Any]] | None]:
        """``(the groups' values of keys, the step's record)``: the record is ``{key: per-group values}`` of every
        scheduled key where some value differs from the log's, ``None`` where all equal the log's (the same object as
        the previous step's while nothing changes: no allocation per step).

        Raises:
            UnsupportedOptimizerError: a change the update rules do not model (:meth:`_changed`).
        """
        current = group_values(groups, self.keys, self._plain)  # (read's, one call fewer at every step)
        if current != self._last:
            if not self._plain and _has_tensor(current):
                self._plain, current = True, group_values(groups, self.keys)
            self._values = None if current == self._base else self._changed(step, current)
            self._last = current
        return current, self._values

    def _changed(self, step: int, current: list[tuple[Any, ...]]) -> dict[str, list[Any]]:
        """The record of values that differ from the log's; refuses a changed number of param groups, a change of a
        key that shapes the rule (``nesterov``, ``amsgrad``, ...), a momentum that becomes non-zero in a group that
        started without one (``torch.optim.SGD`` then starts its buffer mid-run) and a value that is not a finite
        number."""
        name = self.rule.name
        if len(current) != len(self._base):
            raise UnsupportedOptimizerError(
                f"InfluenceTracker: at step {step} the {name} optimizer has {len(current)} param groups, the log "
                f"{len(self._base)}: param groups added during a fit are not supported; create them all before it")
        n = len(self.rule.scheduled)
        for gi, (old, new) in enumerate(zip(self._base, current)):
            for key, a, b in zip(self.keys[n:], old[n:], new[n:]):
                if a != b:
                    raise UnsupportedOptimizerError(
                        f"InfluenceTracker: at step {step} {name}'s {key} of param group {gi} changed from {a!r} to "
                        f"{b!r}: it shapes the update rule and the state it keeps, which replay and the estimators "
                        f"take from the fit's start; keep {key} fixed during the fit")
            for key, a, b in zip(self.keys, old, new):
                if key == "momentum" and not a and b:
                    raise UnsupportedOptimizerError(
                        f"InfluenceTracker: at step {step} {name}'s momentum of param group {gi} became {b!r} after "
                        "starting at 0: torch.optim then starts a momentum buffer mid-run, which replay and the "
                        "estimators do not model; start the fit with a non-zero momentum (e.g. 1e-8) and schedule it")
                if key in self.rule.scheduled and not all(
                        isinstance(v, (int, float)) and math.isfinite(v) for v in (b if isinstance(b, tuple) else (b,))):
                    raise UnsupportedOptimizerError(
                        f"InfluenceTracker: at step {step} {name}'s {key} of param group {gi} is {b!r}, not a finite "
                        "number (or a pair of them) that the log could record")
        return {key: [g[j] for g in current] for j, key in enumerate(self.rule.scheduled)}


def set_step_values(optimizer: torch.optim.Optimizer, values: Mapping[str, Any]) -> None:
    """Put a step's hyperparameters (``{key: per-group values}``, :meth:`InfluenceLog.hyper`) into ``optimizer``'s
    param groups, as training had them (Python floats; ``betas`` a tuple)."""
    for key, per_group in values.items():
        for g, v in zip(optimizer.param_groups, per_group):
            g[key] = tuple(float(x) for x in v) if np.ndim(v) else float(v)
