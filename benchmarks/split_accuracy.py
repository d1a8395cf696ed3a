"""What a projection split costs the scores: projected inner products of real per-sample gradients against exact ones.

The benchmark CNN (``overhead_models.CNN``) is trained for ``--steps`` SGD steps (momentum 0.9) on generated
class-conditional 3x32x32 images; then, in float64, its second convolution's exact per-sample gradients (weight and
folded bias, ``64 x 289``) of ``--train`` training and ``--queries`` query samples (``vmap(grad)``). For each split
``(k_rows, k_cols)`` of ``k = 256`` and ``--seeds`` projection seeds, the projected inner products ``<P g_i, P q_j>``
are compared with the exact ``<g_i, q_j>``: the Frobenius error of the cross matrix relative to its norm, and the
Spearman correlation of each query's column (what a TracIn ranking sees), mean ± standard error over seeds. The cost
side: the column convolution takes ``k_cols`` output channels, so ``(32, 8)`` halves it and ``(8, 32)`` doubles it
(``docs/per-sample-gradients.md``).

    python benchmarks/split_accuracy.py [--seeds 30] [--out benchmarks/results/split_accuracy.json]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch.func import functional_call, grad, vmap

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.accuracy import write_results  # noqa: E402
from benchmarks.overhead_models import CNN  # noqa: E402
from lightning_influence.capture.projection import KroneckerProjector  # noqa: E402

SPLITS = [(16, 16), (32, 8), (64, 4), (8, 32)]
LAYER = "3"  # the second convolution of CNN().net


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--train", type=int, default=128)
    ap.add_argument("--queries", type=int, default=16)
    ap.add_argument("--seeds", type=int, default=30)
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
    rows = []
    print(f"{'split':>9} {'relative error':>18} {'Spearman per query':>20}")
    for split in SPLITS:
        errors, rhos = [], []
        for seed in range(args.seeds):
            proj = KroneckerProjector(shapes, 256, seed, {weight: bias}, {weight: split})
            train, query = (proj.project({weight: g[weight], bias: g[bias]}) for g in grads)
            est = train @ query.T
            errors.append(float((est - exact).norm() / exact.norm()))
            rhos.append(sum(spearmanr(est[:, j], exact[:, j])[0] for j in range(args.queries)) / args.queries)
        err, rho = torch.tensor(errors), torch.tensor(rhos)
        se = math.sqrt(args.seeds)
        print(f"{str(split):>9} {err.mean():10.4f} ± {err.std() / se:.4f} {rho.mean():12.4f} ± {rho.std() / se:.4f}")
        rows.append({"split": list(split), "relative_error": float(err.mean()), "relative_error_se": float(err.std() / se),
                     "spearman": float(rho.mean()), "spearman_se": float(rho.std() / se)})
    write_results({"steps": args.steps, "train": args.train, "queries": args.queries, "seeds": args.seeds,
                   "splits": rows}, args.out)


if __name__ == "__main__":
    main()
