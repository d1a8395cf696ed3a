"""Per-sample gradient throughput of the tenth session's hook engines against ``vmap`` (the engine their layers went to
before; where ``vmap`` has no batching rule, its fallback of a backward pass per sample): float32, k = 256 a tensor,
one own hooked pass (``per_sample_grads_hooks``) against ``per_sample_grads_vmap``, best of ``--reps`` alternating.

    OMP_NUM_THREADS=1 python benchmarks/engines_vs_vmap.py [--models lstm gru-2-bi ...] [--device cuda]

One line a model: samples/s of each and the ratio.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning_influence.capture import (HookGradientCapture, KroneckerProjector, per_sample_grads_hooks,  # noqa: E402
                                         per_sample_grads_vmap, select_params)

BATCH, STEPS, FEATURES, HIDDEN, CLASSES = 64, 20, 32, 128, 10


class Recurrent(nn.Module):
    """A recurrent module over ``(B, 20, 32)`` (hidden 128), a Linear head on the last step's output."""

    def __init__(self, kind: str, layers: int, bidirectional: bool) -> None:
        super().__init__()
        self.rnn = getattr(nn, kind)(FEATURES, HIDDEN, num_layers=layers, bidirectional=bidirectional, batch_first=True)
        self.head = nn.Linear(HIDDEN * (2 if bidirectional else 1), CLASSES)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def _loss(model: nn.Module, batch) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def _sequences(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(BATCH, STEPS, FEATURES, generator=gen), torch.randint(0, CLASSES, (BATCH,), generator=gen)


class CellLoop(nn.Module):
    """An ``nn.LSTMCell(32, 128)`` over the 20 steps of ``(B, 20, 32)``, a Linear head on the last ``h``."""

    def __init__(self) -> None:
        super().__init__()
        self.cell, self.head = nn.LSTMCell(FEATURES, HIDDEN), nn.Linear(HIDDEN, CLASSES)

    def forward(self, x):
        state = None
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
        return self.head(state[0])


class MaxBag(nn.Module):
    """``nn.EmbeddingBag(5000, 128, mode="max")`` over 32 ids a sample, a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.bag, self.head = nn.EmbeddingBag(5000, HIDDEN, mode="max"), nn.Linear(HIDDEN, CLASSES)

    def forward(self, ids):
        return self.head(torch.tanh(self.bag(ids)))


class NormedPair(nn.Module):
    """A spectral-normed ``nn.EmbeddingBag(500, 128)`` (mean) and a weight-normed ``nn.Bilinear(32, 128, 64)`` of the
    ids' scaled values and the bag, a Linear head (``parametrizations``: the parametrized engine's generic chain on
    their engines)."""

    def __init__(self) -> None:
        super().__init__()
        from torch.nn.utils.parametrizations import spectral_norm, weight_norm

        self.bag = spectral_norm(nn.EmbeddingBag(500, HIDDEN, mode="mean"))
        self.bil = weight_norm(nn.Bilinear(32, HIDDEN, 64))
        self.head = nn.Linear(64, CLASSES)

    def forward(self, ids):
        return self.head(torch.tanh(self.bil(ids.float() / 5000, self.bag(ids % 500))))


def _ids(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randint(0, 5000, (BATCH, 32), generator=gen), torch.randint(0, CLASSES, (BATCH,), generator=gen)


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[torch.Generator], tuple]]] = {
    "lstm": (lambda: Recurrent("LSTM", 1, False), _sequences),
    "gru-2-bi": (lambda: Recurrent("GRU", 2, True), _sequences),
    "lstm-cell": (CellLoop, _sequences),
    "bag-max": (MaxBag, _ids),
    "normed-bag-bilinear": (NormedPair, _ids),
}


def measure(name: str, device: str, reps: int) -> str:
    factory, data = MODELS[name]
    torch.manual_seed(0)
    model = factory().to(device).eval()  # (a spectral norm's power iteration: the same weight in both runs)
    batch = tuple(t.to(device) for t in data(torch.Generator().manual_seed(1)))
    names = select_params(model)
    assert HookGradientCapture.unsupported(model, names) == [], name
    proj = KroneckerProjector({n: p.shape for n, p in model.named_parameters()}, 256)
    capture = HookGradientCapture(model, names, proj)
    runs = {"hooks": lambda: per_sample_grads_hooks(model, _loss, batch, capture)[0],
            "vmap": lambda: per_sample_grads_vmap(model, _loss, batch, names, proj)}
    best: dict[str, float] = {}
    rows = {}
    for _ in range(reps):
        for key, fn in runs.items():
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            rows[key] = fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            best[key] = min(best.get(key, float("inf")), time.perf_counter() - t0)
    err = float((rows["hooks"] - rows["vmap"]).abs().max() / rows["vmap"].abs().max())
    return (f"{name} (batch {BATCH}): hooks {BATCH / best['hooks']:.0f} samples/s, vmap {BATCH / best['vmap']:.0f} "
            f"samples/s ({best['vmap'] / best['hooks']:.1f}x; rows differ by {err:.1e} of their largest)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    warnings.simplefilter("ignore")  # vmap's fallback warns once a model
    for name in args.models:
        print(measure(name, args.device, args.reps), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
