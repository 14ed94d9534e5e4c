"""PaDiM: a Gaussian per feature-map position, scored by Mahalanobis distance."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from hamacho import Components, Model, Prediction
from hamacho.errors import ConfigError, ResourceError

log = logging.getLogger("hamacho.padim")
_PAPER_FEATURES = {448: 100, 1792: 550}  # resnet18, wide_resnet50_2
_BLOCK = 256  # positions per Mahalanobis matmul block at inference


@dataclass
class PadimConfig:
    """PaDiM settings (defaults: the paper's); see config.yaml for what each does."""

    backbone: str = "resnet18"
    layers: list[str] = field(default_factory=lambda: ["layer1", "layer2", "layer3"])
    weights: str = "imagenet"
    n_features: int = 0
    regularization: float = 0.01
    sigma: float = 4.0
    bf16: bool = False
    seed: int = 0


def default_n_features(total: int) -> int:
    """The paper's subset size for its backbones, about 30 % of the channels otherwise."""
    return _PAPER_FEATURES.get(total, max(1, round(0.3 * total)))


def available_memory() -> int:
    """Bytes of RAM available to this process (MemAvailable), or a large number if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


class Padim(Model):
    """PaDiM (Defard et al., ICPR 2020)."""

    name = "padim"
    summary = "Per-position Gaussian of pretrained features, Mahalanobis-distance scoring"
    Config = PadimConfig
    offline_fallback = {
        "backbone": "tf_efficientnet_lite0",
        "layers": ["blocks.1", "blocks.2", "blocks.4"],
    }
    test_overrides = {"weights": "none", "n_features": 16}

    def __init__(self, config: PadimConfig, components: Components) -> None:
        super().__init__(config, components)
        if config.regularization < 0:
            raise ConfigError("model.regularization must be >= 0")
        self.aggregator = components.feature_aggregator(
            config.backbone, config.layers, weights=config.weights, bf16=config.bf16
        )
        total = sum(self.aggregator.feature_dimensions())
        d = config.n_features or default_n_features(total)
        if not 0 < d <= total:
            raise ConfigError(f"model.n_features must be in 1..{total} for these layers, got {d}")
        gen = torch.Generator().manual_seed(config.seed)
        self.channels = torch.randperm(total, generator=gen)[:d].sort().values
        self.anomaly_map = components.anomaly_map(sigma=config.sigma)
        self.mean: torch.Tensor | None = None  # (P, d)
        self.precision: torch.Tensor | None = None  # (P, d, d): inverse covariance
        self.grid: tuple[int, int] | None = None

    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return tuple(self.aggregator.mean), tuple(self.aggregator.std)

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (P, B, d): the chosen channels at every position of the first grid."""
        feats = list(self.aggregator(images.to(self.components.device)).values())
        grid = feats[0].shape[-2:]
        up = [
            f if f.shape[-2:] == grid else F.interpolate(f, size=grid, mode="nearest")
            for f in feats
        ]
        emb = torch.cat(up, dim=1)[:, self.channels.to(up[0].device)]  # (B, d, h, w)
        self.grid = (int(grid[0]), int(grid[1]))
        return emb.flatten(2).permute(2, 0, 1).float()  # (P, B, d)

    def fit(self, train_loader: Iterable[dict[str, Any]]) -> None:
        """Stream batches into per-position mean and scatter (Chan's parallel update)."""
        count = 0
        mean = scatter = None
        for batch in train_loader:
            with torch.inference_mode():
                x = self._embed(batch["image"])  # (P, B, d)
            if mean is None:
                self._check_memory(x.shape[0], x.shape[2])
                mean = torch.zeros(x.shape[0], x.shape[2], device=x.device)
                scatter = torch.zeros(x.shape[0], x.shape[2], x.shape[2], device=x.device)
            n = x.shape[1]
            batch_mean = x.mean(dim=1)  # (P, d)
            centred = x - batch_mean[:, None]
            delta = batch_mean - mean
            total = count + n
            # scatter += Xc^T Xc + delta delta^T * count * n / total, one bmm for all positions
            scatter.baddbmm_(centred.transpose(1, 2), centred)
            scatter.add_(delta[:, :, None] * delta[:, None, :], alpha=count * n / total)
            mean.add_(delta, alpha=n / total)
            count = total
        if count < 2:
            raise ConfigError(f"PaDiM needs at least 2 training images, got {count}")
        cov = scatter.div_(count - 1)
        cov.diagonal(dim1=1, dim2=2).add_(self.config.regularization)
        self.mean = mean
        self.precision = _inverse(cov)
        log.info(
            "PaDiM: fitted %d positions x %d features on %d images",
            mean.shape[0],
            mean.shape[1],
            count,
        )

    def _check_memory(self, positions: int, d: int) -> None:
        need = positions * d * d * 4 * 2  # scatter + its inverse, float32
        log.info("PaDiM: %d positions x %d features need about %.0f MB", positions, d, need / 2**20)
        have = available_memory()
        if need > have and not os.environ.get("HAMACHO_IGNORE_MEMORY"):
            raise ResourceError(
                f"PaDiM needs about {need / 2**30:.1f} GiB for {positions} positions x {d} "
                f"features but only {have / 2**30:.1f} GiB is available. Set a smaller "
                "model.n_features or data.crop_size"
            )

    def predict(self, images: torch.Tensor) -> Prediction:
        """Mahalanobis distance of every position -> map; image score = max of the map."""
        if self.mean is None or self.precision is None:
            raise ConfigError("PaDiM.predict called before fit or load_state_dict")
        with torch.inference_mode():
            x = self._embed(images)  # (P, B, d)
            dist = torch.empty(x.shape[0], x.shape[1], device=x.device)
            for start in range(0, x.shape[0], _BLOCK):
                block = slice(start, start + _BLOCK)
                delta = x[block] - self.mean[block, None]  # (p, B, d)
                dist[block] = (torch.bmm(delta, self.precision[block]) * delta).sum(-1)
            patch = dist.clamp_(min=0).sqrt_().T.reshape(x.shape[1], *self.grid)
        maps = self.anomaly_map(patch, tuple(images.shape[-2:]))
        scores = maps.flatten(1).max(dim=1).values
        return Prediction(scores=scores, maps=maps)

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.mean is None or self.precision is None:
            raise ConfigError("PaDiM has not been fitted")
        return {
            "mean": self.mean,
            "precision": self.precision,
            "channels": self.channels,
            "grid": torch.tensor(self.grid),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        device = self.components.device
        self.mean = state["mean"].to(device)
        self.precision = state["precision"].to(device)
        self.channels = state["channels"]
        self.grid = tuple(int(v) for v in state["grid"])

    def info(self) -> dict[str, Any]:
        return {
            "n_features": int(self.channels.numel()),
            "positions": 0 if self.mean is None else int(self.mean.shape[0]),
            "backbone": self.config.backbone,
            "weights": self.aggregator.weights,
        }


def _inverse(cov: torch.Tensor, block: int = 512) -> torch.Tensor:
    """Invert SPD matrices (P, d, d) in place block by block, via Cholesky."""
    for start in range(0, cov.shape[0], block):
        part = cov[start : start + block]
        part.copy_(torch.cholesky_inverse(torch.linalg.cholesky(part)))
    return cov
