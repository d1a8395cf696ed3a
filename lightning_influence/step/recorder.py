"""What the tracker records about the step as Lightning ran it: sample weights and gradient clipping.

Used by :class:`~lightning_influence.InfluenceTracker` (it calls these from its hooks); the
descriptions themselves are :mod:`lightning_influence.step.weights` and
:mod:`lightning_influence.step.clipping`. What the tracker cannot reproduce is refused at the
step where it is seen (the first step for a misconfigured loss or clipping):

- a training loss that is not the mean of the per-sample losses (:func:`check_reduction`);
- a ``configure_gradient_clipping`` override that changes the gradients otherwise than the
  Trainer's ``gradient_clip_val``/``gradient_clip_algorithm`` would (checked at every step it runs).

No Lightning import: the trainer and module are used through their public attributes.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from lightning_influence.step.clipping import ClipSpec, clip_coefficient
from lightning_influence.step.weights import check_reduction, lightning_weights

__all__ = ["ClippingError", "StepRecorder"]


class ClippingError(RuntimeError):
    """The run clips gradients in a way the tracker cannot record or replay."""


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """Lightning's ``main_params``: the optimizer's parameters in param-group order."""
    return [p for g in optimizer.param_groups for p in g["params"]]


class StepRecorder:
    """Per-fit state of the step description: the clipping spec and the ``configure_gradient_clipping`` check."""

    def __init__(self) -> None:
        self.spec: ClipSpec | None = None
        self._override = False
        self._hooked = False  # a hook after the tracker's may change the gradients: checked at every step (norms)
        self._module: nn.Module | None = None
        # (step, gradients before clipping, or None and the per-tensor norms expected after it)
        self._check: tuple[int, list[Tensor | None] | None, Tensor | None] | None = None
        self._checked_default = False
        self._reduction_checked = False
        self._deferred: Callable[[], None] | None = None  # stores the step once its clipping is verified
        self._weights: tuple[tuple[Any, ...], Any, int] | None = None  # (sizes, accumulate, world size) -> weights

    # ------------------------------------------------------------------------------ setup
    def start(self, trainer: Any, module: nn.Module, tracker: Any = None) -> dict[str, Any]:
        """Read the Trainer's clipping, watch ``configure_gradient_clipping``; returns the meta entry. ``tracker``: the
        callback itself (the other callbacks and the module that define ``on_before_optimizer_step``, which run after
        its own, are watched at every step: :meth:`record`)."""
        value = trainer.gradient_clip_val
        algorithm = trainer.gradient_clip_algorithm
        algorithm = getattr(algorithm, "value", algorithm) or "norm"
        self.spec = ClipSpec(str(algorithm).lower(), float(value)) if value else None
        base = _lightning_default_clipping(module)
        self._override = base is not None and type(module).configure_gradient_clipping is not base
        self._hooked = _user_defined(module, "on_before_optimizer_step") or any(
            cb is not tracker and _user_defined(cb, "on_before_optimizer_step") for cb in getattr(trainer, "callbacks", []))
        self._checked_default = False
        self._reduction_checked = False
        self._install(module)
        return {"algorithm": self.spec.algorithm if self.spec else None,
                "value": self.spec.value if self.spec else None,
                "configure_gradient_clipping": "overridden (verified at every step)" if self._override else "default"}

    def _install(self, module: nn.Module) -> None:
        original = module.configure_gradient_clipping
        recorder = self

        def configure_gradient_clipping(optimizer: Any, *args: Any, **kwargs: Any) -> Any:
            out = original(optimizer, *args, **kwargs)
            recorder._verify(optimizer)
            return out

        module.configure_gradient_clipping = configure_gradient_clipping
        self._module = module

    def after_clipping(self, store: Callable[[], None]) -> None:
        """Run ``store`` (which writes the step) now, or after the step's clipping is verified."""
        if self._check is None:
            store()
        else:
            self._deferred = store

    def commit(self) -> None:
        """Store a step still waiting for its clipping check (the check did not run)."""
        store, self._deferred = self._deferred, None
        self._check = None
        if store is not None:
            store()

    def teardown(self) -> None:
        self._uninstall()
        self._check = None
        self._deferred = None

    def _uninstall(self) -> None:
        if self._module is not None:
            self._module.__dict__.pop("configure_gradient_clipping", None)  # the class method shows again
            self._module = None

    # ----------------------------------------------------------------------------- per step
    def record(self, record: Any, micro_sizes: Sequence[int], accumulate: Sequence[int], world_size: int,
               optimizer: torch.optim.Optimizer) -> None:
        """Fill ``record``'s weights, divisor and clipping (before Lightning clips; ``record.clip_coef`` is left a
        0-d device tensor, copied to the host with the step's rows)."""
        if len(accumulate) > 1 and len(set(accumulate)) != 1:
            raise RuntimeError(f"step {record.step}: accumulate_grad_batches changed inside one optimizer step {list(accumulate)}")
        key = (tuple(micro_sizes), accumulate[0], world_size)
        if self._weights is None or self._weights[0] != key:  # the same at almost every step: computed once
            sw = lightning_weights(micro_sizes, accumulate[0], world_size)
            sw.weights.flags.writeable = False  # shared by the records of every step with this key
            self._weights = (key, sw.weights, sw.accumulate)
        record.weights, record.accumulate = self._weights[1:]  # micro-batch sizes: the tracker's micro rows
        verify = self._override or not self._checked_default  # Lightning's clipping of this step checked against ours
        # a hook that runs after the tracker's (the module's on_before_optimizer_step, a later callback's) may change the
        # gradients at any step (a clip from the second epoch on): their norms checked at every step (value clipping:
        # the gradients themselves)
        verify = verify or (self._hooked and self.spec is not None and self.spec.algorithm == "value")
        if self.spec is None and not verify and not self._hooked:  # nothing to record or check: the gradients are not read
            return
        grads = [p.grad for p in _optimizer_params(optimizer)]
        if self.spec is not None:
            record.clip_value = self.spec.value
            record.clip_coef = clip_coefficient(grads, self.spec)
        if verify:
            self._check = (record.step, [None if g is None else g.detach().clone() for g in grads], None)
            self._checked_default = True
        elif self._hooked:
            norms = _norms(grads)
            self._check = (record.step, None, norms if self.spec is None else norms * record.clip_coef)

    @property
    def checks_reduction(self) -> bool:
        """The loss reduction is still to be checked (at the fit's first step): :meth:`check_losses` reads the losses."""
        return not self._reduction_checked

    def check_losses(self, step: int, micro: Sequence[tuple[Tensor | None, Tensor | None, int]], trainer: Any) -> None:
        """Refuse a training loss other than the mean of the per-sample losses (see :func:`check_reduction`).

        ``micro``: ``(returned loss, per-sample losses, accumulate)`` of each micro-batch of the step. Checked at
        the fit's first step only: the check reads the loss on the host, a synchronisation every later step
        would pay for nothing (the reduction is a property of ``training_step``, not of the step).
        """
        if self._reduction_checked or all(r is None or losses is None for r, losses, _ in micro):
            return  # (a step whose training_step returned None: the next one is checked)
        self._reduction_checked = True
        for returned, losses, accumulate in micro:
            self._check_reduction(step, returned, losses, accumulate, trainer)

    @staticmethod
    def _check_reduction(step: int, returned: Tensor | None, losses: Tensor | None, accumulate: int, trainer: Any) -> None:
        if returned is None or losses is None:
            return
        value = float(returned)
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
        if scaler is not None and getattr(scaler, "is_enabled", lambda: True)():
            value /= float(scaler.get_scale())  # Lightning's hook sees the GradScaler-scaled loss
        check_reduction(value, losses, accumulate, step, returned.dtype)

    def _verify(self, optimizer: torch.optim.Optimizer) -> None:
        check, self._check = self._check, None
        if check is None:
            return
        step, before, norms = check
        after = [p.grad for p in _optimizer_params(optimizer)]
        worst = 0.0
        if before is None:  # the per-tensor norms (a hooked step after the first): one pass, one synchronisation
            got = _norms(after)
            worst = math.inf if got.shape != norms.shape else \
                float(((got - norms).abs() / norms.abs().clamp_min(1e-30)).max()) if got.numel() else 0.0
            before = []
        coef = float(clip_coefficient(before, self.spec)) if self.spec is not None and before else 1.0
        for b, a in zip(before, after):
            if b is None or a is None:
                continue
            expected = _expected(b, self.spec, coef)
            scale = max(float(expected.abs().max()) if expected.numel() else 0.0, 1e-30)
            worst = max(worst, float((a.detach() - expected).abs().max()) / scale if a.numel() else 0.0)
        dtype = next((a.dtype for a in after if a is not None), torch.float32)
        if worst > max(1e-5, 16 * torch.finfo(dtype).eps):  # float16 gradients (16-true): the clip's own rounding
            what = (f"Trainer(gradient_clip_val={self.spec.value}, gradient_clip_algorithm={self.spec.algorithm!r})"
                    if self.spec else "no clipping (Trainer(gradient_clip_val=None))")
            who = ("configure_gradient_clipping (or the LightningModule's on_before_optimizer_step, or a callback listed "
                   "after the tracker)") if self._override else (
                "the LightningModule's on_before_optimizer_step (or a callback listed after the tracker: both run after "
                "the tracker's on_before_optimizer_step; a clip_grad_norm_ there, say)")
            raise ClippingError(
                f"InfluenceTracker: at step {step} {who} changed the gradients otherwise than {what} does (relative "
                f"difference {worst:.2e}); replay and the estimators could not reproduce the step. Clip through the "
                "Trainer's gradient_clip_val/gradient_clip_algorithm (norm or value clipping of all parameters at a "
                "fixed threshold) and remove the hand-written clipping. Nothing of this step was stored.")
        if not self._override and not self._hooked:  # Lightning's own clipping, checked once: nothing more to do
            self._uninstall()
        self.commit()


def _expected(grad: Tensor, spec: ClipSpec | None, coef: float) -> Tensor:
    """The gradient after the clipping ``spec`` (``coef``: the norm clip's factor over all parameters)."""
    if spec is None:
        return grad
    if spec.algorithm == "value":
        return grad.clamp(-spec.value, spec.value)
    return grad * coef


def _norms(grads: Sequence[Tensor | None]) -> Tensor:
    """The norm of each gradient that is not ``None`` (a vector on their device; empty without any)."""
    present = [g.detach() for g in grads if g is not None]
    return torch.stack(torch._foreach_norm(present)) if present else torch.zeros(0)


def _user_defined(obj: Any, hook: str) -> bool:
    """``obj``'s class or a base outside Lightning defines ``hook`` (Lightning's own classes are known not to change the
    gradients there)."""
    owner = next((c for c in type(obj).__mro__ if hook in c.__dict__), None)
    return owner is not None and not owner.__module__.split(".")[0] in ("lightning", "pytorch_lightning")


def _lightning_default_clipping(module: nn.Module) -> Any:
    for cls in type(module).__mro__:
        if cls.__name__ == "LightningModule" and "configure_gradient_clipping" in cls.__dict__:
            return cls.configure_gradient_clipping
    return None
