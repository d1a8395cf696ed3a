import json
import math
from fractions import Fraction

import pytest
import torch

from lightning_influence.capture import KroneckerProjector
from lightning_influence.capture.projection import Outer

SHAPES = {
    "conv.weight": (6, 3, 3, 3),  # 6 x 27
    "fc.weight": (20, 30),
    "fc.bias": (20,),  # kept whole at dim=24
    "big.bias": (50,),  # 1 column: k_rows = dim
    "tiny": (2, 3),  # kept whole
}


def _grads(batch: int, shapes=SHAPES, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(batch, *s, generator=gen, dtype=torch.float64) for n, s in shapes.items()}


def test_split_rule_examples():
    proj = KroneckerProjector({"w": (128, 784), "b": (2000,), "small": (10, 10), "thin": (10, 10000)}, dim=1024)
    sides = {s.name: (s.k_rows, s.k_cols) for s in proj.specs}
    assert sides == {"w": (32, 32), "b": (1024, 1), "small": (10, 10), "thin": (10, 102)}
    assert proj.out_dim == 1024 + 1024 + 100 + 1020
    assert proj.slices["b"] == slice(1024, 2048)


def _variance(rows: int, cols: int, k_rows: int, k_cols: int) -> Fraction:
    """Relative variance of a rank-1 gradient's projected squared norm, (1+2/k_r)(1+2/k_c) - 1, an exact side's
    factor 1 (no randomness on that side)."""
    factor = lambda size, k: Fraction(1) if k == size else 1 + Fraction(2, k)  # noqa: E731
    return factor(rows, k_rows) * factor(cols, k_cols) - 1


