"""The ``meta.h5`` an :class:`~lightning_influence.InfluenceTracker` fit writes (``docs/log-format.md``).

What the estimators need to read the rows (projection, tracked parameters, storage dtype,
what is recorded), to reproduce the steps (optimizer and param groups, precision, gradient
accumulation, HVP scheme) and to rebuild the data (recipe, dataset size). A resumed fit
compares its own (without the recipe) to the log's (``log/resume.py``).
"""

from __future__ import annotations

import importlib.metadata
import time
import uuid
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from lightning_influence.capture import KINK_GUARD, KroneckerProjector
from lightning_influence.recipe import class_path, record_recipe
from lightning_influence.step.frozen import store_frozen
from lightning_influence.step.precision import Precision

__all__ = ["engine_metadata", "fit_metadata"]


def fit_metadata(tracker: Any, trainer: Any, module: nn.Module, optimizer: torch.optim.Optimizer, names: dict[int, str],
                 first_step: int, *, tracked: Sequence[str], projector: KroneckerProjector, precision: Precision,
                 engines: Mapping[str, Any], recipe: bool = True) -> dict[str, Any]:
    """The ``meta.h5`` of a new log; ``recipe=False`` leaves out the recipe (which stores ``data.pt``).

    ``tracker``: the callback, for its configuration (public attributes); ``names``: parameter name by ``id``;
    ``engines``: :func:`engine_metadata`.
    """
    groups = []
    for g in optimizer.param_groups:
        hyper = {k: v for k, v in g.items() if k != "params" and isinstance(v, (int, float, bool, str, type(None), tuple, list))}
        # Adam(lr=torch.tensor(...), betas=(torch.tensor(...), ...)): floats, and the keys replay makes tensors again
        tensors = [k for k, v in g.items() if k not in ("params", "initial_lr") and _scalar_tensors(v)]
        hyper.update({k: float(g[k]) if isinstance(g[k], torch.Tensor) else [float(x) for x in g[k]] for k in tensors})
        hyper.update({"tensors": tensors} if tensors else {})
        # the trainable ones, as the checkpoints: a frozen parameter has no gradient, the optimizer never updates it
        groups.append({**hyper, "params": [names[id(p)] for p in g["params"] if p.requires_grad]})
    dataset = getattr(trainer.train_dataloader, "dataset", None)
    try:
        dataset_size = len(dataset) if dataset is not None else None
    except TypeError:
        dataset_size = None
    return {
        "created": time.time(),
        "run_id": uuid.uuid4().hex,
        "first_step": first_step,
        "versions": {pkg: _version(pkg) for pkg in ("lightning-influence", "torch", "lightning", "h5py")},
        "module_class": class_path(module),
        "datamodule_class": class_path(trainer.datamodule) if getattr(trainer, "datamodule", None) is not None else None,
        **({"recipe": record_recipe(trainer, module, tracker.log_dir, tracker.store_data, tracker.loss_fn)} if recipe else {}),  # recipe.py
        **({"frozen": store_frozen(tracker.log_dir, module)} if recipe else {}),  # step/frozen.py: written with a new log
        "world_size": trainer.world_size,
        # CPU threads of torch's kernels: another number sums in another order (replay_drift.report_outside_changes)
        "cpu_threads": torch.get_num_threads() if trainer.strategy.root_device.type == "cpu" else None,
        "dataset_size": dataset_size,
        "loss_reduction": "mean",
        "precision": precision.to_meta(),
        "inputs_stored": tracker.store_inputs,
        "accumulate_grad_batches": trainer.accumulate_grad_batches,
        "recorded": {
            "ids": True,
            "lrs": True,
            "losses": tracker.record_losses,
            "gradients": tracker.record_gradients,
            "hvp": tracker.record_hvp,
            "checkpoints": True,
        },
        "every_n_steps": tracker.every_n_steps,
        "checkpoint_every_n_steps": tracker.checkpoint_every_n_steps,
        **engines,
        "hvp": {"eps0": tracker.hvp_eps0(module), "direction": "batch_mean_gradient", "scheme": tracker.hvp_scheme,
                "kink_guard": KINK_GUARD if tracker.hvp_scheme == "central" else None},
        "storage_dtype": tracker.storage_dtype,
        "compression": tracker.compression,
        "flush_every_n_steps": tracker.flush_every_n_steps,
        "flush_every_n_seconds": tracker.flush_every_n_seconds,
        "tracked_params": list(tracked),
        "param_shapes": {n: list(p.shape) for n, p in module.named_parameters() if p.requires_grad},
        "projection": projector.to_metadata(),
        "optimizer": {"class": f"{type(optimizer).__module__}.{type(optimizer).__qualname__}",
                      "param_groups": groups},
    }


def _scalar_tensors(value: Any) -> bool:
    """A param-group value that is a one-element tensor, or a tuple/list holding one (Adam's ``betas``)."""
    items = value if isinstance(value, (tuple, list)) else (value,)
    return any(isinstance(x, torch.Tensor) for x in items) and all(
        isinstance(x, (int, float)) or isinstance(x, torch.Tensor) and x.numel() == 1 for x in items)


def engine_metadata(tracked: Sequence[str], hooked: Sequence[str], demoted: Mapping[str, int],
                    recorded: bool = True) -> dict[str, Any]:
    """Which engine computed each tracked tensor's columns (``docs/log-format.md``): ``gradient_engine`` (``"hooks"``,
    ``"vmap"``, ``"mixed"``; ``"none"`` without gradients), ``gradient_engines`` (``{name: "hooks" | "vmap"}``) and
    ``demoted`` (``{name: step}``: tensors the hooks handed to vmap during the fit, vmap's from that step on).

    Rewritten when a step demotes a tensor (the callback, ``LogWriter.amend_meta``): the log then tells which
    engine produced a column, which matters to read an error in it (vmap is exact; hooks assume per-sample shapes).
    """
    if not recorded:
        return {"gradient_engine": "none", "gradient_engines": {}, "demoted": {}}
    on_hooks = set(hooked)
    engines = {n: "hooks" if n in on_hooks else "vmap" for n in tracked}
    kinds = set(engines.values())
    engine = "mixed" if len(kinds) > 1 else kinds.pop() if kinds else "none"
    return {"gradient_engine": engine, "gradient_engines": engines, "demoted": dict(demoted)}


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None
