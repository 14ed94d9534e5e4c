"""PaDiM: a Gaussian per feature-map position, scored by Mahalanobis distance."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from hamacho import Components, Model, Prediction
from hamacho.components.features import map_chunks, resize_maps
from hamacho.errors import ArtifactError, ConfigError, DataError, ResourceError
from hamacho_padim.gaussian import (
    GaussianAccumulator,
    loo_mahalanobis,
    mahalanobis,
)
from hamacho_padim.selection import (
    Selection,
    default_n_features,
    memory_needed,
    random_channels,
    resolve_auto,
    semi_orthogonal,
    top_variance,
)

__all__ = ["GaussianAccumulator", "Padim", "PadimConfig", "default_n_features", "mahalanobis"]
log = logging.getLogger("hamacho.padim")  # under "hamacho" so the CLI shows it
# images per backbone forward on a CPU: a 32-image batch of lite0 holds ~350 MB of activations
# at 224 px, which sets the peak RSS of the whole fit
_CPU_CHUNK = 8
_STATE_KEYS = ("mean", "precision", "channels", "grid")  # + "projection" (selection orthogonal)
_LITE_LAYERS = ["blocks.1", "blocks.2", "blocks.4"]  # EfficientNet-Lite stride 4, 8 and 16


@dataclass
class PadimConfig:
    """PaDiM settings; see config.yaml for what each does."""

    backbone: str = "resnet18"
    layers: list[str] = field(default_factory=lambda: ["layer1", "layer2", "layer3"])
    weights: str = "imagenet"
    selection: Selection = "auto"
    n_features: int = 0  # 0 = default_n_features(total channels) where a selection needs one
    seed: int = 0  # draws the random subset / the orthogonal projection
    regularization: float = 0.01
    sigma: float = 4.0
    border: Literal["mirror", "reflect"] = "mirror"  # blur border: torch/anomalib | scipy
    bf16: bool = False

    def validate(self) -> None:
        """Raise ConfigError naming the first setting out of range (before any backbone loads)."""
        if not self.regularization >= 0:
            raise ConfigError(f"model.regularization must be >= 0, got {self.regularization}")
        if self.n_features < 0:
            raise ConfigError(f"model.n_features must be >= 0 (0 = default), got {self.n_features}")
        if self.selection == "all" and self.n_features:
            raise ConfigError(
                f"model.n_features={self.n_features} does not apply to model.selection=all (every "
                "channel). Set model.n_features=0, or model.selection=random|orthogonal|variance"
            )
        if not self.sigma >= 0:
            raise ConfigError(f"model.sigma must be >= 0 (0 disables the blur), got {self.sigma}")


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
            f"4 B) but only {have / 1e9:.1f} GB of RAM is available. Set "
            "model.selection=orthogonal with a smaller model.n_features, or a smaller "
            "data.crop_size/data.image_size"
        )
    return need


def chosen_features(
    feats: list[torch.Tensor],
    picks: Sequence[torch.Tensor],
    rows: Sequence[torch.Tensor | None],
) -> torch.Tensor:
    """Layer maps [(b, C_l, h_l, w_l)] -> (b, d, h, w) on the first grid: the modelled features.

    ``picks`` are each layer's chosen channels; ``rows`` each layer's rows of the orthogonal
    projection (all None without one). Used by predict, fit and the exported graph alike.
    """
    parts = []
    for feat, idx, layer_rows in zip(feats, picks, rows, strict=True):
        if idx.numel():
            # select first: upsample d, not all, channels
            part = feat if idx.numel() == feat.shape[1] else feat.index_select(1, idx)
            if layer_rows is not None:  # project before upsampling: nearest only copies cells
                part = torch.einsum("bchw,cd->bdhw", part, layer_rows)
            parts.append(part)
    parts = resize_maps(parts, feats[0].shape[-2:], "nearest")
    if rows and rows[0] is not None:  # W^T x = the sum of each layer's rows times its features
        emb = parts[0]
        for part in parts[1:]:
            emb = emb + part
        return emb
    return torch.cat(parts, dim=1)


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
        config.validate()  # also when built without resolve (tests, other callers)
        self.aggregator = components.feature_aggregator(
            config.backbone, config.layers, weights=config.weights, bf16=config.bf16
        )
        self._chunk = _CPU_CHUNK if components.device.type == "cpu" else 0  # 0: whole batch
        self._dims = self.aggregator.feature_dimensions()
        total = sum(self._dims)
        if config.n_features > total:
            raise ConfigError(
                f"model.n_features={config.n_features} exceeds the {total} channels of layers "
                f"{', '.join(config.layers)}. Set model.n_features to 1..{total} (0 = default)"
            )
        self.anomaly_map = components.anomaly_map(sigma=config.sigma, border=config.border)
        self.mean: torch.Tensor | None = None  # (P, d)
        self.precision: torch.Tensor | None = None  # (P, d, d): inverse covariance
        self.grid: tuple[int, int] | None = None  # (h, w), P = h * w
        self.n_train = 0
        # (P, d, d) float32 scatter sum (x - mean)(x - mean)^T: with n_train and mean the sufficient
        # statistics, so update and merge equal a fit on all images (None: saved before 0.2)
        self.scatter: torch.Tensor | None = None
        self._operators: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        # auto without n_features needs the grid to decide: every channel until fit knows it
        choice = config.selection
        if choice == "auto":
            choice = "random" if config.n_features else "all"
        self._select(choice)

    def _select(self, selection: Selection) -> None:
        """Set the channels (and projection) the Gaussians model for a resolved selection."""
        total = sum(self._dims)
        d = self.config.n_features or default_n_features(total)
        self.selection = selection
        if selection == "random":
            self._set_channels(random_channels(total, d, self.config.seed))
        elif selection == "orthogonal":
            self._set_channels(torch.arange(total), semi_orthogonal(total, d, self.config.seed))
        else:  # all; variance keeps its top channels once fit has seen their variances
            self._set_channels(torch.arange(total))

    def _set_channels(self, channels: torch.Tensor, projection: torch.Tensor | None = None) -> None:
        """Keep the sorted subset and, per layer, the local indices (and projection rows)."""
        self.channels = channels.long()
        self.projection = projection  # (channels, d) or None
        device = self.components.device
        offsets = [0, *torch.tensor(self._dims).cumsum(0).tolist()]
        bounds = list(zip(offsets[:-1], offsets[1:], strict=True))
        masks = [(self.channels >= lo) & (self.channels < hi) for lo, hi in bounds]
        self._per_layer = [
            (self.channels[m] - lo).to(device) for m, (lo, _) in zip(masks, bounds, strict=True)
        ]
        self._rows = [None if projection is None else projection[m].to(device) for m in masks]

    @property
    def dim(self) -> int:
        """Dimension d of each position's Gaussian."""
        return int(self.channels.numel() if self.projection is None else self.projection.shape[1])

    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return self.aggregator.normalization()

    def _grid_for(self, image_shape: tuple[int, ...]) -> tuple[int, int]:
        _, h, w = self.aggregator.feature_shapes(image_shape)[self.aggregator.layers[0]]
        return h, w

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (P, B, d) contiguous: the modelled features at each first-layer cell."""
        emb, _ = map_chunks(self.aggregator, images, self._embed_chunk, self._chunk)  # (B, d, P)
        # positions outermost and contiguous: bmm over positions is ~10x slower on strided input
        return emb.permute(2, 0, 1).contiguous()

    def _embed_chunk(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Layer maps of b images -> (b, d, P): chosen channels, deeper layers nearest-upsampled."""
        return chosen_features(feats, self._per_layer, self._rows).flatten(2)

    def _map_operators(self, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(H, h) and (w, W) matrices with map = rows @ patch @ cols, from the map generator.

        Bilinear upsampling and a Gaussian blur are both linear and separable, so the generator
        applied once to an identity basis per axis gives them as matrices: two small matmuls
        then replace the convolutions (32 maps of 224 px: 450 ms -> 40 ms on a busy 2-core CPU).
        """
        assert self.grid is not None
        key = (*self.grid, *size)
        if key not in self._operators:
            device = self.components.device
            (h, w), (height, width) = self.grid, size
            rows = self.anomaly_map(torch.eye(h, device=device)[:, :, None], (height, 1))
            cols = self.anomaly_map(torch.eye(w, device=device)[:, None, :], (1, width))
            self._operators = {key: (rows[:, :, 0].T.contiguous(), cols[:, 0, :].contiguous())}
        return self._operators[key]

    def _maps(self, dist: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Squared distances (P, B) -> anomaly maps (B, H, W): sqrt, upsample, blur."""
        assert self.grid is not None
        patch = dist.clamp_(min=0).sqrt_().T.reshape(-1, *self.grid)  # (B, h, w)
        rows, cols = self._map_operators(size)
        return rows @ patch @ cols  # (H, h) @ (B, h, w) @ (w, W) -> (B, H, W)

    def fit(self, train_loader: Iterable[dict[str, Any]]) -> None:
        """Stream batches into a fixed-size per-position mean and scatter, then invert."""
        stats = None
        with torch.no_grad():
            for batch in train_loader:
                images = batch["image"]
                if stats is None:
                    self.grid = self._grid_for(tuple(images.shape[1:]))
                    positions = self.grid[0] * self.grid[1]
                    if self.config.selection == "auto":
                        n, total = self.config.n_features, sum(self._dims)
                        self._select(resolve_auto("auto", n, total, positions))
                    check_memory(positions, self.dim)  # before the backbone runs or allocates
                    stats = GaussianAccumulator(positions, self.dim, self.components.device)
                stats.update(self._embed(images))
            if stats is None:
                raise DataError("PaDiM.fit got no training batches. Add images to train/good")
            if self.selection == "variance":  # the sub-block of a covariance is the subset's
                d = self.config.n_features or default_n_features(self.dim)
                keep = top_variance(stats.scatter.diagonal(dim1=1, dim2=2), d)
                stats.keep_(keep)
                self._set_channels(self.channels[keep])
            self._finish(stats)
        log.info(
            "PaDiM: fitted %d positions x %d features (selection %s) on %d images",
            self.mean.shape[0],
            self.mean.shape[1],
            self.selection,
            self.n_train,
        )

    def _finish(self, stats: GaussianAccumulator) -> None:
        """Keep the statistics, then invert their covariance into the precision."""
        self.precision = stats.precision(self.config.regularization)
        self.scatter, self.mean, self.n_train = stats.scatter, stats.mean, stats.count

    def _statistics(self, action: str, copy: bool = True) -> GaussianAccumulator:
        """The fitted statistics as an accumulator; ArtifactError where they were not saved."""
        if self.mean is None or self.scatter is None:
            raise ArtifactError(
                f"this PaDiM run was saved without its statistics (count and scatter), so it "
                f"cannot be {action}d exactly. Retrain it with this hamacho, then {action} it"
            )
        if self.selection == "variance":
            raise ConfigError(
                f"PaDiM with model.selection=variance ranks channels on the training images, so "
                f"a {action} cannot equal a refit. Retrain on all images, or use selection "
                "random, orthogonal or all"
            )
        return GaussianAccumulator.restore(self.n_train, self.mean, self.scatter, copy)

    def update(self, train_loader: Iterable[dict[str, Any]]) -> None:
        """Stream more good images into the saved statistics: exactly a fit on all of them."""
        stats = self._statistics("update", copy=False)  # the first batch makes new tensors
        with torch.no_grad():
            for batch in train_loader:
                x = self._embed(batch["image"])  # (P, B, d)
                self._check_grid(batch["image"], x)
                stats.update(x)
            self._finish(stats)

    def merge(self, others: Sequence[Model]) -> None:
        """Pool other sites' statistics into these (exact: a fit on the union of their images)."""
        stats = self._statistics("merge", copy=False)  # the first merge_ makes new tensors
        for other in others:
            if not isinstance(other, Padim) or other.grid != self.grid:
                raise ConfigError("PaDiM merges only PaDiM runs fitted on the same feature grid")
            if not torch.equal(other.channels, self.channels) or (
                (other.projection is None) != (self.projection is None)
                or (
                    other.projection is not None
                    and not torch.equal(other.projection, self.projection)
                )
            ):
                raise ConfigError(
                    "the PaDiM runs model different channels (model.selection/n_features/seed). "
                    "Merge runs trained with the same settings"
                )
            with torch.no_grad():
                stats.merge_(other._statistics("merge", copy=False))
        with torch.no_grad():
            self._finish(stats)

    def outlier_score(self, others: Sequence[Model]) -> float:
        """Mean squared Mahalanobis distance of this site's means under the others' pooled fit."""
        pooled = others[0]._statistics("merge", copy=False)  # type: ignore[attr-defined]
        for other in others[1:]:
            pooled.merge_(other._statistics("merge", copy=False))  # type: ignore[attr-defined]
        assert self.mean is not None
        with torch.no_grad():
            precision = pooled.precision(self.config.regularization)
            dist = mahalanobis(self.mean[:, None].to(precision.device), pooled.mean, precision)
        return float(dist.mean()) / self.dim

    def _check_grid(self, images: torch.Tensor, x: torch.Tensor) -> None:
        assert self.mean is not None and self.grid is not None
        if x.shape[0] != self.mean.shape[0]:
            h, w = self._grid_for(tuple(images.shape[1:]))
            raise DataError(
                f"images of {images.shape[-2]}x{images.shape[-1]} px give a {h}x{w} feature "
                f"grid but PaDiM was fitted on {self.grid[0]}x{self.grid[1]}. Use the "
                "training image size (data.image_size/crop_size)"
            )

    def predict(self, images: torch.Tensor) -> Prediction:
        """Mahalanobis distance of every position -> map; image score = max of the map."""
        if self.mean is None or self.precision is None or self.grid is None:
            raise ConfigError("PaDiM.predict called before fit or load_state_dict")
        with torch.no_grad():
            x = self._embed(images)  # (P, B, d)
            self._check_grid(images, x)
            dist = mahalanobis(x, self.mean, self.precision)  # (P, B)
            maps = self._maps(dist, (images.shape[-2], images.shape[-1]))
        return Prediction(scores=maps.flatten(1).amax(dim=1), maps=maps)

    def training_scores(self, train_loader: Iterable[dict[str, Any]]) -> torch.Tensor | None:
        """Image scores (N,) of the fitted images, each under the Gaussians fitted without it.

        Exact leave-one-out of the fitted Gaussians (see ``gaussian.loo_mahalanobis``), then
        predict's map and max. The features stay those the fit chose (selection variance ranks
        them on every image, the image itself included). With tiling each tile is one fitted
        sample, so a tile is left out, not its whole image.
        """
        if self.mean is None or self.precision is None or self.n_train == 0:
            raise ConfigError("PaDiM.training_scores called before fit")
        if self.n_train < 3:
            log.warning("PaDiM: leave-one-out needs 3 or more training images: no threshold")
            return None
        scores = []
        covariance = self._loo_covariance()
        with torch.no_grad():
            for batch in train_loader:
                images = batch["image"]
                x = self._embed(images)  # (P, B, d)
                self._check_grid(images, x)
                reg = self.config.regularization
                dist = loo_mahalanobis(x, self.mean, self.precision, self.n_train, reg, covariance)
                maps = self._maps(dist.float(), (images.shape[-2], images.shape[-1]))
                scores.append(maps.flatten(1).amax(dim=1))
        return torch.cat(scores) if scores else torch.empty(0)

    def _loo_covariance(self) -> torch.Tensor | None:
        """S itself, which leave-one-out needs when n <= d (see loo_mahalanobis), if it fits."""
        assert self.mean is not None
        if self.scatter is None or self.n_train > self.dim:
            return None
        if 2 * memory_needed(*self.mean.shape) > available_memory():
            return None
        cov = self.scatter / (self.n_train - 1)
        cov.diagonal(dim1=1, dim2=2).add_(self.config.regularization)
        return cov

    def export_module(self) -> torch.nn.Module:
        """hamacho's export hook: normalised (N, 3, h, w) -> (scores (N,), maps (N, h, w))."""
        from hamacho_padim.export import PadimGraph

        return PadimGraph(self)

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.mean is None or self.precision is None or self.grid is None:
            raise ConfigError("PaDiM has not been fitted: call fit before state_dict")
        state = {
            "mean": self.mean,
            "precision": self.precision,
            "channels": self.channels,
            "grid": torch.tensor(self.grid),
        }
        if self.projection is not None:
            state["projection"] = self.projection
        if self.scatter is not None:
            state["count"] = torch.tensor(self.n_train, dtype=torch.int64)
            state["scatter"] = self.scatter
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing:
            raise ArtifactError(
                f"PaDiM state lacks {', '.join(missing)}: not a PaDiM artifact. Retrain with "
                "--model padim"
            )
        mean, precision, channels = state["mean"], state["precision"], state["channels"]
        projection = state.get("projection")
        grid = tuple(int(v) for v in state["grid"].reshape(-1))
        positions, d = mean.shape if mean.ndim == 2 else (-1, -1)
        # d channels, or (with a projection) any channels projected to d
        inputs = (d,) if projection is None else (int(projection.shape[0]),)
        total = sum(self._dims)
        if (
            precision.shape != (positions, d, d)
            or channels.shape != inputs
            or (projection is not None and projection.shape != (channels.shape[0], d))
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
        scatter, count = state.get("scatter"), state.get("count")  # absent before 0.2
        if scatter is not None and (scatter.shape != precision.shape or count is None):
            raise ArtifactError(
                f"PaDiM scatter is {tuple(scatter.shape)}, expected {tuple(precision.shape)} "
                "with a count. Retrain with the same backbone and layers"
            )
        device = self.components.device
        self.mean, self.precision = mean.to(device), precision.to(device)
        self.scatter = None if scatter is None else scatter.float().to(device)
        self.n_train = 0 if count is None else int(count)
        self._set_channels(channels, projection)
        if projection is not None or channels.numel() == total:
            self.selection = "orthogonal" if projection is not None else "all"
        elif self.config.selection not in ("random", "variance"):
            self.selection = "random"  # auto with n_features
        self.grid = (grid[0], grid[1])

    def info(self) -> dict[str, Any]:
        positions = 0 if self.mean is None else int(self.mean.shape[0])
        return {
            "selection": self.selection,
            "n_features": self.dim,
            "channels_total": sum(self._dims),
            "positions": positions,
            # precision, and the scatter kept for update/merge
            "state_mb": round(2 * memory_needed(positions, self.dim) / 2**20, 1),
            "backbone": self.config.backbone,
            "weights": self.aggregator.weights,
        }
