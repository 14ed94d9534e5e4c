"""PatchCore's patch embedding: backbone features -> locally aware patch vectors."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchEmbedder(nn.Module):
    """Turns images into one embedding per feature-map position (official PatchCore recipe).

    Each layer's map is averaged over a ``patch_size`` neighbourhood, upsampled to the first
    layer's grid, its channel vector pooled to ``pretrain_embed_dim``, then all layers pooled
    together to ``embedding_dim``.
    """

    def __init__(
        self, aggregator: nn.Module, patch_size: int, pretrain_embed_dim: int, embedding_dim: int
    ) -> None:
        super().__init__()
        self.aggregator = aggregator
        self.patch_size = patch_size
        self.pretrain_embed_dim = pretrain_embed_dim
        self.embedding_dim = embedding_dim

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, 3, H, W) -> embeddings (B, h*w, embedding_dim) and the grid (h, w)."""
        features = list(self.aggregator(images).values())
        grid = features[0].shape[-2:]
        pooled = []
        for fmap in features:
            if self.patch_size > 1:
                pad = self.patch_size // 2
                fmap = F.avg_pool2d(fmap, self.patch_size, stride=1, padding=pad)
            if fmap.shape[-2:] != grid:
                fmap = F.interpolate(fmap, size=grid, mode="bilinear", align_corners=False)
            b, c, h, w = fmap.shape
            # (B, C, h, w) -> (B*h*w, 1, C) -> pooled channel vector (B*h*w, pretrain_dim)
            vectors = fmap.permute(0, 2, 3, 1).reshape(b * h * w, 1, c)
            pooled.append(F.adaptive_avg_pool1d(vectors, self.pretrain_embed_dim))
        stacked = torch.cat(pooled, dim=2)  # (B*h*w, 1, layers*pretrain_dim)
        embeddings = F.adaptive_avg_pool1d(stacked, self.embedding_dim).squeeze(1)
        b = images.shape[0]
        return embeddings.reshape(b, -1, self.embedding_dim), (int(grid[0]), int(grid[1]))


def reweighted_scores(
    patch_scores: torch.Tensor,
    embeddings: torch.Tensor,
    bank: torch.Tensor,
    nn_index: torch.Tensor,
    search: object,
    num_neighbors: int,
) -> torch.Tensor:
    """The paper's image score: the max patch score scaled by how isolated its neighbour is.

    patch_scores (B, P), embeddings (B, P, D), nn_index (B, P) into ``bank`` (N, D).
    """
    b = patch_scores.shape[0]
    worst = patch_scores.argmax(dim=1)  # (B,)
    rows = torch.arange(b)
    test_vec = embeddings[rows, worst].float()  # (B, D)
    star = bank[nn_index[rows, worst]].float()  # (B, D): its nearest bank patch
    k = min(num_neighbors, bank.shape[0])
    _, support = search.search(star, k=k)  # (B, k) neighbours of m* in the bank
    dists = torch.linalg.vector_norm(bank[support].float() - test_vec[:, None], dim=-1)
    # 1 - softmax weight of the nearest one among m*'s neighbourhood
    weights = 1.0 - torch.softmax(dists, dim=1)[:, 0]
    return weights * patch_scores[rows, worst]
