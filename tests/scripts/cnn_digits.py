"""A CNN on scikit-learn's digits trained from a plain script with plain DataLoaders (no datamodule, no YAML)."""

import sys

import lightning.pytorch as pl
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import InfluenceTracker, WithIds


class CNN(pl.LightningModule):
    def __init__(self, channels: int = 4, lr: float = 0.1):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(channels * 64, 10))

    def forward(self, x):
        return self.net(x)

    def per_sample_loss(self, batch):
        x, y = batch[0], batch[1]  # training batches are (x, y, ids), validation batches (x, y)
        return nn.functional.cross_entropy(self(x), y, reduction="none")

    def training_step(self, batch, batch_idx):
        return self.per_sample_loss(batch).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.per_sample_loss(batch).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def data(n_train: int = 96, n_val: int = 48):
    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(d.target, dtype=torch.long)
    train = WithIds(TensorDataset(x[:n_train], y[:n_train]))
    val = TensorDataset(x[n_train:n_train + n_val], y[n_train:n_train + n_val])
    return train, val


if __name__ == "__main__":
    log_dir = sys.argv[1]
    pl.seed_everything(0)
    train, val = data()
    model = CNN(channels=3, lr=0.2)  # not the defaults: the log must record them
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[InfluenceTracker(log_dir, record_gradients=True, checkpoint_every_n_steps=1)])
    trainer.fit(model, DataLoader(train, batch_size=16, shuffle=True), DataLoader(val, batch_size=16))