def _square_split(rows: int, cols: int, dim: int) -> tuple[int, int]:
    """The split rule of every log written before 2026-11-30 (as square as the matrix allows)."""
    if rows * cols <= dim:
        return rows, cols
    s = math.isqrt(dim)
    if rows <= s:
        return rows, dim // rows
    if cols <= s:
        return dim // cols, cols
    return s, min(cols, dim // s)


@pytest.mark.parametrize("dim", [1, 2, 7, 24, 100, 256, 1000])
def test_split_rule_invariants(dim):
    """Against every pair by brute force: the least variance with k_rows*k_cols <= dim (ties to the smaller k_rows);
    never more variance than the square split of earlier logs; a kernel of more than one element keeps its column side
    projected (a 1x1 kernel's column side is its input: it may be kept whole)."""
    for rows in (1, 2, 5, 9, 31, 32, 33, 100):
        for cols in (1, 3, 28, 31, 32, 33, 500):
            for shape in ((rows, cols), (rows, cols, 1, 1), (rows, cols // 2, 1, 2)):
                if shape[1] == 0:
                    continue
                kernel, cols = math.prod(shape[2:]) > 1, math.prod(shape[1:])
                (spec,) = KroneckerProjector({"t": shape}, dim=dim).specs
                if rows * cols <= dim:
                    assert (spec.k_rows, spec.k_cols) == (rows, cols)
                    continue
                pairs = [(_variance(rows, cols, a, b), a, b) for a in range(1, rows + 1)
                         for b in range(1, (cols - 1 if kernel and cols > 1 else cols) + 1) if a * b <= dim]
                assert (_variance(rows, cols, spec.k_rows, spec.k_cols), spec.k_rows, spec.k_cols) == min(pairs)
                if not kernel:
                    assert _variance(rows, cols, spec.k_rows, spec.k_cols) <= _variance(
                        rows, cols, *_square_split(rows, cols, dim))


def test_split_rule_at_large_dims_searches_only_what_can_win():
    """The search skips k_rows whose projected side alone is worse than the best so far; against every pair at
    dim 4096 (300 x 700: the square (64, 64)), and a 2**20 projection of a 50000 x 1024 matrix keeps its columns."""
    pairs = [(_variance(300, 700, a, b), a, b) for a in range(1, 301) for b in range(1, 701) if a * b <= 4096]
    (spec,) = KroneckerProjector({"t": (300, 700)}, dim=4096).specs
    assert (_variance(300, 700, spec.k_rows, spec.k_cols), spec.k_rows, spec.k_cols) == min(pairs)
    (big,) = KroneckerProjector({"t": (50000, 1024)}, dim=2**20).specs
    assert (big.k_rows, big.k_cols) == (1024, 1024)


def test_split_of_the_benchmark_cnns_first_convolution():
    """Conv2d 3->32, 3x3, bias folded: a 32 x 28 block at dim=256. Square (16, 16): v = (1+2/16)^2 - 1 = 0.2656; rows
    kept whole (32, 8): v = 2/8 = 0.25 (the least for a kernel); columns kept whole (9, 28): v = 2/9 = 0.2222, the
    least for a plain 32 x 28 matrix, but a kernel keeps its column side (the unfolded input) projected. The second
    convolution, 64 x 289, stays square: (16, 16) against (64, 4) at v = 0.5."""
    proj = KroneckerProjector({"c1.weight": (32, 3, 3, 3), "c1.bias": (32,), "c2.weight": (64, 32, 3, 3),
                               "c2.bias": (64,), "m": (32, 28)}, 256, fold={"c1.weight": "c1.bias", "c2.weight": "c2.bias"})
    sides = {s.name: (s.rows, s.cols, s.k_rows, s.k_cols) for s in proj.specs}
    assert sides == {"c1.weight": (32, 28, 32, 8), "c2.weight": (64, 289, 16, 16), "m": (32, 28, 9, 28)}
    assert _variance(32, 28, 32, 8) == Fraction(1, 4) < _variance(32, 28, 16, 16) == Fraction(17, 64)


def test_project_matches_dense_kronecker():
    proj = KroneckerProjector(SHAPES, dim=24, seed=3)
    grads = _grads(4)
    out = proj.project(grads)
    assert out.shape == (4, proj.out_dim)
    for spec in proj.specs:
        p_r, p_c = proj.side_matrices(spec.name, torch.float64)
        assert (p_r is None) == (spec.k_rows == spec.rows) and (p_c is None) == (spec.k_cols == spec.cols)
        p_r = torch.eye(spec.rows, dtype=torch.float64) if p_r is None else p_r
        p_c = torch.eye(spec.cols, dtype=torch.float64) if p_c is None else p_c
        dense = torch.kron(p_r, p_c)  # (rows*cols, k_rows*k_cols)
        expected = grads[spec.name].reshape(4, -1) @ dense
        torch.testing.assert_close(out[:, proj.slices[spec.name]], expected, rtol=1e-12, atol=1e-12)
    assert [s.name for s in proj.specs if s.out_dim == s.rows * s.cols] == ["fc.bias", "tiny"]


def test_project_factored_matches_project():
    shapes = {"conv.weight": (6, 3, 3, 3), "fc.weight": (20, 30), "whole": (3, 4)}
    proj = KroneckerProjector(shapes, dim=24, seed=1)
    gen = torch.Generator().manual_seed(1)
    for name, shape in shapes.items():
        spec = proj.spec(name)
        out_grad = torch.randn(4, 5, spec.rows, generator=gen, dtype=torch.float64)
        inp = torch.randn(4, 5, spec.cols, generator=gen, dtype=torch.float64)
        full = torch.einsum("bli,blj->bij", out_grad, inp).reshape(4, *shape)
        torch.testing.assert_close(
            proj.project_factored(name, out_grad, inp), proj.project_tensor(name, full), rtol=1e-12, atol=1e-12
        )


def test_sides_of_transposed_layouts_and_folded_biases():
    """Either side given as a transposed view (``(B, d, L)``-contiguous, a GPT's logits' gradient) projects as its
    contiguous copy and as the float64 gradient; with a folded bias, the bias's row of ``P_c`` is added to each token's
    ``x P_c`` (in place in the product) and never to the input, projected or kept whole."""
    shapes = {"fc.weight": (20, 30), "fc.bias": (20,), "whole.weight": (2, 3), "whole.bias": (2,)}
    proj = KroneckerProjector(shapes, dim=24, seed=1, fold={"fc.weight": "fc.bias"})
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(4, 20, 5, generator=gen, dtype=torch.float64).transpose(1, 2)  # (B, L, rows), not contiguous
    x = torch.randn(4, 30, 5, generator=gen, dtype=torch.float64).transpose(1, 2)
    x_before = x.clone()
    block = proj.project_factored("fc.weight", g, x)
    assert torch.equal(x, x_before)
    assert torch.equal(block, proj.project_factored("fc.weight", g.contiguous(), x.contiguous()))
    augmented = torch.cat([x, torch.ones(4, 5, 1, dtype=torch.float64)], 2)  # [x, 1]: the folded bias's column
    full = torch.einsum("bli,blj->bij", g, augmented)
    torch.testing.assert_close(block, proj.project_tensor("fc.weight", full), rtol=1e-12, atol=1e-12)
    whole = KroneckerProjector({"w": (2, 3), "b": (2,)}, dim=None, fold={"w": "b"})  # no side projected: kept apart
    assert whole.spec("w").bias is None
    x3 = torch.randn(4, 5, 3, dtype=torch.float64)
    assert whole.project_cols("w", x3) is x3


def test_one_token_per_sample_combines_to_an_outer_written_into_the_rows():
    """Inputs ``(B, in)`` and ``(B, 1, in)``: :meth:`combine` leaves the outer products as their factors
    (:class:`Outer`); written into a column slice of wider rows they are the products, bit for bit, elsewhere nothing
    changes, and they equal the projected float64 gradient."""
    proj = KroneckerProjector({"fc.weight": (20, 30), "whole": (3, 4)}, dim=24, seed=1)
    gen = torch.Generator().manual_seed(2)
    for name, shape in (("fc.weight", (20, 30)), ("whole", (3, 4))):
        g = torch.randn(4, shape[0], generator=gen, dtype=torch.float64)
        x = torch.randn(4, shape[1], generator=gen, dtype=torch.float64)
        expected = proj.project_tensor(name, g[:, :, None] * x[:, None, :])
        for block in (proj.combine(name, g, proj.project_cols(name, x)),
                      proj.combine(name, g[:, None], proj.project_cols(name, x[:, None]))):
            assert isinstance(block, Outer) and block.shape == (4, proj.spec(name).out_dim)
            torch.testing.assert_close(block.tensor(), expected, rtol=1e-12, atol=1e-12)
            rows = torch.full((4, block.shape[1] + 5), 7.0, dtype=torch.float64)
            block.write(rows[:, 2:-3])
            assert torch.equal(rows[:, 2:-3], block.tensor())
            assert (rows[:, :2] == 7).all() and (rows[:, -3:] == 7).all()
        assert torch.equal(proj.project_factored(name, g[:, None], x[:, None]), block.tensor())


def test_identity_projection():
    grads = _grads(3)
    flat = torch.cat([g.reshape(3, -1) for g in grads.values()], dim=1)
    proj = KroneckerProjector(SHAPES, dim=None)
    assert proj.out_dim == flat.shape[1]
    assert all(proj.side_matrices(n) == (None, None) for n in SHAPES)
    assert torch.equal(proj.project(grads), flat)
    # dim at least the tensor size is also the identity
    assert torch.equal(KroneckerProjector(SHAPES, dim=600).project(grads), flat)


def test_metadata_roundtrip_is_bit_identical():
    proj = KroneckerProjector(SHAPES, dim=24, seed=7)
    grads = {n: g.float() for n, g in _grads(3).items()}
    meta = json.loads(json.dumps(proj.to_metadata()))
    again = KroneckerProjector.from_metadata(meta)
    assert again.specs == proj.specs and again.slices == proj.slices
    assert torch.equal(again.project(grads), proj.project(grads))
    # the seed matters, and each tensor gets its own matrices
    other = KroneckerProjector(SHAPES, dim=24, seed=8).project(grads)
    assert not torch.allclose(other, proj.project(grads))
    twin = KroneckerProjector({"a": (20, 30), "b": (20, 30)}, dim=24)
    assert not torch.equal(twin.side_matrices("a")[0], twin.side_matrices("b")[0])
    # sizes no projection to that dim has (24 columns of conv.weight > 10; fc.bias kept whole at 20 > 10): refused
    with pytest.raises(ValueError, match=r"projection of 'conv.weight': sizes \(6, 4\) do not fit a 6 x 27 block"):
        KroneckerProjector.from_metadata({**meta, "dim": 10})


def test_metadata_written_under_the_square_rule_rebuilds_its_own_matrices():
    """A log's projection from before the least-variance rule: conv.weight (6 x 27 at dim 24) was split (4, 6) (square:
    isqrt(24) = 4 rows, 24 // 4 = 6 columns), the rule now gives (6, 4). The stored sizes are rebuilt, and the matrices
    are the Gaussians drawn at those sizes from crc32("seed:name") (drawn here independently), so old rows read as
    they were written."""
    import zlib

    meta = json.loads(json.dumps(KroneckerProjector(SHAPES, dim=24, seed=7).to_metadata()))
    (conv,) = [s for s in meta["specs"] if s["name"] == "conv.weight"]
    assert (conv["k_rows"], conv["k_cols"]) == (6, 4)
    conv["k_rows"], conv["k_cols"] = _square_split(6, 27, 24)
    assert (conv["k_rows"], conv["k_cols"]) == (4, 6)
    old = KroneckerProjector.from_metadata(meta)
    assert old.to_metadata() == meta and old.out_dim == KroneckerProjector(SHAPES, dim=24).out_dim
    gen = torch.Generator().manual_seed(zlib.crc32(b"7:conv.weight"))
    p_r, p_c = (torch.randn(n, k, generator=gen, dtype=torch.float64) / math.sqrt(k) for n, k in ((6, 4), (27, 6)))
    got = old.side_matrices("conv.weight", torch.float64)
    assert torch.equal(got[0], p_r) and torch.equal(got[1], p_c)
    grads = _grads(3)
    expected = grads["conv.weight"].reshape(3, -1) @ torch.kron(p_r, p_c)
    torch.testing.assert_close(old.project(grads)[:, old.slices["conv.weight"]], expected, rtol=1e-12, atol=1e-12)


def _seed_estimates(g: torch.Tensor, h: torch.Tensor, dim: int, n_seeds: int) -> torch.Tensor:
    """<Pg, Ph> for the projections of seeds 0..n_seeds-1."""
    out = []
    for seed in range(n_seeds):
        proj = KroneckerProjector({"w": g.shape}, dim=dim, seed=seed)
        pg, ph = proj.project({"w": g[None]}), proj.project({"w": h[None]})
        out.append((pg * ph).sum())
    return torch.stack(out)


def test_inner_products_unbiased():
    # E[<Pg, Ph>] = <g, h>. Over 1000 independent seeds the sample mean is within
    # 4 standard errors of the truth (a false alarm has probability ~6e-5). 4 SE is about
    # 10% of <g, h>, so a wrong scale (e.g. 1/k instead of 1/sqrt(k) on one side) fails.
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(8, 12, generator=gen, dtype=torch.float64)
    h = g + 0.5 * torch.randn(8, 12, generator=gen, dtype=torch.float64)
    est = _seed_estimates(g, h, dim=9, n_seeds=1000)
    truth = (g * h).sum()
    se = est.std() / math.sqrt(len(est))
    assert abs(est.mean() - truth) < 4 * se
    assert 4 * se < 0.12 * truth  # the check has power: the tolerance is a small fraction of the value


def test_rank_one_norm_distortion_matches_theory():
    # For G = a b^T with unit a, b: ||PG||^2 = chi2_kr/kr * chi2_kc/kc, mean 1 and
    # variance (1 + 2/kr)(1 + 2/kc) - 1. Check both within 4 standard errors of their
    # sample estimates over 2000 seeds.
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(10, generator=gen, dtype=torch.float64)
    b = torch.randn(12, generator=gen, dtype=torch.float64)
    g = torch.outer(a / a.norm(), b / b.norm())
    (spec,) = KroneckerProjector({"w": g.shape}, dim=16).specs
    assert (spec.k_rows, spec.k_cols) == (4, 4)
    x = _seed_estimates(g, g, dim=16, n_seeds=2000)
    n = len(x)
    assert abs(x.mean() - 1.0) < 4 * x.std() / math.sqrt(n)
    var_theory = (1 + 2 / spec.k_rows) * (1 + 2 / spec.k_cols) - 1
    sq_dev = (x - x.mean()) ** 2
    assert abs(sq_dev.mean() - var_theory) < 4 * sq_dev.std() / math.sqrt(n)
