"""The ninth session's hook engines on a device (ConvTranspose, PReLU, InstanceNorm, EmbeddingBag, parametrized and
hook-normed layers, layer subclasses): each test model's hooked rows against per-sample autograd on that device in
float64, then per-sample gradient throughput, hooks against vmap, of the benchmark's ``decoder`` and ``mlp-wn``
(float32, k = 256 a tensor).

    PYTHONPATH=.:tests python benchmarks/engines_device.py --device cuda     # well under a minute on one GPU
    PYTHONPATH=.:tests python benchmarks/engines_device.py --device cpu      # dry run

One PASS/FAIL line a model (the largest difference relative to the rows' largest value, 1e-10 allowed), one
throughput line a benchmark model; the exit status is 1 if any model failed.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch.utils.data import DataLoader

import test_embedding_bag as bags
import test_layer_subclasses as subclasses
import test_layers_decoder as decoder
import test_parametrized as parametrized
from benchmarks.overhead_models import make
from lightning_influence.capture import (HookGradientCapture, KroneckerProjector, per_sample_grads, per_sample_grads_hooks,
                                         per_sample_grads_vmap, select_params)
from lightning_influence.capture.layers import foldable_biases
from test_per_sample import brute_force, projector_for


def _cases() -> dict[str, tuple]:
    """name -> (model, batch, loss_fn), float64 on the CPU."""
    out = {}
    for name, (cls, shape) in decoder.CASES.items():
        model, batch, _ = decoder._case(cls, shape)
        out[f"decoder-{name}"] = model, batch, decoder.loss_fn
    for kind in parametrized.SQUARE:
        model, batch, _ = parametrized._case(kind)
        out[f"parametrized-{kind}"] = model.eval(), batch, parametrized.loss_fn  # eval: no power iteration per sample
    hooked = parametrized._hook_normed().eval()
    gen = torch.Generator().manual_seed(1)
    out["hook-normed"] = hooked, (torch.randn(4, 4, 4, generator=gen, dtype=torch.float64),
                                  torch.randint(0, 3, (4,), generator=gen)), parametrized.loss_fn
    for case, args in bags.CASES.items():
        torch.manual_seed(0)
        out[f"bags-{case}"] = bags.Bags(*args).double(), bags._batch(), bags.loss_fn
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    out["subclasses"] = subclasses.Net().double(), (torch.randn(4, 2, 4, 4, generator=gen, dtype=torch.float64),
                                                    torch.randint(0, 3, (4,), generator=gen)), subclasses.loss_fn
    torch.manual_seed(0)
    out["instance-norm"] = decoder.Styled().double().eval(), (torch.randn(4, 3, 4, 4, generator=gen, dtype=torch.float64),
                                                             torch.randint(0, 3, (4,), generator=gen)), decoder.loss_fn
    return out


def check(device: str) -> bool:
    ok = True
    for name, (model, batch, loss_fn) in _cases().items():
        model = model.to(device)
        batch = tuple(t.to(device) for t in batch)
        names = select_params(model)
        rest = HookGradientCapture.unsupported(model, names)
        proj = projector_for(model, names, 8)
        capture = HookGradientCapture(model, [n for n in names if n not in rest], proj)
        grads, _ = per_sample_grads(model, loss_fn, batch, names, proj, capture)
        expected = proj.project(brute_force(model, loss_fn, batch, names))
        err = float((grads - expected).abs().max() / expected.abs().max())
        ok &= err <= 1e-10
        print(f"{'PASS' if err <= 1e-10 else 'FAIL'} {name}: relative difference {err:.1e} (vmap for {rest or 'none'})")
    return ok


def throughput(device: str, reps: int = 5) -> None:
    for model_name in ("decoder", "mlp-wn"):
        factory, ds, batch_size = make(model_name, 1)
        torch.manual_seed(0)
        module = factory().to(device)
        batch = [t.to(device) for t in next(iter(DataLoader(ds, batch_size=batch_size)))[:-1]]
        names = select_params(module)
        proj = KroneckerProjector({n: p.shape for n, p in module.named_parameters() if n in names}, 256,
                                  fold=foldable_biases(module, names))
        capture = HookGradientCapture(module, names, proj)
        loss_fn = type(module).per_sample_loss
        runs = {"hooks": lambda: per_sample_grads_hooks(module, loss_fn, batch, capture),
                "vmap": lambda: per_sample_grads_vmap(module, loss_fn, batch, names, proj)}
        best = {}
        for _ in range(reps):  # alternating
            for key, fn in runs.items():
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                best[key] = min(best.get(key, float("inf")), time.perf_counter() - t0)
        print(f"{model_name} (batch {batch_size}): hooks {batch_size / best['hooks']:.0f} samples/s, vmap "
              f"{batch_size / best['vmap']:.0f} samples/s ({best['vmap'] / best['hooks']:.1f}x)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    ok = check(args.device)
    throughput(args.device, args.reps)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
