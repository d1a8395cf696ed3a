import json
import math

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


@pytest.mark.parametrize("dim", [1, 2, 7, 24, 100, 1000])
def test_split_rule_invariants(dim):
    for rows in (1, 2, 5, 31, 32, 33, 100):
        for cols in (1, 3, 31, 32, 33, 500):
            (spec,) = KroneckerProjector({"t": (rows, cols)}, dim=dim).specs
            assert 1 <= spec.k_rows <= rows and 1 <= spec.k_cols <= cols
            if rows * cols <= dim:
                assert (spec.k_rows, spec.k_cols) == (rows, cols)
            else:
                assert dim - math.isqrt(dim) <= spec.out_dim <= dim


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
    with pytest.raises(ValueError):
        KroneckerProjector.from_metadata({**meta, "dim": 30})


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
