"""Find dataset images, decode them to RGB and turn them into normalised tensors."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, default_collate

from hamacho.components.datasets import (
    IMAGE_EXTENSIONS,
    Sample,
    find_samples,
    safe_name,
    unused_name,
)
from hamacho.errors import (
    ConfigError,
    DataError,
    HamachoError,
    NotAnImageError,
    TooManyPixelsError,
    one_line,
)
from hamacho.preprocess import Preprocess, crop_offset

__all__ = [  # discovery lives in datasets.py; re-exported so one import serves both
    "IMAGE_EXTENSIONS",
    "DataConfig",
    "ImageDataset",
    "Sample",
    "denormalize",
    "find_samples",
    "load_image_tensor",
    "make_loader",
    "pil_to_uint8",
    "read_image",
    "safe_name",
    "unused_name",
]
logger = logging.getLogger(__name__)

_SKIP_HINT = "Replace or remove it, or set data.skip_bad=true"
_FIX_HINT = "Replace or remove it"  # where no data.skip_bad applies (predict)
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485  # PIL's decompression-bomb limit
# The data.max_pixels check below raises DataError for what PIL would only warn about.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


@dataclass
class DataConfig:
    """The `data:` config section: image sizes, normalisation and loading options."""

    image_size: int = 256
    crop_size: int | None = 224
    mean: list[float] | None = None  # None: the backbone's
    std: list[float] | None = None
    batch_size: int = 32
    num_workers: int = 0
    skip_bad: bool = False
    max_pixels: int = MAX_PIXELS  # larger images are refused: guards against decompression bombs

    def __post_init__(self) -> None:
        self.validate()

    @property
    def output_size(self) -> int:
        """Side of the square tensors the dataset yields (crop_size, else image_size)."""
        return self.crop_size if self.crop_size is not None else self.image_size

    def validate(self) -> None:
        """Raise ConfigError naming the first field that cannot work."""
        minimum = {
            "image_size": 1,
            "batch_size": 1,
            "num_workers": 0,
            "crop_size": 1,
            "max_pixels": 1,
        }
        for name, low in minimum.items():
            value = getattr(self, name)
            if value is None and name == "crop_size":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"data.{name}={value!r} must be an integer >= {low}")
        crop = self.crop_size
        if crop is not None and crop > self.image_size:
            raise ConfigError(
                f"data.crop_size={crop} is larger than data.image_size={self.image_size}; "
                f"set data.crop_size <= {self.image_size} or null"
            )
        _check_stats(self.mean, self.std)


def _check_stats(mean: Sequence[float] | None, std: Sequence[float] | None) -> None:
    for name, values in (("mean", mean), ("std", std)):
        if values is not None and len(values) != 3:
            raise ConfigError(f"data.{name}={list(values)} must have 3 values (R, G, B)")
    if std is not None and min(std) <= 0:
        raise ConfigError(f"data.std={list(std)} must be positive")


def _open(
    path: str | Path,
    what: str,
    max_pixels: int = MAX_PIXELS,
    hint: str = _SKIP_HINT,
) -> tuple[Image.Image, tuple[int, int]]:
    """Fully decode `path` upright (EXIF orientation applied) so corrupt files fail here.

    Returns the image and its upright full size. No JPEG draft downscale: the API and the
    exported model see the same pixels.
    """
    if max_pixels > (Image.MAX_IMAGE_PIXELS or max_pixels):
        # data.max_pixels asks for more than PIL allows: let PIL open them, our check still holds
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with Image.open(path) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise TooManyPixelsError(
                    f"{what} '{path}' has {width}x{height} = {width * height:,} pixels, more than "
                    f"data.max_pixels={max_pixels:,} (a guard against decompression bombs). "
                    f"Downscale it, or raise data.max_pixels if it is genuine"
                )
            if img.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8):
                width, height = height, width  # stored sideways: a phone held upright
            img.load()
            ImageOps.exif_transpose(img, in_place=True)
            return (img if what == "mask" else _to_rgb(img)), (width, height)
    except FileNotFoundError:
        reason = "file does not exist"
    except UnidentifiedImageError:
        message = f"cannot read {what} '{path}': not a recognised image format. {hint}"
        raise NotAnImageError(message) from None
    except Image.DecompressionBombError:  # PIL's own limit, twice ours by default
        message = f"more pixels than data.max_pixels={max_pixels:,} allows"
        raise TooManyPixelsError(f"cannot read {what} '{path}': {message}. {hint}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        reason = one_line(exc)
    raise DataError(f"cannot read {what} '{path}': {reason}. {hint}")


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        # Scale the 16-bit range onto 8 bits (PIL's own convert would clip to white).
        values = np.asarray(img, dtype=np.float32)
        scale = 255.0 if img.mode == "F" and values.max(initial=0.0) <= 1.0 else 1 / 257
        img = Image.fromarray(np.clip(values * scale + 0.5, 0, 255).astype(np.uint8))
    elif img.mode in ("P", "PA"):
        img = img.convert("RGBA")  # honours palette transparency before alpha is dropped
    return img if img.mode == "RGB" else img.convert("RGB")


def pil_to_uint8(img: Image.Image) -> torch.Tensor:
    """A PIL image of any mode, upright and converted as `read_image` does, as (H, W, 3) uint8."""
    return torch.from_numpy(np.array(_to_rgb(ImageOps.exif_transpose(img))))


def read_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode an image upright as 8-bit RGB (grey, alpha, palette and 16-bit images included).

    For inference (predict, the API): a bad file's error says to replace it, no data.skip_bad.
    """
    return _open(path, "image", max_pixels, hint=_FIX_HINT)[0]


