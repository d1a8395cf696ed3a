"""Configurable DDP runs (gloo, CPU) for ``test_ddp_matrix.py``: ``python tests/ddp_matrix_run.py CONFIG_JSON``.

The global batches of ``ddp_run.py`` (rank ``r`` takes its share of every global batch; ``mode="single"``: one process,
the same global batches) with: ``accumulate`` (accumulate_grad_batches), ``clip`` (gradient_clip_val), ``optimizer``
(``sgd``: momentum SGD, ``adamw``), ``record`` (``losses``, ``gradients``, ``hvp``), ``checkpoint_every``,
``engine`` (the tracker's ``gradient_engine``), ``model`` (``tiny``; ``flagmix``: its logits mix the batch's samples
when the batch holds a flagged sample, ``FLAGGED``: the hooks' first-step check against autograd demotes on the rank
that sees one), ``ckpt_dir`` (a Lightning checkpoint every ``ckpt_every`` steps), ``resume_from``, ``kill`` (``[rank,
step]``: that process is killed by SIGKILL when it starts that step), ``precision`` (the Trainer's), ``float32`` (a float32
model and data: autocast leaves float64 alone), ``tamper`` (``"clip"``: a callback listed
before the tracker clips the gradients in its ``on_before_optimizer_step``), ``unsharded`` (every process takes the
whole global batches: a sampler that does not split the data by rank), ``sampler`` (``"distributed"``: a plain
shuffled ``DataLoader`` of ``batch`` samples and Lightning's ``DistributedSampler``, over ``n`` samples: with ``n`` odd
it pads each epoch with a repeated sample; ``"distributed-drop"``: a ``DistributedSampler(drop_last=True)`` of the
test's own, no padding).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddp_run import N, WORLD, GlobalOrder  # noqa: E402

FLAGGED = (3, 19)  # rank 1's first batch holds 3 (step 0), rank 0's second batch 19 (step 1), in epoch 0's order


def fit(cfg: dict) -> None:
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.strategies import DDPStrategy
    from torch.utils.data import DataLoader

    from conftest import TinyClassifier, make_data
    from lightning_influence import InfluenceTracker, WithIds

    float32 = bool(cfg.get("float32"))
    data = make_data(cfg.get("n", N), dtype=torch.float32 if float32 else torch.float64)
    data.tensors[0][:, -1] = 0.0
    data.tensors[0][[i for i in FLAGGED if i < len(data)], -1] = 1.0  # the flag: a last input feature of 1
    ds = WithIds(data)
    mode = cfg.get("mode", "ddp")

    class Module(TinyClassifier):
        def forward(self, x):
            out = self.net(x)
            if cfg.get("model") == "flagmix":  # no control flow on values: vmap runs it too
                out = out + 0.5 * x[:, -1].amax() * out.mean(0, keepdim=True)
            return out

        def train_dataloader(self):
            if cfg.get("sampler") == "distributed":  # Lightning puts a DistributedSampler in (use_distributed_sampler)
                return DataLoader(ds, batch_size=cfg.get("batch", 3), shuffle=True)
            if cfg.get("sampler") == "distributed-drop":
                from torch.utils.data import DistributedSampler

                sampler = DistributedSampler(ds, num_replicas=WORLD, rank=self.global_rank, shuffle=True, drop_last=True)
                return DataLoader(ds, batch_size=cfg.get("batch", 3), sampler=sampler)
            if cfg.get("unsharded"):  # every process the whole global batches (a sampler not split by rank)
                return DataLoader(ds, batch_sampler=GlobalOrder(None))
            return DataLoader(ds, batch_sampler=GlobalOrder(self.global_rank if mode == "ddp" else None))

        def configure_optimizers(self):
            if cfg.get("optimizer", "sgd") == "adamw":
                return torch.optim.AdamW(self.parameters(), lr=0.05, weight_decay=0.1)
            return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)

    class Kill(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            rank, step = cfg["kill"]
            if trainer.global_rank == rank and trainer.global_step == step:
                os.kill(os.getpid(), signal.SIGKILL)

    class Clip(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            torch.nn.utils.clip_grad_norm_(pl_module.parameters(), 0.01)

    torch.manual_seed(0)
    module = Module()
    module = module if float32 else module.double()
    record = cfg.get("record", "gradients")
    tracker = InfluenceTracker(cfg["log_dir"], record_gradients=record in ("gradients", "hvp"),
                               record_hvp=record == "hvp", checkpoint_every_n_steps=cfg.get("checkpoint_every", 1),
                               storage_dtype="float64", flush_every_n_steps=cfg.get("flush_every", 3),
                               gradient_engine=cfg.get("engine", "auto"))
    callbacks: list = [Clip(), tracker] if cfg.get("tamper") == "clip" else [tracker]
    if cfg.get("ckpt_dir"):
        from lightning.pytorch.callbacks import ModelCheckpoint

        callbacks.append(ModelCheckpoint(dirpath=cfg["ckpt_dir"], every_n_train_steps=cfg.get("ckpt_every", 4),
                                         save_top_k=-1, filename="{step}"))
    if cfg.get("kill"):
        callbacks.append(Kill())
    ddp = mode == "ddp"
    trainer = pl.Trainer(max_epochs=cfg.get("epochs", 2), accelerator="cpu", devices=WORLD if ddp else 1,
                         strategy=DDPStrategy(timeout=timedelta(seconds=60)) if ddp else "auto",
                         use_distributed_sampler=cfg.get("sampler") == "distributed", logger=False, enable_checkpointing=bool(cfg.get("ckpt_dir")),
                         enable_progress_bar=False, enable_model_summary=False, deterministic=True, callbacks=callbacks,
                         accumulate_grad_batches=cfg.get("accumulate", 1), gradient_clip_val=cfg.get("clip"),
                         precision=cfg.get("precision", "32-true"))
    trainer.fit(module, ckpt_path=cfg.get("resume_from"))


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    fit(json.loads(sys.argv[1]))
