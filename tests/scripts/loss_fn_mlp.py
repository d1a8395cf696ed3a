"""A tabular MLP without per_sample_loss: the tracker is given loss_fn= (a top-level function, or with ``lambda`` as
second argument a lambda that cannot be imported again)."""

import sys

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_influence import InfluenceTracker


class Table(Dataset):
    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 5, generator=g)
        self.y = (self.x[:, 0] - 0.5 * self.x[:, 2] > 0).long()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"features": self.x[i], "label": self.y[i], "ids": i}


class PlainMLP(pl.LightningModule):
    def __init__(self, hidden: int = 16, lr: float = 0.1):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(5, hidden), nn.Tanh(), nn.Linear(hidden, 2))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch["features"]), batch["label"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def sample_loss(module, batch):
    return nn.functional.cross_entropy(module(batch["features"]), batch["label"], reduction="none")


if __name__ == "__main__":
    pl.seed_everything(0)
    loss_fn = (lambda m, b: sample_loss(m, b)) if sys.argv[2:] == ["lambda"] else sample_loss
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[InfluenceTracker(sys.argv[1], loss_fn=loss_fn, record_gradients=True,
                                                     checkpoint_every_n_steps=2)])
    trainer.fit(PlainMLP(hidden=6, lr=0.1), DataLoader(Table(40, 0), batch_size=8, shuffle=True),
                DataLoader(Table(16, 1), batch_size=16))
