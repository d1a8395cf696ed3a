"""Variable-length token sequences padded by the DataLoader's own collate function (dict batches with a mask), the
training set in length buckets of varying batch sizes; ``plain`` (plain DataLoaders given to fit, the data stored in
the log) or ``datamodule`` as second argument."""

import random
import sys

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from lightning_influence import InfluenceTracker

VOCAB = 30


class Seqs(Dataset):
    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(n):
            toks = torch.randint(1, VOCAB, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g)
            self.items.append((toks, int((toks < 12).sum() * 2 > len(toks))))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return {"tokens": self.items[i][0], "label": self.items[i][1], "ids": i}


def pad(items):
    longest = max(len(it["tokens"]) for it in items)
    tokens = torch.zeros(len(items), longest, dtype=torch.long)
    for j, it in enumerate(items):
        tokens[j, :len(it["tokens"])] = it["tokens"]
    return {"tokens": tokens, "mask": tokens != 0, "label": torch.tensor([it["label"] for it in items]),
            "ids": torch.tensor([it["ids"] for it in items])}


class Buckets(Sampler):
    """Batches of 4 to 7 samples of similar lengths, in a seeded order that changes every epoch."""

    def __init__(self, ds: Seqs):
        self.ds, self.epoch = ds, 0

    def __iter__(self):
        rnd = random.Random(self.epoch)
        self.epoch += 1
        order = sorted(range(len(self.ds)), key=lambda i: (len(self.ds.items[i][0]), rnd.random()))
        batches, i = [], 0
        while i < len(order):
            size = rnd.choice([4, 5, 7])
            batches.append(order[i:i + size])
            i += size
        rnd.shuffle(batches)
        return iter(batches)


class TextData(pl.LightningDataModule):
    def __init__(self, n_train: int = 36):
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage=None):
        self.train, self.val = Seqs(self.hparams.n_train, 0), Seqs(11, 1)

    def train_dataloader(self):
        return DataLoader(self.train, batch_sampler=Buckets(self.train), collate_fn=pad)

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=4, collate_fn=pad)


class Bag(pl.LightningModule):
    def __init__(self, d: int = 6, lr: float = 0.2):
        super().__init__()
        self.save_hyperparameters()
        self.emb = nn.Embedding(VOCAB, d, padding_idx=0)
        self.head = nn.Linear(d, 2)

    def forward(self, tokens, mask):
        return self.head((self.emb(tokens) * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True))

    def per_sample_loss(self, batch):
        return F.cross_entropy(self(batch["tokens"], batch["mask"]), batch["label"], reduction="none")

    def training_step(self, batch, batch_idx):
        return self.per_sample_loss(batch).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


if __name__ == "__main__":
    torch.set_default_dtype(torch.float64)
    pl.seed_everything(0, verbose=False)
    tracker = InfluenceTracker(sys.argv[1], record_gradients=True, checkpoint_every_n_steps=4, overwrite=True)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[tracker])
    data = TextData()
    if sys.argv[2] == "datamodule":
        trainer.fit(Bag(), datamodule=data)
    else:
        data.setup()
        trainer.fit(Bag(), DataLoader(data.train, batch_sampler=Buckets(data.train), collate_fn=pad),
                    data.val_dataloader())
