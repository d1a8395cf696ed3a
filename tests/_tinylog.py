"""Test helper: train a tiny model with a plain torch loop and write an influence log.

It records what :class:`~lightning_influence.InfluenceTracker` records (ids, lrs, losses,
full per-sample gradients, checkpoints with optimizer state) through the real
``LogWriter``/``write_meta``, without starting a Lightning ``Trainer`` (fast tests).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from lightning_influence.capture import KroneckerProjector, per_sample_grads_vmap
from lightning_influence.log.writer import CheckpointRecord, LogWriter, StepRecord, write_meta
from lightning_influence.replay import batch_from_ids
from lightning_influence.step.hyper import set_step_values


def _checkpoint(module: nn.Module, opt: torch.optim.Optimizer, step: int) -> CheckpointRecord:
    rec = CheckpointRecord(step=step, params={})
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        rec.params[name] = p.detach().cpu().numpy().copy()
        state = opt.state.get(p, {})
        tensors = {k: v.detach().cpu().numpy().copy() for k, v in state.items() if isinstance(v, torch.Tensor)}
        if tensors:
            rec.optimizer_state[name] = tensors
        scalars = {k: float(v) for k, v in state.items() if isinstance(v, (int, float))}
        if scalars:
            rec.optimizer_scalars[name] = scalars
    return rec


def train_and_log(log_dir: str, module: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor], train_data: Any,
                  batches: Sequence[Sequence[int]], lrs: Sequence[Any], opt: torch.optim.Optimizer, *,
                  checkpoint_every: int | None = 1, record_gradients: bool = True, projection_dim: int | None = None,
                  dataset_size: int | None = None, epochs: Sequence[int] | None = None, meta_extra: dict | None = None,
                  first_step: int = 0, schedule: Sequence[dict | None] | None = None,
                  storage_dtype: str = "float64") -> None:
    """Train ``module`` on ``batches`` (ids per step) with ``opt``, lr per step (scalar or per group); ``schedule``: per
    step, the other hyperparameters a schedule sets (``{key: per-group values}``, recorded as the tracker does) or None.

    ``first_step > 0`` logs steps ``first_step ..`` only (with ``θ_first_step`` and its optimizer state): the log a
    fit resumed at that step writes into a fresh directory."""
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    shapes = {n: tuple(p.shape) for n, p in module.named_parameters() if p.requires_grad}
    projector = KroneckerProjector(shapes, projection_dim, 0)
    by_id = {id(p): n for n, p in module.named_parameters()}
    groups = []
    for g in opt.param_groups:
        hyper = {k: v for k, v in g.items() if k != "params" and isinstance(v, (int, float, bool, str, type(None), tuple, list))}
        groups.append({**hyper, "params": [by_id[id(p)] for p in g["params"]]})
    all_ids = np.concatenate([np.asarray(b, dtype=np.int64) for b in batches])
    meta = {
        "dataset_size": int(dataset_size if dataset_size is not None else all_ids.max() + 1),
        "loss_reduction": "mean",
        "accumulate_grad_batches": 1,
        "recorded": {"ids": True, "lrs": True, "losses": True, "gradients": record_gradients, "hvp": False, "checkpoints": True},
        "every_n_steps": 1,
        "checkpoint_every_n_steps": checkpoint_every,
        "tracked_params": names,
        "param_shapes": {n: list(s) for n, s in shapes.items()},
        "projection": projector.to_metadata(),
        "optimizer": {"class": f"{type(opt).__module__}.{type(opt).__qualname__}", "param_groups": groups},
        **({"first_step": int(first_step)} if first_step else {}),
        "storage_dtype": storage_dtype,
        **(meta_extra or {}),
    }
    write_meta(log_dir, meta)
    writer = LogWriter(log_dir, 0, flush_every_n_steps=7, storage_dtype=storage_dtype, background=False)
    for t, ids in enumerate(batches):
        ids = np.asarray(ids, dtype=np.int64)
        lr_t = lrs[t]
        lr_t = [float(lr_t)] * len(opt.param_groups) if np.ndim(lr_t) == 0 else [float(v) for v in lr_t]
        for g, lr in zip(opt.param_groups, lr_t):
            g["lr"] = lr
        values = schedule[t] if schedule is not None else None
        if values is not None:
            set_step_values(opt, values)
        logged = t >= first_step
        if logged and (t == first_step or (checkpoint_every and t % checkpoint_every == 0)):
            writer.add_checkpoint(_checkpoint(module, opt, t))
        batch = batch_from_ids(train_data, ids)
        grads = None
        if record_gradients and logged:
            grads = per_sample_grads_vmap(module, loss_fn, batch, names, projector).detach().numpy()
        opt.zero_grad(set_to_none=True)
        losses = loss_fn(module, batch)
        losses.mean().backward()
        opt.step()
        if logged:
            writer.add_step(StepRecord(step=t, epoch=int(epochs[t]) if epochs is not None else 0, batch_idx=t,
                                       micro_batches=1, lrs=lr_t, ids=ids, losses=losses.detach().double().numpy(), grads=grads,
                                       hyper=values))
    writer.add_checkpoint(_checkpoint(module, opt, len(batches)))
    writer.close()


def epoch_batches(n: int, batch_size: int, epochs: int, seed: int = 0) -> tuple[list[np.ndarray], list[int]]:
    """Shuffled batches of ids for ``epochs`` epochs, and the epoch of every step."""
    rng = np.random.default_rng(seed)
    batches, epoch_of = [], []
    for e in range(epochs):
        order = rng.permutation(n)
        for i in range(0, n, batch_size):
            batches.append(order[i : i + batch_size])
            epoch_of.append(e)
    return batches, epoch_of
