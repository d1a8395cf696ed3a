"""The layer engine of ``nn.RNNCell`` and ``nn.GRUCell`` (``docs/per-sample-gradients.md``, the table of layers): a
custom recurrent loop calls the cell once a time step, each call a record whose blocks add up.

A cell is two Linear maps, ``a = W_ih x + b_ih`` and ``c = W_hh h + b_hh``, then its gates. With the gradients at
``a`` and ``c`` (per sample: the gates mix no samples), ``W_ih``'s per-sample gradient is a Linear's, ``δa xᵀ``, and
``W_hh``'s ``δc hᵀ``. The forward hook keeps ``a``, ``c`` (one more pair of products, by the weights of that call: the
tracker's own passes substitute them) with the projected column sides ``x P_c``, ``h P_c``; the gradient hook runs the
gates again from ``a`` and ``c`` as leaves and takes ``δa``, ``δc`` by one batched backward of the output gradient.
Gates as PyTorch defines them: ``act(a + c)`` (``tanh`` or ``relu``); GRU ``r, z = σ(a_r + c_r), σ(a_z + c_z)``,
``n = tanh(a_n + r c_n)``, ``h' = (1 − z) n + z h``. (``nn.LSTMCell`` returns two tensors: vmap.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import Blocks, SecondInputEngine, _linear_blocks, _wide

__all__ = ["RNNCellEngine"]


class RNNCellEngine(SecondInputEngine):
    """``nn.RNNCell``, ``nn.GRUCell``: Linear blocks of the gradients at the cell's two pre-activations (module doc)."""

    types = (nn.RNNCell, nn.GRUCell)
    attrs = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    second_kwarg = "hx"

    def save(self, mod, inp, targets, projector, output=None):
        hx = self.second()
        x = _wide(inp.detach())
        h = x.new_zeros(x.shape[0], mod.hidden_size) if hx is None else _wide(hx.detach())
        a = F.linear(x, _wide(mod.weight_ih.detach()), None if mod.bias_ih is None else _wide(mod.bias_ih.detach()))
        c = F.linear(h, _wide(mod.weight_hh.detach()), None if mod.bias_hh is None else _wide(mod.bias_hh.detach()))
        cols = {side: projector.project_cols(targets[f"weight_{side}"], t) if f"weight_{side}" in targets else None
                for side, t in (("ih", x), ("hh", h))}
        return a, c, h, cols

    def blocks(self, mod, saved, g_out, targets, projector) -> Blocks:
        a, c, h, cols = saved
        with torch.enable_grad():
            a, c = a.requires_grad_(), c.requires_grad_()
            d_a, d_c = torch.autograd.grad(_gates(mod, a, c, h), (a, c), _wide(g_out))
        out: Blocks = {}
        for side, d in (("ih", d_a), ("hh", d_c)):
            out.update(_linear_blocks(projector, targets.get(f"weight_{side}"), targets.get(f"bias_{side}"), d,
                                      cols[side]))
        return out


def _gates(mod: nn.Module, a: Tensor, c: Tensor, h: Tensor) -> Tensor:
    """The cell's output from its pre-activations ``a = W_ih x + b_ih``, ``c = W_hh h + b_hh`` and the hidden state."""
    if isinstance(mod, nn.RNNCell):
        return torch.tanh(a + c) if mod.nonlinearity == "tanh" else torch.relu(a + c)
    a_r, a_z, a_n = a.chunk(3, 1)
    c_r, c_z, c_n = c.chunk(3, 1)
    r, z = torch.sigmoid(a_r + c_r), torch.sigmoid(a_z + c_z)
    n = torch.tanh(a_n + r * c_n)
    return (1 - z) * n + z * h
