"""Leave-one-out nearest neighbours: each training patch against the other images' bank rows."""

from __future__ import annotations

from typing import Any

import torch

_TILE = 2**22  # floats per (queries x bank) distance tile of the masked exact search


def nearest_other(
    search: Any,
    bank: torch.Tensor,
    source: torch.Tensor,
    queries: torch.Tensor,
    owner: torch.Tensor,
    candidates: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance (M,) and bank index (M,) of each query's nearest row from another image.

    ``source`` (N,) is the image of each bank row, ``owner`` (M,) that of each query. The
    ``candidates`` nearest rows come from ``search``; the first one from another image wins.
    The rare query whose candidates all come from its own image gets an exact masked search.
    """
    k = min(candidates, bank.shape[0])
    dist, idx = search.search(queries, k=k)  # (M, k), nearest first
    other = source[idx] != owner[:, None]
    first = other.to(torch.uint8).argmax(dim=1)  # the first candidate from another image
    rows = torch.arange(len(queries))
    best_d, best_i = dist[rows, first], idx[rows, first]
    lost = (~other.any(dim=1)).nonzero()[:, 0]
    if len(lost):
        best_d[lost], best_i[lost] = masked_nearest(bank, source, queries[lost], owner[lost])
    return best_d, best_i


def masked_nearest(
    bank: torch.Tensor, source: torch.Tensor, queries: torch.Tensor, owner: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact nearest bank row from another image: (distances (M,), indices (M,)); inf if none."""
    full = bank.float()
    full_sq = full.square().sum(1)
    step = max(1, _TILE // full.shape[0])
    dist = torch.empty(len(queries))
    idx = torch.empty(len(queries), dtype=torch.int64)
    for start in range(0, len(queries), step):
        q = queries[start : start + step].to(full.device, torch.float32)
        # ||q - b||^2 = ||q||^2 + ||b||^2 - 2 q.b : (m, N), same-image rows masked out
        sq = torch.addmm(full_sq, q, full.T, alpha=-2) + q.square().sum(1, keepdim=True)
        sq.masked_fill_(source[None].to(sq.device) == owner[start : start + step, None], torch.inf)
        d, i = sq.min(dim=1)
        dist[start : start + step], idx[start : start + step] = d.clamp_min(0).sqrt().cpu(), i
    return dist, idx


def reweighted_other(
    patch_scores: torch.Tensor,
    embeddings: torch.Tensor,
    bank: torch.Tensor,
    nn_index: torch.Tensor,
    source: torch.Tensor,
    image: torch.Tensor,
    num_neighbors: int,
) -> torch.Tensor:
    """The paper's image score (see ``reweighted_scores``) with each image's own rows left out.

    patch_scores (B, P), embeddings (B, P, D), nn_index (B, P) into ``bank`` (N, D), ``image``
    (B,) the source index of each image.
    """
    b = patch_scores.shape[0]
    k = min(num_neighbors, bank.shape[0])
    if k < 2:
        return patch_scores.amax(dim=1)
    rows = torch.arange(b)
    worst = patch_scores.argmax(dim=1)  # (B,)
    test_vec = embeddings[rows, worst].float()  # (B, D)
    full = bank.float()
    star = full[nn_index[rows, worst]]  # (B, D): its nearest other-image bank patch m*
    around = torch.cdist(star, full)  # (B, N): m*'s neighbourhood, without the image's rows
    around.masked_fill_(source[None] == image[:, None], torch.inf)
    support = around.topk(k, dim=1, largest=False).indices  # (B, k), m* first
    dists = torch.linalg.vector_norm(full[support] - test_vec[:, None], dim=-1)
    weights = 1.0 - torch.softmax(dists, dim=1)[:, 0]
    return weights * patch_scores[rows, worst]
