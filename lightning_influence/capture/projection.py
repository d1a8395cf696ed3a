"""Seeded Kronecker-structured random projection of per-sample gradients.

Each parameter tensor is viewed as a matrix ``G`` with ``rows = shape[0]`` and
``cols = prod(shape[1:])`` (1 for a 1-D tensor). A Conv2d weight ``(out, in, kh, kw)``
becomes ``(out, in*kh*kw)``, the column order of ``F.unfold``. Its projection is
``P_r^T G P_c`` (``k_rows x k_cols``, flattened row-major), i.e. ``(P_r ⊗ P_c)^T vec(G)``,
with ``P_r`` (``rows x k_rows``) and ``P_c`` (``cols x k_cols``) Gaussian with entries
``N(0, 1/k)`` for their own ``k``. Then ``E[(P_r ⊗ P_c)(P_r ⊗ P_c)^T] = I``: inner
products of gradients are preserved in expectation. Only the two side matrices are ever
stored, never a dense ``p x k`` matrix.

**How ``dim`` is split** (``dim`` is the target size per parameter tensor): a tensor with
``rows*cols <= dim`` is kept whole. Otherwise ``(k_rows, k_cols)`` is the pair with
``k_rows*k_cols <= dim`` (``1 <= k <= `` its side) that minimises the relative variance of a rank-1
gradient's projected squared norm, ties to the smaller ``k_rows``. For the rank-1 gradients of a layer
seen once per sample, ``G = a b^T``, ``||P_r^T a||^2 ||P_c^T b||^2`` is a product of two independent
``chi2_k / k`` (one per projected side), so its relative variance is
``v = (1 + 2/k_r)(1 + 2/k_c) - 1``, where a side kept exact (``k`` = its size, the identity) has no
factor: it contributes nothing. With both sides projected, ``v`` falls as either ``k`` grows and, for a
fixed product, is smallest at ``k_r = k_c`` (the square split, about ``sqrt(k)/2`` times the variance
of a dense Gaussian projection to the same size: the price of ``O(rows k_r + cols k_c)`` memory). A
narrow side kept whole can beat the square: a ``32 x 28`` weight at ``dim = 256`` gets ``(16, 16)``
(``v = 0.266``) as a square, ``(32, 8)`` (``v = 2/8 = 0.25``) with its rows exact. For a given
``k_rows`` the best ``k_cols`` is ``min(cols, dim // k_rows)``, so the rule scans ``k_rows`` only
(:func:`_split`). One exception, for cost: a convolution kernel of more than one element (``shape[2:]``), whose
column side is its unfolded input, ``in*kh*kw`` values per output position, keeps its column side
projected (``k_cols < cols``): keeping it whole makes the engine form the unfolded input (on the
benchmark CNN's first layer, ``(9, 28)`` at ``v = 0.222`` measured 2.8 ms a step against 1.8 ms for
``(32, 8)``; ``docs/per-sample-gradients.md``). A bias (``cols = 1``) gets ``k_rows = min(rows, dim)``.

The split of a stored log is the log's own (``k_rows``, ``k_cols`` in :meth:`KroneckerProjector.to_metadata`):
:meth:`KroneckerProjector.from_metadata` rebuilds those sizes (``splits``), whatever rule wrote them, so a log
written under an earlier rule (before 2026-11-30: the square split, ``k_rows = isqrt(dim)`` unless a side was
at most ``isqrt(dim)``) reads with its own matrices, and a fit resumed into it keeps them.

**Folded biases** (``fold``: weight name -> bias name): a bias ``b`` (``rows``,) of a weight
that is projected (``rows*cols > dim``) is folded into it: the pair is one block, the
projection of the augmented matrix ``[G  g_b]`` (``rows x (cols+1)``, the bias as a last
column), the gradient of ``[W b]`` for the augmented input ``[x, 1]``. One block of at most
``dim`` columns replaces a weight block plus a bias block of ``min(rows, dim)`` columns, and the
layer engines get it for an added row of ``P_c`` per token instead of a bias product. Where the
weight is kept whole (or ``dim=None``) folding would save nothing, so the pair stays apart.
Math: ``docs/per-sample-gradients.md`` (Folded biases).

A side whose ``k`` equals its size uses the identity (exact); ``dim=None`` keeps every
gradient whole. The matrices are regenerated deterministically from ``(seed, name)``,
so a projector is fully described by :meth:`KroneckerProjector.to_metadata`.
"""

