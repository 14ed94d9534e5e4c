"""PaDiM: a Gaussian per feature-map position, scored by Mahalanobis distance."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from hamacho import Components, Model, Prediction
from hamacho.errors import ArtifactError, ConfigError, DataError, ResourceError

log = logging.getLogger("hamacho.padim")  # under "hamacho" so the CLI shows it
PAPER_FEATURES = {448: 100, 1792: 550}  # resnet18, wide_resnet50_2 (layer1-3)
DEFAULT_FRACTION, DEFAULT_MAX_FEATURES = 0.3, 550
_BLOCK_BYTES = 64 << 20  # temporaries of one Mahalanobis / inverse block
_CPU_CHUNK = 8  # images per backbone forward on CPU
_STATE_KEYS = ("mean", "precision", "channels", "grid")
_LITE_LAYERS = ["blocks.1", "blocks.2", "blocks.4"]  # EfficientNet-Lite stride 4, 8 and 16


@dataclass
class PadimConfig:
    """PaDiM settings (defaults: the paper's); see config.yaml for what each does."""

    backbone: str = "resnet18"
    layers: list[str] = field(default_factory=lambda: ["layer1", "layer2", "layer3"])
    weights: str = "imagenet"
    n_features: int = 0  # 0 = default_n_features(total channels)
    regularization: float = 0.01
    sigma: float = 4.0
    border: str = "mirror"  # blur border: mirror (torch/anomalib) | reflect (scipy)
    bf16: bool = False
    seed: int = 0


def default_n_features(total: int) -> int:
    """The paper's subset for its backbones (100 of 448, 550 of 1792), else 30 % capped at 550."""
    if total in PAPER_FEATURES:
        return PAPER_FEATURES[total]
    return min(total, DEFAULT_MAX_FEATURES, max(1, round(DEFAULT_FRACTION * total)))


def memory_needed(positions: int, n_features: int) -> int:
    """Bytes of the fitted state: a float32 (d, d) matrix per position (the mean is negligible)."""
    return positions * n_features * n_features * 4


def available_memory() -> int:
    """Bytes this process may still allocate: MemAvailable, lowered by a cgroup v2 limit."""
    have = 1 << 62
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                have = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            have = min(have, int(limit) - used)
    except (OSError, ValueError):
        pass
    return have


def check_memory(positions: int, n_features: int, available: int | None = None) -> int:
    """Log the memory a fit needs; raise ResourceError when it exceeds ``available`` bytes."""
    need = memory_needed(positions, n_features)
    log.info(
        "PaDiM: %d positions x %d^2 features x 4 B = %.2f GB of covariances",
        positions,
        n_features,
        need / 1e9,
    )
    have = available_memory() if available is None else available
    if need > have:
        raise ResourceError(
            f"PaDiM needs {need / 1e9:.1f} GB ({positions} positions x {n_features}^2 features x "
            f"4 B) but only {have / 1e9:.1f} GB of RAM is available. Set a smaller "
            "model.n_features or data.crop_size/data.image_size"
        )
    return need


class GaussianAccumulator:
    """Per-position mean and scatter of (P, B, d) batches with fixed-size float32 state.

    Batches merge by Chan et al.'s parallel update: each batch is centred on its own mean, so
    float32 keeps ~1e-6 relative accuracy however many images stream through.
    """

    def __init__(self, positions: int, dim: int, device: torch.device | str = "cpu") -> None:
        self.count = 0
        self.mean = torch.zeros(positions, dim, device=device)
        self.scatter = torch.zeros(positions, dim, dim, device=device)

    def update(self, x: torch.Tensor) -> None:
        """Add a batch x (P, B, d) of B samples at each of the P positions."""
        n = x.shape[1]
        batch_mean = x.mean(dim=1)  # (P, d)
        rows = x - batch_mean[:, None]  # (P, B, d), centred on the batch mean
        delta = batch_mean - self.mean
        total = self.count + n
        if self.count:
            # scatter += delta delta^T * count * n / total enters as one extra scaled row, so a
            # single bmm updates all positions without a (P, d, d) temporary.
            scale = math.sqrt(self.count * n / total)
            rows = torch.cat([rows, delta[:, None] * scale], dim=1)  # (P, B+1, d)
        self.scatter.baddbmm_(rows.transpose(1, 2), rows)
        self.mean.add_(delta, alpha=n / total)
        self.count = total

    def covariance_(self, regularization: float = 0.0) -> torch.Tensor:
        """Unbiased covariance + regularization * I, computed in place of the scatter."""
        if self.count < 2:
            raise DataError(f"PaDiM needs at least 2 training images, got {self.count}")
        cov = self.scatter.div_(self.count - 1)
        cov.diagonal(dim1=1, dim2=2).add_(regularization)
        return cov


@contextlib.contextmanager
def _one_cpu_thread() -> Iterator[None]:
    """Run torch CPU ops single-threaded inside the block, then restore the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def invert_spd_(matrices: torch.Tensor) -> torch.Tensor:
    """Replace SPD matrices (P, d, d) by their inverses in place (float64 Cholesky per block)."""
    d = matrices.shape[-1]
    block = max(1, _BLOCK_BYTES // (3 * 8 * d * d))
    # MKL threads each small LAPACK call, which thrashes when cores are shared: 3136 inverses of
    # 100 x 100 took 0.7 s with 1 thread but 5.5 s with 2 on a busy 2-core CPU.
    threads = _one_cpu_thread() if matrices.device.type == "cpu" else contextlib.nullcontext()
    with threads:
        _invert_blocks(matrices, block)
    return matrices


def _invert_blocks(matrices: torch.Tensor, block: int) -> None:
    for start in range(0, matrices.shape[0], block):
        part = matrices[start : start + block]
        chol, info = torch.linalg.cholesky_ex(part.double())
        if info.any():
            bad = start + int(info.nonzero()[0, 0])
            raise ConfigError(
                f"PaDiM covariance at position {bad} is singular. Set model.regularization > 0 "
                "(the paper uses 0.01) or train on more images"
            )
        part.copy_(torch.cholesky_inverse(chol))


def mahalanobis(x: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Squared Mahalanobis distances (P, B) of x (P, B, d): one bmm per block of positions."""
    positions, batch, d = x.shape
    block = max(1, _BLOCK_BYTES // (2 * 4 * batch * d))
    out = torch.empty(positions, batch, device=x.device)
    for start in range(0, positions, block):
        part = slice(start, start + block)
        delta = x[part] - mean[part, None]  # (p, B, d)
        out[part] = torch.bmm(delta, precision[part]).mul_(delta).sum(-1)
    return out


class Padim(Model):
    """PaDiM (Defard et al., ICPR 2020)."""

    name = "padim"
    summary = "Per-position Gaussian of pretrained features, Mahalanobis-distance scoring"
    Config = PadimConfig
    offline_fallback = {"backbone": "tf_efficientnet_lite0", "layers": _LITE_LAYERS}
    # the paper's layers for ResNets; stride 4/8/16 stages for EfficientNet-Lite
    layer_presets = {
        "resnet*": ["layer1", "layer2", "layer3"],
        "wide_resnet*": ["layer1", "layer2", "layer3"],
        "tf_efficientnet_lite*": _LITE_LAYERS,
    }
    test_overrides = {"weights": "none", "n_features": 16}

    def __init__(self, config: PadimConfig, components: Components) -> None:
        super().__init__(config, components)
        if not config.regularization >= 0:
            raise ConfigError(f"model.regularization must be >= 0, got {config.regularization}")
        if config.n_features < 0:
            raise ConfigError(
                f"model.n_features must be >= 0 (0 = default), got {config.n_features}"
            )
        self.aggregator = components.feature_aggregator(
            config.backbone, config.layers, weights=config.weights, bf16=config.bf16
        )
        self._dims = self.aggregator.feature_dimensions()
        total = sum(self._dims)
        d = config.n_features or default_n_features(total)
        if d > total:
            raise ConfigError(
                f"model.n_features={d} exceeds the {total} channels of layers "
                f"{', '.join(config.layers)}. Set model.n_features to 1..{total} (0 = default)"
            )
        gen = torch.Generator().manual_seed(config.seed)
        self._set_channels(torch.randperm(total, generator=gen)[:d].sort().values)
        self.anomaly_map = components.anomaly_map(sigma=config.sigma, border=config.border)
        self.mean: torch.Tensor | None = None  # (P, d)
        self.precision: torch.Tensor | None = None  # (P, d, d): inverse covariance
        self.grid: tuple[int, int] | None = None  # (h, w), P = h * w
        self.n_train = 0
        self._operators: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    def _set_channels(self, channels: torch.Tensor) -> None:
        """Keep the sorted subset and, per layer, the local indices to pick before upsampling."""
        self.channels = channels.long()
        device = self.components.device
        offsets = [0, *torch.tensor(self._dims).cumsum(0).tolist()]
        self._per_layer = [
            (channels[(channels >= lo) & (channels < hi)] - lo).to(device)
            for lo, hi in zip(offsets[:-1], offsets[1:], strict=True)
        ]

    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return tuple(self.aggregator.mean), tuple(self.aggregator.std)

    def _grid_for(self, image_shape: tuple[int, ...]) -> tuple[int, int]:
        _, h, w = self.aggregator.feature_shapes(image_shape)[self.aggregator.layers[0]]
        return h, w

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (P, B, d) contiguous: the chosen channels at each first-layer cell."""
        # On CPU the backbone runs a few images at a time: a 32-image batch of lite0 holds ~350 MB
        # of activations at 224 px, which sets the peak RSS of the whole fit.
        step = _CPU_CHUNK if self.components.device.type == "cpu" else len(images)
        chunks = [self._embed_chunk(images[i : i + step]) for i in range(0, len(images), step)]
        emb = chunks[0] if len(chunks) == 1 else torch.cat(chunks)  # (B, d, P)
        # positions outermost and contiguous: bmm over positions is ~10x slower on strided input
        return emb.permute(2, 0, 1).contiguous()

    def _embed_chunk(self, images: torch.Tensor) -> torch.Tensor:
        """(b, 3, H, W) -> (b, d, P): chosen channels, deeper layers nearest-upsampled."""
        feats = list(self.aggregator(images).values())
        grid = feats[0].shape[-2:]
        parts = []
        for feat, idx in zip(feats, self._per_layer, strict=True):
            if idx.numel():
                part = feat.index_select(1, idx)  # select first: upsample d, not all, channels
                if part.shape[-2:] != grid:
                    part = F.interpolate(part, size=grid, mode="nearest")
                parts.append(part)
        return torch.cat(parts, dim=1).flatten(2)

    def _map_operators(self, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(H, h) and (w, W) matrices with map = rows @ patch @ cols, from the map generator.

        Bilinear upsampling and a Gaussian blur are both linear and separable, so the generator
        applied once to an identity basis per axis gives them as matrices: two small matmuls
        then replace the convolutions (32 maps of 224 px: 450 ms -> 40 ms on a busy 2-core CPU).
        """
        key = (*self.grid, *size)
        if key not in self._operators:
            device = self.components.device
            (h, w), (height, width) = self.grid, size
            rows = self.anomaly_map(torch.eye(h, device=device)[:, :, None], (height, 1))
            cols = self.anomaly_map(torch.eye(w, device=device)[:, None, :], (1, width))
            self._operators = {key: (rows[:, :, 0].T.contiguous(), cols[:, 0, :].contiguous())}
        return self._operators[key]

    def fit(self, train_loader: Iterable[dict[str, Any]]) -> None:
        """Stream batches into a fixed-size per-position mean and scatter, then invert."""
        stats = None
        with torch.no_grad():
            for batch in train_loader:
                images = batch["image"]
                if stats is None:
                    self.grid = self._grid_for(tuple(images.shape[1:]))
                    positions, d = self.grid[0] * self.grid[1], len(self.channels)
                    check_memory(positions, d)  # before the backbone runs or anything is allocated
                    stats = GaussianAccumulator(positions, d, self.components.device)
                stats.update(self._embed(images))
            if stats is None:
                raise DataError("PaDiM.fit got no training batches. Add images to train/good")
            # covariance and inverse overwrite the scatter: one (P, d, d) tensor at any time
            self.precision = invert_spd_(stats.covariance_(self.config.regularization))
        self.mean, self.n_train = stats.mean, stats.count
        log.info(
            "PaDiM: fitted %d positions x %d features on %d images",
            self.mean.shape[0],
            self.mean.shape[1],
            self.n_train,
        )

    def predict(self, images: torch.Tensor) -> Prediction:
        """Mahalanobis distance of every position -> map; image score = max of the map."""
        if self.mean is None or self.precision is None or self.grid is None:
            raise ConfigError("PaDiM.predict called before fit or load_state_dict")
        with torch.no_grad():
            x = self._embed(images)  # (P, B, d)
            if x.shape[0] != self.mean.shape[0]:
                h, w = self._grid_for(tuple(images.shape[1:]))
                raise DataError(
                    f"images of {images.shape[-2]}x{images.shape[-1]} px give a {h}x{w} feature "
                    f"grid but PaDiM was fitted on {self.grid[0]}x{self.grid[1]}. Use the "
                    "training image size (data.image_size/crop_size)"
                )
            dist = mahalanobis(x, self.mean, self.precision)  # (P, B)
            patch = dist.clamp_(min=0).sqrt_().T.reshape(-1, *self.grid)  # (B, h, w)
            rows, cols = self._map_operators((images.shape[-2], images.shape[-1]))
            maps = rows @ patch @ cols  # (H, h) @ (B, h, w) @ (w, W) -> (B, H, W)
        return Prediction(scores=maps.flatten(1).amax(dim=1), maps=maps)

    def export_module(self) -> torch.nn.Module:
        """hamacho's export hook: normalised (N, 3, h, w) -> (scores (N,), maps (N, h, w))."""
        from hamacho_padim.export import PadimGraph

        return PadimGraph(self)

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.mean is None or self.precision is None or self.grid is None:
            raise ConfigError("PaDiM has not been fitted: call fit before state_dict")
        return {
            "mean": self.mean,
            "precision": self.precision,
            "channels": self.channels,
            "grid": torch.tensor(self.grid),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing:
            raise ArtifactError(
                f"PaDiM state lacks {', '.join(missing)}: not a PaDiM artifact. Retrain with "
                "--model padim"
            )
        mean, precision, channels = state["mean"], state["precision"], state["channels"]
        grid = tuple(int(v) for v in state["grid"].reshape(-1))
        positions, d = mean.shape if mean.ndim == 2 else (-1, -1)
        total = sum(self._dims)
        if (
            precision.shape != (positions, d, d)
            or channels.shape != (d,)
            or len(grid) != 2
            or grid[0] * grid[1] != positions
            or not bool((channels.diff() > 0).all())  # fit's order: sorted, unique
            or not 0 <= int(channels.min()) <= int(channels.max()) < total
        ):
            raise ArtifactError(
                f"PaDiM state shapes disagree (mean {tuple(mean.shape)}, precision "
                f"{tuple(precision.shape)}, channels {tuple(channels.shape)} of {total}, grid "
                f"{grid}). Retrain with the same backbone and layers"
            )
        device = self.components.device
        self.mean, self.precision = mean.to(device), precision.to(device)
        self._set_channels(channels)
        self.grid = (grid[0], grid[1])

    def info(self) -> dict[str, Any]:
        positions = 0 if self.mean is None else int(self.mean.shape[0])
        return {
            "n_features": int(self.channels.numel()),
            "channels_total": sum(self._dims),
            "positions": positions,
            "state_mb": round(memory_needed(positions, int(self.channels.numel())) / 2**20, 1),
            "backbone": self.config.backbone,
            "weights": self.aggregator.weights,
        }
