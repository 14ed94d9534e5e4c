"""Side-by-side result panels (input | heat map | ground truth | predicted region) as PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from hamacho.errors import DataError

# Jet-like colour map: anchor positions in [0, 1] and their RGB colours (0..1).
_JET_POSITIONS = np.array([0.0, 0.11, 0.34, 0.65, 0.89, 1.0])
_JET_COLOURS = np.array(
    [
        [0.0, 0.0, 0.5],  # dark blue
        [0.0, 0.0, 1.0],  # blue
        [0.0, 1.0, 1.0],  # cyan
        [1.0, 1.0, 0.0],  # yellow
        [1.0, 0.0, 0.0],  # red
        [0.5, 0.0, 0.0],  # dark red
    ]
)
_ALPHA = 0.5  # heat-map weight in the overlay
_CONTOUR_COLOUR = np.array([255, 0, 0], dtype=np.uint8)
_CONTOUR_WIDTH = 2  # pixels, drawn inside the predicted region


def _numpy(x: object) -> np.ndarray:
    """Numpy copy of an array or a (CPU/GPU) torch tensor."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().float().numpy()
    return np.asarray(x)


def colorize(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] (H, W) to jet-like colours (H, W, 3) uint8; values are clipped."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    rgb = np.stack([np.interp(v, _JET_POSITIONS, _JET_COLOURS[:, c]) for c in range(3)], axis=-1)
    return np.round(rgb * 255.0).astype(np.uint8)


def _as_rgb(image: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8 -> (H, W, 3) uint8."""
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise DataError(f"overlay_panel expects an (H, W, 3) image, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise DataError(f"overlay_panel expects a uint8 image, got {image.dtype}; pass 0..255")
    return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image[..., :3]


def _as_2d(x: object, shape: tuple[int, int], what: str) -> np.ndarray:
    """Squeeze a (1, H, W) / (H, W, 1) array to (H, W) and check it matches the image."""
    arr = _numpy(x)
    arr = arr.reshape(arr.shape[-2:]) if arr.ndim == 3 and arr.shape[0] == 1 else arr
    arr = arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr
    if arr.shape != shape:
        raise DataError(
            f"{what} has shape {arr.shape} but the image is {shape}; resize it to the image size"
        )
    return arr


def _contour(region: np.ndarray) -> np.ndarray:
    """Inner boundary (H, W) bool of a binary region, _CONTOUR_WIDTH pixels thick."""
    if not region.any():
        return region
    from scipy import ndimage  # on use: scipy takes ~0.5 s to import

    inner = ndimage.binary_erosion(region, iterations=_CONTOUR_WIDTH, border_value=0)
    return region ^ inner


def overlay_panel(
    image: np.ndarray,
    amap: np.ndarray,
    mask: np.ndarray | None = None,
    threshold: float | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
) -> np.ndarray:
    """Side-by-side panel (H, k*W, 3) uint8: input | heat-map overlay | [mask] | [prediction].

    The heat map spans [vmin, vmax] (default: this map's min/max); pass fixed values to make
    panels of different images comparable. The prediction panel outlines amap >= threshold
    (raw map units) in red on the input; it is added only when `threshold` is given.
    """
    rgb = _as_rgb(_numpy(image))
    shape = rgb.shape[:2]
    scores = _as_2d(amap, shape, "anomaly map").astype(np.float64)
    lo = float(scores.min()) if vmin is None else float(vmin)
    hi = float(scores.max()) if vmax is None else float(vmax)
    scaled = (scores - lo) / (hi - lo) if hi > lo else np.zeros_like(scores)
    heat = colorize(scaled).astype(np.float64)
    overlay = np.round((1.0 - _ALPHA) * rgb + _ALPHA * heat).astype(np.uint8)

    panels = [rgb, overlay]
    if mask is not None:
        gt = _as_2d(mask, shape, "mask") > 0.5
        panels.append(np.repeat((gt * 255).astype(np.uint8)[..., None], 3, axis=-1))
    if threshold is not None:
        predicted = rgb.copy()
        predicted[_contour(scores >= threshold)] = _CONTOUR_COLOUR
        panels.append(predicted)
    return np.concatenate(panels, axis=1)


def save_png(path: str | Path, array: np.ndarray) -> None:
    """Write an (H, W) or (H, W, 3|4) uint8 array as PNG, creating parent directories."""
    arr = np.asarray(array)
    channels_ok = arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))
    if arr.dtype != np.uint8 or not channels_ok:
        raise DataError(
            f"save_png needs an (H, W) or (H, W, 3|4) uint8 array, got {arr.dtype} {arr.shape}"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="PNG")
