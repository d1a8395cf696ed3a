"""The layer engine of the recurrent modules ``nn.RNN``, ``nn.GRU`` and ``nn.LSTM`` (``docs/per-sample-gradients.md``,
the table of layers): any number of layers, bidirectional, ``batch_first`` or not, padded or packed sequences.

Each layer and direction is a cell run over the time steps: ``a_t = W_ih x_t + b_ih``, ``c_t = W_hh h_{t−1} + b_hh``,
then the gates (:func:`gates`). With the gradients ``δa_t``, ``δc_t`` at the two pre-activations (per sample: the gates
mix no samples), ``W_ih``'s per-sample gradient is ``Σ_t δa_t x_tᵀ`` and ``W_hh``'s ``Σ_t δc_t h_{t−1}ᵀ``: a Linear's
on the time steps as tokens, so each side is projected before the sum over time (``_linear_blocks``). The module runs
PyTorch's fused kernel, whose intermediates are out of reach; so the forward hook keeps the call's input, initial state
and weights (references: the tracker's own passes substitute the weights), and once the gradients of every output that
reaches the loss (the output sequence, ``h_n``, ``c_n``: one multi-gradient hook) have arrived, the gradient hook runs
the layers again by these formulas from the kept tensors (in float32 or wider) and takes every ``δa``, ``δc`` by one
backward of those gradients. A packed sequence is run padded, a sample's steps past its length masked (its state kept:
the packed kernel's ``h_n`` is the state at the sample's last step). An LSTM's projection (``proj_size``: ``h_t = W_hr
r_t``, ``r_t = o_t tanh(c_t)``) is one more Linear a step, ``W_hr``'s gradient ``Σ_t δh_t r_tᵀ``. Dropout between layers
(random masks the kernel does not give back) goes to ``vmap``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.graph import register_multi_grad_hook
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from .layers import Blocks, LayerEngine, _edge, _linear_blocks, _own_precision, _wide

__all__ = ["MultiOutputEngine", "RecurrentEngine", "gates"]


def gates(mode: str, a: Tensor, c: Tensor, h: Tensor, cell: Tensor | None = None,
          h_apart: bool = False) -> tuple[Tensor, Tensor | None]:
    """One step of a recurrent cell from its pre-activations ``a = W_ih x + b_ih``, ``c = W_hh h + b_hh``: ``(h', c')``
    (``c'`` an LSTM's cell state, else ``None``), as PyTorch defines them (``mode``: ``RNN_TANH``, ``RNN_RELU``, ``GRU``,
    ``LSTM``; ``cell``: an LSTM's cell state). ``h_apart``: an LSTM's ``h'`` made from ``c'`` detached, for a gradient
    at ``c'`` that already holds ``h'``'s share (the CPU's composite LSTM cell, :mod:`.rnn_cells`)."""
    if mode == "RNN_TANH":
        return torch.tanh(a + c), None
    if mode == "RNN_RELU":
        return torch.relu(a + c), None
    if mode == "GRU":
        a_r, a_z, a_n = a.chunk(3, -1)
        c_r, c_z, c_n = c.chunk(3, -1)
        r, z = torch.sigmoid(a_r + c_r), torch.sigmoid(a_z + c_z)
        n = torch.tanh(a_n + r * c_n)
        return (1 - z) * n + z * h, None
    i, f, g, o = (a + c).chunk(4, -1)
    cell = torch.sigmoid(f) * cell + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(cell.detach() if h_apart else cell), cell


class MultiOutputEngine(LayerEngine):
    """An engine of a layer that returns several tensors (a recurrent module's output and final states, an LSTM cell's
    ``(h, c)``): one record per call, whose blocks are made once the gradients of all its outputs that reach the loss
    have arrived (``register_multi_grad_hook``; ``None`` for the others). ``save`` gets the call's positional
    arguments (keywords in the layer's order) and output, ``blocks`` the gradients in :meth:`outputs`' order."""

    inputs: tuple[str, ...] = ("input", "hx")  # the layer's arguments, in order
    chainable = False  # hooks of its own; save reads the weights

    def outputs(self, output: Any) -> tuple[Tensor | None, ...]:
        """The output tensors of a call, in a fixed order."""
        raise NotImplementedError

    def attach(self, mod, records, active, targets, projector, memo=None):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if not active():
                return
            outs = self.outputs(output)
            live = [i for i, t in enumerate(outs) if t is not None and t.requires_grad]
            if not live:
                return
            call = (*args, *(kwargs.get(k) for k in self.inputs[len(args):]))
            first = call[0].data if isinstance(call[0], PackedSequence) else call[0]
            with _own_precision(first):
                saved = self.save(module, call, targets, projector, output)
            record = [saved, None, tuple(_edge(outs[i]) for i in live)]
            records.append(record)

            def on_grads(grads: tuple[Tensor | None, ...]) -> None:
                full: list[Tensor | None] = [None] * len(outs)
                for i, g in zip(live, grads):
                    full[i] = g
                record[1] = self.blocks(module, record[0], tuple(full), targets, projector)
                record[0] = record[2] = None

            register_multi_grad_hook([outs[i] for i in live], on_grads, mode="all")

        return [mod.register_forward_hook(hook, with_kwargs=True)]


class _Call(NamedTuple):
    """What a recurrent module's forward hook keeps: the input ``(B, T, in)`` (padded), each sample's length (packed;
    else ``None``), the initial states ``(layers·directions, B, H)`` (``None``: zeros) and the weights by name."""

    x: Tensor
    lengths: Tensor | None
    h0: Tensor | None
    c0: Tensor | None
    weights: dict[str, Tensor]
    packed: tuple[Tensor, Tensor | None, Tensor | None] | None  # the output's batch sizes and orders (packed)


class RecurrentEngine(MultiOutputEngine):
    """``nn.RNN``, ``nn.GRU``, ``nn.LSTM``: Linear blocks over time of the gradients at each layer's and direction's
    two pre-activations, recomputed from the call's input (module doc)."""

    types = (nn.RNN, nn.GRU, nn.LSTM)

    def supports(self, mod, attr):
        return attr in mod._flat_weights_names and (mod.dropout == 0 or mod.num_layers == 1)

    def outputs(self, output):
        out, state = output
        seq = out.data if isinstance(out, PackedSequence) else out
        return (seq, *state) if isinstance(state, tuple) else (seq, state)

    def save(self, mod, inp, targets, projector, output=None):
        x, hx = inp[0], inp[1] if len(inp) > 1 else None
        lengths = None
        if isinstance(x, PackedSequence):
            x, lengths = pad_packed_sequence(x, batch_first=True)
        elif x.dim() != 3:
            raise ValueError(f"{type(mod).__name__} hook capture needs batched inputs (B, T, in) or (T, B, in), got "
                             f"shape {tuple(x.shape)}; exclude its parameters (exclude_params) to leave them to vmap")
        elif not mod.batch_first:
            x = x.transpose(0, 1)
        h0, c0 = hx if isinstance(hx, tuple) else (hx, None)
        weights = {n: getattr(mod, n).detach() for n in mod._flat_weights_names}
        out = output[0]
        packed = (out.batch_sizes, out.sorted_indices, out.unsorted_indices) if lengths is not None else None
        return _Call(_wide(x.detach()), lengths, None if h0 is None else h0.detach(), None if c0 is None else c0.detach(),
                     weights, packed)

    def blocks(self, mod, saved, g_out, targets, projector) -> Blocks:
        g_seq, g_h, g_c = (*g_out, None)[:3]
        if g_seq is not None and saved.packed is not None:  # the packed data's gradient, padded as the input
            g_seq = pad_packed_sequence(PackedSequence(g_seq, *saved.packed), batch_first=True,
                                        total_length=saved.x.shape[1])[0]
        elif g_seq is not None and not mod.batch_first:
            g_seq = g_seq.transpose(0, 1)
        with torch.enable_grad():
            run = _replay(mod, saved)
            ends = [(run.output, g_seq), (run.h_n, g_h), (run.c_n, g_c)]
            ends = [(t, _wide(g)) for t, g in ends if g is not None and t is not None]
            leaves = [t for layer in run.layers for t in (layer.a, *layer.c, *layer.p)]
            found = torch.autograd.grad([t for t, _ in ends], leaves, [g for _, g in ends], allow_unused=True)
        out: Blocks = {}
        it = iter(found)
        for layer in run.layers:
            d_a = _zero_if_none(next(it), layer.a)
            d_c = torch.stack([_zero_if_none(next(it), c) for c in layer.c], 1)
            sides = [("ih", d_a, layer.x), ("hh", d_c, layer.h_prev)]
            if layer.p:  # an LSTM's projection h = W_hr r: a Linear on r
                sides.append(("hr", torch.stack([_zero_if_none(next(it), p) for p in layer.p], 1), layer.r))
            for side, d, inp in sides:
                weight, bias = targets.get(f"weight_{side}{layer.suffix}"), targets.get(f"bias_{side}{layer.suffix}")
                cols = projector.project_cols(weight, inp) if weight is not None else None
                out.update(_linear_blocks(projector, weight, bias, d, cols))
        return out


def _node(t: Tensor) -> Tensor:
    """``t`` in the replay's graph: a leaf that requires its gradient where nothing before it does (the first layer's
    ``a``; ``c`` at a zero initial state)."""
    return t if t.requires_grad else t.requires_grad_()


def _zero_if_none(g: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if g is None else g


class _Layer(NamedTuple):
    """One layer and direction of a replay: its input ``(B, T, in)``, its pre-activations ``a`` ``(B, T, G)`` and
    ``c_t`` (one ``(B, G)`` a step, in the order run), the states ``h_{t−1}`` they were made from ``(B, T, H)`` (same
    order), its weights' suffix (``_l0``, ``_l1_reverse``, ...), and with ``proj_size`` the projected states
    ``h_t = W_hr r_t`` (one a step, same order; else none) and the ``r_t = o_t tanh(c_t)`` ``(B, T, hidden)``."""

    x: Tensor
    a: Tensor
    c: list[Tensor]
    h_prev: Tensor
    suffix: str
    p: list[Tensor]
    r: Tensor | None


class _Run(NamedTuple):
    output: Tensor  # (B, T, directions·H)
    h_n: Tensor  # (layers·directions, B, H)
    c_n: Tensor | None
    layers: list[_Layer]


def _replay(mod: nn.RNNBase, call: _Call) -> _Run:
    """The module's forward again, by :func:`gates`, from the kept call, in the input's (float32 or wider) dtype; a
    packed call's steps past a sample's length leave its state as it was."""
    x, dtype = call.x, call.x.dtype
    batch, steps = x.shape[0], x.shape[1]
    dirs = 2 if mod.bidirectional else 1
    masks = None if call.lengths is None else (call.lengths.to(x.device)[None, :] > torch.arange(steps)[:, None].to(
        x.device)).unsqueeze(-1)  # (T, B, 1)
    zeros = x.new_zeros(batch, mod.hidden_size)
    proj = getattr(mod, "proj_size", 0)
    h_zeros = x.new_zeros(batch, proj) if proj else zeros
    w = {n: _wide(t).to(dtype) for n, t in call.weights.items()}
    layers, h_n, c_n = [], [], []
    inp = x
    for layer in range(mod.num_layers):
        outs = []
        for d in range(dirs):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            k = layer * dirs + d
            h = h_zeros if call.h0 is None else call.h0[k].to(dtype)
            cell = None if mod.mode != "LSTM" else zeros if call.c0 is None else call.c0[k].to(dtype)
            a = _node(F.linear(inp, w["weight_ih" + sfx], w.get("bias_ih" + sfx)))
            w_hh, b_hh = w["weight_hh" + sfx], w.get("bias_hh" + sfx)
            w_hr = w.get("weight_hr" + sfx)
            hs: list[Tensor | None] = [None] * steps
            cs, prev, ps, rs = [], [], [], []
            for t in (reversed(range(steps)) if d else range(steps)):
                prev.append(h)
                c_t = _node(F.linear(h, w_hh, b_hh))
                cs.append(c_t)
                h_new, cell_new = gates(mod.mode, a[:, t], c_t, h, cell)
                if w_hr is not None:
                    rs.append(h_new.detach())
                    h_new = _node(F.linear(h_new, w_hr))
                    ps.append(h_new)
                if masks is not None:
                    h_new = torch.where(masks[t], h_new, h)
                    cell_new = None if cell is None else torch.where(masks[t], cell_new, cell)
                    hs[t] = h_new * masks[t]  # the padded output: zeros past the length
                else:
                    hs[t] = h_new
                h, cell = h_new, cell_new
            layers.append(_Layer(inp.detach(), a, cs, torch.stack(prev, 1).detach(), sfx, ps,
                                 torch.stack(rs, 1) if rs else None))
            h_n.append(h)
            c_n.append(cell)
            outs.append(torch.stack(hs, 1))
        inp = outs[0] if dirs == 1 else torch.cat(outs, -1)
    return _Run(inp, torch.stack(h_n), None if mod.mode != "LSTM" else torch.stack(c_n), layers)
