"""PaDiM as one exportable module: chosen channels, Mahalanobis distance, anomaly map."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hamacho.components.features import map_chunks
from hamacho_padim.model import chosen_features


class PadimGraph(nn.Module):
    """Normalised (N, 3, h, w) -> scores (N,), maps (N, h, w), as ``Padim.predict`` scores."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        if model.mean is None or model.precision is None or model.grid is None:
            raise ValueError("PaDiM is not fitted: fit or load it before exporting")
        self.aggregator = model.aggregator
        self.grid = tuple(int(v) for v in model.grid)
        # per layer, the local indices of the chosen channels (selected before upsampling) and,
        # with selection orthogonal, that layer's rows of the projection: as Padim._embed_chunk
        self.layers = len(model._per_layer)
        for i, (idx, rows) in enumerate(zip(model._per_layer, model._rows, strict=True)):
            self.register_buffer(f"pick{i}", idx.detach().cpu().long())
            if rows is not None:
                self.register_buffer(f"rows{i}", rows.detach().cpu().float())
        self.projected = model.projection is not None
        self.register_buffer("mean", model.mean.detach().cpu().float())  # (P, d)
        self.register_buffer("precision", model.precision.detach().cpu().float())  # (P, d, d)
        self.anomaly_map = model.anomaly_map

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Score a normalised batch."""
        picks = [getattr(self, f"pick{i}") for i in range(self.layers)]
        rows = [getattr(self, f"rows{i}") if self.projected else None for i in range(self.layers)]
        # one backbone call for the whole batch (chunk 0: no loop over a dynamic batch size)
        emb, _ = map_chunks(
            self.aggregator, images, lambda feats: chosen_features(feats, picks, rows).flatten(2)
        )  # (N, d, P), as Padim._embed_chunk
        x = emb.permute(2, 0, 1)  # (P, N, d)
        delta = x - self.mean[:, None]  # (P, N, d)
        dist = (torch.bmm(delta, self.precision) * delta).sum(dim=2)  # (P, N)
        patch = dist.clamp(min=0).sqrt().T.reshape(-1, *self.grid)  # (N, h, w)
        maps = self.anomaly_map(patch, tuple(images.shape[-2:]))
        return maps.flatten(1).amax(dim=1), maps
