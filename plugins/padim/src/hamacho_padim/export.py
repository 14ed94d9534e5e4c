"""PaDiM as one exportable module: chosen channels, Mahalanobis distance, anomaly map."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


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
        feats = list(self.aggregator(images).values())
        grid = feats[0].shape[-2:]
        parts = []
        for i, feat in enumerate(feats):
            pick = getattr(self, f"pick{i}")
            if not pick.numel():
                continue
            part = feat if pick.numel() == feat.shape[1] else feat.index_select(1, pick)
            if self.projected:  # project before upsampling: nearest only copies cells
                part = torch.einsum("bchw,cd->bdhw", part, getattr(self, f"rows{i}"))
            if part.shape[-2:] != grid:
                part = F.interpolate(part, size=grid, mode="nearest")
            parts.append(part)
        if self.projected:  # W^T x = the sum of each layer's rows times its features
            emb = parts[0]
            for part in parts[1:]:
                emb = emb + part
        else:
            emb = torch.cat(parts, dim=1)
        x = emb.flatten(2).permute(2, 0, 1)  # (P, N, d)
        delta = x - self.mean[:, None]  # (P, N, d)
        dist = (torch.bmm(delta, self.precision) * delta).sum(dim=2)  # (P, N)
        patch = dist.clamp(min=0).sqrt().T.reshape(-1, *self.grid)  # (N, h, w)
        maps = self.anomaly_map(patch, tuple(images.shape[-2:]))
        return maps.flatten(1).amax(dim=1), maps
