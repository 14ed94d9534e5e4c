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
        channels = model.channels.cpu()
        bounds = torch.tensor([0, *model.aggregator.feature_dimensions()]).cumsum(0).tolist()
        # per layer, the local indices of the chosen channels (selected before upsampling)
        self.picks = [
            (channels[(channels >= lo) & (channels < hi)] - lo).tolist()
            for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)
        ]
        for i, pick in enumerate(self.picks):
            self.register_buffer(f"pick{i}", torch.tensor(pick, dtype=torch.long))
        self.register_buffer("mean", model.mean.detach().cpu().float())  # (P, d)
        self.register_buffer("precision", model.precision.detach().cpu().float())  # (P, d, d)
        self.anomaly_map = model.anomaly_map

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Score a normalised batch."""
        feats = list(self.aggregator(images).values())
        grid = feats[0].shape[-2:]
        parts = []
        for i, feat in enumerate(feats):
            if not self.picks[i]:
                continue
            part = feat.index_select(1, getattr(self, f"pick{i}"))  # (N, d_i, h_i, w_i)
            if part.shape[-2:] != grid:
                part = F.interpolate(part, size=grid, mode="nearest")
            parts.append(part)
        x = torch.cat(parts, dim=1).flatten(2).permute(2, 0, 1)  # (P, N, d)
        delta = x - self.mean[:, None]  # (P, N, d)
        dist = (torch.bmm(delta, self.precision) * delta).sum(dim=2)  # (P, N)
        patch = dist.clamp(min=0).sqrt().T.reshape(-1, *self.grid)  # (N, h, w)
        maps = self.anomaly_map(patch, tuple(images.shape[-2:]))
        return maps.flatten(1).amax(dim=1), maps
