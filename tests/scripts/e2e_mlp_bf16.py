"""An MLP with dropout 0.2 on digits, 10% flipped labels, SGD momentum, bf16-mixed."""
import sys
import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from lightning_influence import InfluenceTracker, WithIds

N_TRAIN = 400


def data():
    d = load_digits()
    x = torch.tensor(d.data / 16, dtype=torch.float32)
    y = torch.tensor(d.target)
    rng = np.random.default_rng(0)
    flipped = np.sort(rng.choice(N_TRAIN, N_TRAIN // 10, replace=False))
    y_train = y[:N_TRAIN].clone()
    y_train[flipped] = (y_train[flipped] + torch.tensor(rng.integers(1, 10, len(flipped)))) % 10
    return TensorDataset(x[:N_TRAIN], y_train), TensorDataset(x[N_TRAIN:N_TRAIN + 300], y[N_TRAIN:N_TRAIN + 300]), flipped


class MLP(pl.LightningModule):
    def __init__(self, hidden: int = 64, lr: float = 0.05, p: float = 0.2):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Dropout(p), nn.Linear(hidden, 10))

    def forward(self, x):
        return self.net(x)

    def per_sample_loss(self, batch):
        return F.cross_entropy(self(batch[0]), batch[1], reduction="none")

    def training_step(self, batch, batch_idx):
        return self.per_sample_loss(batch).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.per_sample_loss(batch).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


if __name__ == "__main__":
    log_dir = sys.argv[1] if len(sys.argv) > 1 else "runs/influence"
    pl.seed_everything(0)
    train, val, flipped = data()
    tracker = InfluenceTracker(log_dir, record_gradients=True, projection_dim=32, checkpoint_every_n_steps=10,
                               overwrite=True)
    trainer = pl.Trainer(max_epochs=4, accelerator="cpu", precision="bf16-mixed", logger=False,
                         enable_checkpointing=False, callbacks=[tracker], enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(MLP(hidden=48), DataLoader(WithIds(train), batch_size=32, shuffle=True), DataLoader(val, batch_size=100))
