"""A tiny transformer classifier on random tokens, with its datamodule defined in the script itself."""

import sys

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import InfluenceTracker, WithIds


class Tokens(pl.LightningDataModule):
    def __init__(self, n_train: int = 64, n_val: int = 32, length: int = 6, vocab: int = 12, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        g = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, vocab, (n_train + n_val, length), generator=g)
        labels = (tokens[:, 0] > vocab // 2).long()  # learnable: the first token decides
        self.train_set = WithIds(TensorDataset(tokens[:n_train], labels[:n_train]))
        self.val_set = TensorDataset(tokens[n_train:], labels[n_train:])

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=16, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=16)


class TinyTransformer(pl.LightningModule):
    def __init__(self, vocab: int = 12, dim: int = 8, lr: float = 0.05):
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.layer = nn.TransformerEncoderLayer(dim, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(dim, 2)

    def forward(self, tokens):
        return self.head(self.layer(self.norm(self.embed(tokens))).mean(dim=1))

    def per_sample_loss(self, batch):
        return nn.functional.cross_entropy(self(batch[0]), batch[1], reduction="none")

    def training_step(self, batch, batch_idx):
        return self.per_sample_loss(batch).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


if __name__ == "__main__":
    pl.seed_everything(0)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[InfluenceTracker(sys.argv[1], record_gradients=True, checkpoint_every_n_steps=1)])
    trainer.fit(TinyTransformer(dim=8, lr=0.1), datamodule=Tokens(n_train=48, seed=1))
