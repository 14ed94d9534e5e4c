"""Cut images into (possibly overlapping) tiles and stitch per-tile outputs back together."""

from __future__ import annotations

from fractions import Fraction

import torch

from hamacho.errors import ConfigError


def _starts(size: int, tile: int, stride: int) -> list[int]:
    """Tile start offsets along one axis; the last tile is shifted to end at the border."""
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] + tile < size:
        starts.append(size - tile)
    return starts


def _scaled(value: int, scale: Fraction, what: str) -> int:
    """`value * scale` as an int, or ConfigError when it falls between output pixels."""
    scaled = value * scale
    if scaled.denominator != 1:
        raise ConfigError(
            f"tiler: {what} {value} times the tile output scale {scale} is not a whole pixel; "
            f"use a tile_size, stride and image size that are multiples of {scale.denominator}"
        )
    return int(scaled)


class Tiler:
    """Split (B, C, H, W) images into full-size tiles and average overlapping outputs back.

    Tiles are laid out row-major with step `stride`; when the image size is not a multiple of
    the step, the last row/column of tiles is moved to end at the border, so every tile is
    `tile_size` square and every pixel is covered.
    """

    def __init__(self, tile_size: int, stride: int | None = None) -> None:
        stride = tile_size if stride is None else stride
        if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < 1:
            raise ConfigError(f"tiler.tile_size must be a positive integer, got {tile_size!r}")
        if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= tile_size:
            raise ConfigError(
                f"tiler.stride must be an integer in [1, tile_size={tile_size}] so tiles leave no "
                f"gaps, got {stride!r}"
            )
        self.tile_size = tile_size
        self.stride = stride

    def __repr__(self) -> str:
        return f"Tiler(tile_size={self.tile_size}, stride={self.stride})"

    def grid(self, image_size: tuple[int, int]) -> tuple[list[int], list[int]]:
        """Row and column start offsets of the tiles for an image of `image_size` (H, W)."""
        height, width = (int(s) for s in image_size)
        if height < self.tile_size or width < self.tile_size:
            raise ConfigError(
                f"image {height}x{width} is smaller than tiler.tile_size={self.tile_size}; "
                f"use a tile_size of at most {min(height, width)} or a larger image size"
            )
        return (
            _starts(height, self.tile_size, self.stride),
            _starts(width, self.tile_size, self.stride),
        )

    def num_tiles(self, image_size: tuple[int, int]) -> int:
        """Number of tiles T per image of `image_size` (H, W)."""
        rows, cols = self.grid(image_size)
        return len(rows) * len(cols)

    def tile(self, images: torch.Tensor) -> torch.Tensor:
        """Cut (B, C, H, W) images into (B*T, C, t, t) tiles, batch-major then row-major."""
        if images.dim() != 4:
            raise ValueError(f"Tiler.tile expects (B, C, H, W), got shape {tuple(images.shape)}")
        channels = images.shape[1]
        size = (self.tile_size, self.tile_size)
        image_size = (images.shape[-2], images.shape[-1])
        rows, cols = self._pixel_index(image_size, size, images.device)
        # Advanced indexing broadcasts rows (R,1,t,1) against cols (1,K,1,t):
        # (B, C, H, W) -> (B, C, R, K, t, t) -> (B, R, K, C, t, t) -> (B*T, C, t, t)
        tiles = images[:, :, rows[:, None, :, None], cols[None, :, None, :]]
        tiles = tiles.permute(0, 2, 3, 1, 4, 5)
        return tiles.reshape(-1, channels, self.tile_size, self.tile_size)

    def untile(self, tiles: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """Stitch (B*T, C', h', w') tile outputs into (B, C', H*h'/t, W*w'/t), averaging overlaps.

        The per-tile output may have another resolution than the tile (e.g. a stride-8 feature
        map); the scale h'/t must map every tile edge onto a whole output pixel.
        """
        if tiles.dim() != 4:
            raise ValueError(f"Tiler.untile expects (B*T, C, h, w), got {tuple(tiles.shape)}")
        height, width = (int(s) for s in image_size)
        n_rows, n_cols = (len(starts) for starts in self.grid((height, width)))
        per_image = n_rows * n_cols
        if tiles.shape[0] % per_image:
            raise ValueError(
                f"Tiler.untile got {tiles.shape[0]} tiles, not a multiple of the {per_image} "
                f"tiles per {height}x{width} image; pass the image_size that was tiled"
            )
        batch, channels, out_h, out_w = tiles.shape[0] // per_image, *tiles.shape[1:]
        rows, cols = self._pixel_index((height, width), (out_h, out_w), tiles.device)
        full_h = _scaled(height, Fraction(out_h, self.tile_size), "image height")
        full_w = _scaled(width, Fraction(out_w, self.tile_size), "image width")

        # Flat output pixel of every tile pixel: (R, K, h', w') -> (T*h'*w',)
        flat = (rows[:, None, :, None] * full_w + cols[None, :, None, :]).reshape(-1)
        # (B*T, C', h', w') -> (B, C', T*h'*w'), same pixel order as `flat`
        values = tiles.reshape(batch, per_image, channels, out_h * out_w).transpose(1, 2)
        values = values.reshape(batch, channels, -1)
        if not values.is_floating_point():
            values = values.float()
        summed = values.new_zeros(batch, channels, full_h * full_w).index_add_(2, flat, values)
        counts = torch.bincount(flat, minlength=full_h * full_w).to(summed.dtype)
        return (summed / counts).reshape(batch, channels, full_h, full_w)

    def _pixel_index(
        self, image_size: tuple[int, int], out_size: tuple[int, int], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Output row indices (R, h') and column indices (K, w') covered by each tile."""
        row_starts, col_starts = self.grid(image_size)
        out_h, out_w = (int(s) for s in out_size)
        index = []
        for starts, out, what in ((row_starts, out_h, "tile row"), (col_starts, out_w, "tile col")):
            scale = Fraction(out, self.tile_size)
            if scale.numerator != 1 and scale.denominator != 1:
                raise ConfigError(
                    f"tiler: tile output size {out} is not an integer multiple or fraction of "
                    f"tile_size={self.tile_size}; the per-tile map must be t*k or t/k pixels"
                )
            offsets = torch.tensor([_scaled(s, scale, f"{what} start") for s in starts])
            index.append((offsets[:, None] + torch.arange(out)).to(device))
        return index[0], index[1]
