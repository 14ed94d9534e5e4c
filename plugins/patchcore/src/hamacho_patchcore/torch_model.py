"""PatchCore's patch embedding and image score, in plain torch."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hamacho.components.features import map_chunks, resize_maps


def _pool_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """adaptive_avg_pool1d from n_in to n_out values as a (n_out, n_in) float64 matrix."""
    eye = torch.eye(n_in, dtype=torch.float64)[:, None]  # n_in one-hot rows (n_in, 1, n_in)
    return F.adaptive_avg_pool1d(eye, n_out)[:, 0].T


def pooling_matrix(
    channels: Sequence[int], pretrain_embed_dim: int, embedding_dim: int
) -> torch.Tensor:
    """The two-step channel pooling as one linear map (embedding_dim, sum(channels)), float64.

    Each layer's channel vector is adaptive-average-pooled to ``pretrain_embed_dim``, the layers
    are stacked and pooled again to ``embedding_dim``; both steps are linear per position.
    """
    per_layer = torch.block_diag(*(_pool_matrix(c, pretrain_embed_dim) for c in channels))
    return _pool_matrix(per_layer.shape[0], embedding_dim) @ per_layer


class PatchEmbedder(nn.Module):
    """Images -> one locally aware embedding per feature-map position (PatchCore).

    ``aggregation`` picks how each position's neighbourhood becomes a vector:

    - ``official``: the official code's embedding (patchcore-inspection ``_embed``). Each layer's
      map is unfolded into (C, p, p) neighbourhoods (zero padded), every one of the C*p*p
      components is bilinearly upsampled to the first layer's grid, each position's
      channel-major C*p*p vector is adaptive-average-pooled to ``pretrain_embed_dim`` and the
      stacked layers to ``embedding_dim``. Pooling acts on the component axis and upsampling on
      the grid, so they commute: we pool at the layer's own resolution and upsample the pooled
      ``pretrain_embed_dim`` maps (9x fewer maps to upsample for wide_resnet50_2's layer3).
    - ``mean``: the p x p mean of each channel (the neighbourhood's structure is averaged away),
      upsampled, then the same two-step pooling of the C-vectors.
    - ``concat``: the p x p channel means concatenated as they are (anomalib's embedding), so
      every channel, not every layer, weighs the same in a distance.

    For ``mean`` the channel pooling is a fixed linear map M. When its rank r is below
    ``embedding_dim`` (e.g. 40 + 112 channels pooled up to 1024), embeddings are returned in r
    coordinates z = S V^T c (from M = U S V^T) instead: ||z - z'|| = ||M c - M c'|| exactly, so
    nearest neighbours and scores are unchanged at a fraction of the memory and search cost.
    ``basis`` (embedding_dim, r) maps them back: pooled embedding = z @ basis.T. (``official``
    for lite0 has rank 872 of 1024: too little to gain for a dense 1024 x 872 product per patch.)
    """

    def __init__(
        self,
        aggregator: nn.Module,
        channels: Sequence[int],
        patch_size: int,
        pretrain_embed_dim: int,
        embedding_dim: int,
        chunk: int = 0,
        aggregation: str = "official",
    ) -> None:
        super().__init__()
        self.aggregator = aggregator
        self.chunk = chunk  # images per backbone forward; 0 = the whole batch
        self.channels = [int(c) for c in channels]
        self.patch_size = patch_size
        self.pretrain_embed_dim = pretrain_embed_dim
        self.embedding_dim = embedding_dim
        self.aggregation = aggregation
        self.reduce: torch.Tensor | None = None  # (r, sum C): channels -> stored coordinates
        self.basis: torch.Tensor | None = None  # (embedding_dim, r)
        if aggregation == "concat":
            self.dim = sum(self.channels)
            return
        if aggregation == "official":
            self.dim = embedding_dim
            return
        matrix = pooling_matrix(self.channels, pretrain_embed_dim, embedding_dim)
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        rank = int((s > s[0] * 1e-9).sum())
        if rank < embedding_dim:
            self.reduce = (s[:rank, None] * vh[:rank]).float()
            self.basis = u[:, :rank].float()
        self.dim = rank  # == embedding_dim when the pooled embeddings are stored as they are

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, 3, H, W) -> embeddings (B, h*w, dim) float32 and the grid (h, w).

        The batch runs through the backbone ``chunk`` images at a time (``map_chunks``).
        """
        return map_chunks(self.aggregator, images, self._embed, self.chunk)

    def _embed(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.embed_features(features)[0]

    def embed_features(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, tuple[int, int]]:
        """Feature maps [(B, C_l, h_l, w_l)] -> embeddings (B, h*w, dim) on the first grid."""
        grid = features[0].shape[-2:]
        h, w = int(grid[0]), int(grid[1])
        if self.aggregation == "official":
            return official_embedding(
                features, self.patch_size, self.pretrain_embed_dim, self.embedding_dim
            ), (h, w)
        local = [self._local(fmap, grid) for fmap in features]
        if self.reduce is not None or self.aggregation == "concat":
            # (B, sum C, h, w) -> (B, h*w, sum C) [@ (sum C, r) -> (B, h*w, r)]
            stacked = torch.cat(local, dim=1).flatten(2).transpose(1, 2)
            if self.reduce is None:
                return stacked.contiguous(), (h, w)
            return stacked @ self.reduce.to(stacked.device).T, (h, w)
        # (B, C, h*w) per layer -> pooled along channels -> (B, layers * pretrain_dim, h*w)
        pooled = [_pool_dim1(fmap.flatten(2), self.pretrain_embed_dim) for fmap in local]
        embeddings = _pool_dim1(torch.cat(pooled, dim=1), self.embedding_dim)
        return embeddings.transpose(1, 2).contiguous(), (h, w)

    def _local(self, fmap: torch.Tensor, grid: torch.Size) -> torch.Tensor:
        """3x3 (patch_size) mean around each position, zero padded, then upsampled to ``grid``."""
        if self.patch_size > 1:
            pad = self.patch_size // 2
            fmap = F.avg_pool2d(fmap, self.patch_size, stride=1, padding=pad)
        return resize_maps([fmap], grid, "bilinear")[0]


def _pool_dim1(x: torch.Tensor, size: int) -> torch.Tensor:
    """adaptive_avg_pool1d along dim 1 of (B, K, P) -> (B, size, P), without transposing.

    Output o averages inputs [floor(o K / size), ceil((o + 1) K / size)), as torch's pooling
    does, summed in the same order; a few index_selects are ~10x faster on a CPU than
    adaptive_avg_pool2d over (K, P), whose windows cross the long P axis one by one.
    """
    k = x.shape[1]
    if k == size:
        return x
    if k % size == 0:
        return x.unflatten(1, (size, k // size)).mean(2)
    # windows from Python ints (k and size are static), so the graph exports with constants
    start = [(o * k) // size for o in range(size)]
    length = [((o + 1) * k + size - 1) // size - s for o, s in enumerate(start)]
    out = x.index_select(1, torch.tensor(start, device=x.device))
    for j in range(1, max(length)):
        longer = [o for o in range(size) if length[o] > j]  # the windows with a (j + 1)-th input
        shifted = torch.tensor([start[o] + j for o in longer], device=x.device)
        out.index_add_(1, torch.tensor(longer, device=x.device), x.index_select(1, shifted))
    return out / torch.tensor(length, dtype=x.dtype, device=x.device)[:, None]


def official_embedding(
    features: list[torch.Tensor], patch_size: int, pretrain_dim: int, dim: int
) -> torch.Tensor:
    """The official PatchCore embedding of feature maps [(B, C_l, h_l, w_l)]: (B, h*w, dim)."""
    b, _, h, w = features[0].shape
    layers = len(features)
    # The final pooling of the stacked layers (layer-major: the official torch.stack(dim=1)
    # then reshape) averages windows of r values; when no window straddles two layers each
    # layer's share is pooled on its own, before upsampling and without the stacked tensor.
    r = layers * pretrain_dim // dim
    split = (layers * pretrain_dim) % dim == 0 and pretrain_dim % r == 0
    share = dim // layers if split else pretrain_dim
    pooled = []
    for fmap in features:
        # (B, C, fh, fw) -> (B, C*p*p, fh*fw): channel-major (C, p, p) neighbourhoods
        patches = F.unfold(fmap, patch_size, padding=patch_size // 2)
        patches = _pool_dim1(_pool_dim1(patches, pretrain_dim), share)  # (B, share, fh*fw)
        pooled.append(patches.unflatten(2, fmap.shape[-2:]))
    grid = resize_maps(pooled, (h, w), "bilinear")  # (B, share, h, w) per layer
    stacked = torch.cat([m.flatten(2) for m in grid], dim=1)  # (B, layers * share, h*w)
    embeddings = stacked if split else _pool_dim1(stacked, dim)
    return embeddings.transpose(1, 2).contiguous()  # (B, h*w, dim)


def reweighted_scores(
    patch_scores: torch.Tensor,
    embeddings: torch.Tensor,
    bank: torch.Tensor,
    nn_index: torch.Tensor,
    search: object,
    num_neighbors: int,
) -> torch.Tensor:
    """The paper's image score: the max patch score scaled by how isolated its neighbour is.

    patch_scores (B, P) and nn_index (B, P) on the CPU (as the search returns them), embeddings
    (B, P, D) and ``bank`` (N, D) where they live: only the rows used are read, on the bank's
    device, so the bank is never copied. With one neighbour the weight is undefined (softmax of
    one value), so the max score is returned.
    """
    b = patch_scores.shape[0]
    k = min(num_neighbors, bank.shape[0])
    if k < 2:
        return patch_scores.amax(dim=1)
    worst = patch_scores.argmax(dim=1)  # (B,)
    rows = torch.arange(b)
    device = bank.device
    test_vec = embeddings[rows.to(embeddings.device), worst.to(embeddings.device)]
    test_vec = test_vec.to(device, torch.float32)  # (B, D)
    star = bank[nn_index[rows, worst].to(device)].float()  # (B, D): its nearest bank patch m*
    _, support = search.search(star, k=k)  # (B, k) neighbours of m* in the bank
    dists = torch.linalg.vector_norm(bank[support.to(device)].float() - test_vec[:, None], dim=-1)
    # 1 - softmax weight of the nearest one among m*'s neighbourhood
    weights = 1.0 - torch.softmax(dists, dim=1)[:, 0]
    return weights.cpu() * patch_scores[rows, worst]
