"""GPU check (issue 16): the tracker, the estimators and replay on CUDA, and the overhead table.

    PYTHONPATH=. python3 benchmarks/gpu_check.py              # on the GPU, ~3 minutes on one H200
    PYTHONPATH=. python3 benchmarks/gpu_check.py --device cpu --quick   # dry run of every check

Models: a tanh MLP with dropout 0.2 (and the same without dropout), a tiny transformer
classifier (Embedding, LayerNorm, one ``TransformerEncoderLayer`` with its default dropout
0.1) and, for the overhead table, the 784-512-512-10 MLP of ``benchmarks/overhead.py``.
Checks, one PASS/FAIL line each (SKIP where a check does not apply to the device):

- ``records[model]``: the log holds ids (a permutation of the data each epoch), per-sample
  losses whose mean is the loss ``training_step`` returned, finite projected gradient and HVP
  rows, and checkpoints, the last equal to the trained parameters bit for bit.
- ``bit_identical[model]``: the parameters after a fit with the tracker (every recording
  level on) equal those of the same fit without it, bit for bit (dropout included).
- ``grad_rows[model]`` / ``hvp_rows[model]``: a logged row equals a recomputation at the
  logged ``θ_t`` under the random state that training had at that step (so with the step's
  dropout masks): gradients by per-sample autograd, HVP products exactly (double backward)
  where the model allows and by the same central differences otherwise. The same
  recomputation with another step's random state (other masks) is shown as a control.
- ``replay/tracin/dit/diffin[model]``: the estimators on the device from the log: replay's drift
  against every stored checkpoint, and TracIn / DIT / Diff-In on the device against the same
  estimator on the CPU (``--device cpu``: the CPU against itself, a dry run).
- ``replay_cpu[model]``: the device's log replayed on the CPU: each step's drift from the stored ``θ_t``
  (cuda against cpu kernels) within 1e-4 of the tensor's max.
- ``mixed[bf16]`` / ``mixed[fp16]``: the tracker under ``bf16-mixed`` and ``16-mixed`` (float16 autocast with a
  GradScaler; CUDA only, SKIP on the CPU): the log's precision and per-step GradScaler factor, the first step's
  applied-gradient check (``meta.h5``'s ``applied_gradient_check``), losses and finite rows, training bit-identical
  with and without the tracker, replay on the device within 1e-4 (and on the CPU, reported).
- ``dit_fd[model]``: DIT with finite-difference HVPs against DIT exact on the device, within 1e-3
  without falling back from the float64 differences (docs/replay.md).
- ``no_sync[model]`` (CUDA only): with ``torch.cuda.set_sync_debug_mode("warn")``, the
  synchronising calls made from ``lightning_influence`` code must not grow with the number
  of steps (a fit of 2S steps against one of S steps): the tracker's device-to-host copies
  are non-blocking.
- ``overhead``: fit time with the tracker over without it at each recording level of
  ``benchmarks/overhead.py``, alternating (round-robin), the fastest fits' ratio.

A failing check prints FAIL with its reason and the run continues; the exit status is 1 if
any check failed. Results go to ``$OUT/gpu_check.json`` when ``OUT`` is set, else
``benchmarks/results/gpu_check.json``. ``--inject-fault rng`` makes the tracker draw one
random number per step (a deliberately broken tracker: ``bit_identical`` must then FAIL),
which tests the check itself.
"""

from __future__ import annotations

import os

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS: must precede CUDA init

import argparse  # noqa: E402
import fnmatch  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402
from torch.utils.data._utils.collate import default_collate  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

from lightning_influence import InfluenceLog, InfluenceTracker, WithIds  # noqa: E402
from lightning_influence.capture import KINK_GUARD, call_with_params, fd_directional_derivative  # noqa: E402
from lightning_influence.estimators import diffin, dit, tracin  # noqa: E402
from lightning_influence.queries import eval_mode, mean_loss  # noqa: E402
from lightning_influence.replay import replay  # noqa: E402

FULL = dict(record_losses=True, record_gradients=True, projection_dim=16, record_hvp=True, checkpoint_every_n_steps=1,
            flush_every_n_steps=8)


class CheckFailed(Exception):
    """A check ran and found the code under test wrong (the message says how)."""


class Skip(Exception):
    """The check does not apply here (e.g. CUDA-only on the CPU)."""


