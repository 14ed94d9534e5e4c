"""Leave-one-out nearest neighbours: each training patch against the other images' bank rows."""

from __future__ import annotations

import torch

from hamacho.components.bounded import BoundedNearest, fast_dtype
from hamacho.components.search import pca_basis

_TILE = 2**22  # floats per (queries x bank) distance tile


class OtherImageSearch:
    """Exact nearest bank row from another image, pruned by PCA lower bounds.

    Own-image rows are masked out of the bounds themselves (see ``BoundedNearest``), so no
    query loses its candidates; the few queries the bounds cannot settle get the exact masked
    search. ``source`` (N,) is the image of each bank row.
    """

    def __init__(
        self,
        bank: torch.Tensor,
        source: torch.Tensor,
        dim: int,
        dtype: torch.dtype | None = None,  # of the bounds; None: bfloat16 where it is fast
    ) -> None:
        self.full = bank.float()  # once per pass, not per batch
        self.full_sq = self.full.square().sum(1)
        self.source = source.to(bank.device)
        self.last_uncertain = 0  # queries of the last call that needed the exact search
        self.bounded: BoundedNearest | None = None
        if dim and bank.shape[1] >= 2 * dim:
            mean, basis = pca_basis(self.full, dim)
            dtype = dtype or fast_dtype(bank.device)
            self.bounded = BoundedNearest(bank, mean, basis, dtype)

    def nearest(
        self, queries: torch.Tensor, owner: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Distance (M,) and bank index (M,) of each query's nearest row from image != owner."""
        queries = queries.to(self.full.device, torch.float32)
        owner = owner.to(self.full.device)
        if self.bounded is None:
            return masked_nearest(self.full, self.full_sq, self.source, queries, owner)
        squared, idx, redo = self.bounded.nearest(queries, exclude=(owner, self.source))
        dist = squared.clamp_min_(0).sqrt_()
        self.last_uncertain = len(redo)
        if len(redo):
            dist[redo], idx[redo] = masked_nearest(
                self.full, self.full_sq, self.source, queries[redo], owner[redo]
            )
        return dist, idx


def masked_nearest(
    full: torch.Tensor,
    full_sq: torch.Tensor,
    source: torch.Tensor,
    queries: torch.Tensor,
    owner: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact nearest row of float32 ``full`` from another image: (dist, index); inf if none."""
    step = max(1, _TILE // full.shape[0])
    dist = torch.empty(len(queries))
    idx = torch.empty(len(queries), dtype=torch.int64)
    for start in range(0, len(queries), step):
        q = queries[start : start + step].to(full.device, torch.float32)
        # ||q - b||^2 = ||q||^2 + ||b||^2 - 2 q.b : (m, N), same-image rows masked out
        sq = torch.addmm(full_sq, q, full.T, alpha=-2) + q.square().sum(1, keepdim=True)
        own = owner[start : start + step, None].to(sq.device)
        sq.masked_fill_(source[None].to(sq.device) == own, torch.inf)
        d, i = sq.min(dim=1)
        dist[start : start + step], idx[start : start + step] = d.clamp_min(0).sqrt().cpu(), i.cpu()
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
