"""Deterministic synthetic MVTec-style datasets, including the built-in default one."""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import TypedDict

import numpy as np
from PIL import Image

from hamacho.errors import ConfigError, DataError

DEFECT_TYPES = ("scratch", "hole", "stain")
KINDS = ("texture", "object")
GENERATOR_VERSION = 1  # bump whenever the rendering changes: cached copies are then rebuilt
DEFAULT_DATASET_NAME = "synthetic_default"


class _DatasetParams(TypedDict):
    """Keyword arguments of make_synthetic_dataset that define the default dataset."""

    n_train: int
    n_test_good: int
    n_test_defect: int
    size: int
    seed: int
    kind: str


_DEFAULT_PARAMS: _DatasetParams = {
    "n_train": 40,
    "n_test_good": 10,
    "n_test_defect": 15,
    "size": 256,
    "seed": 0,
    "kind": "object",
}
_MARKER = ".hamacho-dataset"
# Stain colours: brown, ink blue, green, oil black (all far from the red cap and beige cloth).
_STAIN_COLOURS = np.array([[0.40, 0.25, 0.08], [0.12, 0.22, 0.62], [0.18, 0.42, 0.16], [0.06] * 3])


def make_synthetic_dataset(
    root: str | Path,
    *,
    n_train: int = 20,
    n_test_good: int = 5,
    n_test_defect: int = 5,
    size: int = 128,
    seed: int = 0,
    kind: str = "texture",
    overwrite: bool = False,
) -> Path:
    """Write an MVTec AD category of rendered images with exact defect masks; return `root`.

    Defects cycle through scratch, hole and stain. The same arguments give the same bytes,
    and each image depends only on (seed, split, index), not on the other counts.
    """
    if kind not in KINDS:
        raise ConfigError(f"synthetic kind={kind!r} is not valid; use one of {', '.join(KINDS)}")
    minimum = {"n_train": 1, "n_test_good": 0, "n_test_defect": 0, "size": 32, "seed": 0}
    values = (n_train, n_test_good, n_test_defect, size, seed)
    for (name, low), value in zip(minimum.items(), values, strict=True):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"synthetic {name}={value!r} must be an integer >= {low}")
    root = Path(root).expanduser()
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise DataError(f"folder '{root}' is not empty; use a new folder or overwrite=True")
        shutil.rmtree(root)
    jobs: list[tuple[str, str | None, tuple[int, int]]] = [
        (f"train/good/{i:03d}.png", None, (0, i)) for i in range(n_train)
    ]
    jobs += [(f"test/good/{i:03d}.png", None, (1, i)) for i in range(n_test_good)]
    for i in range(n_test_defect):
        defect_type = DEFECT_TYPES[i % len(DEFECT_TYPES)]
        jobs.append((f"test/{defect_type}/{i // len(DEFECT_TYPES):03d}.png", defect_type, (2, i)))
    for name, defect, key in jobs:
        rng = np.random.default_rng([seed, *key])
        _, image, mask = _render_sample(kind, size, rng, defect)
        _save(root / name, image)
        if defect is not None:
            _save(root / "ground_truth" / defect / f"{Path(name).stem}_mask.png", mask)
    return root


