"""A small CNN with GroupNorm on digits (1x8x8), dict batches {"x", "y", "ids"}, Adam."""
import sys
import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_influence import InfluenceTracker


class Digits(Dataset):
    def __init__(self, start: int, stop: int, with_ids: bool = True):
        d = load_digits()
        self.x = torch.tensor(d.images[start:stop] / 16, dtype=torch.float32).unsqueeze(1)
        self.y = torch.tensor(d.target[start:stop])
        self.with_ids = with_ids

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        item = {"x": self.x[i], "y": self.y[i]}
        return {**item, "ids": i} if self.with_ids else item


class CNN(pl.LightningModule):
    def __init__(self, channels: int = 8, lr: float = 3e-3):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.GroupNorm(2, channels), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.GroupNorm(2, channels), nn.ReLU(),
            nn.Flatten(), nn.Linear(channels * 16, 10))

    def forward(self, x):
        return self.net(x)

    def per_sample_loss(self, batch):
        return F.cross_entropy(self(batch["x"]), batch["y"], reduction="none")

    def training_step(self, batch, batch_idx):
        return self.per_sample_loss(batch).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.per_sample_loss(batch).mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


if __name__ == "__main__":
    log_dir = sys.argv[1] if len(sys.argv) > 1 else "runs/influence"
    pl.seed_everything(0)
    tracker = InfluenceTracker(log_dir, record_gradients=True, projection_dim=64, checkpoint_every_n_steps=8,
                               overwrite=True)
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False, callbacks=[tracker],
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(CNN(channels=6), DataLoader(Digits(0, 300), batch_size=25, shuffle=True),
                DataLoader(Digits(1000, 1200, with_ids=False), batch_size=100))
