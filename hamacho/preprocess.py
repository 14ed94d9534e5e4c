"""The one image preprocessing: uint8 RGB -> square resize, centre crop, normalise, in torch.

Train, test, predict, the Python API and the exported graph all run this module, so there is a
single implementation to agree with. The resize is PIL's BILINEAR (antialiased: the triangle
filter widens by the downscale factor) written as two matrix products with PIL's fixed-point
weights, rounded to 8 bits after each pass as PIL does: it gives PIL's pixels bit for bit. The
crop keeps only the matrices' rows inside the crop. It is plain tensor maths on the input's own
values and shape, so it traces to ONNX with dynamic H and W.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

_ONE = float(1 << 22)  # PIL's fixed-point unit for 8-bit resampling (PRECISION_BITS)


def _exporting() -> bool:
    """Whether torch is tracing or exporting this module (the graph must stay general)."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.compiler.is_exporting()


def crop_offset(image_size: int, crop_size: int) -> int:
    """Left/top offset of the centre crop, as torchvision's center_crop rounds it."""
    return int(round((image_size - crop_size) / 2))


def _resize_rows(positions: torch.Tensor, size: int, first: int, count: int) -> torch.Tensor:
    """(count, n_in) float64 weights of output pixels first..first+count of an n_in -> size resize.

    ``positions`` is arange(n_in) as float64, made from the input so the graph stays dynamic.
    PIL: centre = (i + 0.5) * scale; weight = triangle((j + 0.5 - centre) / max(scale, 1)),
    each row normalised to sum 1 (taps outside PIL's support window have zero weight anyway),
    then rounded to PIL's 22-bit fixed point. Pixel x weight products are then exact in
    float64, so every runtime sums them to the same value whatever its order: ties at .5
    (frequent with these rational weights) round the same in torch, onnxruntime and PIL.
    """
    n_in = positions[-1:] + 1.0  # (1,) tensor, not a Python int: keeps H/W symbolic
    scale = n_in / size
    support = torch.clamp(scale, min=1.0)
    out = torch.arange(first, first + count, dtype=torch.float64, device=positions.device)
    centres = (out[:, None] + 0.5) * scale  # (count, 1)
    weights = torch.clamp(1.0 - torch.abs((positions[None, :] + 0.5 - centres) / support), min=0)
    weights = weights / weights.sum(dim=1, keepdim=True)
    return torch.floor(weights * _ONE + 0.5) / _ONE


class Preprocess(nn.Module):
    """(N, H, W, 3) uint8 RGB -> (N, 3, c, c) float32 normalised, c = crop (else image) size."""

    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(
        self,
        image_size: int,
        crop_size: int | None,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__()
        self.image_size = int(image_size)
        self.crop_size = int(crop_size) if crop_size is not None else self.image_size
        self.left = crop_offset(self.image_size, self.crop_size)
        mean_t = torch.tensor([float(m) for m in mean], dtype=torch.float32)
        std_t = torch.tensor([float(s) for s in std], dtype=torch.float32)
        # (x / 255 - mean) / std folded into one multiply-add per channel, shaped (1, 3, 1, 1)
        self.register_buffer("scale", (1.0 / (255.0 * std_t)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", (-mean_t / std_t).view(1, 3, 1, 1), persistent=False)

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """(N, H, W, 3) uint8 -> (N, 3, c, c) float32 pixel values 0..255 after resize + crop."""
        x = images.permute(0, 3, 1, 2).to(torch.float64)  # (N, 3, H, W)
        size, left, c = self.image_size, self.left, self.crop_size
        if not _exporting() and x.shape[-2:] == (size, size):
            # already at image_size: the resize is the identity, only crop (eager only)
            return x[..., left : left + c, left : left + c].to(torch.float32)
        # arange(W) and arange(H) from the input itself (cumsum of ones): dynamic under tracing
        cols = torch.ones_like(x[0, 0, 0, :]).cumsum(0) - 1.0
        rows = torch.ones_like(x[0, 0, :, 0]).cumsum(0) - 1.0
        across = _resize_rows(cols, self.image_size, self.left, self.crop_size)  # (c, W)
        down = _resize_rows(rows, self.image_size, self.left, self.crop_size)  # (c, H)
        # PIL resizes horizontally, then vertically, rounding to uint8 after each pass
        x = torch.clamp(torch.floor(x @ across.T + 0.5), 0, 255)  # (N, 3, H, c)
        return torch.clamp(torch.floor(down @ x + 0.5), 0, 255).to(torch.float32)  # (N, 3, c, c)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, c, c) pixel values 0..255 from ``pixels`` -> the model's normalised input."""
        return pixels * self.scale + self.shift

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Resize, crop and normalise a uint8 batch."""
        return self.normalize(self.pixels(images))