def _save(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG", compress_level=1)  # ~5x faster, ~10% larger


def _render_sample(
    kind: str, size: int, rng: np.random.Generator, defect: str | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (clean (S,S,3) uint8, image (S,S,3) uint8, mask (S,S) uint8 {0,255})."""
    render = _render_object if kind == "object" else _render_texture
    clean, region = render(rng, size)
    image = clean.copy()
    mask = np.zeros((size, size), dtype=bool)
    if defect is not None:
        mask = _DEFECTS[defect](image, rng, region)  # edits `image` where mask is True only
    return _to_uint8(clean), _to_uint8(image), mask.astype(np.uint8) * 255


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


@functools.lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in pixels: (y, x), each (S, S) float32."""
    coords = np.arange(size, dtype=np.float32) + 0.5
    grids = np.meshgrid(coords, coords, indexing="ij")
    for grid in grids:
        grid.flags.writeable = False  # cached and shared between calls
    return grids[0], grids[1]


def _uniform(rng: np.random.Generator, low: float, high: float) -> float:
    # A Python float keeps float32 arrays float32 (a NumPy float64 scalar would upcast them).
    return float(rng.uniform(low, high))


def _sensor_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    # Grey (shared by the channels) so that PNGs stay small.
    return rng.standard_normal((size, size, 1), dtype=np.float32) * sigma


def _render_texture(rng: np.random.Generator, size: int) -> tuple[np.ndarray, tuple]:
    """Plain-weave cloth with jittered phase, angle, thread period and per-thread tone."""
    y, x = _grid(size)
    period = size / 16 * _uniform(rng, 0.98, 1.02)
    angle = _uniform(rng, -0.02, 0.02)
    u = (x * math.cos(angle) + y * math.sin(angle)) / period + _uniform(rng, 0, 2)
    v = (y * math.cos(angle) - x * math.sin(angle)) / period + _uniform(rng, 0, 2)
    fu, fv = u - np.floor(u), v - np.floor(v)
    i, j = np.floor(u).astype(np.int64), np.floor(v).astype(np.int64)
    over = (i + j) % 2 == 0  # weft on top in these cells, warp in the others
    weft = np.sin(math.pi * fv) ** 0.6 * (0.75 + 0.25 * np.sin(math.pi * fu))
    warp = np.sin(math.pi * fu) ** 0.6 * (0.75 + 0.25 * np.sin(math.pi * fv))
    tone = rng.normal(1.0, 0.04, size=(2, 64)).astype(np.float32)  # thread-to-thread tone
    shade = np.where(over, weft * tone[0][j % 64], warp * tone[1][i % 64])
    colours = np.array([[0.74, 0.63, 0.45], [0.80, 0.70, 0.52]], dtype=np.float32)
    image = (0.35 + 0.65 * shade)[..., None] * colours[over.astype(np.int64)]
    image *= _uniform(rng, 0.96, 1.04)
    image += _sensor_noise(rng, size, 0.01)
    return image, (size / 2, size / 2, 0.3 * size)


def _render_object(rng: np.random.Generator, size: int) -> tuple[np.ndarray, tuple]:
    """A red crimped bottle cap seen from above on a grey table, with pose/light jitter."""
    y, x = _grid(size)
    cy, cx = size * (0.5 + _uniform(rng, -0.02, 0.02)), size * (0.5 + _uniform(rng, -0.02, 0.02))
    radius = size * 0.34 * _uniform(rng, 0.98, 1.02)
    light = _uniform(rng, 0, 2 * math.pi)
    lc, ls = math.cos(light), math.sin(light)
    dx, dy = x - cx, y - cy
    r, theta = np.hypot(dx, dy), np.arctan2(dy, dx)
    rn = r / radius

    slope = 1 + 0.06 * ((x / size - 0.5) * lc + (y / size - 0.5) * ls)
    shadow_r = np.hypot(dx + 0.02 * size * lc, dy + 0.02 * size * ls)  # cast away from the light
    shadow = 1 - 0.35 * np.clip((radius * 1.06 - shadow_r) / (0.04 * size), 0, 1)
    table = (slope * shadow)[..., None] * np.array([0.74, 0.76, 0.78], dtype=np.float32)

    crimp = np.cos(21 * (theta - _uniform(rng, 0, 2 * math.pi)))
    inside = np.clip((radius * (1 + 0.03 * crimp) - r) + 0.5, 0, 1)  # 1-px anti-aliased rim
    face = (0.92 - 0.08 * rn**2) * (1 - 0.3 * np.exp(-(((rn - 0.8) / 0.025) ** 2)))
    face *= 1 + 0.07 * np.exp(-(((rn - 0.45) / 0.03) ** 2))  # embossed ring
    face = np.where(rn > 0.82, face * (0.82 + 0.1 * crimp), face)  # ribbed skirt
    hx, hy = dx - 0.3 * radius * lc, dy - 0.3 * radius * ls
    highlight = 0.22 * np.exp(-(hx**2 + hy**2) / (2 * (0.3 * radius) ** 2))
    red = np.array([0.72, 0.16, 0.14], dtype=np.float32) * _uniform(rng, 0.97, 1.03)
    glint = np.array([1.0, 0.9, 0.85], dtype=np.float32)  # the highlight's colour
    cap = face[..., None] * red + highlight[..., None] * glint

    inside = inside[..., None]
    image = table * (1 - inside) + cap * inside
    image *= _uniform(rng, 0.95, 1.05)
    image += _sensor_noise(rng, size, 0.008)
    return image, (cy, cx, 0.45 * radius)


def _centre(rng: np.random.Generator, region: tuple) -> tuple[float, float]:
    """Uniform point in the disc `region` = (cy, cx, radius) where defects may sit."""
    cy, cx, radius = region
    rho, phi = radius * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
    return cy + rho * np.sin(phi), cx + rho * np.cos(phi)


def _scratch(image: np.ndarray, rng: np.random.Generator, region: tuple) -> np.ndarray:
    """A thin, slightly curved line, bright on dark ground or dark on bright ground."""
    size = image.shape[0]
    (cy, cx), phi = _centre(rng, region), rng.uniform(0, np.pi)
    half = size * rng.uniform(0.06, 0.11) * np.array([np.sin(phi), np.cos(phi)])
    bend = size * rng.uniform(-0.03, 0.03) * np.array([np.cos(phi), -np.sin(phi)])
    t = np.linspace(-1, 1, 25)[:, None]
    points = np.array([cy, cx]) + t * half + (1 - t**2) * bend  # (25, 2) quadratic curve
    width = max(0.7, 0.006 * size)
    y0, x0 = np.floor(points.min(0) - 2).astype(int).clip(0, size)
    y1, x1 = np.ceil(points.max(0) + 3).astype(int).clip(0, size)
    y, x = _grid(size)
    pixels = np.stack([y[y0:y1, x0:x1], x[y0:y1, x0:x1]], axis=-1)[..., None, :]  # (h,w,1,2)
    a, b = points[:-1], points[1:]
    t_seg = np.clip(((pixels - a) * (b - a)).sum(-1) / ((b - a) ** 2).sum(-1), 0, 1)
    dist = np.linalg.norm(pixels - a - t_seg[..., None] * (b - a), axis=-1).min(-1)
    mask = np.zeros((size, size), dtype=bool)
    mask[y0:y1, x0:x1] = dist <= width
    target = 0.95 if image[mask].mean() < 0.5 else 0.08
    strength = rng.uniform(0.6, 0.8)
    image[mask] = image[mask] * (1 - strength) + target * strength
    return mask


def _blob(rng: np.random.Generator, region: tuple, size: int, r0: float, wobble: float):
    """Irregular disc: (mask (S,S) bool, radius relative to the local edge (S,S))."""
    cy, cx = _centre(rng, region)
    y, x = _grid(size)
    theta = np.arctan2(y - cy, x - cx)
    edge = np.ones_like(theta)
    for k in range(2, 6):
        edge += rng.uniform(0, wobble) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    rel = np.hypot(y - cy, x - cx) / (r0 * edge)
    return rel < 1, rel


def _hole(image: np.ndarray, rng: np.random.Generator, region: tuple) -> np.ndarray:
    """A dark pit, darkest at its centre."""
    size = image.shape[0]
    mask, rel = _blob(rng, region, size, size * rng.uniform(0.025, 0.045), 0.1)
    depth = 0.04 + 0.12 * rel[mask] ** 2
    image[mask] = depth[:, None] * [1.0, 0.95, 0.9] + rng.normal(0, 0.01, (mask.sum(), 3))
    return mask


def _stain(image: np.ndarray, rng: np.random.Generator, region: tuple) -> np.ndarray:
    """A translucent colour blotch with a darker drying ring at its edge."""
    size = image.shape[0]
    mask, rel = _blob(rng, region, size, size * rng.uniform(0.04, 0.07), 0.18)
    local = image[mask].mean(0)
    far = [c for c in _STAIN_COLOURS if np.abs(c - local).sum() > 0.45] or list(_STAIN_COLOURS)
    colour = far[rng.integers(len(far))]
    alpha = (rng.uniform(0.45, 0.6) * (0.8 + 0.2 * rel[mask]))[:, None]
    image[mask] = image[mask] * (1 - alpha) + colour * alpha
    return mask


_DEFECTS = {"scratch": _scratch, "hole": _hole, "stain": _stain}


def hamacho_home() -> Path:
    """Cache folder for datasets and weights: $HAMACHO_HOME, else ~/.cache/hamacho."""
    return Path(os.environ.get("HAMACHO_HOME") or "~/.cache/hamacho").expanduser()


def default_dataset() -> Path:
    """The built-in dataset used when no --data is given, generated once and then reused."""
    target = hamacho_home() / "datasets" / DEFAULT_DATASET_NAME
    stamp = json.dumps({"generator": GENERATOR_VERSION, **_DEFAULT_PARAMS}, sort_keys=True)
    if _is_complete(target, stamp):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Build next to the target and rename, so a crash never leaves a half-written dataset.
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            make_synthetic_dataset(tmp, **_DEFAULT_PARAMS)
            (tmp / _MARKER).write_text(stamp + "\n")
            if _is_complete(target, stamp):  # another process finished first
                return target
            if target.exists():
                shutil.rmtree(target)  # incomplete, or from another generator version
            try:
                os.replace(tmp, target)
            except OSError:
                if not _is_complete(target, stamp):  # else another process won the race
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        raise DataError(
            f"cannot write the default dataset to '{target}': {exc.strerror or exc}. "
            "Set HAMACHO_HOME to a writable folder"
        ) from exc
    return target


def _is_complete(folder: Path, stamp: str) -> bool:
    try:
        return (folder / _MARKER).read_text().strip() == stamp
    except OSError:
        return False