# ----------------------------------------------------------------------------------- models
class MLP(pl.LightningModule):
    """tanh MLP with dropout; SGD with momentum."""

    def __init__(self, d_in: int = 32, hidden: int = 64, classes: int = 4, dropout: float = 0.2) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Dropout(dropout), nn.Linear(hidden, hidden),
                                 nn.Tanh(), nn.Dropout(dropout), nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def per_sample_loss(self, batch: Any) -> torch.Tensor:
        return F.cross_entropy(self(batch[0]), batch[1], reduction="none")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.per_sample_loss(batch).mean()

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class TinyTransformer(MLP):
    """Embedding, LayerNorm, one TransformerEncoderLayer (dropout 0.1), mean pooling, linear head."""

    def __init__(self, vocab: int = 50, d: int = 32, classes: int = 4) -> None:
        pl.LightningModule.__init__(self)
        self.emb = nn.Embedding(vocab, d)
        self.norm = nn.LayerNorm(d)
        self.enc = nn.TransformerEncoderLayer(d, nhead=4, dim_feedforward=64, dropout=0.1, batch_first=True)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.norm(self.emb(x))).mean(1))


class BigMLP(MLP):
    """The 784-512-512-10 ReLU MLP of ``benchmarks/overhead.py``."""

    def __init__(self) -> None:
        pl.LightningModule.__init__(self)
        self.net = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


def make_data(model: str, n: int, seed: int = 0) -> WithIds:
    g = torch.Generator().manual_seed(seed)
    if model == "transformer":
        x = torch.randint(0, 50, (n, 8), generator=g)
        y = (x[:, :4].sum(1) % 4).long()
    elif model == "big-mlp":
        x, y = torch.randn(n, 784, generator=g), torch.randint(0, 10, (n,), generator=g)
    else:
        x = torch.randn(n, 32, generator=g)
        y = (x @ torch.randn(32, 4, generator=g) + 0.5 * torch.randn(n, 4, generator=g)).argmax(1)
    return WithIds(TensorDataset(x, y))


def make_module(model: str) -> MLP:
    return {"mlp": lambda: MLP(dropout=0.2), "mlp-nodrop": lambda: MLP(dropout=0.0), "transformer": TinyTransformer,
            "big-mlp": BigMLP}[model]()


# ---------------------------------------------------------------------------------- fitting
class Probe(Callback):
    """Records, at each training batch, the random state training draws its dropout masks from, and the returned loss."""

    def __init__(self) -> None:
        self.rng: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.loss: dict[int, float] = {}
        self._step = 0

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._step = trainer.global_step
        dev = module.device
        self.rng[self._step] = (torch.get_rng_state(), torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None)

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.loss[self._step] = float(outputs["loss"])


class RngFault(Callback):
    """A deliberately broken tracker companion: draws one random number per step (tests ``bit_identical``)."""

    def on_before_optimizer_step(self, trainer: pl.Trainer, module: pl.LightningModule, optimizer: Any) -> None:
        torch.rand(1, device=module.device)


def restore_rng(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def fit(model: str, device: str, data: WithIds, batch: int, epochs: int | None = None, steps: int | None = None,
        tracker: dict[str, Any] | None = None, log_dir: Path | None = None, callbacks: list[Callback] = (),
        deterministic: bool = True, seed: int = 0, precision: str = "32-true") -> tuple[MLP, float]:
    """Train ``model`` with a real ``lightning.Trainer`` (``precision``: the Trainer's); returns the module and the
    fit's wall time."""
    pl.seed_everything(seed, verbose=False)
    module = make_module(model)
    loader = DataLoader(data, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(seed))
    cbs = list(callbacks)
    if tracker is not None:
        cbs.append(InfluenceTracker(str(log_dir), overwrite=True, **tracker))
    trainer = pl.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, max_epochs=epochs or -1,
                         max_steps=steps or -1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, deterministic="warn" if deterministic else None, callbacks=cbs,
                         precision=precision)
    _sync(device)
    t0 = time.perf_counter()
    trainer.fit(module, loader)
    _sync(device)
    seconds = time.perf_counter() - t0
    torch.use_deterministic_algorithms(False)  # Trainer(deterministic=...) sets it process-wide
    return module, seconds


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def params_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in module.named_parameters()}


