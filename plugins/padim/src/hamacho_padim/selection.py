"""Which features PaDiM models: every channel, a seeded subset or projection, or top variance."""

from __future__ import annotations

from typing import Literal

import torch

Selection = Literal["auto", "all", "random", "orthogonal", "variance"]
PAPER_FEATURES = {448: 100, 1792: 550}  # resnet18, wide_resnet50_2 (layer1-3)
DEFAULT_FRACTION, DEFAULT_MAX_FEATURES = 0.3, 550
# auto keeps every channel while their covariances stay this small (lite0 blocks.1+2+4 at 224 px:
# 3136 x 176^2 x 4 B = 0.39 GB; resnet18 layer1-3: 2.5 GB, wide_resnet50_2: 40 GB)
AUTO_MAX_BYTES = 1 << 30


def default_n_features(total: int) -> int:
    """The paper's subset for its backbones (100 of 448, 550 of 1792), else 30 % capped at 550."""
    if total in PAPER_FEATURES:
        return PAPER_FEATURES[total]
    return min(total, DEFAULT_MAX_FEATURES, max(1, round(DEFAULT_FRACTION * total)))


def memory_needed(positions: int, n_features: int) -> int:
    """Bytes of the fitted state: a float32 (d, d) matrix per position (the mean is negligible)."""
    return positions * n_features * n_features * 4


def resolve_auto(selection: Selection, n_features: int, total: int, positions: int) -> Selection:
    """What ``auto`` means for this backbone and grid; other choices are returned unchanged.

    ``auto`` with ``n_features`` set is the paper's seeded random subset; without, every channel
    while their covariances fit in AUTO_MAX_BYTES, else a seeded semi-orthogonal projection (its
    accuracy varies far less with the seed than a random subset's).
    """
    if selection != "auto":
        return selection
    if n_features:
        return "random"
    return "all" if memory_needed(positions, total) <= AUTO_MAX_BYTES else "orthogonal"


def random_channels(total: int, d: int, seed: int) -> torch.Tensor:
    """The paper's choice: d of ``total`` channels drawn with ``seed``, sorted."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(total, generator=gen)[:d].sort().values


def semi_orthogonal(total: int, d: int, seed: int) -> torch.Tensor:
    """(total, d) W with W^T W = I, uniform over such matrices (Kim et al. 2021; QR of N(0, 1))."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(total, d, generator=gen, dtype=torch.float64))
    # sign fix: makes the draw uniform (Haar) rather than biased by QR's sign convention
    return (q * torch.sign(torch.diagonal(r))).float()


def top_variance(variance: torch.Tensor, d: int) -> torch.Tensor:
    """The d channels of largest variance (P, total) summed over positions, sorted (ties: index)."""
    total = variance.sum(0).double()
    order = sorted(range(total.numel()), key=lambda i: (-float(total[i]), i))
    return torch.tensor(sorted(order[:d]), dtype=torch.long)
