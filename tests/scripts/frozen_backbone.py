"""Fine-tuning a head on a frozen "pretrained" backbone, the weights loaded and frozen by the script after the model
is built (so a module rebuilt from its class and hyperparameters has neither), AdamW with the usual two param groups
(weight decay on the weights, none on biases and LayerNorm)."""

import sys

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import InfluenceTracker, WithIds


class Head(pl.LightningModule):
    def __init__(self, hidden: int = 8, lr: float = 0.02):
        super().__init__()
        self.save_hyperparameters()
        self.backbone = nn.Sequential(nn.Linear(6, hidden), nn.LayerNorm(hidden), nn.Tanh())
        self.head = nn.Sequential(nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.Tanh(), nn.Linear(hidden, 3))

    def forward(self, x):
        return self.head(self.backbone(x))

    def per_sample_loss(self, batch):
        return nn.functional.cross_entropy(self(batch[0]), batch[1], reduction="none")

    def training_step(self, batch, batch_idx):
        return self.per_sample_loss(batch).mean()

    def configure_optimizers(self):
        decay = [p for n, p in self.named_parameters() if p.requires_grad and n.endswith("weight") and p.dim() > 1]
        rest = [p for n, p in self.named_parameters() if p.requires_grad and not (n.endswith("weight") and p.dim() > 1)]
        return torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                                 lr=self.hparams.lr)


def pretrained(model: Head) -> Head:
    """Load the "pretrained" backbone (seeded weights standing for a file) and freeze it, as a script does."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    model.backbone.requires_grad_(False)
    return model


def data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return TensorDataset(x, y)


if __name__ == "__main__":
    pl.seed_everything(0)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[InfluenceTracker(sys.argv[1], record_gradients=True, checkpoint_every_n_steps=3)])
    trainer.fit(pretrained(Head(hidden=8, lr=0.02)), DataLoader(WithIds(data(40, 0)), batch_size=8, shuffle=True),
                DataLoader(data(20, 1), batch_size=20))
