"""Shared fixtures: a tiny regression/classification problem with sample ids and a module with ``per_sample_loss``."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import InfluenceTracker, WithIds


class TinyClassifier(pl.LightningModule):
    """A small MLP; ``routed`` makes ``training_step`` compute its loss through ``per_sample_loss``."""

    def __init__(self, d_in: int = 5, hidden: int = 7, classes: int = 3, dropout: float = 0.0, batchnorm: bool = False,
                 optimizer: str = "sgd", lr: float = 0.1, momentum: float = 0.0, weight_decay: float = 0.0,
                 routed: bool = True, extra: nn.Module | None = None) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(d_in, hidden)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(hidden))
        layers += [nn.Tanh(), nn.Dropout(dropout), nn.Linear(hidden, classes)]
        self.net = nn.Sequential(*layers)
        self.extra = extra
        self.opt, self.lr, self.momentum, self.weight_decay, self.routed = optimizer, lr, momentum, weight_decay, routed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if self.extra is None:
            return out
        out = self.extra(out)
        return out[0] if isinstance(out, tuple) else out  # an LSTM cell's (h, c): h

    def per_sample_loss(self, batch: Any) -> torch.Tensor:
        return F.cross_entropy(self(batch[0]), batch[1], reduction="none")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.routed:
            return self.per_sample_loss(batch).mean()
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> Any:
        if self.opt == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)}
        if self.opt == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        if self.opt == "rmsprop":
            return torch.optim.RMSprop(self.parameters(), lr=self.lr)
        if self.opt == "nadam":
            return torch.optim.NAdam(self.parameters(), lr=self.lr)
        raise ValueError(self.opt)


class ChangesOptimizer(TinyClassifier):
    """A plain SGD with momentum whose ``change(optimizer)`` edits its param groups in ``where``: ``training_step``
    (recorded) or the module's own ``on_before_optimizer_step``, which Lightning calls after the callbacks'."""

    where = "training_step"

    def change(self, optimizer: torch.optim.Optimizer) -> None:
        raise NotImplementedError

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.where == "training_step":
            self.change(self.trainer.optimizers[0])
        return super().training_step(batch, batch_idx)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.where == "on_before_optimizer_step":
            self.change(optimizer)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


def make_data(n: int = 24, d_in: int = 5, classes: int = 3, dtype: torch.dtype = torch.float64, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, d_in, generator=g, dtype=dtype), torch.randint(0, classes, (n,), generator=g))


def loader(ds: Any, batch_size: int = 6, seed: int = 0, ids: bool = True) -> DataLoader:
    return DataLoader(WithIds(ds) if ids else ds, batch_size=batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))


def fit(module: pl.LightningModule, data: Any, tracker: InfluenceTracker | None = None, epochs: int = 2,
        seed: int = 0, **trainer_kw: Any) -> pl.Trainer:
    """Deterministic CPU fit; returns the trainer."""
    pl.seed_everything(seed, verbose=False)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, deterministic=True,
                         callbacks=[tracker] if tracker else [], **trainer_kw)
    trainer.fit(module, data)
    return trainer


def weight_normed_cell(n_in: int, n_out: int) -> nn.Module:
    """``nn.LSTMCell`` with ``parametrizations.weight_norm`` on ``weight_ih``: the LSTM cell's engine reads the weights
    at each call (a parametrized one would be made again), so the parametrized engine does not chain it, and no engine
    covers the cell (``capture/owners.engine_for``)."""
    return torch.nn.utils.parametrizations.weight_norm(nn.LSTMCell(n_in, n_out), "weight_ih")


def no_engine_layer(n: int = 3) -> nn.Module:
    """A torch.nn layer ``(B, n) -> ((B, n), (B, n))`` that no hook engine covers, so that its parameters go through vmap
    (a mixed engine; :class:`TinyClassifier` takes its first output): an LSTM cell with a weight-normed ``weight_ih``
    (:func:`weight_normed_cell`; a PReLU, an RNN cell, then ``nn.LSTMCell`` itself were this until they got their
    engines), its parameters drawn from a generator of its own (the same layer wherever the global stream is)."""
    layer = weight_normed_cell(n, n)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.rand(p.shape, generator=gen) - 0.5)
    return layer


def tiny(seed: int = 0, **kw: Any) -> TinyClassifier:
    torch.manual_seed(seed)
    return TinyClassifier(**kw).double()


@pytest.fixture
def log_dir(tmp_path):
    return str(tmp_path / "log")
