"""A tabular MLP with dict batches; the module defines its own dataloaders."""

import sys

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_influence import InfluenceTracker


class Table(Dataset):
    def __init__(self, n: int, seed: int, with_ids: bool):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 5, generator=g)
        self.y = (self.x[:, 0] + 0.5 * self.x[:, 1] > 0).long()
        self.with_ids = with_ids

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        item = {"features": self.x[i], "y": self.y[i]}
        return {**item, "ids": i} if self.with_ids else item


class DictMLP(pl.LightningModule):
    def __init__(self, hidden: int = 16, lr: float = 0.1, n_train: int = 64):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(5, hidden), nn.Tanh(), nn.Linear(hidden, 2))

    def forward(self, x):
        return self.net(x)

    def per_sample_loss(self, batch):  # dict batches, with or without "ids"
        return nn.functional.cross_entropy(self(batch["features"]), batch["y"], reduction="none")

    def training_step(self, batch, batch_idx):
        return self.per_sample_loss(batch).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    def train_dataloader(self):
        return DataLoader(Table(self.hparams.n_train, 0, True), batch_size=16, shuffle=True)

    def val_dataloader(self):
        return DataLoader(Table(32, 1, False), batch_size=16)


if __name__ == "__main__":
    pl.seed_everything(0)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[InfluenceTracker(sys.argv[1], record_gradients=True, checkpoint_every_n_steps=1)])
    trainer.fit(DictMLP(hidden=7, lr=0.2, n_train=48))
