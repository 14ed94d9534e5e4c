from __future__ import annotations

import math

import pytest
import torch

from hamacho.components import sampling
from hamacho.components.sampling import CoresetSampler
from hamacho.errors import ConfigError, DataError


def _clusters(n_clusters: int = 8, per: int = 100, d: int = 16, spread: float = 0.1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_clusters, d, generator=g) * 10
    labels = torch.arange(n_clusters).repeat_interleave(per)
    return centres[labels] + spread * torch.randn(len(labels), d, generator=g), labels


def _greedy_reference(points: torch.Tensor, first: int | list[int], size: int) -> list[int]:
    """Textbook greedy k-center in float64 from the centre(s) ``first``: all N distances per
    pick."""
    x = points.double()
    chosen = [first] if isinstance(first, int) else list(first)
    min_dist = torch.full((len(x),), math.inf, dtype=torch.float64)
    for c in chosen[:-1]:
        min_dist = torch.minimum(min_dist, (x - x[c]).square().sum(1))
    for _ in range(size - len(chosen)):
        min_dist = torch.minimum(min_dist, (x - x[chosen[-1]]).square().sum(1))
        min_dist[chosen] = -math.inf
        chosen.append(int(min_dist.argmax()))
    return chosen


def _radius(points: torch.Tensor, idx: torch.Tensor) -> float:
    """Largest distance from any point to its nearest selected point."""
    return torch.cdist(points, points[idx]).min(1).values.max().item()


@pytest.mark.parametrize(
    ("n", "ratio", "max_size", "expected"),
    [(1000, 0.1, None, 100), (1001, 0.1, None, 101), (1000, 0.1, 30, 30), (5, 0.1, None, 1),
     (1, 0.5, None, 1), (7, 1.0, None, 7), (7, 1.0, 100, 7)],
)  # fmt: skip
def test_coreset_size_rules(n, ratio, max_size, expected):
    sampler = CoresetSampler(ratio=ratio, max_size=max_size, projection_dim=None)
    idx = sampler.select(torch.randn(n, 4))
    assert sampler.size(n) == expected
    assert idx.dtype == torch.long and idx.shape == (expected,)
    assert len(set(idx.tolist())) == expected
    assert 0 <= idx.min() and idx.max() < n


def test_coreset_select_of_chunks_equals_select_of_their_concatenation():
    points = torch.randn(3000, 16, generator=torch.Generator().manual_seed(5))
    chunks = list(points.split([1000, 7, 1500, 493]))
    sampler = CoresetSampler(ratio=0.05, seed=2)
    assert torch.equal(sampler.select(chunks), sampler.select(points))
    assert chunks == []  # consumed, so the caller does not hold the rows twice


def test_coreset_select_rejects_mixed_widths_and_empty_lists():
    with pytest.raises(DataError, match="rows of one width"):
        CoresetSampler().select([torch.zeros(3, 4), torch.zeros(3, 5)])
    with pytest.raises(DataError, match="rows of one width"):
        CoresetSampler().select([])


def test_coreset_select_is_deterministic_and_seeded():
    points = torch.randn(500, 8)
    a = CoresetSampler(ratio=0.2, seed=3).select(points)
    b = CoresetSampler(ratio=0.2, seed=3).select(points)
    c = CoresetSampler(ratio=0.2, seed=4).select(points)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("pool_size", [8, 4096])  # 8 forces hundreds of pool refreshes
def test_coreset_select_matches_textbook_greedy(monkeypatch, pool_size):
    monkeypatch.setattr(sampling._KCenter, "pool_size", pool_size)
    points, _ = _clusters(spread=1.0)
    idx = CoresetSampler(ratio=0.25, seed=1).select(points)
    assert idx.tolist() == _greedy_reference(points, int(idx[0]), len(idx))


