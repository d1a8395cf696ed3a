"""The three models of the overhead benchmark (issue 13): an MLP, a CNN with GroupNorm, a small GPT.

Each is a LightningModule whose ``training_step`` returns the mean of ``per_sample_loss`` (so the
tracker reads losses and gradients from the step itself), trained by SGD with momentum on
synthetic data of fixed shape. ``make(name)`` returns ``(module factory, dataset, batch size)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from lightning_influence import WithIds

__all__ = ["MODELS", "DEFAULT", "make", "MLP", "CNN", "GPT", "GPTParam", "Decoder", "WeightNormMLP"]


class _Classifier(pl.LightningModule):
    def per_sample_loss(self, batch: Any) -> torch.Tensor:
        return F.cross_entropy(self.net(batch[0]), batch[1], reduction="none")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.per_sample_loss(batch).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


class MLP(_Classifier):
    """784-512-512-10, ReLU."""

    def __init__(self, d_in: int = 784, hidden: int = 512) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 10))


class CNN(_Classifier):
    """3x32x32: Conv2d 3->32, pool, Conv2d 32->64, GroupNorm(8), pool, Linear 4096->10."""

    def __init__(self, size: int = 32, c1: int = 32, c2: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.GroupNorm(8, c2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(c2 * (size // 4) ** 2, 10))


class WeightNormMLP(MLP):
    """The MLP with every Linear's weight under ``torch.nn.utils.parametrizations.weight_norm`` (its originals
    tracked: ``capture/parametrized.py``)."""

    def __init__(self, d_in: int = 784, hidden: int = 512) -> None:
        super().__init__(d_in, hidden)
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                nn.utils.parametrizations.weight_norm(layer)


class Block(nn.Module):
    """Pre-norm transformer block: causal attention through nn.Linear projections, GELU MLP."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(a)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class GPT(pl.LightningModule):
    """2 layers, d=128, 4 heads, sequence 64, vocabulary 512; per-sample loss = mean token loss."""

    def __init__(self, vocab: int = 512, d: int = 128, layers: int = 2, seq: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)  # per sample: hooks see the batch
        return self.tok(x) + self.pos(positions)

    def per_sample_loss(self, batch: Any) -> torch.Tensor:
        tokens = batch[0]
        x, y = tokens[:, :-1], tokens[:, 1:]
        h = self.blocks(self.embed(x))
        logits = self.head(self.ln_f(h))
        return F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.per_sample_loss(batch).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


class GPTParam(GPT):
    """The GPT with its position table a raw ``nn.Parameter`` added to the token embeddings (GPT-2's ``wpe`` as a
    ViT's ``pos_embed``): the raw-parameter engine's case (``capture/raw_params.py``)."""

    def __init__(self, vocab: int = 512, d: int = 128, layers: int = 2, seq: int = 64, heads: int = 4) -> None:
        super().__init__(vocab, d, layers, seq, heads)
        del self.pos
        self.pos_p = nn.Parameter(torch.zeros(seq, d))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.tok(x) + self.pos_p[:x.shape[1]]


class Decoder(_Classifier):
    """A DCGAN-style decoder, latent 64 -> 1x28x28: Linear 64->64·7·7, PReLU(64), ConvTranspose2d 64->32 (4, stride 2,
    padding 1), PReLU, ConvTranspose2d 32->1; per-sample loss = mean squared error to a target image (the transposed
    convolution and PReLU engines: ``capture/conv_transpose.py``, ``capture/prelu.py``)."""

    def __init__(self, latent: int = 64, c1: int = 64, c2: int = 32, size: int = 7) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(latent, c1 * size * size), nn.Unflatten(1, (c1, size, size)), nn.PReLU(c1),
            nn.ConvTranspose2d(c1, c2, 4, stride=2, padding=1), nn.PReLU(), nn.ConvTranspose2d(c2, 1, 4, stride=2, padding=1))

    def per_sample_loss(self, batch: Any) -> torch.Tensor:
        return (self.net(batch[0]) - batch[1]).square().flatten(1).mean(1)


def _images(latent: int, side: int, n: int) -> Dataset:
    g = torch.Generator().manual_seed(0)
    return WithIds(TensorDataset(torch.randn(n, latent, generator=g), torch.rand(n, 1, side, side, generator=g)))


def _classification(shape: tuple[int, ...], classes: int, n: int) -> Dataset:
    g = torch.Generator().manual_seed(0)
    return WithIds(TensorDataset(torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)))


def _tokens(vocab: int, seq: int, n: int) -> Dataset:
    g = torch.Generator().manual_seed(0)
    return WithIds(TensorDataset(torch.randint(0, vocab, (n, seq + 1), generator=g)))


MODELS: dict[str, tuple[Callable[[], pl.LightningModule], Callable[[int], Dataset], int]] = {
    "mlp": (MLP, lambda n: _classification((784,), 10, n), 128),
    "cnn": (CNN, lambda n: _classification((3, 32, 32), 10, n), 64),
    "gpt": (GPT, lambda n: _tokens(512, 64, n), 64),
    "gpt-param": (GPTParam, lambda n: _tokens(512, 64, n), 64),
    "decoder": (Decoder, lambda n: _images(64, 28, n), 64),
    "mlp-wn": (WeightNormMLP, lambda n: _classification((784,), 10, n), 128),
}
DEFAULT = ("mlp", "cnn", "gpt")  # the benchmarks' default models (gpt-param, decoder, mlp-wn: on request)
SMALL: dict[str, tuple[Callable[[], pl.LightningModule], Callable[[int], Dataset], int]] = {  # same layers, for tests
    "mlp": (lambda: MLP(20, 16), lambda n: _classification((20,), 10, n), 8),
    "cnn": (lambda: CNN(8, 8, 16), lambda n: _classification((3, 8, 8), 10, n), 4),
    "gpt": (lambda: GPT(vocab=32, d=16, seq=8, heads=2), lambda n: _tokens(32, 8, n), 4),
    "gpt-param": (lambda: GPTParam(vocab=32, d=16, seq=8, heads=2), lambda n: _tokens(32, 8, n), 4),
    "decoder": (lambda: Decoder(8, 6, 4, 2), lambda n: _images(8, 8, n), 4),
    "mlp-wn": (lambda: WeightNormMLP(20, 16), lambda n: _classification((20,), 10, n), 8),
}


def make(name: str, batches: int = 8, small: bool = False) -> tuple[Callable[[], pl.LightningModule], Dataset, int]:
    """``(module factory, dataset of `batches` batches, batch size)`` of model ``name`` (``small``: test sizes)."""
    factory, data, batch = (SMALL if small else MODELS)[name]
    return factory, data(batch * batches), batch
