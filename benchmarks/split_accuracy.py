"""What a projection split costs the scores: projected inner products of real per-sample gradients against exact ones.

The benchmark CNN (``overhead_models.CNN``) is trained for ``--steps`` SGD steps (momentum 0.9) on generated
class-conditional 3x32x32 images; then, in float64, its second convolution's exact per-sample gradients (weight and
folded bias, ``64 x 289``) of ``--train`` training and ``--queries`` query samples (``vmap(grad)``). For each split
``(k_rows, k_cols)`` of ``k = 256`` and ``--seeds`` projection seeds, the projected inner products ``<P g_i, P q_j>``
are compared with the exact ``<g_i, q_j>``: the Frobenius error of the cross matrix relative to its norm, and the
Spearman correlation of each query's column (what a TracIn ranking sees), mean ± standard error over seeds. The cost
side: the column convolution takes ``k_cols`` output channels, so ``(32, 8)`` halves it, ``(8, 32)`` doubles it and
``(25, 10)`` costs what the two-stage column side below does (``docs/per-sample-gradients.md``).

Also a cheaper column side for ``(16, 16)``, measured and not adopted: ``P_c = (I_9 ⊗ Q) R`` (``Q`` ``32 x a``
``N(0, 1/a)`` shared by the kernel's nine offsets, ``R`` ``9a x 16`` ``N(0, 1/16)``: still ``E[P_c P_cᵀ] = I``), which
the engine could compute as a 1x1 convolution to ``a`` channels and a 3x3 convolution to 16 (``a = 16``: 0.61x the
column convolution's multiply-adds, ``a = 8``: 0.36x), against a plain Gaussian ``P_c`` drawn the same way (both here,
not by ``KroneckerProjector``). Then the same measures over the whole model (every tensor's exact per-sample gradient,
projected as the tracker does, biases folded) with the second convolution at the rule's split and at the cheaper
ones: what a TracIn score at one checkpoint sees. The relative error is heavy-tailed over seeds (30 seeds moved a mean
by ±0.05 between runs), hence 300 by default.

    python benchmarks/split_accuracy.py [--seeds 300] [--out benchmarks/results/split_accuracy.json]
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch.func import functional_call, grad, vmap

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.accuracy import write_results  # noqa: E402
from benchmarks.overhead_models import CNN  # noqa: E402
from lightning_influence.capture.layers import foldable_biases  # noqa: E402
from lightning_influence.capture.projection import KroneckerProjector  # noqa: E402

SPLITS = [(16, 16), (32, 8), (64, 4), (8, 32), (25, 10)]  # (25, 10): the column convolution of a = 16's cost
WHOLE_SPLITS = [None, (25, 10), (32, 8)]  # the second convolution's split in the whole model (None: the rule's)
CHANNEL_MAPS = [None, 16, 8]  # two-stage column sides of (16, 16): a (None: a plain Gaussian P_c drawn alike)
LAYER = "3"  # the second convolution of CNN().net


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--train", type=int, default=128)
    ap.add_argument("--queries", type=int, default=16)
    ap.add_argument("--seeds", type=int, default=300)
    ap.add_argument("--out", default="benchmarks/results/split_accuracy.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    net = CNN().net
    gen = torch.Generator().manual_seed(1)
    means = torch.randn(10, 3, 32, 32, generator=gen)

    def data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, 10, (n,), generator=gen)
        return means[y] * 0.5 + torch.randn(n, 3, 32, 32, generator=gen), y

    opt = torch.optim.SGD(net.parameters(), lr=0.02, momentum=0.9)
    for _ in range(args.steps):
        x, y = data(64)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    net = net.double()
    params = {k: v.detach() for k, v in net.named_parameters()}

    def loss(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(net, p, (x[None],)), y[None])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))
    weight, bias = f"{LAYER}.weight", f"{LAYER}.bias"
    grads = [per_sample(params, x.double(), y) for x, y in (data(args.train), data(args.queries))]
    blocks = [torch.cat([g[weight].flatten(2), g[bias][:, :, None]], 2) for g in grads]
    exact = torch.einsum("irc,jrc->ij", *blocks)
    shapes = {weight: tuple(params[weight].shape), bias: tuple(params[bias].shape)}

    def accuracy(label: str, project: Callable[[int, Any], torch.Tensor], inputs: list[Any],
                 truth: torch.Tensor) -> dict[str, float]:
        """Relative error and mean Spearman over seeds of the projected inner products (``project(seed, inputs[i]) ->
        (n, k)``) against ``truth``, mean ± standard error, printed on a row of the table."""
        errors, rhos = [], []
        for seed in range(args.seeds):
            train, query = (project(seed, b) for b in inputs)
            est = train @ query.T
            errors.append(float((est - truth).norm() / truth.norm()))
            rhos.append(sum(spearmanr(est[:, j], truth[:, j])[0] for j in range(args.queries)) / args.queries)
        err, rho, se = torch.tensor(errors), torch.tensor(rhos), math.sqrt(args.seeds)
        print(f"{label:>24} {err.mean():10.4f} ± {err.std() / se:.4f} {rho.mean():12.4f} ± {rho.std() / se:.4f}")
        return {"relative_error": float(err.mean()), "relative_error_se": float(err.std() / se),
                "spearman": float(rho.mean()), "spearman_se": float(rho.std() / se)}

    def by_projector(split: tuple[int, int]) -> Callable[[int, torch.Tensor], torch.Tensor]:
        def project(seed: int, b: torch.Tensor) -> torch.Tensor:
            proj = KroneckerProjector(shapes, 256, seed, {weight: bias}, {weight: split})
            return proj.project({weight: b[:, :, :-1].reshape(-1, *shapes[weight]), bias: b[:, :, -1]})
        return project

    def two_stage(a: int | None) -> Callable[[int, torch.Tensor], torch.Tensor]:
        channels, offsets = shapes[weight][1], math.prod(shapes[weight][2:])

        def project(seed: int, b: torch.Tensor) -> torch.Tensor:
            gen = torch.Generator().manual_seed(1000 + seed)
            p_r = torch.randn(b.shape[1], 16, generator=gen, dtype=b.dtype) / 4
            if a is None:
                p_c = torch.randn(b.shape[2], 16, generator=gen, dtype=b.dtype) / 4
            else:  # column c*offsets + o of the weight (channel c at kernel offset o) reads Q[c] into block o of R
                q = torch.randn(channels, a, generator=gen, dtype=b.dtype) / math.sqrt(a)
                r = torch.randn(offsets, a, 16, generator=gen, dtype=b.dtype) / 4
                p_c = torch.cat([torch.einsum("ci,oij->coj", q, r).reshape(channels * offsets, 16),
                                 torch.randn(1, 16, generator=gen, dtype=b.dtype) / 4])
            return torch.einsum("nrc,rk,cl->nkl", b, p_r, p_c).flatten(1)
        return project

    def whole_model(split: tuple[int, int] | None) -> Callable[[int, dict], torch.Tensor]:
        def project(seed: int, g: dict) -> torch.Tensor:
            return KroneckerProjector(all_shapes, 256, seed, fold, None if split is None else {weight: split}).project(g)
        return project

    print(f"{'split':>24} {'relative error':>18} {'Spearman per query':>20}")
    rows, maps, whole = [], [], []
    for split in SPLITS:
        rows.append({"split": list(split), **accuracy(str(split), by_projector(split), blocks, exact)})
    for a in CHANNEL_MAPS:
        label = "(16, 16) Gaussian, alike" if a is None else f"(16, 16) two-stage a={a}"
        maps.append({"channel_map": a, **accuracy(label, two_stage(a), blocks, exact)})
    # the whole model's inner products (every tensor, the tracker's projection) with the second convolution's split
    names = list(params)
    all_shapes = {n: tuple(params[n].shape) for n in names}
    fold = foldable_biases(net, names)
    flat = [torch.cat([g[n].reshape(g[n].shape[0], -1) for n in names], 1) for g in grads]
    print("whole model (every tensor at k = 256; the second convolution's split):")
    for split in WHOLE_SPLITS:
        label = "by the rule, (16, 16)" if split is None else str(split)
        whole.append({"split": None if split is None else list(split),
                      **accuracy(label, whole_model(split), grads, flat[0] @ flat[1].T)})
    write_results({"steps": args.steps, "train": args.train, "queries": args.queries, "seeds": args.seeds,
                   "splits": rows, "two_stage": maps, "whole_model": whole}, args.out)


if __name__ == "__main__":
    main()
