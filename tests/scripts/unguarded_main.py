"""A script that trains through ``main()`` called at its top level, without ``if __name__ == "__main__":``; with
``local`` as second argument its model class is defined inside ``main`` (not importable)."""

import sys

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import InfluenceTracker, WithIds


class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))

    def forward(self, x):
        return self.net(x)

    def per_sample_loss(self, batch):
        return nn.functional.cross_entropy(self(batch[0]), batch[1], reduction="none")

    def training_step(self, batch, batch_idx):
        return self.per_sample_loss(batch).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main():
    class Local(Net):
        pass

    module = Local() if sys.argv[2:] == ["local"] else Net()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 4, generator=g), torch.randint(0, 2, (24,), generator=g)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[InfluenceTracker(sys.argv[1], overwrite=True)])
    trainer.fit(module, DataLoader(WithIds(TensorDataset(x[:16], y[:16])), batch_size=8),
                DataLoader(TensorDataset(x[16:], y[16:]), batch_size=8))


main()
