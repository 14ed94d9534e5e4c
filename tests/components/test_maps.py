from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from hamacho.components.maps import AnomalyMapGenerator, gaussian_blur2d
from hamacho.errors import ConfigError


def _scores(*shape: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(0), dtype=dtype)


def _scipy_reference(patch_scores: torch.Tensor, size: tuple[int, int], sigma: float) -> np.ndarray:
    up = F.interpolate(patch_scores[:, None], size=size, mode="bilinear", align_corners=False)
    return np.stack([ndimage.gaussian_filter(m, sigma=sigma) for m in up[:, 0].numpy()])


def test_generator_matches_scipy_gaussian_filter():
    patch_scores = _scores(2, 7, 9)
    maps = AnomalyMapGenerator(sigma=4.0)(patch_scores, (56, 72))
    expected = _scipy_reference(patch_scores, (56, 72), 4.0)
    assert maps.shape == (2, 56, 72)
    assert np.allclose(maps[:, 16:-16, 16:-16].numpy(), expected[:, 16:-16, 16:-16], atol=1e-10)
    # Borders too: padding is half-sample symmetric like scipy's default "reflect" mode.
    assert np.allclose(maps.numpy(), expected, atol=1e-10)


def test_generator_float32_close_to_scipy():
    patch_scores = _scores(3, 28, 28, dtype=torch.float32)
    maps = AnomalyMapGenerator()(patch_scores, (224, 224))
    expected = _scipy_reference(patch_scores.double(), (224, 224), 4.0)
    assert maps.dtype == torch.float32
    assert np.abs(maps.numpy() - expected).max() < 1e-5


def test_blur_radius_larger_than_map_matches_scipy():
    maps = _scores(1, 5, 6)
    blurred = gaussian_blur2d(maps, sigma=4.0)
    assert np.allclose(blurred[0].numpy(), ndimage.gaussian_filter(maps[0].numpy(), 4.0))


@pytest.mark.parametrize("size", [(1, 40), (5, 6), (30, 41)])
def test_blur_mirror_border_matches_scipy_mirror(size):
    maps = _scores(1, *size)
    blurred = gaussian_blur2d(maps, sigma=4.0, border="mirror")
    expected = ndimage.gaussian_filter(maps[0].numpy(), 4.0, mode="mirror")
    assert np.allclose(blurred[0].numpy(), expected, atol=1e-12)
    # the two modes differ at the edges only
    reflect = gaussian_blur2d(maps, sigma=4.0)
    assert not torch.allclose(blurred, reflect)


def test_generator_rejects_unknown_border():
    with pytest.raises(
        ConfigError, match="model.border must be one of reflect, mirror, got 'wrap'"
    ):
        AnomalyMapGenerator(border="wrap")


@pytest.mark.parametrize("sigma", [0.0, 2.0])
def test_blur_rejects_unknown_border_instead_of_reflecting(sigma):
    with pytest.raises(ConfigError, match="model.border must be one of reflect, mirror"):
        gaussian_blur2d(_scores(1, 8, 8), sigma=sigma, border="nearest")


def test_blur_kernel_size_follows_truncate_rule():
    impulse = torch.zeros(1, 101, 101, dtype=torch.float64)
    impulse[0, 50, 50] = 1.0
    support = (gaussian_blur2d(impulse, sigma=4.0)[0, 50] > 0).sum().item()
    assert support == 2 * int(4 * 4.0 + 0.5) + 1
    assert gaussian_blur2d(impulse, sigma=4.0).sum().item() == pytest.approx(1.0)


def test_generator_sigma_zero_is_plain_bilinear():
    patch_scores = _scores(2, 4, 4)
    maps = AnomalyMapGenerator(sigma=0)(patch_scores, (16, 16))
    expected = F.interpolate(patch_scores[:, None], size=(16, 16), mode="bilinear")[:, 0]
    assert torch.equal(maps, expected)


def test_generator_constant_scores_stay_constant():
    maps = AnomalyMapGenerator(sigma=2.0)(torch.full((2, 3, 3), 0.7), (24, 30))
    assert torch.allclose(maps, torch.full((2, 24, 30), 0.7))


def test_generator_accepts_channel_axis_and_is_per_image():
    patch_scores = _scores(3, 1, 6, 6)
    generator = AnomalyMapGenerator(sigma=1.5)
    batched = generator(patch_scores, (24, 24))
    single = generator(patch_scores[1:2], (24, 24))
    assert batched.shape == (3, 24, 24)
    assert torch.allclose(batched[1:2], single)


def test_generator_same_size_skips_upsampling():
    patch_scores = _scores(1, 20, 20)
    maps = AnomalyMapGenerator(sigma=1.0)(patch_scores, (20, 20))
    assert np.allclose(maps[0].numpy(), ndimage.gaussian_filter(patch_scores[0].numpy(), 1.0))


@pytest.mark.parametrize("sigma", [-1.0, float("inf"), float("nan"), "4"])
def test_generator_invalid_sigma_raises(sigma):
    with pytest.raises(ConfigError, match=r"^model\.sigma must be"):
        AnomalyMapGenerator(sigma=sigma)


def test_generator_wrong_rank_raises():
    with pytest.raises(ValueError, match=r"\(B, h, w\)"):
        AnomalyMapGenerator()(torch.zeros(4, 4), (8, 8))