@pytest.mark.parametrize("pool_size", [8, 4096])
def test_coreset_grown_from_kept_rows_continues_the_textbook_greedy(monkeypatch, pool_size):
    monkeypatch.setattr(sampling._KCenter, "pool_size", pool_size)
    points, _ = _clusters(spread=1.0)
    kept = points[torch.randperm(len(points), generator=torch.Generator().manual_seed(2))][:40]
    rows = torch.cat([kept, points])  # a bank of 40 rows first, then 800 new ones
    sampler = CoresetSampler(ratio=0.1, seed=1)  # 84 of 840
    idx = sampler.select([kept.clone(), points.clone()], keep=40)
    assert idx[:40].tolist() == list(range(40))
    assert idx.tolist() == _greedy_reference(rows, list(range(40)), 84)
    assert torch.equal(sampler.select(rows, keep=84), torch.arange(84))  # all kept: no picks
    with pytest.raises(ConfigError, match="keep=85"):
        sampler.select(rows, keep=85)


def test_coreset_picks_one_point_per_separated_cluster():
    points, labels = _clusters()
    idx = CoresetSampler(ratio=8 / len(points), projection_dim=None).select(points)
    assert sorted(labels[idx].tolist()) == list(range(8))


def test_coreset_covers_better_than_random_subset():
    # one big mode and ten rare ones, as with a few odd patches among many normal ones
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(11, 16, generator=g) * 10
    labels = torch.cat([torch.zeros(900, dtype=torch.long), torch.arange(1, 11).repeat(10)])
    points = centres[labels] + torch.randn(len(labels), 16, generator=g)
    idx = CoresetSampler(ratio=0.02, projection_dim=None).select(points)
    random_idx = torch.randperm(len(points), generator=g)[: len(idx)]
    assert set(labels[idx].tolist()) == set(range(11))
    assert _radius(points, idx) < 0.5 * _radius(points, random_idx)


def test_coreset_keeps_duplicates_unique():
    points = torch.randn(10, 4).repeat(20, 1)  # 10 distinct points, 200 rows
    idx = CoresetSampler(ratio=0.5, projection_dim=None).select(points)
    assert len(set(idx.tolist())) == 100
    assert len({tuple(points[i].tolist()) for i in idx.tolist()}) == 10


def test_coreset_projection_is_fixed_across_calls_and_batches():
    features = torch.randn(300, 256)
    sampler = CoresetSampler(projection_dim=32, seed=5)
    whole = sampler.project(features)
    batches = torch.cat([sampler.project(b) for b in features.split(64)])
    again = CoresetSampler(projection_dim=32, seed=5).project(features)
    assert whole.shape == (300, 32) and whole.dtype == torch.float32
    assert torch.equal(whole, batches) and torch.equal(whole, again)
    assert not torch.equal(whole, CoresetSampler(projection_dim=32, seed=6).project(features))


def test_coreset_projection_roughly_preserves_distances():
    features = torch.randn(200, 1024)
    projected = CoresetSampler(projection_dim=128).project(features)
    ratio = torch.pdist(projected) / torch.pdist(features)
    assert 0.7 < ratio.min() and ratio.max() < 1.3


def test_coreset_projection_identity_and_float16():
    features = torch.randn(50, 16)
    for dim in (None, 16, 64):
        assert torch.equal(CoresetSampler(projection_dim=dim).project(features), features)
    half = CoresetSampler(projection_dim=8).project(features.half())
    assert half.dtype == torch.float32 and half.shape == (50, 8)


def test_coreset_sample_is_select_of_project():
    features = torch.randn(400, 64)
    sampler = CoresetSampler(ratio=0.1, projection_dim=16)
    assert torch.equal(sampler.sample(features), sampler.select(sampler.project(features)))


def test_coreset_errors():
    with pytest.raises(ConfigError, match="ratio=0"):
        CoresetSampler(ratio=0)
    with pytest.raises(ConfigError, match="ratio=1.5"):
        CoresetSampler(ratio=1.5)
    with pytest.raises(ConfigError, match="max_size=0"):
        CoresetSampler(max_size=0)
    with pytest.raises(ConfigError, match="projection_dim=0"):
        CoresetSampler(projection_dim=0)
    with pytest.raises(DataError, match="non-empty"):
        CoresetSampler().select(torch.empty(0, 4))
    with pytest.raises(DataError, match="NaN"):
        CoresetSampler().select(torch.tensor([[0.0, math.nan], [1.0, 1.0]]))
    with pytest.raises(DataError, match=r"\(N, D\)"):
        CoresetSampler().project(torch.randn(10))
