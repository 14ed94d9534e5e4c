"""A model's export module run on tiles, stitched back as ``runtime.predict_batch`` does."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hamacho.components.tiler import Tiler


class TiledCore(nn.Module):
    """Normalised (N, 3, c, c) -> scores (N,), maps (N, c, c) through ``core`` on each tile.

    The crop size ``c`` is fixed by the run, so the tile grid is too: tiles are static slices,
    each tile's map is padded into place and the sum divided by the constant overlap counts
    (Tiler.untile's average, without a scatter), and an image scores as its worst tile
    (runtime.per_image_max).
    """

    counts: torch.Tensor  # (c, c) how many tiles cover each pixel

    def __init__(self, core: nn.Module, tiler: Tiler, crop: int) -> None:
        super().__init__()
        self.core, self.tile, self.crop = core, tiler.tile_size, crop
        rows, cols = tiler.grid((crop, crop))
        self.starts = [(r, c) for r in rows for c in cols]  # row-major, as Tiler.tile
        counts = torch.zeros(crop, crop)
        for r, c in self.starts:
            counts[r : r + self.tile, c : c + self.tile] += 1
        self.register_buffer("counts", counts)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Score a normalised batch of crops."""
        t, size = self.tile, self.crop
        tiles = torch.stack([images[:, :, r : r + t, c : c + t] for r, c in self.starts], dim=1)
        scores, maps = self.core(tiles.flatten(0, 1))  # (N*T,), (N*T, t, t)
        maps = maps.reshape(-1, len(self.starts), t, t)
        total = torch.zeros_like(maps[:, 0, :1, :1]).expand(-1, size, size)  # (N, c, c)
        for i, (r, c) in enumerate(self.starts):  # each tile's map padded into its place
            total = total + F.pad(maps[:, i], (c, size - c - t, r, size - r - t))
        return scores.reshape(-1, len(self.starts)).amax(dim=1), total / self.counts
