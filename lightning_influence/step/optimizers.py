"""Each supported optimizer's update rule, written once as a pure function (docs/optimizer-adjoint.md).

An update rule is ``update(θ, state, g, hyper) -> (θ', state')`` over **flat** tensors: ``θ``,
``g`` and every state entry are ``(p,)`` vectors (all trainable parameters concatenated),
and every hyperparameter is a ``(p,)`` vector too (param groups expanded per coordinate, so
one call covers every group). ``state["step"]`` counts the steps taken (it is not
differentiated). A step's hyperparameters are the param groups' with its learning rates and,
where a schedule changed them, its recorded momentum, betas, ... (:meth:`OptimizerStep.hyper`,
``step/hyper.py``). The rules equal ``torch.optim`` in float64 to rounding
(``tests/test_step_optimizers.py``); replay keeps running ``torch.optim`` forward, and the
DIT adjoint takes the VJP of these twins (:meth:`OptimizerStep.vjp`).

Composing with the rest of the step (per-sample weights, gradient clipping): the map that
DIT linearises is ``θ_t, s_t -> u(θ_t, s_t, c(G_t(θ_t)), h_t)`` where ``G_t(θ) = Σ_i w_i
∇ℓ_i(θ)`` is the weighted batch gradient and ``c`` an optional gradient transform (norm or
value clipping, with the coefficient it had in training). :meth:`OptimizerStep.vjp` takes
``transform=c`` and differentiates ``u(θ, s, c(g))`` as one function, so its gradient
cotangent ``ḡ = J_cᵀ J_u,gᵀ λ`` already includes the clipping Jacobian; the caller then adds
``H_t ḡ`` (the Hessian of the *weighted* loss) to ``θ̄`` and scores sample ``j`` with
``−w_j ⟨∇ℓ_j, ḡ⟩``. Nothing in this module depends on how ``G_t`` was weighted.

Supported: SGD (momentum, dampening, Nesterov, weight decay), Adam and AdamW (coupled or
decoupled weight decay, bias correction, ``eps``, ``amsgrad``), RMSprop (momentum,
centered), Adagrad (``lr_decay``, ``initial_accumulator_value``). ``maximize`` and every
other optimizer class are refused by name (:func:`check_optimizer`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "RULES",
    "OptimizerStep",
    "UnsupportedOptimizerError",
    "UpdateRule",
    "check_optimizer",
    "check_param_groups",
    "coordinate_groups",
    "rule_for",
    "step_groups",
    "supported_names",
]

State = dict[str, Tensor]
Hyper = dict[str, Any]
Transform = Callable[[Tensor], Tensor]


class UnsupportedOptimizerError(ValueError):
    """The run used an optimizer (or optimizer setting) replay and DIT cannot reproduce."""


def _sqrt(v: Tensor) -> Tensor:
    """``√v`` whose derivative at ``v = 0`` is 0 rather than ``inf`` (docs/optimizer-adjoint.md §4).

    ``v = 0`` only where every gradient so far was 0; there ``√v = |g|``-like has a kink and
    0 is the subgradient the linearisation uses (a ``NaN`` otherwise reaches every column)."""
    pos = v > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, v, 1.0)), 0.0)


def _where(condition: Tensor, a: Tensor | Callable[[], Tensor], b: Tensor | Callable[[], Tensor]) -> Tensor:
    """``torch.where(condition, a, b)``; a condition that is one value for every coordinate (a 0-d tensor: a
    hyperparameter all param groups share, the step count of a state stepped as one) picks ``a`` or ``b`` whole,
    nothing selected elementwise nor differentiated through a selection (:meth:`OptimizerStep.vjp`'s cost). A side
    given as a function is computed only where it may be taken."""
    if condition.dim() == 0:
        side = a if bool(condition) else b
        return side() if callable(side) else side
    return torch.where(condition, a() if callable(a) else a, b() if callable(b) else b)


def _frozen(x: Tensor, hyper: Hyper) -> Tensor:
    """The preconditioner held at its value in the run (the approximate adjoint)."""
    return x.detach() if hyper.get("frozen_preconditioner") else x


# ------------------------------------------------------------------------------- the rules
def sgd_update(theta: Tensor, state: State, g: Tensor, h: Hyper) -> tuple[Tensor, State]:
    """``torch.optim.SGD``: ``d = g + λθ``; ``b = d`` (first step) or ``μ b + (1−τ) d``;
    ``θ' = θ − η (d + μ b)`` (Nesterov) or ``θ − η b`` (``μ = 0``: ``θ − η d``)."""
    d = g + h["weight_decay"] * theta
    out: State = {"step": state["step"] + 1}
    if "momentum_buffer" not in state:
        return theta - h["lr"] * d, out
    mu = h["momentum"]
    first = state["step"] == 0
    buf = _where(first, d, lambda: mu * state["momentum_buffer"] + (1 - h["dampening"]) * d)
    direction = _where(h["nesterov"], lambda: d + mu * buf, buf)
    has = mu != 0
    out["momentum_buffer"] = _where(has, buf, state["momentum_buffer"])
    return theta - h["lr"] * _where(has, direction, d), out


def adam_update(theta: Tensor, state: State, g: Tensor, h: Hyper) -> tuple[Tensor, State]:
    """``torch.optim.Adam``/``AdamW``: coupled (``g + λθ``) or decoupled (``θ(1 − ηλ)``)
    weight decay, ``m' = m + (1−β₁)(g − m)``, ``v' = β₂ v + (1−β₂) g²``, ``v̂`` = running max
    with ``amsgrad``, ``θ' = θ − η/(1−β₁ᵏ) · m' / (√v̂/√(1−β₂ᵏ) + ε)``."""
    step = state["step"] + 1
    dec, wd, lr = h["decoupled"], h["weight_decay"], h["lr"]
    g = _where(dec, g, lambda: g + wd * theta)
    theta = _where(dec, lambda: theta * (1 - lr * wd), theta)
    b1, b2 = h["beta1"], h["beta2"]
    m = state["exp_avg"] + (g - state["exp_avg"]) * (1 - b1)
    v = b2 * state["exp_avg_sq"] + (1 - b2) * (g * g)
    out: State = {"step": step, "exp_avg": m, "exp_avg_sq": v}
    used = v
    if "max_exp_avg_sq" in state:
        vmax = torch.where(v >= state["max_exp_avg_sq"], v, state["max_exp_avg_sq"])
        out["max_exp_avg_sq"] = _where(h["amsgrad"], vmax, state["max_exp_avg_sq"])
        used = _where(h["amsgrad"], vmax, v)
    denom = _frozen(_sqrt(used) / torch.sqrt(1 - b2**step) + h["eps"], h)
    return theta - (lr / (1 - b1**step)) * m / denom, out


def rmsprop_update(theta: Tensor, state: State, g: Tensor, h: Hyper) -> tuple[Tensor, State]:
    """``torch.optim.RMSprop``: ``g += λθ``; ``a' = α a + (1−α) g²``; centered: ``ḡ' = ḡ +
    (1−α)(g − ḡ)``, ``d = √(a' − ḡ'²) + ε`` (else ``√a' + ε``); ``b' = μ b + g/d``,
    ``θ' = θ − η b'`` (``μ = 0``: ``θ − η g/d``)."""
    g = g + h["weight_decay"] * theta
    alpha = h["alpha"]
    sq = alpha * state["square_avg"] + (1 - alpha) * (g * g)
    out: State = {"step": state["step"] + 1, "square_avg": sq}
    avg = sq
    if "grad_avg" in state:
        ga = state["grad_avg"] + (g - state["grad_avg"]) * (1 - alpha)
        out["grad_avg"] = _where(h["centered"], ga, state["grad_avg"])
        avg = _where(h["centered"], lambda: sq - ga * ga, sq)
    denom = _frozen(_sqrt(avg) + h["eps"], h)
    if "momentum_buffer" not in state:
        return theta - h["lr"] * g / denom, out
    has = h["momentum"] != 0
    buf = h["momentum"] * state["momentum_buffer"] + g / denom
    out["momentum_buffer"] = _where(has, buf, state["momentum_buffer"])
    return theta - h["lr"] * _where(has, buf, g / denom), out


def adagrad_update(theta: Tensor, state: State, g: Tensor, h: Hyper) -> tuple[Tensor, State]:
    """``torch.optim.Adagrad``: ``g += λθ``; ``s' = s + g²``; ``θ' = θ − η/(1 + (k−1)·decay) · g/(√s' + ε)``."""
    step = state["step"] + 1
    g = g + h["weight_decay"] * theta
    s = state["sum"] + g * g
    clr = h["lr"] / (1 + (step - 1) * h["lr_decay"])
    return theta - clr * g / _frozen(_sqrt(s) + h["eps"], h), {"step": step, "sum": s}


# ---------------------------------------------------------------------------- the registry
def _wd(g: Mapping[str, Any]) -> float:
    return float(g.get("weight_decay", 0.0) or 0.0)


@dataclass(frozen=True)
class UpdateRule:
    """One optimizer class and its functional twin.

    Attributes:
        name: the ``torch.optim`` class name.
        cls: the class (only exactly this class is supported, not subclasses).
        update: ``(θ, state, g, hyper) -> (θ', state')``.
        hyper: per-coordinate hyperparameter name -> ``f(param_group, cls)`` (``lr`` comes per step).
        state: ``(param_groups) -> (state key, initial value from the group)`` pairs the rule keeps.
        adaptive: a per-coordinate preconditioner built from past gradients (the frozen
            approximation applies; projected-gradient estimators cannot model it).
        linear: the update is affine in ``(θ, state, g)`` (its VJP needs no ``g`` or state values).
        preconditioner_keys: state that only feeds the preconditioner (held constant, so
            without an adjoint, when the preconditioner is frozen).
        scheduled: the param-group keys besides ``lr`` a schedule may change from step to step (``OneCycleLR``
            cycles ``momentum`` or Adam's ``betas``): recorded per step where they differ from the log's
            (``step/hyper.py``), taken per step by :meth:`OptimizerStep.hyper`.
        fixed: the param-group keys that shape the rule or its state (``nesterov``, ``amsgrad``, ...): a change
            during a fit is refused.
    """

    name: str
    cls: type[torch.optim.Optimizer]
    update: Callable[[Tensor, State, Tensor, Hyper], tuple[Tensor, State]]
    hyper: Mapping[str, Callable[[Mapping[str, Any], type], Any]]
    state: Callable[[Sequence[Mapping[str, Any]]], list[tuple[str, Callable[[Mapping[str, Any]], float]]]]
    adaptive: bool
    linear: bool
    preconditioner_keys: tuple[str, ...] = ()
    scheduled: tuple[str, ...] = ()
    fixed: tuple[str, ...] = ()


def _sgd_state(groups: Sequence[Mapping[str, Any]]) -> list[tuple[str, Callable[[Mapping[str, Any]], float]]]:
    return [("momentum_buffer", lambda g: 0.0)] if any(float(g.get("momentum", 0) or 0) for g in groups) else []


def _adam_state(groups: Sequence[Mapping[str, Any]]) -> list[tuple[str, Callable[[Mapping[str, Any]], float]]]:
    keys = [("exp_avg", lambda g: 0.0), ("exp_avg_sq", lambda g: 0.0)]
    return keys + ([("max_exp_avg_sq", lambda g: 0.0)] if any(g.get("amsgrad") for g in groups) else [])


def _rmsprop_state(groups: Sequence[Mapping[str, Any]]) -> list[tuple[str, Callable[[Mapping[str, Any]], float]]]:
    keys = [("square_avg", lambda g: 0.0)]
    if any(float(g.get("momentum", 0) or 0) for g in groups):
        keys.append(("momentum_buffer", lambda g: 0.0))
    if any(g.get("centered") for g in groups):
        keys.append(("grad_avg", lambda g: 0.0))
    return keys


_ADAM_HYPER = {
    "weight_decay": lambda g, c: _wd(g), "beta1": lambda g, c: float(g["betas"][0]),
    "beta2": lambda g, c: float(g["betas"][1]), "eps": lambda g, c: float(g["eps"]),
    "amsgrad": lambda g, c: bool(g.get("amsgrad", False)),
    # AdamW is Adam with decoupled weight decay (torch: AdamW subclasses Adam)
    "decoupled": lambda g, c: c is torch.optim.AdamW or bool(g.get("decoupled_weight_decay", False)),
}

_ADAM_KEYS = {"scheduled": ("betas", "eps", "weight_decay"), "fixed": ("amsgrad", "decoupled_weight_decay", "maximize")}

RULES: dict[str, UpdateRule] = {
    r.name: r
    for r in (
        UpdateRule("SGD", torch.optim.SGD, sgd_update,
                   {"weight_decay": lambda g, c: _wd(g), "momentum": lambda g, c: float(g.get("momentum", 0) or 0),
                    "dampening": lambda g, c: float(g.get("dampening", 0) or 0),
                    "nesterov": lambda g, c: bool(g.get("nesterov", False))},
                   _sgd_state, adaptive=False, linear=True, scheduled=("momentum", "dampening", "weight_decay"),
                   fixed=("nesterov", "maximize")),
        UpdateRule("Adam", torch.optim.Adam, adam_update, _ADAM_HYPER, _adam_state, adaptive=True, linear=False,
                   preconditioner_keys=("exp_avg_sq", "max_exp_avg_sq"), **_ADAM_KEYS),
        UpdateRule("AdamW", torch.optim.AdamW, adam_update, _ADAM_HYPER, _adam_state, adaptive=True, linear=False,
                   preconditioner_keys=("exp_avg_sq", "max_exp_avg_sq"), **_ADAM_KEYS),
        UpdateRule("RMSprop", torch.optim.RMSprop, rmsprop_update,
                   {"weight_decay": lambda g, c: _wd(g), "alpha": lambda g, c: float(g["alpha"]),
                    "eps": lambda g, c: float(g["eps"]), "momentum": lambda g, c: float(g.get("momentum", 0) or 0),
                    "centered": lambda g, c: bool(g.get("centered", False))},
                   _rmsprop_state, adaptive=True, linear=False, preconditioner_keys=("square_avg", "grad_avg"),
                   scheduled=("alpha", "eps", "momentum", "weight_decay"), fixed=("centered", "maximize")),
        UpdateRule("Adagrad", torch.optim.Adagrad, adagrad_update,
                   {"weight_decay": lambda g, c: _wd(g), "lr_decay": lambda g, c: float(g.get("lr_decay", 0) or 0),
                    "eps": lambda g, c: float(g["eps"])},
                   lambda groups: [("sum", lambda g: float(g.get("initial_accumulator_value", 0) or 0))],
                   adaptive=True, linear=False, preconditioner_keys=("sum",),
                   scheduled=("lr_decay", "eps", "weight_decay"), fixed=("maximize",)),
    )
}

_HINTS = {
    "LBFGS": " LBFGS re-evaluates the loss several times per step with a line search; its steps are not a function "
             "of one batch gradient that replay can linearise.",
}


def supported_names() -> str:
    """``"SGD, Adam, AdamW, RMSprop, Adagrad"`` (for messages)."""
    return ", ".join(RULES)


def rule_for(class_path: str, where: str = "") -> UpdateRule:
    """The rule of an optimizer given by class path (``"torch.optim.adamw.AdamW"``), or a refusal naming it."""
    module_name, _, name = str(class_path).rpartition(".")
    rule = RULES.get(name)
    if rule is None or not module_name.startswith("torch.optim"):
        raise UnsupportedOptimizerError(
            f"{where}optimizer {class_path!r} is not supported: the update rules modelled exactly are torch.optim's "
            f"{supported_names()} (exactly these classes, not subclasses).{_HINTS.get(name, '')}")
    return rule


def check_param_groups(rule: UpdateRule, groups: Sequence[Mapping[str, Any]], where: str = "") -> None:
    """Refuse settings the rule does not model (``maximize``, sparse Adam variants)."""
    for i, g in enumerate(groups):
        if g.get("maximize"):
            raise UnsupportedOptimizerError(f"{where}{rule.name} with maximize=True (param group {i}) is not supported: "
                                            "minimise the negated objective instead")
        if torch.is_tensor(g.get("lr")) and g["lr"].numel() != 1:
            raise UnsupportedOptimizerError(f"{where}{rule.name}: a per-parameter tensor lr is not supported")


def check_optimizer(optimizer: torch.optim.Optimizer) -> UpdateRule:
    """The rule of a live optimizer, or :class:`UnsupportedOptimizerError` naming what is unsupported.

    Called by the tracker before the first training step, so a run the estimators cannot
    reproduce is refused before it is trained."""
    cls = type(optimizer)
    rule = RULES.get(cls.__name__)
    if rule is None or rule.cls is not cls:
        raise UnsupportedOptimizerError(
            f"{cls.__module__}.{cls.__qualname__} is not supported: the update rules modelled exactly are torch.optim's "
            f"{supported_names()} (exactly these classes, not subclasses).{_HINTS.get(cls.__name__, '')}")
    check_param_groups(rule, optimizer.param_groups)
    return rule


def step_groups(groups: Sequence[Mapping[str, Any]], values: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The param groups of one step: ``groups`` with the step's recorded hyperparameters ``values``
    (``{param-group key: per-group values}``, e.g. ``{"momentum": [0.9, 0.85], "betas": [[0.9, 0.999], ...]}``)."""
    return [{**g, **{k: v[i] for k, v in values.items()}} for i, g in enumerate(groups)]


# ------------------------------------------------------------------------ flat layout, state
def coordinate_groups(groups: Sequence[Mapping[str, Any]], names: Sequence[str], sizes: Sequence[int]) -> np.ndarray:
    """``(p,)`` param-group index of every coordinate, for parameters ``names`` of ``sizes``
    laid out in that order (each group lists its parameter names under ``"params"``)."""
    group_of = {n: gi for gi, g in enumerate(groups) for n in g["params"]}
    missing = [n for n in names if n not in group_of]
    if missing:
        raise ValueError(f"parameters {missing[:5]} are in no param group of the optimizer")
    return np.concatenate([np.full(int(k), group_of[n], dtype=np.int64) for n, k in zip(names, sizes)]) if names \
        else np.zeros(0, np.int64)


class OptimizerStep:
    """The logged optimizer's update over flat ``(p,)`` tensors: forward, state, and VJP.

    Args:
        rule: the update rule (:data:`RULES`).
        groups: param-group hyperparameters (``torch.optim`` param groups or the log's
            ``meta["optimizer"]["param_groups"]``).
        group_index: ``(p,)`` param group of every coordinate (:func:`coordinate_groups`).
        dtype, device: of the flat tensors.
        frozen_preconditioner: hold adaptive optimizers' denominators at their value in the run
            in :meth:`vjp` (the approximate adjoint; no effect on SGD).
    """

    def __init__(self, rule: UpdateRule, groups: Sequence[Mapping[str, Any]], group_index: np.ndarray | Tensor,
                 dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu",
                 frozen_preconditioner: bool = False) -> None:
        check_param_groups(rule, groups)
        self.rule, self.groups, self.dtype, self.device = rule, list(groups), dtype, device
        self.idx = torch.as_tensor(np.asarray(group_index, dtype=np.int64), device=device)
        self.p = int(self.idx.numel())
        self.frozen = bool(frozen_preconditioner) and rule.adaptive
        self._hyper: Hyper = {"frozen_preconditioner": self.frozen, **self._expanded(self.groups)}
        self.state_keys = [k for k, _ in rule.state(self.groups)]
        # the state carrying an adjoint: all of it, or without the preconditioner's when frozen
        self.adjoint_keys = [k for k in self.state_keys if not (self.frozen and k in rule.preconditioner_keys)]
        self._init = {k: torch.tensor([float(f(g)) for g in self.groups], dtype=dtype, device=device)[self.idx]
                      for k, f in rule.state(self.groups)}

    def _expanded(self, groups: Sequence[Mapping[str, Any]]) -> Hyper:
        """The rule's hyperparameters of ``groups``, expanded per coordinate; one all groups share as a 0-d tensor
        (broadcast: the same numbers, without ``p``-long vectors to read and conditions to select elementwise)."""
        out: Hyper = {}
        for key, fn in self.rule.hyper.items():
            vals = [fn(g, self.rule.cls) for g in groups]
            kind = torch.bool if isinstance(vals[0], bool) else self.dtype
            out[key] = self._per_coordinate(torch.tensor(vals, dtype=kind, device=self.device))
        return out

    def _per_coordinate(self, per_group: Tensor) -> Tensor:
        """``(p,)`` values of coordinates from ``(groups,)`` values of their param groups; a 0-d tensor where every
        group that has a coordinate holds the same value."""
        used = per_group[: len(self.groups)]
        if bool((used == used[0]).all()):
            return used[0]
        return used[self.idx]

    def hyper(self, lrs: Sequence[float] | np.ndarray, values: Mapping[str, Any] | None = None) -> Hyper:
        """The hyperparameters of a step with per-group learning rates ``lrs`` and, where a schedule changed them,
        the step's other hyperparameters ``values`` (``{param-group key: per-group values}``,
        :meth:`InfluenceLog.hyper <lightning_influence.log.reader.InfluenceLog.hyper>`; ``None``: the groups')."""
        lr = torch.as_tensor(np.asarray(lrs, dtype=np.float64)[: len(self.groups)], dtype=self.dtype, device=self.device)
        if lr.numel() < len(self.groups):
            raise ValueError(f"{lr.numel()} learning rates for {len(self.groups)} param groups")
        fixed = self._hyper if values is None else {**self._hyper, **self._expanded(step_groups(self.groups, values))}
        return {**fixed, "lr": self._per_coordinate(lr)}

    def init_state(self) -> State:
        """The state before the first step (``torch.optim``'s initial values)."""
        return {"step": torch.zeros(self.p, dtype=self.dtype, device=self.device),
                **{k: v.clone() for k, v in self._init.items()}}

    def state_from(self, per_name: Mapping[str, Mapping[str, Any]], names: Sequence[str], sizes: Sequence[int]) -> State:
        """Flat state from per-parameter-name state, as a live optimizer holds it
        (``{name: optimizer.state[p]}``) or as checkpoints store it (:meth:`InfluenceLog.optimizer_state`).

        A parameter without state has not been stepped yet: initial values, ``step = 0``.
        SGD keeps no step count; a momentum buffer present means ``step >= 1``.
        """
        init = self.init_state()
        out: State = {k: v.clone() for k, v in init.items()}
        start = 0
        for n, k in zip(names, sizes):
            sl = slice(start, start + int(k))
            start += int(k)
            entry = per_name.get(n) or {}
            for key in self.state_keys:
                value = entry.get(key)
                if value is not None:
                    out[key][sl] = torch.as_tensor(np.asarray(value.detach().cpu() if torch.is_tensor(value) else value),
                                                   dtype=self.dtype).reshape(-1).to(self.device)
            if "step" in entry:
                step = entry["step"]  # a 0-d tensor (live), or a (1,) array / float (as checkpoints store it)
                value = step.item() if torch.is_tensor(step) else np.asarray(step, dtype=np.float64).reshape(-1)[0]
                out["step"][sl] = float(value)
            elif "momentum_buffer" in entry and entry["momentum_buffer"] is not None:
                out["step"][sl] = 1.0
        return out

    def update(self, theta: Tensor, state: State, g: Tensor, lrs: Sequence[float] | np.ndarray,
               transform: Transform | None = None, values: Mapping[str, Any] | None = None) -> tuple[Tensor, State]:
        """``(θ', state') = u(θ, state, c(g))`` for one step with learning rates ``lrs`` (and ``values``, :meth:`hyper`)."""
        return self.rule.update(theta, state, g if transform is None else transform(g), self.hyper(lrs, values))

    def vjp(self, theta: Tensor, state: State, g: Tensor, lrs: Sequence[float] | np.ndarray, cot_theta: Tensor,
            cot_state: Mapping[str, Tensor], transform: Transform | None = None,
            values: Mapping[str, Any] | None = None) -> tuple[Tensor, State, Tensor]:
        """Adjoint of one step for ``C`` cotangent columns at once.

        Args:
            theta, state, g: the step's ``θ_t``, state before the step and (unclipped) batch gradient.
            cot_theta: ``(p, C)`` cotangent of ``θ_{t+1}``.
            cot_state: ``{key: (p, C)}`` cotangents of the differentiated state after the step
                (keys :attr:`adjoint_keys`; a missing key is zero).
            transform: the gradient transform applied in training (clipping), differentiated
                with the update.
            values: the step's scheduled hyperparameters (:meth:`hyper`; ``None``: the groups').

        Returns:
            ``(θ̄, s̄, ḡ)``, each ``(p, C)``: cotangents of ``θ_t`` (through the update only: the
            caller adds ``H_t ḡ``), of the state before the step, and of the gradient ``g``.
        """
        f, keys = self._differentiated(state, lrs, transform, values)
        _, pullback = torch.func.vjp(f, theta, {k: state[k] for k in keys}, g)
        cots = (cot_theta, {k: cot_state[k] if k in cot_state else torch.zeros_like(cot_theta) for k in keys})
        # out_dims=0, then columns: a cotangent the picked side of a condition does not reach (the momentum buffer at
        # the first step) comes back unbatched, which vmap expands right at dim 0 only
        bars = torch.func.vmap(pullback, in_dims=1, out_dims=0)(cots)
        th_bar, st_bar, g_bar = torch.utils._pytree.tree_map(lambda x: x.T, bars)
        return th_bar, st_bar, g_bar

    @staticmethod
    def add_columns(cot_theta: Tensor, cot_state: Mapping[str, Tensor], q: Tensor) -> tuple[Tensor, State]:
        """The adjoint ``(θ̄, s̄)`` with the query columns ``q`` ``(p, Q)`` appended: ``θ̄`` gains ``q`` (a query's
        gradient at the step where its window ends), every state cotangent zeros (the query does not read the state)."""
        return (torch.cat([cot_theta, q], dim=1),
                {k: torch.cat([v, torch.zeros_like(q)], dim=1) for k, v in cot_state.items()})

    def _differentiated(self, state: State, lrs: Sequence[float] | np.ndarray, transform: Transform | None,
                        values: Mapping[str, Any] | None = None
                        ) -> tuple[Callable[[Tensor, State, Tensor], tuple[Tensor, State]], list[str]]:
        """``f(θ, s, g) = (θ', s')`` of one step over the differentiated state keys (the others held fixed)."""
        h = self.hyper(lrs, values)
        keys = self.adjoint_keys
        held = {k: v for k, v in state.items() if k not in keys}  # the step count, a frozen preconditioner's state
        step = held.get("step")
        if step is not None and step.numel() and bool((step == step[0]).all()):
            held["step"] = step[0]  # every coordinate stepped alike (the usual case): its bias corrections are scalars

        def f(th: Tensor, st: State, gg: Tensor) -> tuple[Tensor, State]:
            if transform is not None:
                gg = transform(gg)
            th2, st2 = self.rule.update(th, {**held, **st}, gg, h)
            return th2, {k: st2[k] for k in keys}

        return f, keys

    def removal_terms(self, theta: Tensor, state: State, g: Tensor, lrs: Sequence[float] | np.ndarray, removed: Tensor,
                      cot_theta: Tensor, cot_state: Mapping[str, Tensor], transform: Transform | None = None,
                      chunk_size: int | None = None, values: Mapping[str, Any] | None = None) -> Tensor:
        """``⟨λ, u(θ, s, c(g − r_j)) − u(θ, s, c(g))⟩`` for each row ``r_j`` of ``removed`` ``(B, p)`` and each adjoint
        column ``λ = (cot_theta, cot_state)``: ``(C, B)``.

        The step's exact response to removing sample ``j`` (``r_j = w_j g_j``), propagated linearly by the adjoint of
        the later steps (docs/optimizer-adjoint.md §2). Equal to ``−⟨ḡ, r_j⟩`` of :meth:`vjp` for an affine
        update; for Adam early in training (``v̂ ≈ g²``, an update close to ``sign(g)``) it keeps what the first
        derivative misses. Evaluated in float64 (the differences cancel ``θ``), ``chunk_size`` rows at a time
        (default: about 2**24 numbers per evaluated vector); ``values``: the step's scheduled hyperparameters
        (:meth:`hyper`).
        """
        if removed.shape[0] == 0:
            return cot_theta.new_zeros(cot_theta.shape[1], 0)
        f, keys = self._differentiated({k: v.double() if v.is_floating_point() else v for k, v in state.items()},
                                       lrs, transform, values)
        th, g64 = theta.double(), g.double()
        st = {k: state[k].double() for k in keys}
        base_th, base_st = f(th, st, g64)
        lam = [cot_theta.double()] + [cot_state[k].double() if k in cot_state else None for k in keys]
        out = []
        chunk_size = chunk_size or max(1, 2**24 // max(self.p, 1))
        for c0 in range(0, removed.shape[0], chunk_size):
            th_r, st_r = torch.func.vmap(lambda r: f(th, st, g64 - r))(removed[c0:c0 + chunk_size].double())
            diffs = [th_r - base_th] + [st_r[k] - base_st[k] for k in keys]
            out.append(sum(d @ l for d, l in zip(diffs, lam) if l is not None).T)
        return torch.cat(out, dim=1).to(cot_theta.dtype)

    def bytes_per_state(self) -> int:
        """Bytes of one flat state (the step count included)."""
        return self.p * torch.tensor([], dtype=self.dtype).element_size() * (1 + len(self.state_keys))
