"""A train-mode BatchNorm run on 2 DDP processes (gloo, CPU) for ``test_batchnorm_state.py``.

``python tests/ddp_bn_run.py LOG_DIR SNAPSHOTS``: ``ddp_run.py``'s global batches (of ``N`` samples: BatchNorm needs
more than one per process), a BatchNorm layer in train mode (``allow_train_batchnorm``), a checkpoint every 2 steps; rank 0 saves its module's state before every step's forward
into ``SNAPSHOTS`` (``torch.save``), as the reference of the running statistics replay carries.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

N = 18  # 3 global batches of 6 per epoch, 3 samples per process


def fit(log_dir: str, snapshots: str) -> None:
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader

    from conftest import TinyClassifier, make_data
    import ddp_run
    from ddp_run import WORLD, GlobalOrder

    ddp_run.N = N
    from lightning_influence import InfluenceTracker, WithIds

    ds = WithIds(make_data(N))
    states: dict[int, dict[str, torch.Tensor]] = {}

    class Module(TinyClassifier):
        def train_dataloader(self):
            return DataLoader(ds, batch_sampler=GlobalOrder(self.global_rank))

        def on_train_batch_start(self, batch, batch_idx):
            states.setdefault(self.trainer.global_step, copy.deepcopy(self.state_dict()))

        def on_train_end(self):
            states[self.trainer.global_step] = copy.deepcopy(self.state_dict())
            if self.global_rank == 0:
                torch.save(states, snapshots)

    torch.manual_seed(0)
    tracker = InfluenceTracker(log_dir, record_gradients=True, params=["net.0.*", "net.4.*"], allow_train_batchnorm=True,
                               checkpoint_every_n_steps=2, storage_dtype="float64")
    pl.Trainer(max_epochs=2, accelerator="cpu", devices=WORLD, strategy="ddp", use_distributed_sampler=False,
               logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
               deterministic=True, callbacks=[tracker]).fit(Module(batchnorm=True).double())


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    fit(*sys.argv[1:])
