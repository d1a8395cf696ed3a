"""Defects found using the package at scale (long fits, many segments, wide models), each reproduced small."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lightning_influence.step.micro import MicroBatch, Step


def test_per_sample_curvature_costs_a_few_backward_passes_per_sample():
    """Diff-In's exact per-sample ``H_i v`` (published form, batch rows) batched its second backward over the rows of
    a first backward already batched over the samples: ``B²·p`` work and memory (B = 32, a 512-wide MLP: 4.5-13 s a
    step instead of 0.13-0.18 s, and out of memory at wider layers). It now costs a few backward passes of the
    batch per sample (counted in FLOPs: at most ``4·B`` forward+backward passes), and equals double backward per
    sample."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    B = 16
    module = nn.Sequential(nn.Linear(20, 128), nn.Tanh(), nn.Linear(128, 5)).double()
    x, y = torch.randn(B, 20, dtype=torch.float64), torch.randint(0, 5, (B,))

    def loss_fn(m, batch):
        return F.cross_entropy(m(batch[0]), batch[1], reduction="none")

    params = {n: p.detach() for n, p in module.named_parameters()}
    v = {n: torch.randn_like(p) for n, p in params.items()}
    step = Step(0, [MicroBatch(np.arange(B), (x, y))])
    with FlopCounterMode(display=False) as once:
        loss_fn(module, (x, y)).sum().backward()
    with FlopCounterMode(display=False) as counted:
        hv = step.per_sample_curvature(module, loss_fn, params, v, list(params))
    assert counted.get_total_flops() <= 4 * B * once.get_total_flops()

    leaves = [p.clone().requires_grad_(True) for p in params.values()]
    losses = F.cross_entropy(torch.func.functional_call(module, dict(zip(params, leaves)), (x,)), y, reduction="none")
    for i in range(B):
        g = torch.autograd.grad(losses[i], leaves, create_graph=True)
        expected = torch.autograd.grad(sum((gi * v[n]).sum() for gi, n in zip(g, params)), leaves, retain_graph=True)
        for n, e in zip(params, expected):
            torch.testing.assert_close(hv[n][i], e, rtol=1e-12, atol=1e-14)
