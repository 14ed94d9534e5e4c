"""PatchCore as one exportable module: embed, nearest bank row by matmul + min, anomaly map."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class PatchCoreGraph(nn.Module):
    """Normalised (N, 3, h, w) -> scores (N,), maps (N, h, w), as ``PatchCore.predict`` scores.

    The nearest neighbour is ||b||^2 - 2 q.b minimised over the bank (the torch search backend's
    formula) with the bank as a constant: plain MatMul + ArgMin, no cdist.
    """

    def __init__(self, model: Any) -> None:
        super().__init__()
        if model.bank is None:
            raise ValueError("PatchCore has no memory bank: fit or load it before exporting")
        # the embedder PatchCore.predict uses, shallow-copied so chunk=0 (one backbone call for
        # the whole batch, no loop over a dynamic batch size) leaves the model itself unchanged
        self.embedder = copy.copy(model.embedder)
        self.embedder.chunk = 0
        bank = model.bank.detach().to("cpu", torch.float32)  # (M, D)
        self.register_buffer("bank_t", bank.T.contiguous())  # (D, M)
        self.register_buffer("bank_sq", bank.square().sum(dim=1))  # (M,)
        self.anomaly_map = model.anomaly_map
        k = min(model.config.num_neighbors, len(bank)) if model.config.score == "paper" else 0
        self.reweight = k >= 2  # with one neighbour the paper's weight is undefined: max score
        if self.reweight:
            # the paper's score needs the k neighbours of the worst patch's nearest bank row m*:
            # m* is a bank row, so its neighbours are looked up once here, as a (M, k) table
            _, support = model.search.search(bank, k=k)
            self.register_buffer("bank", bank)
            self.register_buffer("support", support.long())

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Score a normalised batch."""
        emb, grid = self.embedder(images)  # (N, P, D)
        # (N, P, M) squared distances up to ||q||^2, which is constant per query
        partial = self.bank_sq - 2.0 * (emb @ self.bank_t)
        index = partial.argmin(dim=2)  # (N, P)
        # the distance to that row recomputed as ||q - b||: the expansion above cancels (float32
        # error ~1e-7 of ||q||^2), and the search's exact re-rank computes it this way too
        nearest = self.bank_t[:, index.flatten()].T.reshape(emb.shape)  # (N, P, D)
        patch = (emb - nearest).square().sum(dim=2).sqrt()  # (N, P)
        scores = patch.amax(dim=1)
        if self.reweight:
            scores = self._paper_scores(patch, emb, index)
        maps = self.anomaly_map(patch.reshape(-1, *grid), tuple(images.shape[-2:]))
        return scores, maps

    def _paper_scores(
        self, patch: torch.Tensor, emb: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        """reweighted_scores: the worst patch's score x (1 - softmax weight of its nearest)."""
        worst = patch.argmax(dim=1, keepdim=True)  # (N, 1)
        test_vec = emb.gather(1, worst[..., None].expand(-1, -1, emb.shape[2]))  # (N, 1, D)
        star = index.gather(1, worst)[:, 0]  # (N,) nearest bank row of the worst patch
        neighbours = self.bank[self.support[star]]  # (N, k, D)
        dists = (neighbours - test_vec).square().sum(dim=2).sqrt()  # (N, k)
        weights = 1.0 - torch.softmax(dists, dim=1)[:, 0]
        return weights * patch.gather(1, worst)[:, 0]