class _Transform:
    """Images through hamacho.preprocess (the one implementation); masks through PIL NEAREST."""

    def __init__(
        self, config: DataConfig, mean: Sequence[float] | None, std: Sequence[float] | None
    ) -> None:
        config.validate()
        mean = config.mean if config.mean is not None else mean
        std = config.std if config.std is not None else std
        if mean is None or std is None:
            raise ConfigError("no normalisation mean/std: pass the backbone's or set data.mean/std")
        _check_stats(mean, std)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.size = config.image_size
        out = config.output_size
        left = crop_offset(self.size, out)
        self.box = (left, left, left + out, left + out)
        self.out = out
        self.preprocess = Preprocess(self.size, config.crop_size, self.mean, self.std)

    def _fit(self, img: Image.Image, resample: Image.Resampling) -> np.ndarray:
        if img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), resample)
        if self.out != self.size:
            img = img.crop(self.box)
        return np.array(img)

    def image(self, img: Image.Image) -> torch.Tensor:
        """RGB PIL image -> (3, S, S) float32 normalised."""
        return self.pixels(pil_to_uint8(img))

    def pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """(H, W, 3) uint8 RGB tensor -> (3, S, S) float32 normalised."""
        with torch.no_grad():
            return self.preprocess(pixels[None])[0]

    def mask(self, img: Image.Image) -> torch.Tensor:
        """Mask PIL image of any mode -> (1, S, S) float32 in {0, 1}; non-zero is defect."""
        values = np.asarray(img)
        if values.ndim == 3:  # colour masks: any non-zero colour channel; alpha is ignored
            # any() over an axis of a 3-D array is a 2-D array, never a numpy scalar
            values = (
                cast(np.ndarray, values[..., :3].any(axis=2))
                if values.shape[2] >= 3
                else values[..., 0]
            )
        binary_img = Image.fromarray((values != 0).astype(np.uint8) * 255)
        binary = self._fit(binary_img, Image.Resampling.NEAREST) > 0
        return torch.from_numpy(binary[None].astype(np.float32))

    def empty_mask(self) -> torch.Tensor:
        """(1, S, S) zeros for samples without a mask."""
        return torch.from_numpy(np.zeros((1, self.out, self.out), dtype=np.float32))


