"""The logged optimizer, rebuilt for replay: its class, hyperparameters, state and per-step values.

:func:`build_optimizer` recreates the optimizer a log recorded (``meta["optimizer"]``) over given parameters, with the
state stored at a checkpoint (:func:`load_optimizer_state`); :func:`set_step_hyper` puts a step's logged learning rates
and scheduled hyperparameters into it before that step is replayed. Only the update rules that
:mod:`lightning_influence.step.optimizers` models are accepted (:class:`UnsupportedOptimizerError` otherwise).
Re-exported by :mod:`lightning_influence.replay`. Pure torch: no Lightning imports.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from lightning_influence.log.reader import InfluenceLog
from lightning_influence.step.hyper import set_step_values
from lightning_influence.step.optimizers import UnsupportedOptimizerError, check_param_groups, rule_for


def _optimizer_spec(log: InfluenceLog) -> dict[str, Any]:
    """The log's one optimizer (``meta["optimizer"]``), refusing a log whose run replay cannot rebuild."""
    spec = log.meta.get("optimizer")
    if spec is None:
        raise UnsupportedOptimizerError(f"{log.path}: the log has no optimizer metadata; it cannot be replayed")
    if isinstance(spec, list):
        if len(spec) != 1:
            raise UnsupportedOptimizerError(
                f"{log.path}: the run used {len(spec)} optimizers (manual optimization); replay and DIT need exactly "
                "one optimizer stepped once per training step (automatic optimization)")
        spec = spec[0]
    if log.meta.get("automatic_optimization") is False:
        raise UnsupportedOptimizerError(f"{log.path}: the run used manual optimization; replay and DIT need "
                                        "automatic optimization (one optimizer.step per training step)")
    return spec


def optimizer_class(log: InfluenceLog) -> type[torch.optim.Optimizer]:
    """The logged optimizer's class, if supported (:data:`lightning_influence.step.optimizers.RULES`).

    Raises:
        UnsupportedOptimizerError: any other optimizer (LBFGS, a subclass, several optimizers),
            or a setting the update rules do not model (``maximize``).
    """
    spec = _optimizer_spec(log)
    rule = rule_for(str(spec.get("class", "")), f"{log.path}: ")
    check_param_groups(rule, spec["param_groups"], f"{log.path}: ")
    return rule.cls


def _to_hyper(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def build_optimizer(log: InfluenceLog, params: Mapping[str, Tensor], state_step: int | None = None) -> torch.optim.Optimizer:
    """Recreate the logged optimizer over ``params`` (``{name: leaf tensor}``).

    Class and per-group hyperparameters come from ``log.meta["optimizer"]``; with
    ``state_step`` the optimizer state stored with the checkpoint of that step is loaded
    (momentum buffers, Adam moments and step counts). ``params`` may be stacked copies
    (extra leading dimension): stored state is then broadcast to every copy.

    Raises:
        UnsupportedOptimizerError: an optimizer class or setting replay cannot reproduce.
        ValueError: ``params`` does not match the logged param groups.
    """
    cls = optimizer_class(log)
    spec = _optimizer_spec(log)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "params"}
    groups, seen = [], []
    for gi, g in enumerate(spec["param_groups"]):
        names = list(g["params"])
        missing = [n for n in names if n not in params]
        if missing:
            raise ValueError(f"param group {gi} of the logged optimizer holds {missing[:5]}, which are not among the "
                             f"parameters given ({sorted(params)[:10]}): the module does not match the log")
        hyper = {k: _to_hyper(v) for k, v in g.items() if k in accepted}
        for k in set(g.get("tensors") or ()) & accepted:  # a tensor lr or betas take other kernels: replayed as trained
            hyper[k] = torch.tensor(float(g[k])) if np.ndim(g[k]) == 0 else tuple(torch.tensor(float(x)) for x in g[k])
        groups.append({"params": [params[n] for n in names], **hyper})
        seen += names
    extra = sorted(set(params) - set(seen))
    if extra:
        raise ValueError(f"parameters {extra[:5]} are in no param group of the logged optimizer: the module does not match the log")
    opt = cls(groups)
    if state_step is not None:
        load_optimizer_state(opt, seen, log.optimizer_state(state_step))
    return opt


def load_optimizer_state(opt: torch.optim.Optimizer, names: list[str], state: Mapping[str, Mapping[str, Any]]) -> None:
    """Load per-parameter-name optimizer ``state`` (as :meth:`InfluenceLog.optimizer_state` returns it).

    ``names`` lists the parameter names in the optimizer's order. State tensors are broadcast
    to the parameter's shape when the parameters are stacked copies.
    """
    current = opt.state_dict()
    params = [p for g in opt.param_groups for p in g["params"]]
    if len(params) != len(names):
        raise ValueError(f"{len(names)} names for {len(params)} optimizer parameters")
    new_state: dict[int, dict[str, Any]] = {}
    for i, (name, p) in enumerate(zip(names, params)):
        entry = state.get(name)
        if not entry:
            continue
        out: dict[str, Any] = {}
        for key, value in entry.items():
            if key == "step":
                out[key] = torch.as_tensor(np.asarray(value, dtype=np.float32)).clone() if not torch.is_tensor(value) else value.clone()
                continue
            if isinstance(value, (int, float, bool)) and not isinstance(value, np.ndarray):
                out[key] = value
                continue
            t = torch.as_tensor(np.asarray(value)).to(p.device)
            if t.shape != p.shape and t.dim() > 0:
                t = t.expand(p.shape)
            out[key] = t.clone()
        new_state[i] = out
    opt.load_state_dict({"state": new_state, "param_groups": current["param_groups"]})


def set_step_hyper(opt: torch.optim.Optimizer, log: InfluenceLog, t: int) -> None:
    """Put step ``t``'s learning rates and, in a log with a hyperparameter schedule, its other scheduled
    hyperparameters (:meth:`InfluenceLog.hyper`: momentum, betas, ...) into ``opt``, as training had them."""
    lrs = log.lr(t)
    if len(lrs) < len(opt.param_groups):
        raise ValueError(f"step {t}: the log holds {len(lrs)} learning rates for {len(opt.param_groups)} param groups")
    for g, lr in zip(opt.param_groups, lrs):
        if not math.isfinite(float(lr)):
            raise ValueError(f"step {t}: the logged learning rate is {lr}")
        if isinstance(g["lr"], Tensor):
            g["lr"].fill_(float(lr))  # as torch's schedulers set a tensor lr
        else:
            g["lr"] = float(lr)
    values = log.hyper(t)
    if values is not None:
        set_step_values(opt, values)
