"""``nn.Bilinear`` on hooks (``capture/bilinear.py``): on ``(B, d)`` and on tokens ``(B, T, d)``, the second input as a
keyword, with and without a bias, against projected float64 brute force (columns projected and kept whole)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn


from test_per_sample import B, assert_hooks_match_brute_force


class Pairs(nn.Module):
    def __init__(self):
        super().__init__()
        self.flat = nn.Bilinear(4, 3, 5)
        self.tokens = nn.Bilinear(5, 4, 3, bias=False)

    def forward(self, x):  # x (B, T, 4)
        h = torch.tanh(self.flat(x[:, 0], input2=x[:, 1, :3]))  # (B, 5)
        return self.tokens(h[:, None].expand(-1, x.shape[1], -1), torch.tanh(x)).mean(1)


def loss_fn(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


@pytest.mark.parametrize("dim", [None, 8, 1000])
def test_bilinear_matches_brute_force(dim):
    torch.manual_seed(0)
    model = Pairs().double()
    gen = torch.Generator().manual_seed(1)
    batch = torch.randn(B, 3, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (B,), generator=gen)
    assert_hooks_match_brute_force(model, loss_fn, batch, dim)
