from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hamacho.components.tiler import Tiler
from hamacho.errors import ConfigError


def _images(batch: int, channels: int, height: int, width: int) -> torch.Tensor:
    return torch.randn(batch, channels, height, width, generator=torch.Generator().manual_seed(0))


def test_tile_order_batch_major_then_row_major():
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    tiles = Tiler(2).tile(x)
    assert tiles.shape == (8, 1, 2, 2)
    assert torch.equal(tiles[0], x[0, :, :2, :2])
    assert torch.equal(tiles[1], x[0, :, :2, 2:])
    assert torch.equal(tiles[2], x[0, :, 2:, :2])
    assert torch.equal(tiles[3], x[0, :, 2:, 2:])
    assert torch.equal(tiles[4], x[1, :, :2, :2])


def test_grid_shifts_last_tile_to_border():
    tiler = Tiler(4)
    assert tiler.grid((10, 8)) == ([0, 4, 6], [0, 4])
    assert Tiler(4, stride=3).grid((10, 4)) == ([0, 3, 6], [0])
    assert tiler.num_tiles((10, 8)) == 6


def test_tile_non_divisible_keeps_full_tiles():
    x = _images(1, 3, 10, 7)
    tiles = Tiler(4).tile(x)
    assert tiles.shape == (6, 3, 4, 4)
    assert torch.equal(tiles[-1], x[0, :, 6:10, 3:7])


@pytest.mark.parametrize(
    ("tile_size", "stride", "size"),
    [(4, None, (8, 8)), (4, 2, (10, 10)), (4, None, (10, 7)), (5, 3, (13, 11)), (6, 6, (6, 6))],
)
def test_untile_round_trip(tile_size, stride, size):
    x = _images(2, 3, *size)
    tiler = Tiler(tile_size, stride)
    assert torch.allclose(tiler.untile(tiler.tile(x), size), x, atol=1e-6)


def test_untile_averages_overlaps():
    tiler = Tiler(4, stride=2)
    tiles = torch.ones(9, 1, 4, 4)
    tiles[0] = 3.0  # top-left tile only
    out = tiler.untile(tiles, (8, 8))
    assert out[0, 0, 0, 0] == 3.0  # covered by tile 0 alone
    assert out[0, 0, 2, 2] == pytest.approx((3 + 1 + 1 + 1) / 4)  # covered by four tiles
    assert out[0, 0, 7, 7] == 1.0


def test_untile_downscaled_feature_maps_match_full_image():
    # A stride-8 "feature map" (8x8 average pooling) of overlapping, border-shifted tiles
    # stitched back must equal the same pooling applied to the whole image.
    x = _images(2, 3, 48, 40)
    tiler = Tiler(16, stride=8)
    features = F.avg_pool2d(tiler.tile(x), 8)  # (B*T, 3, 2, 2)
    out = tiler.untile(features, (48, 40))
    assert out.shape == (2, 3, 6, 5)
    assert torch.allclose(out, F.avg_pool2d(x, 8), atol=1e-6)


def test_untile_upscaled_outputs_and_new_channels():
    x = _images(1, 3, 12, 12)
    tiler = Tiler(8, stride=4)
    per_tile = F.interpolate(tiler.tile(x).sum(1, keepdim=True), scale_factor=2, mode="nearest")
    out = tiler.untile(per_tile, (12, 12))
    expected = F.interpolate(x.sum(1, keepdim=True), scale_factor=2, mode="nearest")
    assert out.shape == (1, 1, 24, 24)
    assert torch.allclose(out, expected, atol=1e-5)


def test_untile_integer_tiles_give_float_average():
    tiler = Tiler(2, stride=1)
    tiles = torch.zeros(4, 1, 2, 2, dtype=torch.int64)
    tiles[0] = 1
    out = tiler.untile(tiles, (3, 3))
    assert out.is_floating_point()
    assert out[0, 0, 1, 1].item() == pytest.approx(0.25)


def test_untile_non_integer_scale_raises():
    tiler = Tiler(16)
    with pytest.raises(ConfigError, match="tile_size=16"):
        tiler.untile(torch.zeros(4, 1, 6, 6), (32, 32))


def test_untile_misaligned_shifted_tile_raises():
    # Tiles start at 0, 16, 20 along W; 20 is not a multiple of the feature stride 8.
    tiler = Tiler(16)
    with pytest.raises(ConfigError, match="multiples of 8"):
        tiler.untile(torch.zeros(9, 1, 2, 2), (48, 36))


def test_untile_wrong_tile_count_raises():
    with pytest.raises(ValueError, match="not a multiple of the 4 tiles"):
        Tiler(4).untile(torch.zeros(6, 1, 4, 4), (8, 8))


def test_tile_image_smaller_than_tile_raises():
    with pytest.raises(ConfigError, match="smaller than tiler.tile_size=32"):
        Tiler(32).tile(torch.zeros(1, 3, 16, 64))


@pytest.mark.parametrize(("tile_size", "stride"), [(0, None), (4, 0), (4, 5), (4.0, None)])
def test_tiler_invalid_sizes_raise(tile_size, stride):
    with pytest.raises(ConfigError):
        Tiler(tile_size, stride)
