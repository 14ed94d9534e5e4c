"""PatchCore's patch embedding and image score, in plain torch."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _pool_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """adaptive_avg_pool1d from n_in to n_out values as a (n_out, n_in) float64 matrix."""
    eye = torch.eye(n_in, dtype=torch.float64)[:, None]  # n_in one-hot rows (n_in, 1, n_in)
    return F.adaptive_avg_pool1d(eye, n_out)[:, 0].T


def recipe_matrix(
    channels: Sequence[int], pretrain_embed_dim: int, embedding_dim: int
) -> torch.Tensor:
    """The recipe's channel pooling as one linear map (embedding_dim, sum(channels)), float64.

    Each layer's channel vector is adaptive-average-pooled to ``pretrain_embed_dim``, the layers
    are stacked and pooled again to ``embedding_dim``; both steps are linear per position.
    """
    per_layer = torch.block_diag(*(_pool_matrix(c, pretrain_embed_dim) for c in channels))
    return _pool_matrix(per_layer.shape[0], embedding_dim) @ per_layer


class PatchEmbedder(nn.Module):
    """Images -> one locally aware embedding per feature-map position (the PatchCore recipe).

    Each layer's map is averaged over a ``patch_size`` neighbourhood and bilinearly upsampled to
    the first layer's grid; per position, each layer's channel vector is pooled to
    ``pretrain_embed_dim`` and the layers together to ``embedding_dim``.

    That channel pooling is a fixed linear map M. When its rank r is below ``embedding_dim``
    (e.g. 40 + 112 channels pooled up to 1024), embeddings are returned in r coordinates
    z = S V^T c (from M = U S V^T) instead: ||z - z'|| = ||M c - M c'|| exactly, so nearest
    neighbours and scores are those of the recipe at a fraction of the memory and search cost.
    ``basis`` (embedding_dim, r) maps them back: recipe embedding = z @ basis.T.

    ``concat=True`` skips the channel pooling: the layers' channels are concatenated as they are
    (anomalib's embedding), so every channel, not every layer, weighs the same in a distance.
    """

    def __init__(
        self,
        aggregator: nn.Module,
        channels: Sequence[int],
        patch_size: int,
        pretrain_embed_dim: int,
        embedding_dim: int,
        chunk: int = 0,
        concat: bool = False,
    ) -> None:
        super().__init__()
        self.aggregator = aggregator
        self.chunk = chunk  # images per backbone forward; 0 = the whole batch
        self.channels = [int(c) for c in channels]
        self.patch_size = patch_size
        self.pretrain_embed_dim = pretrain_embed_dim
        self.embedding_dim = embedding_dim
        self.concat = concat
        self.reduce: torch.Tensor | None = None  # (r, sum C): channels -> stored coordinates
        self.basis: torch.Tensor | None = None  # (embedding_dim, r)
        if concat:
            self.dim = sum(self.channels)
            return
        matrix = recipe_matrix(self.channels, pretrain_embed_dim, embedding_dim)
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        rank = int((s > s[0] * 1e-9).sum())
        if rank < embedding_dim:
            self.reduce = (s[:rank, None] * vh[:rank]).float()
            self.basis = u[:, :rank].float()
        self.dim = rank  # == embedding_dim when the pooled embeddings are stored as they are

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, 3, H, W) -> embeddings (B, h*w, dim) float32 and the grid (h, w).

        The batch runs through the backbone ``chunk`` images at a time: on a CPU a few images'
        activations stay in cache, which is ~2.5x faster per image than 32 at once.
        """
        b = images.shape[0]
        step = self.chunk if 0 < self.chunk < b else b
        if step == b:  # before the loop: with chunk=0 an export sees no loop over a dynamic batch
            return self._embed(images)
        out: torch.Tensor | None = None
        for start in range(0, b, step):
            emb, grid = self._embed(images[start : start + step])
            if out is None:
                out = emb.new_empty((b, *emb.shape[1:]))
            out[start : start + len(emb)] = emb
        return out, grid

    def _embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        features = list(self.aggregator(images).values())
        grid = features[0].shape[-2:]
        local = [self._local(fmap, grid) for fmap in features]
        b, (h, w) = images.shape[0], grid
        if self.concat or self.reduce is not None:
            # (B, sum C, h, w) -> (B, h*w, sum C) [@ (sum C, r) -> (B, h*w, r)]
            stacked = torch.cat(local, dim=1).flatten(2).transpose(1, 2)
            if self.reduce is None:
                return stacked.contiguous(), (int(h), int(w))
            return stacked @ self.reduce.to(stacked.device).T, (int(h), int(w))
        pooled = []
        for fmap in local:
            # (B, C, h, w) -> (B*h*w, 1, C) -> (B*h*w, 1, pretrain_dim)
            vectors = fmap.permute(0, 2, 3, 1).reshape(b * h * w, 1, fmap.shape[1])
            pooled.append(F.adaptive_avg_pool1d(vectors, self.pretrain_embed_dim))
        stacked = torch.cat(pooled, dim=2)  # (B*h*w, 1, layers * pretrain_dim)
        embeddings = F.adaptive_avg_pool1d(stacked, self.embedding_dim)
        return embeddings.reshape(b, h * w, self.embedding_dim), (int(h), int(w))

    def _local(self, fmap: torch.Tensor, grid: torch.Size) -> torch.Tensor:
        """3x3 (patch_size) mean around each position, zero padded, then upsampled to ``grid``."""
        if self.patch_size > 1:
            pad = self.patch_size // 2
            fmap = F.avg_pool2d(fmap, self.patch_size, stride=1, padding=pad)
        if fmap.shape[-2:] != grid:
            fmap = F.interpolate(fmap, size=grid, mode="bilinear", align_corners=False)
        return fmap


def reweighted_scores(
    patch_scores: torch.Tensor,
    embeddings: torch.Tensor,
    bank: torch.Tensor,
    nn_index: torch.Tensor,
    search: object,
    num_neighbors: int,
) -> torch.Tensor:
    """The paper's image score: the max patch score scaled by how isolated its neighbour is.

    patch_scores (B, P), embeddings (B, P, D), nn_index (B, P) into ``bank`` (N, D). With one
    neighbour the weight is undefined (softmax of one value), so the max score is returned.
    """
    b = patch_scores.shape[0]
    k = min(num_neighbors, bank.shape[0])
    if k < 2:
        return patch_scores.amax(dim=1)
    worst = patch_scores.argmax(dim=1)  # (B,)
    rows = torch.arange(b)
    test_vec = embeddings[rows, worst].float()  # (B, D)
    star = bank[nn_index[rows, worst]].float()  # (B, D): its nearest bank patch m*
    _, support = search.search(star, k=k)  # (B, k) neighbours of m* in the bank
    dists = torch.linalg.vector_norm(bank[support].float() - test_vec[:, None], dim=-1)
    # 1 - softmax weight of the nearest one among m*'s neighbourhood
    weights = 1.0 - torch.softmax(dists, dim=1)[:, 0]
    return weights * patch_scores[rows, worst]
