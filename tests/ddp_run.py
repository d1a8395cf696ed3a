"""Training runs for ``test_ddp.py``: the same global batches on 2 DDP processes (gloo, CPU) or on 1.

``python tests/ddp_run.py LOG_DIR ddp``: ``strategy="ddp"``, 2 processes (Lightning re-runs this
script for rank 1); rank ``r`` takes samples ``[r·B, (r+1)·B)`` of every global batch of ``2B``.
``python tests/ddp_run.py LOG_DIR single``: 1 process, global batches of ``2B`` in the same order
(rank 0's part, then rank 1's). ``use_distributed_sampler=False`` keeps these orders.
``python tests/ddp_run.py LOG_DIR ddp CKPT_DIR [RESUME_FROM]``: also save a Lightning checkpoint
at every epoch end into ``CKPT_DIR``, and resume from the checkpoint ``RESUME_FROM``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

N, B, EPOCHS, WORLD = 20, 3, 3, 2  # global batch 6: 3 full steps + one of 2 per epoch (ranks get 1 each)


class GlobalOrder:
    """Epoch-seeded permutation cut into global batches of ``WORLD·B``; yields one rank's share (or all)."""

    def __init__(self, rank: int | None) -> None:
        self.rank, self.epoch = rank, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        perm = np.random.default_rng(100 + self.epoch).permutation(N).tolist()
        out = []
        for i in range(0, N, WORLD * B):
            chunk = perm[i : i + WORLD * B]
            share = -(-len(chunk) // WORLD)  # rank r takes chunk[r·share : (r+1)·share]
            out.append(chunk if self.rank is None else chunk[self.rank * share : (self.rank + 1) * share])
        return out

    def __iter__(self):
        return iter(self.batches())

    def __len__(self) -> int:
        return len(self.batches())


def fit(log_dir: str, mode: str, ckpt_dir: str | None = None, resume_from: str | None = None) -> None:
    """Train with ``mode`` ``"ddp"`` (2 processes) or ``"single"`` (1 process), tracking into ``log_dir``;
    with ``ckpt_dir``, checkpoint every epoch there; with ``resume_from``, resume from that checkpoint.
    ``mode + "+onecycle"``: under OneCycleLR stepped every batch (it cycles the momentum)."""
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader

    from conftest import TinyClassifier, make_data
    from lightning_influence import InfluenceTracker, WithIds

    ds = WithIds(make_data(N))
    mode, _, schedule = mode.partition("+")

    class Module(TinyClassifier):
        def train_dataloader(self):
            return DataLoader(ds, batch_sampler=GlobalOrder(self.global_rank if mode == "ddp" else None))

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)
            if schedule != "onecycle":
                return opt
            cycle = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=4 * EPOCHS)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": cycle, "interval": "step"}}

    torch.manual_seed(0)
    module = Module().double()
    tracker = InfluenceTracker(log_dir, record_gradients=True, checkpoint_every_n_steps=1, storage_dtype="float64",
                               flush_every_n_steps=3)
    callbacks: list = [tracker]
    if ckpt_dir is not None:
        from lightning.pytorch.callbacks import ModelCheckpoint

        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, every_n_epochs=1, save_top_k=-1))
    trainer = pl.Trainer(max_epochs=EPOCHS, accelerator="cpu", devices=WORLD if mode == "ddp" else 1,
                         strategy="ddp" if mode == "ddp" else "auto", use_distributed_sampler=False, logger=False,
                         enable_checkpointing=ckpt_dir is not None, enable_progress_bar=False,
                         enable_model_summary=False, deterministic=True, callbacks=callbacks)
    trainer.fit(module, ckpt_path=resume_from)


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    fit(*sys.argv[1:])
