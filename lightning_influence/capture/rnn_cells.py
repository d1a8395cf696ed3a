"""The layer engines of ``nn.RNNCell``, ``nn.GRUCell`` and ``nn.LSTMCell`` (``docs/per-sample-gradients.md``, the table
of layers): a custom recurrent loop calls the cell once a time step, each call a record whose blocks add up.

A cell is two Linear maps, ``a = W_ih x + b_ih`` and ``c = W_hh h + b_hh``, then its gates. With the gradients at
``a`` and ``c`` (per sample: the gates mix no samples), ``W_ih``'s per-sample gradient is a Linear's, ``δa xᵀ``, and
``W_hh``'s ``δc hᵀ``. The forward hook keeps ``a``, ``c`` (one more pair of products, by the weights of that call: the
tracker's own passes substitute them) with the projected column sides ``x P_c``, ``h P_c``; the gradient hook runs the
gates again from ``a`` and ``c`` as leaves (:func:`.recurrent.gates`, as PyTorch defines them) and takes ``δa``, ``δc``
by one batched backward of the output gradient. An LSTM cell returns ``(h', c')``: its blocks wait for the gradients of
both that reach the loss (:class:`.recurrent.MultiOutputEngine`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import Blocks, SecondInputEngine, _linear_blocks, _wide
from .recurrent import MultiOutputEngine, gates

__all__ = ["LSTMCellEngine", "RNNCellEngine"]


class RNNCellEngine(SecondInputEngine):
    """``nn.RNNCell``, ``nn.GRUCell``: Linear blocks of the gradients at the cell's two pre-activations (module doc)."""

    types = (nn.RNNCell, nn.GRUCell)
    attrs = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    second_kwarg = "hx"
    chainable = False  # save reads the weights: a parametrized one would be made again (a spectral norm's step)

    def save(self, mod, inp, targets, projector, output=None):
        hx = self.second()
        x = _wide(inp.detach())
        h = x.new_zeros(x.shape[0], mod.hidden_size) if hx is None else _wide(hx.detach())
        return (h, *_pre_activations(mod, x, h, targets, projector))

    def blocks(self, mod, saved, g_out, targets, projector) -> Blocks:
        h, a, c, cols = saved
        with torch.enable_grad():
            a, c = a.requires_grad_(), c.requires_grad_()
            d_a, d_c = torch.autograd.grad(gates(_mode(mod), a, c, h)[0], (a, c), _wide(g_out))
        return _cell_blocks(projector, targets, d_a, d_c, cols)


class LSTMCellEngine(MultiOutputEngine):
    """``nn.LSTMCell``: as :class:`RNNCellEngine`, from the gradients of ``h'`` and ``c'`` (module doc)."""

    types = (nn.LSTMCell,)
    attrs = RNNCellEngine.attrs

    def outputs(self, output):
        return tuple(output)

    def save(self, mod, inp, targets, projector, output=None):
        x, hx = _wide(inp[0].detach()), inp[1] if len(inp) > 1 else None
        h, cell = (x.new_zeros(x.shape[0], mod.hidden_size),) * 2 if hx is None else (_wide(t.detach()) for t in hx)
        return (h, cell, _made_from(*output), *_pre_activations(mod, x, h, targets, projector))

    def blocks(self, mod, saved, g_out, targets, projector) -> Blocks:
        h, cell, coupled, a, c, cols = saved
        with torch.enable_grad():
            a, c = a.requires_grad_(), c.requires_grad_()
            # coupled: c''s gradient includes what reached it through h': h' from c' apart, not counted twice
            outs = gates("LSTM", a, c, h, cell, h_apart=coupled)
            ends = [(t, _wide(g)) for t, g in zip(outs, g_out) if g is not None]
            d_a, d_c = torch.autograd.grad([t for t, _ in ends], (a, c), [g for _, g in ends])
        return _cell_blocks(projector, targets, d_a, d_c, cols)


def _made_from(h: Tensor, c: Tensor, depth: int = 4) -> bool:
    """Whether the cell's ``h'`` was computed from its ``c'`` tensor in the autograd graph (``h' = o tanh(c')``: the
    CPU's composite cell), so that the gradient arriving at ``c'`` includes ``h'``'s share; a fused cell (CUDA) makes
    both in one node, and ``c'``'s gradient is the loss's alone. Looked for within ``depth`` nodes of ``h'``."""
    target = (c.grad_fn, c.output_nr)
    nodes = [h.grad_fn]
    for _ in range(depth):
        nodes = [(n, i) for node in nodes if node is not None for n, i in node.next_functions]
        if target in nodes:
            return True
        nodes = [n for n, _ in nodes]
    return False


def _mode(mod: nn.Module) -> str:
    """The :func:`.recurrent.gates` mode of an RNN or GRU cell."""
    return "GRU" if isinstance(mod, nn.GRUCell) else "RNN_TANH" if mod.nonlinearity == "tanh" else "RNN_RELU"


def _pre_activations(mod: nn.Module, x: Tensor, h: Tensor, targets, projector) -> tuple[Tensor, Tensor, dict]:
    """A cell call's ``a = W_ih x + b_ih``, ``c = W_hh h + b_hh`` (by the weights of the call) and the projected column
    sides ``x P_c``, ``h P_c`` of its tracked weights."""
    a = F.linear(x, _wide(mod.weight_ih.detach()), None if mod.bias_ih is None else _wide(mod.bias_ih.detach()))
    c = F.linear(h, _wide(mod.weight_hh.detach()), None if mod.bias_hh is None else _wide(mod.bias_hh.detach()))
    cols = {side: projector.project_cols(targets[f"weight_{side}"], t) if f"weight_{side}" in targets else None
            for side, t in (("ih", x), ("hh", h))}
    return a, c, cols


def _cell_blocks(projector, targets, d_a: Tensor, d_c: Tensor, cols: dict) -> Blocks:
    """The Linear blocks of a cell's two sides from the gradients at its pre-activations."""
    out: Blocks = {}
    for side, d in (("ih", d_a), ("hh", d_c)):
        out.update(_linear_blocks(projector, targets.get(f"weight_{side}"), targets.get(f"bias_{side}"), d, cols[side]))
    return out
