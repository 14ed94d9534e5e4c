"""Turn coarse patch scores into smooth full-resolution anomaly maps."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hamacho.errors import ConfigError


def _gaussian_kernel(sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Normalised 1-D Gaussian with radius int(4*sigma + 0.5), as scipy.ndimage truncates it."""
    radius = int(4.0 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).to(device=device, dtype=dtype)


BORDERS = ("reflect", "mirror")


def _symmetric_index(
    size: int, radius: int, device: torch.device, border: str = "reflect"
) -> torch.Tensor:
    """Indices padding an axis by `radius` with scipy.ndimage's symmetric border modes.

    "reflect" repeats the edge sample (d c b a | a b c d), scipy's default and the papers'
    reference code's choice; "mirror" does not (d c b | a b c d), like torch/kornia "reflect"
    padding, which anomalib uses. Unlike torch's padding both work for any radius: the mirror
    image repeats with period 2*size (2*size - 2 for "mirror").
    """
    pos = torch.arange(-radius, size + radius, device=device)
    if border == "mirror":
        if size == 1:
            return torch.zeros_like(pos)
        pos = pos % (2 * size - 2)
        return torch.where(pos < size, pos, 2 * size - 2 - pos)
    pos = pos % (2 * size)
    return torch.where(pos < size, pos, 2 * size - 1 - pos)


def _check_border(border: str) -> None:
    # Both plugins expose these as model.border / model.sigma: name the setting to fix.
    if border not in BORDERS:
        raise ConfigError(f"model.border must be one of {', '.join(BORDERS)}, got {border!r}")


def gaussian_blur2d(maps: torch.Tensor, sigma: float, border: str = "reflect") -> torch.Tensor:
    """Blur (B, H, W) maps with a separable Gaussian, matching scipy.ndimage.gaussian_filter
    with ``mode=border`` ("reflect" or "mirror")."""
    _check_border(border)  # also with sigma 0: a misspelt border should not pass silently
    if sigma <= 0:
        return maps
    kernel = _gaussian_kernel(sigma, maps.dtype, maps.device)
    radius = kernel.numel() // 2
    height, width = maps.shape[-2:]
    x = maps[:, None]  # (B, H, W) -> (B, 1, H, W) for conv2d
    x = x[..., _symmetric_index(width, radius, maps.device, border)]  # (B, 1, H, W + 2r)
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))  # (B, 1, H, W)
    x = x[..., _symmetric_index(height, radius, maps.device, border), :]  # (B, 1, H + 2r, W)
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))  # (B, 1, H, W)
    return x[:, 0]


class AnomalyMapGenerator:
    """Upsample patch scores bilinearly to the image size, then smooth them with a Gaussian.

    `sigma=4` with kernel radius int(4*sigma + 0.5) reproduces the reference implementations'
    post-processing (scipy.ndimage.gaussian_filter); `sigma=0` disables the blur. `border` is how
    the blur extends the map past its edges (see `_symmetric_index`).
    """

    def __init__(self, sigma: float = 4.0, border: str = "reflect") -> None:
        _check_border(border)
        if not isinstance(sigma, (int, float)) or isinstance(sigma, bool) or not sigma >= 0:
            raise ConfigError(f"model.sigma must be a number >= 0 (0 disables blur), got {sigma!r}")
        if math.isinf(sigma):
            raise ConfigError("model.sigma must be finite; use a value such as 4")
        self.sigma = float(sigma)
        self.border = border

    def __repr__(self) -> str:
        return f"AnomalyMapGenerator(sigma={self.sigma}, border={self.border!r})"

    def __call__(self, patch_scores: torch.Tensor, output_size: tuple[int, int]) -> torch.Tensor:
        """Map (B, h, w) (or (B, 1, h, w)) patch scores to (B, H, W) anomaly maps."""
        if patch_scores.dim() == 4 and patch_scores.shape[1] == 1:
            patch_scores = patch_scores[:, 0]
        if patch_scores.dim() != 3:
            raise ValueError(
                "AnomalyMapGenerator expects (B, h, w) patch scores, "
                f"got {tuple(patch_scores.shape)}"
            )
        if not patch_scores.is_floating_point():
            patch_scores = patch_scores.float()
        size = (int(output_size[0]), int(output_size[1]))
        maps = patch_scores
        if tuple(maps.shape[-2:]) != size:
            # (B, h, w) -> (B, 1, h, w) -> (B, 1, H, W) -> (B, H, W)
            maps = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)
            maps = maps[:, 0]
        return gaussian_blur2d(maps, self.sigma, self.border)