class ImageDataset(Dataset):
    """Samples as dicts: image (3,S,S), mask (1,S,S) {0,1}, label, path, defect.

    `mean`/`std` are the backbone's; `config.mean`/`config.std` override them when set.
    With `config.skip_bad`, unreadable samples are dropped up front and listed in `skipped`
    as (path, reason); otherwise the first access to one raises DataError.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        config: DataConfig,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        self.config = config
        self._transform = _Transform(config, mean, std)
        self._hint = _FIX_HINT if config.skip_bad else _SKIP_HINT  # skip_bad=true: say no more
        self.mean, self.std = self._transform.mean, self._transform.std
        self.skipped: list[tuple[Path, str]] = []
        self.samples = list(samples)
        if config.skip_bad and self.samples:
            self.samples = self._drop_bad(self.samples)

    def _drop_bad(self, samples: list[Sample]) -> list[Sample]:
        def check(sample: Sample) -> str | None:
            try:
                self._load(sample)
            except DataError as exc:
                return str(exc)
            return None

        # Decoding releases the GIL, so threads overlap it.
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            reasons = list(pool.map(check, samples))
        kept = [s for s, reason in zip(samples, reasons, strict=True) if reason is None]
        self.skipped = [(s.path, r) for s, r in zip(samples, reasons, strict=True) if r is not None]
        if not kept:
            raise DataError(f"all {len(samples)} images are unusable; first: {self.skipped[0][1]}")
        if self.skipped:
            logger.warning(
                "skipped %d of %d images (data.skip_bad=true); first: %s",
                len(self.skipped),
                len(samples),
                self.skipped[0][1],
            )
        return kept

    def _load(self, sample: Sample) -> tuple[torch.Tensor, torch.Tensor]:
        limit = self.config.max_pixels
        image, size = _open(sample.path, "image", limit, self._hint)
        if sample.mask is None:
            return self._transform.image(image), self._transform.empty_mask()
        mask, mask_size = _open(sample.mask, "mask", max_pixels=limit, hint=self._hint)
        if mask_size != size:
            raise DataError(
                f"mask '{sample.mask}' is {mask_size[0]}x{mask_size[1]} but image "
                f"'{sample.path}' is {size[0]}x{size[1]}; they must match. {self._hint}"
            )
        return self._transform.image(image), self._transform.mask(mask)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        image, mask = self._load(sample)
        return {
            "image": image,
            "mask": mask,
            "label": sample.label,
            "path": str(sample.path),
            "defect": sample.defect,
        }


def make_loader(
    dataset: Dataset, batch_size: int, shuffle: bool = False, num_workers: int = 0, seed: int = 0
) -> DataLoader:
    """Batch a dataset with the default collate; `seed` fixes the shuffle order."""
    if batch_size < 1:
        raise ConfigError(f"data.batch_size={batch_size} must be a positive integer")
    return _Loader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        collate_fn=_collate if num_workers == 0 else None,  # workers: shared-memory default
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(seed) if shuffle else None,
    )


class _Loader(DataLoader):
    """DataLoader whose worker errors keep hamacho's one-line message."""

    # A generator rather than a _BaseDataLoaderIter: all callers only iterate over it.
    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        batches = super().__iter__()
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except HamachoError as exc:
                # A worker re-raises as "Caught DataError in DataLoader worker ..." + traceback,
                # whose last line is "<module>.DataError: <original message>".
                lines = str(exc).strip().splitlines()
                if self.num_workers == 0 or not lines[0].startswith("Caught "):
                    raise
                raise type(exc)(lines[-1].split(": ", 1)[-1]) from None
            yield batch


def _collate(items: list[Any]) -> Any:
    """default_collate's result, but stacking in NumPy.

    torch.stack runs on the intra-op thread pool, which is ~7x slower than NumPy for these
    copies when the CPU is busy (measured: 25 images, 0.94 s vs 0.14 s on 2 loaded cores).
    """
    if not isinstance(items[0], dict):
        return default_collate(items)
    batch: dict[str, Any] = {}
    for key, first in items[0].items():
        values = [item[key] for item in items]
        if isinstance(first, torch.Tensor) and first.dtype == torch.float32 and not first.is_cuda:
            batch[key] = torch.from_numpy(np.stack([v.numpy() for v in values]))
        elif isinstance(first, str):
            batch[key] = values
        else:
            batch[key] = default_collate(values)
    return batch


def load_image_tensor(
    path: str | Path, config: DataConfig, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """Load one image exactly as ImageDataset does: (3, S, S) float32 normalised."""
    transform = _Transform(config, mean, std)
    image = _open(path, "image", config.max_pixels, hint=_FIX_HINT)[0]
    return transform.image(image)


def denormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Undo normalisation for display: (3,H,W) or (B,3,H,W) -> (..., H, W, 3) uint8."""
    values = np.moveaxis(images.detach().float().cpu().numpy(), -3, -1)  # (..., H, W, 3)
    std_a, mean_a = np.asarray(std, dtype=np.float32), np.asarray(mean, dtype=np.float32)
    pixels = (values * std_a + mean_a) * 255
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
