"""The Python API: ``hamacho.load(run_or_file).predict(image)`` and ``hamacho.train(...)``."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from hamacho.components import data
from hamacho.errors import DataError
from hamacho.export.runtimes import Backend, open_backend
from hamacho.preprocess import Preprocess
from hamacho.runtime import decide

ImageInput = str | Path | Image.Image | np.ndarray | torch.Tensor
__all__ = ["Detector", "ImageInput", "Result", "load", "merge", "train", "update"]


@dataclass
class Result:
    """One image's verdict; ``map`` is (H, W) float32 at the original size, NaN not inspected.

    The map is resampled to the original size when first read, so a caller that needs only
    the verdict (``hamacho serve`` without ``?maps=true``) never pays for it.
    """

    score: float
    is_anomalous: bool | None
    threshold: float | None
    resample_map: Callable[[], np.ndarray] = field(repr=False, compare=False)

    @functools.cached_property
    def map(self) -> np.ndarray:
        """(H, W) float32 anomaly map on the original image's pixels (NaN: not inspected)."""
        return self.resample_map()


class Detector:
    """A trained model (a run directory or an exported file) that scores images."""

    def __init__(self, backend: Backend, source: Path, runtime: str) -> None:
        self.backend, self.source, self.runtime = backend, source, runtime

    def __repr__(self) -> str:
        return f"Detector(model={self.model!r}, source='{self.source}', runtime={self.runtime!r})"

    @property
    def model(self) -> str:
        """The model's registered name, as ``hamacho models`` lists it."""
        return self.backend.model

    @property
    def threshold(self) -> float | None:
        """The decision threshold set at training time, if any."""
        return self.backend.threshold

    def predict(
        self, images: ImageInput | Sequence[ImageInput], batch_size: int = 16
    ) -> Result | list[Result]:
        """Score one image (-> Result) or a list of them (-> list, scored in batches)."""
        if isinstance(images, (list, tuple)):
            pixels = [as_uint8(image, self._max_pixels) for image in images]
            out: list[Result] = []
            for start in range(0, len(pixels), max(1, batch_size)):
                out.extend(self._score(pixels[start : start + batch_size]))
            return out
        return self._score([as_uint8(cast(ImageInput, images), self._max_pixels)])[0]

    @property
    def _max_pixels(self) -> int:
        """The run's decompression-bomb guard (data.max_pixels), as train/test/predict use it."""
        return int(self.backend.config["data"].get("max_pixels", data.MAX_PIXELS))

    def _score(self, pixels: list[torch.Tensor]) -> list[Result]:
        scores, maps = self.backend.score(pixels)
        limit = self.threshold
        return [
            Result(
                score=float(score),
                is_anomalous=decide(float(score), limit),
                threshold=limit,
                resample_map=functools.partial(
                    to_original, amap, tuple(image.shape[:2]), self.backend.preprocess
                ),
            )
            for score, amap, image in zip(scores, maps, pixels, strict=True)
        ]


def as_uint8(image: ImageInput, max_pixels: int = data.MAX_PIXELS) -> torch.Tensor:
    """Any supported image input -> (H, W, 3) uint8 RGB tensor, decoded as hamacho decodes."""
    if isinstance(image, (str, Path)):
        return data.pil_to_uint8(data.read_image(image, max_pixels))
    if isinstance(image, Image.Image):
        return data.pil_to_uint8(image)
    if isinstance(image, np.ndarray):
        array = image
    elif isinstance(image, torch.Tensor):
        if image.ndim == 3 and image.shape[0] in (1, 3):
            image = image.permute(1, 2, 0)  # (C, H, W) -> (H, W, C)
        array = image.detach().cpu().numpy()
    else:
        raise DataError(
            f"cannot score a {type(image).__name__}: pass a path, a PIL image, a numpy (H, W, 3) "
            "or (H, W) uint8 array, a torch uint8 (3, H, W) tensor, or a list of those"
        )
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.dtype != np.uint8 or not (
        array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)
    ):
        raise DataError(
            f"image array is {array.dtype} {tuple(array.shape)}; hamacho takes uint8 RGB "
            "(H, W, 3) or grey (H, W) (torch: (3, H, W)). Convert it, e.g. np.uint8 0..255"
        )
    if array.ndim == 2:  # grey -> RGB, as PIL's convert("RGB") replicates L
        array = np.repeat(array[..., None], 3, axis=2)
    if not array.flags.writeable:  # torch wants writable memory (np.asarray of a PIL image)
        array = array.copy()
    return torch.from_numpy(np.ascontiguousarray(array))


