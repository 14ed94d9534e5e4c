"""The bounded nearest-neighbour search: its bounds are bounds, so its answers are exact."""

from __future__ import annotations

import pytest
import torch

from hamacho.components.bounded import BoundedNearest
from hamacho.components.search import NearestNeighbourSearch, pca_basis

DTYPES = ["bfloat16", "float32"]


def _features(n: int, m: int, d: int = 128, seed: int = 0, scale: float = 1.0):
    """Non-negative, correlated, offset vectors like pooled CNN features (and queries)."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(24, d, generator=g) / 3

    def draw(k: int) -> torch.Tensor:
        latent = torch.randn(k, 24, generator=g)
        return scale * ((latent @ mixing).relu_() + 0.1 * torch.rand(k, d, generator=g) + 2.0)

    return draw(n), draw(m)


def _nearest64(bank: torch.Tensor, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d = torch.cdist(queries.double(), bank.double())
    return d.min(1).values, d.argmin(1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [1e-3, 1.0, 300.0])
def test_bounds_never_exceed_the_true_squared_distance(dtype, scale):
    bank, queries = _features(1500, 300, scale=scale)
    # far-out queries (defects) and queries inside the PCA span (no residual) are the hard cases
    queries = torch.cat([queries, queries[:50] * 4, bank[:50] + 0 * queries[:50]])
    mean, basis = pca_basis(bank, 32)
    nearest = BoundedNearest(bank, mean, basis, getattr(torch, dtype))
    tiles, sq, smallest = nearest._bounds(queries)
    bounds = tiles.permute(1, 0, 2).reshape(len(queries), -1)  # (queries, rows) in bank order
    torch.testing.assert_close(smallest, bounds.view(len(queries), -1, 64).amin(2).float())
    true = torch.cdist(queries.double(), bank.double()).square()
    lower = bounds[:, : len(bank)].double() + sq.double()[:, None]
    assert bool((lower <= true + 1e-6 * (true + sq.double()[:, None])).all())
    assert bool((bounds[:, len(bank) :].float() > 1e29).all())  # padding rows never qualify


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bank_dtype", [torch.float16, torch.float32])
def test_search_through_bounds_is_exact(dtype, bank_dtype):
    bank, queries = _features(3000, 400)
    bank = bank.to(bank_dtype)
    queries = torch.cat([queries, queries[:40] * 3])  # a few far from every bank row
    nn = NearestNeighbourSearch("torch", candidates_dim=32, bound_dtype=dtype).fit(bank)
    dist, idx = nn.search(queries)
    ref_dist, ref_idx = _nearest64(bank, queries)
    assert torch.equal(idx[:, 0], ref_idx)
    torch.testing.assert_close(dist[:, 0].double(), ref_dist, rtol=1e-5, atol=1e-6)
    assert nn.last_uncertain < len(queries) // 20  # the bounds did the work, not the fallback


def test_ties_take_the_lowest_index_and_crowds_fall_back_exactly():
    bank, queries = _features(600, 20)
    bank[100:400] = bank[7]  # 301 equal rows: more candidates than a query may re-rank
    bank[500] = bank[450]
    queries = torch.cat([queries, bank[7:8] + 0.05, bank[450:451]])
    nn = NearestNeighbourSearch("torch", candidates_dim=16, bound_dtype="bfloat16").fit(bank)
    dist, idx = nn.search(queries)
    ref_dist, ref_idx = _nearest64(bank, queries)
    assert idx[-2, 0] == 7 and idx[-1, 0] == 450  # not 100..399, not 500
    assert nn.last_uncertain >= 1  # the crowd of 301 went to the plain exact search
    # the plain search's |q|^2 + |b|^2 - 2 q.b loses digits that the bounded re-rank keeps
    torch.testing.assert_close(dist[:, 0].double(), ref_dist, rtol=1e-3, atol=1e-5)
    assert torch.equal(idx[:-2, 0], ref_idx[:-2])


def test_bound_dtype_is_checked_and_k_above_one_stays_exact():
    with pytest.raises(Exception, match="bound_dtype must be auto, bfloat16 or float32"):
        NearestNeighbourSearch("torch", candidates_dim=8, bound_dtype="int8")
    bank, queries = _features(800, 60)
    nn = NearestNeighbourSearch("torch", candidates_dim=16).fit(bank)
    nn.search(queries, k=1)
    assert nn._candidates is None  # the k > 1 index is built only when a k > 1 search needs it
    dist, idx = nn.search(queries, k=3)
    ref = torch.cdist(queries.double(), bank.double()).topk(3, dim=1, largest=False)
    assert torch.equal(idx, ref.indices)