from __future__ import annotations

import math
import zlib
from fractions import Fraction
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = ["TensorProjection", "KroneckerProjector", "Outer", "contract", "dense"]

_METADATA_KIND = "kronecker_gaussian"


@dataclass(frozen=True)
class TensorProjection:
    """How one parameter tensor is projected: its matrix view and the two side sizes.

    ``bias``: the bias folded into this weight's block as its last column (``cols`` counts it), or ``None``.
    """

    name: str
    shape: tuple[int, ...]
    rows: int
    cols: int
    k_rows: int
    k_cols: int
    bias: str | None = None

    @property
    def tensors(self) -> tuple[str, ...]:
        """The parameter tensors whose gradients this block holds: the weight and its folded bias."""
        return (self.name,) if self.bias is None else (self.name, self.bias)

    @property
    def out_dim(self) -> int:
        """Number of output columns this tensor contributes."""
        return self.k_rows * self.k_cols


def _matrix_view(shape: Sequence[int]) -> tuple[int, int]:
    if len(shape) == 0:
        return 1, 1
    return int(shape[0]), math.prod(int(s) for s in shape[1:])


def _variance_factor(size: int, k: int) -> Fraction:
    """``1 + 2/k`` for a projected side, 1 for a side kept exact (``k == size``): exact, so ties are ties."""
    return Fraction(1) if k >= size else 1 + Fraction(2, k)


