"""Plumbing the train / test / predict flows share: loaders, tiling, progress, memory, JSON."""

from __future__ import annotations

import json
import math
import resource
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hamacho.components import data
from hamacho.components.tiler import Tiler
from hamacho.config import Config
from hamacho.model import Model, Prediction


@dataclass
class Run:
    """A trained model loaded back from its run directory."""

    model: Model
    config: Config
    metadata: dict[str, Any]
    path: Path
    tiler: Tiler | None = None  # run state the engine keeps, never on the model

    @property
    def mean(self) -> tuple[float, ...]:
        """The per-channel mean the model's inputs were normalised with."""
        return tuple(self.metadata["normalization"]["mean"])

    @property
    def std(self) -> tuple[float, ...]:
        """The per-channel std the model's inputs were normalised with."""
        return tuple(self.metadata["normalization"]["std"])

    @property
    def threshold(self) -> float | None:
        """The decision threshold derived at training time, if any."""
        info = self.metadata.get("threshold")
        return None if not info else float(info["value"])


def batch_loader(samples: list[data.Sample], cfg: Config, mean: Any, std: Any) -> Any:
    """A loader over ``samples``, normalised with ``mean``/``std`` as ``cfg.data`` says."""
    dataset = data.ImageDataset(samples, cfg.data, mean, std)
    return data.make_loader(dataset, cfg.data.batch_size, num_workers=cfg.data.num_workers)


class Batches:
    """The batches ``fit`` and ``training_scores`` iterate: a loader's, cut into tiles when the
    run tiles, behind a progress bar when asked.

    ``len()`` is the number of batches and ``num_images`` the images one pass yields (tiles
    when tiling), so a model can size its work before the first batch (the plugin contract).
    """

    def __init__(
        self, loader: Any, tiler: Tiler | None, size: int, progress: bool = False, desc: str = ""
    ) -> None:
        self.loader, self.tiler, self.progress, self.desc = loader, tiler, progress, desc
        per_image = 1 if tiler is None else tiler.num_tiles((size, size))
        self.num_images = len(loader.dataset) * per_image

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in progress_bar(self.loader, self.progress, self.desc):
            if self.tiler is not None:
                batch = {**batch, "image": self.tiler.tile(batch["image"])}
            yield batch


def make_tiler(cfg: Config) -> Tiler | None:
    """The run's tiler (``tiler.tile_size`` set), or None: run state kept by the engine."""
    return Tiler(cfg.tiler.tile_size, cfg.tiler.stride) if cfg.tiler.tile_size else None


def predict_batch(net: Model, images: torch.Tensor, tiler: Tiler | None = None) -> Prediction:
    """``net.predict``, through ``tiler`` when the run tiles its images."""
    if tiler is None:
        return net.predict(images)
    pred = net.predict(tiler.tile(images))  # (B*T, ...) per tile
    h, w = images.shape[-2:]
    maps = tiler.untile(pred.maps[:, None], (int(h), int(w)))[:, 0]
    return Prediction(scores=per_image_max(pred.scores, images.shape[0]), maps=maps)


def per_image_max(tile_scores: torch.Tensor, n_images: int) -> torch.Tensor:
    """Tile scores (N*T,) -> image scores (N,): an image is as anomalous as its worst tile."""
    return tile_scores.reshape(n_images, -1).amax(dim=1)


def decide(score: float, threshold: float | None) -> bool | None:
    """The verdict on one score: None without a threshold or for a non-finite score."""
    if threshold is None or not math.isfinite(score):
        return None
    return bool(score >= threshold)


def to_uint8(images: torch.Tensor, mean: Any, std: Any) -> list[np.ndarray]:
    """Normalised ``(B, 3, H, W)`` images back to ``(H, W, 3)`` uint8 arrays for drawing."""
    return list(data.denormalize(images.cpu(), mean, std))


def progress_bar(iterable: Any, enabled: bool, desc: str) -> Any:
    """``iterable`` behind a tqdm bar on stderr when ``enabled``, else unchanged."""
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, leave=False, file=sys.stderr)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as indented JSON (train.json, metrics.json)."""
    path.write_text(json.dumps(payload, indent=2) + "\n")