def rel(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def device_batch(data: WithIds, ids: np.ndarray, device: str) -> Any:
    return [t.to(device) for t in default_collate([data[int(i)] for i in ids])]


# ------------------------------------------------------------------------------------ state
class Context:
    """Shared fits and logs: each check reuses what the earlier ones trained."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args, self.work, self.device = args, work, args.device
        self.n = 64 if args.quick else 256
        self.batch = 16 if args.quick else 32
        self.epochs = 2 if args.quick else 3
        self.data = {m: make_data(m, self.n) for m in ("mlp", "mlp-nodrop", "transformer")}
        self.tracked: dict[str, tuple[MLP, Probe, Path]] = {}
        self.fault = [RngFault()] if args.inject_fault == "rng" else []

    def tracked_fit(self, model: str) -> tuple[MLP, Probe, Path]:
        """The fit with the tracker at every level (and the probe), trained once per model."""
        if model not in self.tracked:
            probe, log_dir = Probe(), self.work / f"log-{model}"
            module, _ = fit(model, self.device, self.data[model], self.batch, epochs=self.epochs, tracker=FULL,
                            log_dir=log_dir, callbacks=[probe, *self.fault])
            self.tracked[model] = (module, probe, log_dir)
        return self.tracked[model]


# ----------------------------------------------------------------------------------- checks
def check_records(ctx: Context, model: str) -> str:
    module, probe, log_dir = ctx.tracked_fit(model)
    steps_per_epoch = -(-ctx.n // ctx.batch)
    with InfluenceLog(log_dir) as log:
        T = log.num_steps
        if T != ctx.epochs * steps_per_epoch:
            raise CheckFailed(f"{T} steps logged, {ctx.epochs * steps_per_epoch} trained")
        by_epoch: dict[int, list[np.ndarray]] = {}
        worst_loss = 0.0
        for rec in log.iter_steps(0, T, fields=("loss", "grad", "hvp")):
            by_epoch.setdefault(rec.epoch, []).append(rec.ids)
            for what, rows in (("loss", rec.losses), ("gradient", rec.grads), ("HVP", rec.hvps)):
                if not np.isfinite(rows).all():
                    raise CheckFailed(f"step {rec.step}: non-finite {what} rows")
            if not (np.abs(rec.grads).sum(1) > 0).all() or not (np.abs(rec.hvps).sum(1) > 0).any():
                raise CheckFailed(f"step {rec.step}: all-zero gradient or HVP rows")
            worst_loss = max(worst_loss, abs(rec.losses.mean() - probe.loss[rec.step]) / abs(probe.loss[rec.step]))
        if worst_loss > 1e-5:
            raise CheckFailed(f"mean of the logged per-sample losses differs from training_step's loss by {worst_loss:.1e} "
                              "(relative): the losses are not the step's own")
        for epoch, ids in by_epoch.items():
            if not np.array_equal(np.sort(np.concatenate(ids)), np.arange(ctx.n)):
                raise CheckFailed(f"epoch {epoch}: the logged ids are not a permutation of the {ctx.n} samples")
        if log.checkpoint_steps != list(range(T + 1)):
            raise CheckFailed(f"checkpoints at {log.checkpoint_steps[:5]}..., expected every step 0..{T}")
        final, live = log.checkpoint(T), params_of(module)
        bad = [n for n, p in live.items() if not np.array_equal(final[n], p.numpy())]
        if bad:
            raise CheckFailed(f"the final checkpoint differs from the trained parameters in {bad[:3]}")
        k = log.projector().out_dim
    return f"{T} steps, {k} columns, losses match training_step to {worst_loss:.1e}, {T + 1} checkpoints, final exact"


def check_bit_identical(ctx: Context, model: str) -> str:
    tracked, _, _ = ctx.tracked_fit(model)
    plain, _ = fit(model, ctx.device, ctx.data[model], ctx.batch, epochs=ctx.epochs)
    a, b = params_of(tracked), params_of(plain)
    diff = {n: float((a[n] - b[n]).abs().max()) for n in a if not torch.equal(a[n], b[n])}
    if not diff:
        return f"{len(a)} parameter tensors identical after {ctx.epochs} epochs (tracker at every level)"
    again, _ = fit(model, ctx.device, ctx.data[model], ctx.batch, epochs=ctx.epochs)
    c = params_of(again)
    if not all(torch.equal(b[n], c[n]) for n in b):
        raise CheckFailed("training without the tracker is itself not bit-reproducible on this device "
                          f"(deterministic='warn'); with vs without differ by up to {max(diff.values()):.1e}")
    worst = max(diff, key=diff.get)
    raise CheckFailed(f"the tracker changes training: {len(diff)}/{len(a)} tensors differ, worst {worst} by "
                      f"{diff[worst]:.1e} (training alone is reproducible)")


def _step_grads(module: nn.Module, params: dict[str, torch.Tensor], batch: Any, rng: Any,
                device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Full per-sample gradients ``{name: (B, *shape)}`` at ``params`` under random state ``rng`` (one batched forward)."""
    restore_rng(rng, device)
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
    with torch.enable_grad():
        losses = call_with_params(module, lambda m, b: m.per_sample_loss(b), leaves, batch)
        rows = [torch.autograd.grad(losses[i], list(leaves.values()), retain_graph=True)
                for i in range(len(losses))]
    return {n: torch.stack([r[j] for r in rows]) for j, n in enumerate(leaves)}, losses


def _rows_setup(ctx: Context, model: str) -> tuple[nn.Module, InfluenceLog, Probe, list[int]]:
    module, probe, log_dir = ctx.tracked_fit(model)
    log = InfluenceLog(log_dir)
    T = log.num_steps
    # Lightning moves the module back to the CPU after fit: the recomputation runs on the check's device
    return module.to(ctx.device).train(), log, probe, sorted({1, T // 2, T - 2})


def check_grad_rows(ctx: Context, model: str) -> str:
    module, log, probe, steps = _rows_setup(ctx, model)
    dev = module.device
    proj, names = log.projector(), log.param_names
    worst, control = 0.0, float("inf")
    with log:
        for t in steps:
            rec = next(log.iter_steps(t, t + 1, fields=("grad",)))
            params = {n: torch.from_numpy(v).to(dev) for n, v in log.checkpoint(t).items()}
            batch = device_batch(ctx.data[model], rec.ids, ctx.device)
            full, _ = _step_grads(module, params, batch, probe.rng[t], dev)
            got = proj.project({n: full[n] for n in names}).cpu().numpy()
            worst = max(worst, rel(rec.grads, got))
            other, _ = _step_grads(module, params, batch, probe.rng[t + 1], dev)
            control = min(control, rel(rec.grads, proj.project({n: other[n] for n in names}).cpu().numpy()))
    detail = f"steps {steps}: logged vs recomputed with the step's random state {worst:.1e}; with another step's {control:.1e}"
    if worst > 1e-4:
        raise CheckFailed(detail + " (tolerance 1e-4): the logged rows are not the step's own gradients")
    return detail


def check_hvp_rows(ctx: Context, model: str) -> str:
    module, log, probe, steps = _rows_setup(ctx, model)
    dev = module.device
    proj, names = log.projector(), log.param_names
    eps0 = float(log.meta["hvp"]["eps0"])
    worst_fd = worst_exact = 0.0
    control = float("inf")
    exact_note = ""
    with log:
        for t in steps:
            rec = next(log.iter_steps(t, t + 1, fields=("grad", "hvp")))
            params = {n: torch.from_numpy(v).to(dev) for n, v in log.checkpoint(t).items()}
            batch = device_batch(ctx.data[model], rec.ids, ctx.device)
            full, _ = _step_grads(module, params, batch, probe.rng[t], dev)
            v = {n: g.mean(0) for n, g in full.items()}  # Ĝ_t: the step's batch-mean gradient (mean loss)

            def rows_at(p: dict[str, torch.Tensor], rng: Any) -> torch.Tensor:
                g, _ = _step_grads(module, p, batch, rng, dev)
                return proj.project({n: g[n] for n in names})

            for rng, is_own in ((probe.rng[t], True), (probe.rng[t + 1], False)):
                restore_rng(rng, dev)
                at = rows_at(params, rng)
                fd, _ = fd_directional_derivative(lambda p: rows_at(p, rng), params, v, eps0, "central", at, KINK_GUARD)
                err = rel(rec.hvps, fd.cpu().numpy())
                if is_own:
                    worst_fd = max(worst_fd, err)
                else:
                    control = min(control, err)
            if exact_note:
                continue
            try:  # exact per-sample H_z Ĝ_t with the step's masks: double backward, one sample at a time
                exact = []
                restore_rng(probe.rng[t], dev)
                leaves = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
                with torch.enable_grad():
                    losses = call_with_params(module, lambda m, b: m.per_sample_loss(b), leaves, batch)
                    for i in range(len(losses)):
                        gi = torch.autograd.grad(losses[i], list(leaves.values()), create_graph=True)
                        dot = sum((a * v[n]).sum() for a, n in zip(gi, leaves))
                        hv = torch.autograd.grad(dot, list(leaves.values()), retain_graph=True)
                        exact.append({n: h for n, h in zip(leaves, hv)})
                ex = proj.project({n: torch.stack([e[n] for e in exact]) for n in names}).cpu().numpy()
                worst_exact = max(worst_exact, rel(rec.hvps, ex))
            except RuntimeError as e:  # e.g. no double backward through a fused attention kernel
                exact_note = f"exact HVP n/a ({str(e).splitlines()[0][:80]})"
    detail = (f"steps {steps}: logged vs central differences recomputed with the step's random state {worst_fd:.1e}, "
              f"with another step's {control:.1e}; " + (exact_note or f"vs exact (double backward) {worst_exact:.1e}"))
    if worst_fd > 1e-2 or (not exact_note and worst_exact > 5e-2):
        raise CheckFailed(detail + " (tolerances 1e-2 / 5e-2): the logged HVP rows are not the step's")
    return detail


def _estimator_setup(ctx: Context, model: str) -> tuple[InfluenceLog, MLP, Any]:
    _, _, log_dir = ctx.tracked_fit(model)
    module = make_module(model).to(ctx.device)
    val = make_data(model, 32, seed=1)
    return InfluenceLog(log_dir), module, [t for t in default_collate([val[i] for i in range(32)])]


def _query(val: list[torch.Tensor], device: str) -> Callable[[nn.Module], torch.Tensor]:
    """Mean validation loss with dropout off (the module stays in train mode for the replayed steps)."""
    return eval_mode(mean_loss([t.to(device) for t in val]))


def _replay_drift(log: InfluenceLog, module: nn.Module, data: WithIds) -> tuple[float, int]:
    """Replay the whole log with ``module`` (where it is) without re-anchoring checks; the largest drift from a stored
    checkpoint (relative to the tensor's max) and its step. Every step is a checkpoint here: the drift of one step."""
    worst, where = 0.0, 0
    ckpts = set(log.checkpoint_steps)
    for rs in replay(log, module, data, verify=False):
        if rs.step in ckpts and rs.step > 0:
            ref = log.checkpoint(rs.step)
            d = max(float(np.abs(rs.params[n].detach().cpu().numpy() - ref[n]).max() / max(np.abs(ref[n]).max(), 1e-30))
                    for n in ref)
            if d > worst:
                worst, where = d, rs.step
    return worst, where


def check_replay(ctx: Context, model: str) -> str:
    log, module, _ = _estimator_setup(ctx, model)
    with log:
        worst, where = _replay_drift(log, module, ctx.data[model])
        T = log.num_steps
    detail = f"{T} steps replayed on {ctx.device}; largest drift from a stored checkpoint {worst:.1e}" + (f" (step {where})" if where else "")
    if worst > 1e-4:
        raise CheckFailed(detail + " (tolerance 1e-4 relative to the tensor's max)")
    return detail


def check_replay_cpu(ctx: Context, model: str) -> str:
    """The device's log replayed on the CPU (another machine's kernels): every step's drift from the stored θ_t (a
    checkpoint at every step), within 1e-4 relative to the tensor's max; ``--device cpu``: the CPU against itself."""
    log, module, _ = _estimator_setup(ctx, model)
    with log:
        worst, where = _replay_drift(log, module.to("cpu"), ctx.data[model])
        T = log.num_steps
    detail = (f"{T} steps of the {ctx.device} log replayed on the CPU; largest one-step drift from a stored checkpoint "
              f"{worst:.1e}" + (f" (step {where})" if where else ""))
    if not worst <= 1e-4:
        raise CheckFailed(detail + " (tolerance 1e-4 relative to the tensor's max)")
    return detail


MIXED = {"bf16": ("bf16-mixed", "bfloat16"), "fp16": ("16-mixed", "float16")}


def check_mixed(ctx: Context, name: str) -> str:
    """The tracker under autocast (``bf16-mixed``; ``16-mixed``: float16 with a GradScaler, CUDA only): the log records
    the precision (and the GradScaler's factor every step), the first step's applied-gradient check ran within its
    tolerance, losses are training_step's, rows finite, training is bit-identical with and without the tracker, and
    replay on the device reproduces every checkpoint; replay of the same log on the CPU is measured (autocast's
    kernels differ there: reported, not failed)."""
    precision, dtype = MIXED[name]
    if name == "fp16" and ctx.device != "cuda":
        raise Skip("16-mixed (float16 autocast, GradScaler) is CUDA only: on the CPU Lightning runs bf16-mixed instead")
    model, probe, log_dir = "mlp", Probe(), ctx.work / f"log-mixed-{name}"
    tracked, _ = fit(model, ctx.device, ctx.data[model], ctx.batch, epochs=ctx.epochs, tracker=FULL, log_dir=log_dir,
                     callbacks=[probe, *ctx.fault], precision=precision)
    plain, _ = fit(model, ctx.device, ctx.data[model], ctx.batch, epochs=ctx.epochs, precision=precision)
    a, b = params_of(tracked), params_of(plain)
    differ = [n for n in a if not torch.equal(a[n], b[n])]
    if differ:
        raise CheckFailed(f"the tracker changes training under {precision}: {differ[:3]} differ")
    with InfluenceLog(log_dir) as log:
        p = log.meta.get("precision") or {}
        want = {"name": precision, "autocast_device": ctx.device, "autocast_dtype": dtype, "grad_scaler": name == "fp16"}
        if {k: p.get(k) for k in want} != want:
            raise CheckFailed(f"meta precision {p}, expected {want}")
        applied = log.meta.get("applied_gradient_check") or {}
        if not applied.get("checked"):
            raise CheckFailed(f"the first step's applied-gradient check did not run: {applied}")
        T, skipped, worst_loss = log.num_steps, [], 0.0
        for rec in log.iter_steps(0, T, fields=("loss", "grad", "hvp")):
            if log.skipped(rec.step):
                skipped.append(rec.step)
                continue
            if not all(np.isfinite(r).all() for r in (rec.losses, rec.grads, rec.hvps)):
                raise CheckFailed(f"step {rec.step}: non-finite rows in a step the GradScaler did not skip")
            worst_loss = max(worst_loss, abs(rec.losses.mean() - probe.loss[rec.step]) / abs(probe.loss[rec.step]))
            scale = log.grad_scale(rec.step)
            if (name == "fp16") != (scale is not None and np.isfinite(scale) and scale > 0):
                raise CheckFailed(f"step {rec.step}: GradScaler factor {scale} logged under {precision}")
        if worst_loss > 1e-3:
            raise CheckFailed(f"mean of the logged per-sample losses differs from training_step's loss by {worst_loss:.1e}")
        module = make_module(model).to(ctx.device)
        drift, where = _replay_drift(log, module, ctx.data[model])
        detail = (f"{T} steps ({len(skipped)} skipped by the GradScaler), applied gradient vs rows "
                  f"{applied['relative_difference']:.1e} (tolerance {applied['tolerance']:.1e}), losses match to "
                  f"{worst_loss:.1e}, bit-identical to training without the tracker; replay on {ctx.device}: drift "
                  f"{drift:.1e}")
        if drift > 1e-4:
            raise CheckFailed(detail + f" at step {where} (tolerance 1e-4)")
        if ctx.device != "cpu":
            cpu_drift, _ = _replay_drift(log, module.to("cpu"), ctx.data[model])
            detail += f"; on the CPU (no {dtype} autocast of CUDA kernels there): {cpu_drift:.1e}, reported"
    return detail


def _device_vs_cpu(ctx: Context, model: str, label: str, estimator: Callable[..., Any], tol: float) -> str:
    """``estimator(log, query, module=..., train_data=...)`` with the module on the device, then on the CPU."""
    log, module, val = _estimator_setup(ctx, model)
    with log:
        dev = estimator(log, _query(val, ctx.device), module=module, train_data=ctx.data[model]).column(0)
        cpu = estimator(log, _query(val, "cpu"), module=module.to("cpu"), train_data=ctx.data[model]).column(0)
    err = rel(dev, cpu)
    detail = f"{label} on {ctx.device} vs CPU: {err:.1e} relative, {np.count_nonzero(dev)} samples scored"
    if not np.isfinite(dev).all() or err > tol or not np.count_nonzero(dev):
        raise CheckFailed(detail + f" (tolerance {tol:.0e})")
    return detail


def check_tracin(ctx: Context, model: str) -> str:
    return _device_vs_cpu(ctx, model, "TracIn", lambda log, q, module, train_data: tracin(log, q, module=module), 1e-4)


def check_dit(ctx: Context, model: str) -> str:
    return _device_vs_cpu(ctx, model, "DIT (exact HVP)", dit, 1e-3)


def check_dit_fd(ctx: Context, model: str) -> str:
    """DIT with finite-difference HVPs (float64 differences, estimators/fd.py) against DIT exact, both on the device:
    no fallback (the float64 copy draws the training dropout masks there too), within 1e-3 (relative L2)."""
    log, module, val = _estimator_setup(ctx, model)
    with log:
        exact = dit(log, _query(val, ctx.device), module=module, train_data=ctx.data[model]).column(0)
        fd = dit(log, _query(val, ctx.device), module=module, train_data=ctx.data[model], hvp="fd")
    err, info = rel(fd.column(0), exact), fd.info
    detail = (f"DIT fd vs exact on {ctx.device}: {err:.1e}; products in {info['fd_dtype']} (float64 vs native gradient "
              f"{info.get('fd_agreement', float('nan')):.1e}, one-sided disagreement {info['fd_asymmetry']:.1e})")
    if info.get("fd_fallback") or info.get("fd_unreliable") or not err <= 1e-3:
        raise CheckFailed(detail + f" ({info.get('fd_fallback') or 'flagged or over 1e-3'})")
    return detail


def check_diffin(ctx: Context, model: str) -> str:
    return _device_vs_cpu(ctx, model, "Diff-In", diffin, 1e-3)


def _sync_warnings(ctx: Context, model: str, steps: int) -> dict[str, int]:
    """Synchronising CUDA calls by ``file:line`` inside lightning_influence during a tracked fit of ``steps`` steps."""
    level = {k: v for k, v in FULL.items() if k != "checkpoint_every_n_steps"}
    counts: dict[str, int] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fit(model, ctx.device, ctx.data[model], ctx.batch, steps=steps, tracker=level,
                log_dir=ctx.work / f"sync-{model}-{steps}", deterministic=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" in str(w.message) and "lightning_influence" in w.filename:
            key = f"{Path(w.filename).name}:{w.lineno}"
            counts[key] = counts.get(key, 0) + 1
    return counts


def check_no_sync(ctx: Context, model: str) -> str:
    if ctx.device != "cuda":
        raise Skip("CUDA only")
    steps = 8
    short, long = _sync_warnings(ctx, model, steps), _sync_warnings(ctx, model, 2 * steps)
    grow = {k: long.get(k, 0) - short.get(k, 0) for k in long if long.get(k, 0) > short.get(k, 0)}
    detail = (f"synchronising calls from lightning_influence: {sum(short.values())} in {steps} steps, "
              f"{sum(long.values())} in {2 * steps}")
    if grow:
        top = sorted(grow.items(), key=lambda kv: -kv[1])[:6]
        raise CheckFailed(detail + "; per-step ones at " + ", ".join(f"{k} (+{n})" for k, n in top))
    return detail


def overhead_table(ctx: Context) -> dict[str, Any]:
    """Fit time with the tracker over without, per recording level, alternating; the fastest fits' ratio."""
    from benchmarks.overhead import LEVELS, TARGETS

    quick = ctx.args.quick
    models = ["mlp"] if quick else ["big-mlp", "mlp", "transformer"]
    steps, rounds = (4, 1) if quick else (ctx.args.overhead_steps, ctx.args.rounds)
    table: dict[str, dict[str, float]] = {}
    for model in models:
        data = make_data(model, 128 * 8 if model == "big-mlp" else ctx.n)
        batch = 128 if model == "big-mlp" else ctx.batch
        fit(model, ctx.device, data, batch, steps=3, deterministic=False)  # warm-up (kernels, allocator)
        times: dict[str, list[float]] = {"baseline": [], **{k: [] for k in LEVELS}}
        for _ in range(rounds):
            for level in times:
                log_dir = ctx.work / "overhead"
                shutil.rmtree(log_dir, ignore_errors=True)
                _, seconds = fit(model, ctx.device, data, batch, steps=steps, deterministic=False,
                                 tracker=None if level == "baseline" else LEVELS[level], log_dir=log_dir)
                times[level].append(seconds)
        base = min(times["baseline"])
        table[model] = {"baseline_s": base, **{lv: min(t) / base for lv, t in times.items() if lv != "baseline"}}
    print(f"\noverhead on {ctx.device}: fit time with the tracker / without, {steps} steps per fit, {rounds} alternating "
          "round(s), fastest fits")
    print(f"{'level':<28}" + "".join(f"{m:>13}" for m in models) + f"{'CPU target':>12}")
    print(f"{'baseline fit (s)':<28}" + "".join(f"{table[m]['baseline_s']:>13.2f}" for m in models))
    for level in LEVELS:
        tgt = f"{TARGETS[level]:.2f}" if level in TARGETS else "-"
        print(f"{level:<28}" + "".join(f"{table[m][level]:>13.2f}" for m in models) + f"{tgt:>12}")
    return {"steps": steps, "rounds": rounds, "ratios": table}


# -------------------------------------------------------------------------------------- main
def run(name: str, fn: Callable[..., str], *args: Any, results: list[dict[str, Any]], only: str | None = None) -> None:
    """Run one check: print its PASS/FAIL/SKIP line and append its result (a crash is a FAIL with the reason)."""
    if only and not any(name == pat or fnmatch.fnmatchcase(name, pat) for pat in only.split(",")):
        return
    t0 = time.perf_counter()
    try:
        status, detail, trace = "PASS", fn(*args), None
    except Skip as e:
        status, detail, trace = "SKIP", str(e), None
    except CheckFailed as e:
        status, detail, trace = "FAIL", str(e), None
    except Exception as e:  # noqa: BLE001 -- a crash of the code under test is a failed check, not a failed script
        status, detail, trace = "FAIL", f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}", \
            traceback.format_exc()
    seconds = time.perf_counter() - t0
    print(f"{status} {name} ({seconds:.1f} s): {detail}", flush=True)
    results.append({"check": name, "status": status, "detail": detail, "seconds": seconds, "traceback": trace})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--quick", action="store_true", help="tiny sizes (the CPU dry run)")
    ap.add_argument("--overhead-steps", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default=None, help="comma-separated name patterns of the checks to run, e.g. 'dit*,replay*'")
    ap.add_argument("--inject-fault", choices=("rng",), default=None, help="break the tracker on purpose (self-test)")
    ap.add_argument("--out", default=None, help="JSON path (default $OUT/gpu_check.json or benchmarks/results/)")
    args = ap.parse_args(argv)
    out = Path(args.out or (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT")
                            else Path(__file__).resolve().parent / "results" / "gpu_check.json"))
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*(deterministic|nested tensors).*")
    torch.set_num_threads(1 if args.device == "cpu" else torch.get_num_threads())
    results: list[dict[str, Any]] = []
    env = {"torch": torch.__version__, "lightning": pl.__version__, "python": platform.python_version(),
           "device": torch.cuda.get_device_name() if args.device == "cuda" and torch.cuda.is_available() else "cpu"}
    print(f"gpu_check on {env['device']} (torch {env['torch']}, lightning {env['lightning']})", flush=True)
    if args.device == "cuda" and not torch.cuda.is_available():
        run("cuda_available", lambda: (_ for _ in ()).throw(CheckFailed("torch.cuda.is_available() is False")),
            results=results, only=args.only)
        return _finish(results, env, {}, out)
    work = Path(tempfile.mkdtemp(prefix="li-gpu-check-"))
    overhead: dict[str, Any] = {}
    t0 = time.perf_counter()
    try:
        ctx = Context(args, work)
        for model in ("mlp", "transformer"):
            run(f"records[{model}]", check_records, ctx, model, results=results, only=args.only)
            run(f"bit_identical[{model}]", check_bit_identical, ctx, model, results=results, only=args.only)
            run(f"grad_rows[{model}]", check_grad_rows, ctx, model, results=results, only=args.only)
            run(f"hvp_rows[{model}]", check_hvp_rows, ctx, model, results=results, only=args.only)
        for name in MIXED:
            run(f"mixed[{name}]", check_mixed, ctx, name, results=results, only=args.only)
        for model in ("mlp-nodrop", "mlp"):
            run(f"replay[{model}]", check_replay, ctx, model, results=results, only=args.only)
            run(f"replay_cpu[{model}]", check_replay_cpu, ctx, model, results=results, only=args.only)
            run(f"tracin[{model}]", check_tracin, ctx, model, results=results, only=args.only)
            run(f"dit[{model}]", check_dit, ctx, model, results=results, only=args.only)
            run(f"dit_fd[{model}]", check_dit_fd, ctx, model, results=results, only=args.only)
            run(f"diffin[{model}]", check_diffin, ctx, model, results=results, only=args.only)
        run("no_sync[mlp]", check_no_sync, ctx, "mlp", results=results, only=args.only)

        def table() -> str:
            overhead.update(overhead_table(ctx))
            return "table above"

        run("overhead", table, results=results, only=args.only)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    env["seconds"] = time.perf_counter() - t0
    return _finish(results, env, overhead, out)


def _finish(results: list[dict[str, Any]], env: dict[str, Any], overhead: dict[str, Any], out: Path) -> int:
    failed = [r["check"] for r in results if r["status"] == "FAIL"]
    print(f"\n{len(results) - len(failed)}/{len(results)} checks did not fail"
          + (f"; FAILED: {', '.join(failed)}" if failed else "") + f"; {env.get('seconds', 0):.0f} s in all")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"env": env, "checks": results, "overhead": overhead}, indent=1))
    print(f"wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