def _split(rows: int, cols: int, dim: int | None, kernel: bool = False) -> tuple[int, int]:
    """Side sizes ``(k_rows, k_cols)`` for a ``rows x cols`` matrix: the least variance with ``k_rows*k_cols <= dim``,
    ties to the smaller ``k_rows``; ``kernel`` (a convolution's kernel of more than one element): the column side stays
    projected (rule in module doc).

    For a given ``k_rows`` the most columns, ``min(cols, dim // k_rows)``, is best, so only ``k_rows`` is searched:
    the two sides kept whole and the square first, then every ``k_rows`` that can still do as well: a projected side
    alone has ``1 + 2/k``, so both ``k_rows`` and (unless kept whole) ``dim // k_rows`` must be at least
    ``2 / (best - 1)`` (``O(sqrt(dim))`` values; a full scan would take seconds at ``dim = 2**20``)."""
    if dim is None or rows * cols <= dim:
        return rows, cols
    col_cap = cols - 1 if kernel and cols > 1 else cols

    def candidate(k_rows: int) -> tuple[Fraction, int, int]:
        k_cols = min(col_cap, dim // k_rows)
        return _variance_factor(rows, k_rows) * _variance_factor(cols, k_cols), k_rows, k_cols

    top = min(rows, dim)
    best = min(candidate(k) for k in {top, max(1, min(top, dim // cols)), max(1, min(top, math.isqrt(dim)))})
    least = 2 / (best[0] - 1)  # a projected side needs k >= least to reach the best so far
    lo = max(1, math.floor(least) - 1)
    hi = min(top, dim // max(1, math.floor(least) - 1))
    return min([best, *(candidate(k) for k in range(lo, hi + 1))])[1:]


def _checked_split(name: str, rows: int, cols: int, dim: int | None, split: Sequence[int]) -> tuple[int, int]:
    """A stored ``(k_rows, k_cols)``, if it is one a projection of a ``rows x cols`` block to ``dim`` can have."""
    k_rows, k_cols = (int(k) for k in split)
    whole = dim is None or rows * cols <= dim
    if not (1 <= k_rows <= rows and 1 <= k_cols <= cols) or (whole and (k_rows, k_cols) != (rows, cols)) or (
            not whole and k_rows * k_cols > dim):
        raise ValueError(f"projection of {name!r}: sizes ({k_rows}, {k_cols}) do not fit a {rows} x {cols} block "
                         f"projected to dim={dim}")
    return k_rows, k_cols


def _foldable(shapes: Mapping[str, tuple[int, ...]], weight: str, bias: str, dim: int | None) -> bool:
    """Whether bias ``bias`` folds into weight ``weight``: both present, the bias one entry per weight row,
    and the weight projected (``rows*cols > dim``; otherwise folding saves no column)."""
    if weight not in shapes or bias not in shapes or len(shapes[weight]) < 2 or dim is None:
        return False
    rows, cols = _matrix_view(shapes[weight])
    return shapes[bias] == (rows,) and rows * cols > dim


def _apply_rows(g: Tensor, p_r: Tensor) -> Tensor:
    """``P_r^T G`` for each sample of ``g`` ``(B, rows, cols)``. matmul folds the batch into the
    rows of one GEMM only when the 2-D operand is on the right, so the row side is applied to
    the transposed view; a single column (a bias) is a plain ``(B, rows)`` GEMM, which that
    view (``B`` matrix-vector products) runs 4x slower at ``B = 128``, ``rows = 512``."""
    if g.shape[2] == 1:
        return (g.reshape(g.shape[0], g.shape[1]) @ p_r).unsqueeze(2)
    return (g.transpose(1, 2) @ p_r).transpose(1, 2)


def _matmul(x: Tensor, side: Tensor) -> Tensor:
    """``x @ side``; a 2-D ``x`` by ``mm``, the call ``matmul`` makes for it (the same product, one dispatch fewer: a
    hooked layer's sides are projected at every step). A 3-D ``x`` on the CPU laid out as its transpose (``(B, d, L)``
    contiguous: the output gradient of a layer whose output the model transposed, a GPT's logits fed to
    ``cross_entropy`` as ``(B, V, T)``) goes as ``(side^T x^T)^T``, one batched product in the layout of its memory:
    ``matmul`` cannot fold such an ``x`` into one GEMM and ran the batched product on it 13% slower (the benchmark GPT's
    head, ``[64, 64, 512] x [512, 16]``: 0.70 against 0.60 ms; the same numbers)."""
    if x.dim() == 2:
        return x.mm(side)
    if x.dim() == 3 and x.stride(1) == 1 and x.stride(2) != 1 and x.is_cpu:
        return torch.bmm(side.t().expand(x.shape[0], -1, -1), x.transpose(1, 2)).transpose(1, 2)
    return x @ side


class Outer(NamedTuple):
    """The per-sample outer product ``a[b] ⊗ b[b]`` of ``a`` ``(B, i)`` and ``b`` ``(B, j)``, kept as its two factors
    until :meth:`write` puts it, flattened row-major ``(B, i*j)``, straight into its columns of the rows: the
    ``(B, i*j)`` block is then written once (no block of its own, no concatenation; the same products)."""

    a: Tensor
    b: Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return self.a.shape[0], self.a.shape[1] * self.b.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        dtype = self.a.dtype
        return dtype if dtype == self.b.dtype else torch.promote_types(dtype, self.b.dtype)  # (a dispatched call)

    def write(self, out: Tensor) -> None:
        """``out`` ``(B, i*j)`` (columns of a wider matrix: a view) := the outer products."""
        torch.mul(self.a.unsqueeze(2), self.b.unsqueeze(1), out=out.view(self.a.shape[0], self.a.shape[1], -1))

    def tensor(self) -> Tensor:
        """The outer products as a new ``(B, i*j)`` tensor."""
        return (self.a[:, :, None] * self.b[:, None, :]).reshape(self.a.shape[0], -1)


def dense(block: Tensor | Outer) -> Tensor:
    """``block`` as a ``(B, k)`` tensor."""
    return block.tensor() if isinstance(block, Outer) else block


def contract(a: Tensor, b: Tensor) -> Tensor | Outer:
    """``sum_l a[:, l] ⊗ b[:, l]`` per sample, flattened row-major: ``(B, L, i), (B, L, j) -> (B, i*j)``.

    One batched matrix product; with ``L = 1`` (no reduction to do), also for ``(B, i), (B, j)`` (one token per
    sample without its dimension), an :class:`Outer` left to be written into the rows.
    """
    if a.dim() == 2:
        return Outer(a, b)
    if a.shape[1] == 1:
        return Outer(a[:, 0], b[:, 0])
    return torch.bmm(a.transpose(1, 2), b).reshape(a.shape[0], -1)


class KroneckerProjector:
    """Projects per-sample gradients of named tensors to ``out_dim`` concatenated columns.

    ``shapes`` is ordered: the output columns follow its order (see :attr:`slices`).
    ``dim`` is the target size per tensor, ``None`` for no projection. ``fold``: candidate
    ``{weight: bias}`` pairs, folded where the weight is projected (module doc); a folded bias
    has no block of its own (:attr:`block_of`). ``splits``: ``{block: (k_rows, k_cols)}`` kept from a log
    (:meth:`from_metadata`, a resumed fit) instead of the split rule, for the blocks it names.
    """

    def __init__(self, shapes: Mapping[str, Sequence[int]], dim: int | None, seed: int = 0,
                 fold: Mapping[str, str] | None = None, splits: Mapping[str, Sequence[int]] | None = None):
        if dim is not None and dim < 1:
            raise ValueError(f"dim must be a positive integer or None, got {dim}")
        self.dim = dim
        self.seed = int(seed)
        shapes = {name: tuple(int(s) for s in shape) for name, shape in shapes.items()}
        folded = {w: b for w, b in (fold or {}).items() if _foldable(shapes, w, b, dim)}
        self.specs: list[TensorProjection] = []
        self.slices: dict[str, slice] = {}  # block (its weight's name) -> its columns
        self.block_of: dict[str, str] = {}  # tensor name -> the name of the block holding its gradient
        start = 0
        for name, shape in shapes.items():
            if name in folded.values():
                continue
            rows, cols = _matrix_view(shape)
            cols += name in folded
            if splits is not None and name in splits:
                k_rows, k_cols = _checked_split(name, rows, cols, dim, splits[name])
            else:
                k_rows, k_cols = _split(rows, cols, dim, kernel=math.prod(shape[2:]) > 1)
            spec = TensorProjection(name, shape, rows, cols, k_rows, k_cols, folded.get(name))
            self.specs.append(spec)
            self.slices[name] = slice(start, start + spec.out_dim)
            self.block_of.update({t: name for t in spec.tensors})
            start += spec.out_dim
        self.out_dim = start
        self._by_name = {spec.name: spec for spec in self.specs}
        self._cache: dict[tuple[str, torch.dtype, torch.device], tuple[Tensor | None, Tensor | None]] = {}
        self._columns: dict[tuple[str, torch.dtype, Any], tuple[Tensor | None, Tensor | None]] = {}  # column_side
        self._kernels: dict[tuple, tuple[Tensor, Tensor | None]] = {}  # column_kernel

    def spec(self, name: str) -> TensorProjection:
        """The :class:`TensorProjection` of tensor ``name``."""
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no projection for {name!r}; known: {list(self._by_name)}") from None

    def side_matrices(
        self, name: str, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> tuple[Tensor | None, Tensor | None]:
        """``(P_r, P_c)`` for tensor ``name``; ``None`` stands for the identity.

        Drawn on the CPU in float64 from a generator seeded by ``crc32(f"{seed}:{name}")``
        (stable across processes and devices), then cast and cached.
        """
        if not isinstance(device, torch.device):  # a tensor's device as it is (every hooked layer asks, every step)
            device = torch.device("cpu" if device is None else device)
        key = (name, dtype, device)
        if key not in self._cache:
            spec = self.spec(name)
            gen = torch.Generator(device="cpu")
            gen.manual_seed(zlib.crc32(f"{self.seed}:{name}".encode()))
            sides = []
            for size, k in ((spec.rows, spec.k_rows), (spec.cols, spec.k_cols)):
                if k == size:
                    sides.append(None)
                else:
                    mat = torch.randn(size, k, generator=gen, dtype=torch.float64) / math.sqrt(k)
                    sides.append(mat.to(device=device, dtype=dtype))
            self._cache[key] = (sides[0], sides[1])
        return self._cache[key]

    def project_tensor(self, name: str, grad: Tensor) -> Tensor:
        """Project per-sample grads ``(B, *shape)`` of block ``name`` to ``(B, k_rows*k_cols)``.

        A block with a folded bias takes the augmented ``(B, rows, cols)`` gradient (:meth:`project`
        assembles it from the weight's and the bias's).
        """
        spec = self.spec(name)
        batch = grad.shape[0]
        g = grad.reshape(batch, spec.rows, spec.cols)
        p_r, p_c = self.side_matrices(name, grad.dtype, grad.device)
        # Apply first the side whose product is cheaper overall.
        left_first = spec.k_rows * spec.cols * (spec.rows + spec.k_cols) <= spec.k_cols * spec.rows * (
            spec.cols + spec.k_rows
        )
        if left_first and p_r is not None:
            g = _apply_rows(g, p_r)
        if p_c is not None:
            g = g @ p_c
        if not left_first and p_r is not None:
            g = _apply_rows(g, p_r)
        return g.reshape(batch, spec.out_dim)

    def project(self, grads: Mapping[str, Tensor], partial: bool = False) -> Tensor:
        """Project full per-sample grads ``grads[name]`` ``(B, *shape)`` to ``(B, out_dim)``.

        ``partial``: tensors missing from ``grads`` get zero columns, a folded pair's missing half
        counts as zero (another engine fills them: the projection is linear, so the parts add up).
        """
        if not partial:
            missing = [n for spec in self.specs for n in spec.tensors if n not in grads]
            if missing:
                raise KeyError(f"no per-sample gradient of {missing} (partial=True fills zeros)")
            return torch.cat([self.project_tensor(spec.name, self._block_grad(spec, grads)) for spec in self.specs],
                             dim=1)
        first = next(iter(grads.values()))
        out = torch.zeros(first.shape[0], self.out_dim, dtype=first.dtype, device=first.device)
        for name in dict.fromkeys(self.block_of[n] for n in grads):
            out[:, self.slices[name]] = self.project_tensor(name, self._block_grad(self.spec(name), grads))
        return out

    @staticmethod
    def _block_grad(spec: TensorProjection, grads: Mapping[str, Tensor]) -> Tensor:
        """The gradient of block ``spec``: the tensor's, or ``[G g_b]`` ``(B, rows, cols)`` of a folded pair."""
        if spec.bias is None:
            return grads[spec.name]
        weight, bias = grads.get(spec.name), grads.get(spec.bias)
        ref = weight if weight is not None else bias
        batch = ref.shape[0]
        weight = ref.new_zeros(batch, spec.rows, spec.cols - 1) if weight is None else weight.reshape(batch, spec.rows, -1)
        bias = ref.new_zeros(batch, spec.rows, 1) if bias is None else bias.reshape(batch, spec.rows, 1)
        return torch.cat([weight, bias], dim=2)

    def project_factored(self, name: str, out_grad: Tensor, inp: Tensor, rows: slice | None = None) -> Tensor:
        """Projected per-sample grad ``sum_l out_grad[b,l] ⊗ inp[b,l]`` of a weight.

        ``out_grad`` is ``(B, L, rows)``, ``inp`` ``(B, L, cols)``. Each side is projected
        before the outer product, so no ``rows x cols`` matrix is formed per sample.
        ``rows``: ``out_grad`` holds only this block of the weight's rows (the others have
        zero gradient), e.g. one of the query/key/value blocks of a packed attention weight.
        Returns ``(B, k_rows*k_cols)``, equal to :meth:`project_tensor` of that gradient.
        """
        return dense(self.combine(name, out_grad, self.project_cols(name, inp), rows))

    def project_cols(self, name: str, inp: Tensor) -> Tensor:
        """The column side ``inp @ P_c`` ``(B, L, k_cols)`` of :meth:`project_factored` (``inp`` if unprojected).

        With a folded bias the input is ``[inp, 1]``: ``inp @ P_c[:-1] + P_c[-1]`` (:meth:`column_side`).
        """
        p_c, p_bias = self.column_side(name, inp.dtype, inp.device)
        if p_c is None:  # (never with a folded bias: its unprojected column side is the identity, column_side)
            return inp
        cols = _matmul(inp, p_c)
        return cols if p_bias is None else cols.add_(p_bias)  # in place: the product is new memory, still in cache

    def column_side(self, name: str, dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> tuple[Tensor | None, Tensor | None]:
        """``(P_c of the weight's columns, the folded bias's row of P_c)``; ``(P_c, None)`` without a folded bias.

        The column side of the augmented input ``[x, 1]`` is ``x @ P_c[:-1] + P_c[-1]``. An unprojected
        column side of a folded block is written as the identity matrix (a rare, small case).
        """
        key = (name, dtype, device)
        if key not in self._columns:  # cached: the slices below are two calls at every hooked layer's forward
            spec = self.spec(name)
            p_c = self.side_matrices(name, dtype, device)[1]
            if spec.bias is None:
                self._columns[key] = p_c, None
            else:
                if p_c is None:
                    p_c = torch.eye(spec.cols, dtype=dtype, device=torch.device("cpu" if device is None else device))
                self._columns[key] = p_c[:-1], p_c[-1]
        return self._columns[key]

    def column_kernel(self, name: str, dtype: torch.dtype, device: torch.device, channels: int,
                      kernel_size: Sequence[int], groups: int) -> tuple[Tensor, Tensor | None]:
        """``P_c`` as the weight ``(groups·k_cols, channels, *kernel_size)`` and bias of the convolution that projects a
        convolution's unfolded input (:func:`.layers.conv_columns`; the bias: a folded bias's row of ``P_c``), cached:
        both are copies made at every hooked call otherwise. An unprojected column side is the identity."""
        key = (name, dtype, device, channels, tuple(kernel_size), groups)
        if key not in self._kernels:
            spec = self.spec(name)
            p_c, p_bias = self.column_side(name, dtype, device)
            if p_c is None:
                p_c = torch.eye(spec.cols, dtype=dtype, device=device)
            dims = len(kernel_size)
            kernel = p_c.t().reshape(spec.k_cols, channels, *kernel_size).repeat(groups, *([1] * (dims + 1)))
            self._kernels[key] = kernel, None if p_bias is None else p_bias.repeat(groups)
        return self._kernels[key]

    def combine(self, name: str, out_grad: Tensor, cols: Tensor, rows: slice | None = None) -> Tensor | Outer:
        """:meth:`project_factored` from the projected column side ``cols`` (:meth:`project_cols`); one token per
        sample gives an :class:`Outer`."""
        p_r = self.side_matrices(name, out_grad.dtype, out_grad.device)[0]
        if p_r is not None:
            return contract(_matmul(out_grad, p_r if rows is None else p_r[rows]), cols)
        if rows is None:
            return contract(out_grad, cols)
        full = torch.zeros(out_grad.shape[0], self.spec(name).rows, cols.shape[2], dtype=cols.dtype, device=cols.device)
        full[:, rows] = torch.bmm(out_grad.transpose(1, 2), cols)
        return full.reshape(out_grad.shape[0], -1)

    def to_metadata(self) -> dict[str, Any]:
        """JSON-serialisable description from which :meth:`from_metadata` rebuilds it."""
        return {
            "kind": _METADATA_KIND,
            "seed": self.seed,
            "dim": self.dim,
            "specs": [
                {
                    "name": s.name,
                    "shape": list(s.shape),
                    "rows": s.rows,
                    "cols": s.cols,
                    "k_rows": s.k_rows,
                    "k_cols": s.k_cols,
                    **({"bias": s.bias} if s.bias is not None else {}),
                }
                for s in self.specs
            ],
        }

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> KroneckerProjector:
        """Rebuild a projector with identical matrices: each block's stored sizes (``k_rows``, ``k_cols``), whatever
        split rule chose them (the matrices are drawn from the seed and the name at those sizes); refuses metadata it
        cannot reproduce."""
        if meta.get("kind") != _METADATA_KIND:
            raise ValueError(f"not a {_METADATA_KIND} projection: kind={meta.get('kind')!r}")
        shapes: dict[str, tuple[int, ...]] = {}
        for s in meta["specs"]:  # a spec without "bias" (every spec of a log before folding) is unfolded
            shapes[s["name"]] = tuple(s["shape"])
            if s.get("bias") is not None:
                shapes[s["bias"]] = (int(s["shape"][0]),)
        fold = {s["name"]: s["bias"] for s in meta["specs"] if s.get("bias") is not None}
        splits = {s["name"]: (s["k_rows"], s["k_cols"]) for s in meta["specs"]}
        proj = cls(shapes, meta["dim"], meta["seed"], fold, splits)
        if proj.to_metadata() != dict(meta):
            raise ValueError("projection metadata does not describe a projection this version can rebuild "
                             "(its blocks' shapes, matrix views or folded biases do not agree)")
        return proj
