"""``capture.vjp.batched_grad``: one vectorised backward where the graph allows it, rows otherwise, and a graph whose
vectorised backward failed is not tried again (the failed attempt had cost Diff-In's self-influence on a GroupNorm CNN
about a third of its time, at every call)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_influence.capture import vjp


@pytest.fixture
def batched_calls(monkeypatch):
    """Every ``torch.autograd.grad`` call's ``is_grads_batched``, with an empty record of failed graphs (restored after)."""
    monkeypatch.setattr(vjp, "_UNBATCHED", set(), raising=False)
    grad, calls = torch.autograd.grad, []

    def counting(*args, **kw):
        calls.append(bool(kw.get("is_grads_batched")))
        return grad(*args, **kw)

    monkeypatch.setattr(torch.autograd, "grad", counting)
    return calls


def test_a_graph_without_a_batching_rule_is_tried_batched_once(batched_calls):
    """GroupNorm's double backward (a gradient's gradient, as the HVP products take it) has no batching rule in torch
    2.13: the first call tries the vectorised backward, then takes the rows; later calls on a graph of the same node
    types take the rows at once. Each row equals a plain ``torch.autograd.grad`` with that cotangent. A graph that
    batches still goes in one call."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 5, generator=gen, dtype=torch.float64)
    w = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True)
    cot = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    for _ in range(3):
        g, = torch.autograd.grad((F.group_norm(x, 2, w, b) ** 3).sum(), w, create_graph=True)
        got = vjp.batched_grad(g, [w, b], cot)
        for i, c in enumerate(cot):
            want = torch.autograd.grad(g, [w, b], grad_outputs=c, retain_graph=True)
            assert torch.equal(got[0][i], want[0]) and torch.equal(got[1][i], want[1])
    assert batched_calls.count(True) == 1  # one attempt, then rows only (the loop above adds 3 plain calls a call)
    assert batched_calls.count(False) == 3 * (1 + 3 + 3)  # create_graph grads, the rows, the references
    del batched_calls[:]
    out = torch.sin(w) * b
    got = vjp.batched_grad(out, [w], cot)
    torch.testing.assert_close(got[0], torch.cos(w.detach()) * b.detach() * cot, rtol=1e-14, atol=0)
    assert batched_calls == [True]
