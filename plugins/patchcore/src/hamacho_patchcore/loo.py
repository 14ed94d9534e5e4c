"""Leave-one-out nearest neighbours: each training patch against the other images' bank rows."""

from __future__ import annotations

import torch

from hamacho.components.search import pca_basis

_TILE = 2**22  # floats per (queries x bank) distance tile


class OtherImageSearch:
    """Exact nearest bank row from another image, with candidates from a PCA of the bank.

    Own-image rows are masked out of the candidate search itself, so no query loses its
    candidates. The basis is orthonormal, so a row's PCA distance never exceeds its true
    distance: when the best exact distance among a query's ``rerank`` candidates is at most
    the last candidate's PCA distance, no other row is nearer. The few queries without that
    certificate get the exact masked search. ``source`` (N,) is the image of each bank row.
    """

    def __init__(self, bank: torch.Tensor, source: torch.Tensor, dim: int, rerank: int) -> None:
        self.full = bank.float()  # once per pass, not per batch
        self.full_sq = self.full.square().sum(1)
        self.source = source.to(bank.device)
        self.rerank = max(1, min(rerank, len(bank)))
        self.last_uncertain = 0  # queries of the last call that needed the exact search
        self.low: torch.Tensor | None = None  # the bank's PCA coordinates (N, dim)
        if dim and bank.shape[1] >= 2 * dim:
            self.mean, self.basis = pca_basis(self.full, dim)
            self.low = (self.full - self.mean) @ self.basis
            self.low_sq = self.low.square().sum(1)

    def nearest(
        self, queries: torch.Tensor, owner: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Distance (M,) and bank index (M,) of each query's nearest row from image != owner."""
        queries = queries.to(self.full.device, torch.float32)
        owner = owner.to(self.full.device)
        if self.low is None:
            return masked_nearest(self.full, self.full_sq, self.source, queries, owner)
        dist = torch.empty(len(queries))
        idx = torch.empty(len(queries), dtype=torch.int64)
        uncertain = []
        step = max(1, _TILE // len(self.full))
        for s in range(0, len(queries), step):
            q, own = queries[s : s + step], owner[s : s + step]
            lq = (q - self.mean) @ self.basis
            lq_sq = lq.square().sum(1)
            low = torch.addmm(self.low_sq, lq, self.low.T, alpha=-2) + lq_sq[:, None]
            low.masked_fill_(self.source[None] == own[:, None], torch.inf)
            low_d, cand = low.topk(self.rerank, dim=1, largest=False, sorted=True)
            exact = (self.full[cand] - q[:, None]).square_().sum(-1)  # (m, rerank) squared
            exact.masked_fill_(low_d.isinf(), torch.inf)  # fewer other rows than candidates
            best_d, best = exact.min(dim=1)
            # float32 rounding of the PCA distances is ~1e-6 of the squared norms: keep a margin
            bound = low_d[:, -1] - 1e-5 * (lq_sq + self.low_sq.max())
            uncertain.append((best_d > bound).nonzero()[:, 0] + s)
            dist[s : s + step] = best_d.clamp_min(0).sqrt().cpu()
            idx[s : s + step] = cand.gather(1, best[:, None])[:, 0].cpu()
        redo = torch.cat(uncertain)
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