def to_original(amap: np.ndarray, size: tuple[int, ...], preprocess: Preprocess) -> np.ndarray:
    """A (c, c) crop-size map -> (H, W) float32 on the original image's pixels, NaN outside.

    The model saw the image squashed to image_size x image_size and centre-cropped; each original
    pixel centre is mapped through that resize and the map sampled there (bilinear). Pixels whose
    centre falls outside the crop were not inspected: NaN, never a stretched value.
    """
    height, width = int(size[0]), int(size[1])
    c, s, left = preprocess.crop_size, preprocess.image_size, preprocess.left

    def axis(n: int) -> torch.Tensor:  # original pixel centres in crop pixel units
        return (torch.arange(n, dtype=torch.float64) + 0.5) * (s / n) - left

    ys, xs = axis(height), axis(width)
    grid = torch.stack(  # (1, H, W, 2) as (x, y) in [-1, 1], align_corners=False convention
        [
            (2 * xs / c - 1)[None, :].expand(height, width),
            (2 * ys / c - 1)[:, None].expand(height, width),
        ],
        dim=-1,
    )[None]
    values = torch.from_numpy(np.asarray(amap, dtype=np.float64))[None, None]  # float64: exact
    out = F.grid_sample(values, grid, mode="bilinear", padding_mode="border", align_corners=False)
    outside = ((ys < 0) | (ys >= c))[:, None] | ((xs < 0) | (xs >= c))[None, :]
    return out[0, 0].masked_fill(outside, float("nan")).to(torch.float32).numpy()


def load(source: str | Path, runtime: str | None = None) -> Detector:
    """A Detector for a run directory or an exported ``.onnx`` / OpenVINO ``.xml`` file.

    ``runtime`` is torch, onnx or openvino; None picks it from the file (a directory: torch).
    With onnx / openvino and a run directory, its exported ``model.onnx`` / ``model.xml`` is used.
    """
    from hamacho.export.runtimes import infer_runtime

    chosen = runtime or infer_runtime(source)
    return Detector(open_backend(source, chosen), Path(source), chosen)


def train(
    model: str,
    data: str | Path | None = None,
    output: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    config: str | Path | None = None,
) -> Detector:
    """Train ``model`` on ``data``'s good images into ``output``; return its Detector.

    ``overrides`` maps dotted settings to values, e.g. ``{"model.backbone": "resnet18"}``.
    """
    from hamacho import engine

    pairs = [
        f"{key}={value if isinstance(value, str) else json.dumps(value)}"
        for key, value in (overrides or {}).items()
    ]
    run_dir = engine.train(model, data, config, pairs, output)
    return load(run_dir)


def update(run: str | Path, data: str | Path, output: str | Path | None = None) -> Detector:
    """Add ``data``'s good training images to ``run`` (in place, or into ``output``)."""
    from hamacho.grow.flows import update as grow

    return load(grow(run, data, output))


def merge(
    runs: Sequence[str | Path], output: str | Path, reject_outliers: bool = False
) -> Detector:
    """Merge ``runs`` (trained elsewhere, same settings) into ``output``; merge.json says how."""
    from hamacho.grow.flows import merge as grow

    return load(grow(list(runs), output, reject_outliers))
