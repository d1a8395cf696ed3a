"""A tiny transformer classifier trained as users do: dropout 0.1, AdamW with a cosine schedule and warm-up,
clipping, accumulation 2 with an incomplete last accumulation; gradients, HVP products and checkpoints recorded."""
import math, sys
import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from lightning_influence import InfluenceTracker, WithIds

VOCAB, LEN = 16, 8


def make_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(0, VOCAB, (n, LEN), generator=g)
    y = ((tok == 3).sum(1) > (tok == 5).sum(1)).long()   # more 3s than 5s
    return tok, y


class TinyTransformer(pl.LightningModule):
    def __init__(self, dim: int = 16, heads: int = 2, lr: float = 3e-3, warmup: int = 4, total: int = 40):
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(VOCAB, dim)
        self.norm = nn.LayerNorm(dim)
        self.layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=32, dropout=0.1, batch_first=True)
        self.head = nn.Linear(dim, 2)

    def forward(self, tok):
        return self.head(self.layer(self.norm(self.embed(tok))).mean(1))

    def per_sample_loss(self, batch):
        return F.cross_entropy(self(batch[0]), batch[1], reduction="none")

    def training_step(self, batch, batch_idx):
        return self.per_sample_loss(batch).mean()

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.01)
        w, T = self.hparams.warmup, self.hparams.total
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: (s + 1) / w if s < w else 0.5 * (1 + math.cos(math.pi * min(1.0, (s - w) / max(1, T - w)))))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


if __name__ == "__main__":
    log_dir = sys.argv[1] if len(sys.argv) > 1 else "runs/influence"
    pl.seed_everything(0)
    xt, yt = make_data(120, 0)
    xv, yv = make_data(40, 1)
    train = WithIds(TensorDataset(xt, yt))
    # 120 samples in micro-batches of 18: 7 per epoch (the last of 12), accumulation 2: the 4th step is incomplete
    tracker = InfluenceTracker(log_dir, record_gradients=True, record_hvp=True, projection_dim=32,
                               checkpoint_every_n_steps=4, overwrite=True)
    trainer = pl.Trainer(max_epochs=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                         gradient_clip_val=1.0, accumulate_grad_batches=2, callbacks=[tracker],
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(TinyTransformer(), DataLoader(train, batch_size=18, shuffle=True),
                DataLoader(TensorDataset(xv, yv), batch_size=20))
