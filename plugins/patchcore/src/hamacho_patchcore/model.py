"""PatchCore: a coreset memory bank of normal patch features, scored by nearest neighbour."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from hamacho import Components, Model, Prediction
from hamacho.errors import ArtifactError, ConfigError, DataError
from hamacho_patchcore import loo
from hamacho_patchcore.torch_model import PatchEmbedder, reweighted_scores

log = logging.getLogger("hamacho.patchcore")
_DTYPES = {"float16": torch.float16, "float32": torch.float32}
_LITE_LAYERS = ["blocks.2", "blocks.4"]  # EfficientNet-Lite stride 8 and 16: 28 x 28 at 224 px
_AGGREGATIONS = ("official", "mean", "concat")
_APPROXIMATE = ("faiss_ivfpq", "faiss_hnsw")  # search backends that are not exact


@dataclass
class PatchCoreConfig:
    """PatchCore settings (defaults: the paper's); see config.yaml for what each does."""

    backbone: str = "wide_resnet50_2"
    layers: list[str] = field(default_factory=lambda: ["layer2", "layer3"])
    weights: str = "imagenet"
    patch_size: int = 3
    aggregation: str = "official"  # official (the paper's code) | mean | concat
    pretrain_embed_dim: int = 1024
    embedding_dim: int = 1024
    coreset_ratio: float = 0.1
    max_bank_size: int = 0
    projection_dim: int = 128
    score: str = "max"
    num_neighbors: int = 9
    loo_candidates: int = 32  # no effect: kept so runs saved with it load (bounds replaced it)
    search: str = "auto"
    search_candidates_dim: int = 512  # exact search pruned by PCA lower bounds (0 = plain)
    search_rerank: int = 32  # k > 1 (score: paper): PCA neighbours re-ranked exactly
    sigma: float = 4.0
    border: str = "reflect"  # blur border: reflect (scipy, the references) | mirror
    feature_dtype: str = "float16"  # patch features held during fit and the memory bank
    backbone_batch: int = 4  # images per backbone forward (0 = whole loader batch)
    bf16: bool = False
    seed: int = 0


def _check(config: PatchCoreConfig) -> None:
    """Raise ConfigError naming the first setting that cannot work."""
    if config.aggregation == "recipe":  # its old name (artifacts saved before the rename)
        log.warning("model.aggregation=recipe is now called 'mean'; loading it as mean")
        config.aggregation = "mean"
    if config.loo_candidates != PatchCoreConfig.loo_candidates:
        log.warning(
            "model.loo_candidates has no effect: the leave-one-out threshold prunes with the "
            "search's lower bounds (model.search_candidates_dim); drop the setting"
        )
    if config.aggregation not in _AGGREGATIONS:
        raise ConfigError(
            f"model.aggregation must be one of {', '.join(_AGGREGATIONS)}, got "
            f"{config.aggregation!r}"
        )
    if config.score not in ("max", "paper"):
        raise ConfigError(f"model.score must be max or paper, got {config.score!r}")
    if config.feature_dtype not in _DTYPES:
        raise ConfigError(
            f"model.feature_dtype must be float16 or float32, got {config.feature_dtype!r}"
        )
    if not 0 < config.coreset_ratio <= 1:
        raise ConfigError(f"model.coreset_ratio must be in (0, 1], got {config.coreset_ratio}")
    if config.patch_size < 1 or config.patch_size % 2 == 0:
        raise ConfigError(
            f"model.patch_size must be an odd number >= 1 (it keeps the grid), got "
            f"{config.patch_size}"
        )
    positive = (
        "pretrain_embed_dim",
        "embedding_dim",
        "projection_dim",
        "num_neighbors",
        "loo_candidates",
        "search_rerank",
    )
    for key in positive:
        if getattr(config, key) < 1:
            raise ConfigError(f"model.{key} must be >= 1, got {getattr(config, key)}")
    if config.backbone_batch < 0:
        raise ConfigError(
            f"model.backbone_batch must be >= 0 (0 = whole batch), got {config.backbone_batch}"
        )
    if config.search_candidates_dim < 0:
        raise ConfigError(
            f"model.search_candidates_dim must be >= 0 (0 = plain search), got "
            f"{config.search_candidates_dim}"
        )
    if config.max_bank_size < 0:
        raise ConfigError(
            f"model.max_bank_size must be >= 0 (0 = no cap), got {config.max_bank_size}"
        )


def _gather_rows(chunks: list[torch.Tensor], index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` of ``torch.cat(chunks)`` (in that order) without concatenating them."""
    ends = torch.tensor([len(c) for c in chunks]).cumsum(0)
    index = index.cpu()
    which = torch.searchsorted(ends, index, right=True)  # the chunk each row lives in
    out = chunks[0].new_empty((len(index), chunks[0].shape[1]))
    for c in which.unique().tolist():
        rows = (which == c).nonzero()[:, 0]
        start = int(ends[c]) - len(chunks[c])
        out[rows.to(out.device)] = chunks[c][(index[rows] - start).to(out.device)]
    return out


def _owners(first: int, images: int, patches: int) -> torch.Tensor:
    """(images * patches,) int32: the image index of each row of a (B, P, D) batch, flattened."""
    return torch.arange(first, first + images, dtype=torch.int32).repeat_interleave(patches)


class PatchCore(Model):
    """PatchCore (Roth et al., CVPR 2022)."""

    name = "patchcore"
    summary = "Coreset memory bank of pretrained patch features, nearest-neighbour scoring"
    Config = PatchCoreConfig
    offline_fallback = {"backbone": "tf_efficientnet_lite0", "layers": _LITE_LAYERS}
    # the paper's layers for ResNets; stride 8/16 stages for EfficientNet-Lite
    layer_presets = {
        "resnet*": ["layer2", "layer3"],
        "wide_resnet*": ["layer2", "layer3"],
        "tf_efficientnet_lite*": _LITE_LAYERS,
    }
    test_overrides = {
        "backbone": "resnet18",
        "weights": "none",
        "pretrain_embed_dim": 64,
        "embedding_dim": 32,
    }

    def __init__(self, config: PatchCoreConfig, components: Components) -> None:
        _check(config)
        super().__init__(config, components)
        self.aggregator = components.feature_aggregator(
            config.backbone, config.layers, weights=config.weights, bf16=config.bf16
        )
        self.embedder = PatchEmbedder(
            self.aggregator,
            self.aggregator.feature_dimensions(),
            config.patch_size,
            config.pretrain_embed_dim,
            config.embedding_dim,
            chunk=config.backbone_batch,
            aggregation=config.aggregation,
        )
        self.search = components.search(
            backend=config.search,
            # PCA candidates certify exact answers on top of an exact backend only
            candidates_dim=0 if config.search in _APPROXIMATE else config.search_candidates_dim,
            rerank=config.search_rerank,
        )
        self.anomaly_map = components.anomaly_map(sigma=config.sigma, border=config.border)
        self.bank: torch.Tensor | None = None  # (N, embedder.dim) in feature_dtype
        self.bank_source: torch.Tensor | None = None  # (N,) int32: training image of each row
        self.grid: tuple[int, int] | None = None
        self.train_patches = 0  # patches the bank stands for (all fits, updates and merges)
        self._source_base = 0  # bank_source of the first image training_scores will see

    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return self.aggregator.normalization()

    def _sampler(self) -> Any:
        cfg = self.config
        return self.components.sampler(
            ratio=cfg.coreset_ratio,
            max_size=cfg.max_bank_size or None,
            projection_dim=cfg.projection_dim,
            seed=cfg.seed,
        )

    def fit(self, train_loader: Iterable[dict[str, Any]]) -> None:
        """Stream features batch by batch, then keep a greedy coreset of them."""
        sampler = self._sampler()
        dtype = _DTYPES[self.config.feature_dtype]
        kept: list[torch.Tensor] = []  # (B*P, D) per batch, in feature_dtype
        projected: list[torch.Tensor] = []  # (B*P, projection_dim) float32 per batch
        sources: list[torch.Tensor] = []  # (B*P,) int32 per batch: which image (tile) it is
        images = 0
        for batch in train_loader:
            emb, self.grid = self.embedder(batch["image"].to(self.components.device))
            flat = emb.reshape(-1, emb.shape[-1])  # (B, P, D) -> (B*P, D)
            if not kept:
                self._announce(train_loader, emb.shape[1], flat.shape[1])
            projected.append(sampler.project(flat))
            kept.append(flat.to(dtype))
            sources.append(_owners(images, *emb.shape[:2]))
            images += emb.shape[0]
            del emb, flat
        if not kept:
            raise DataError("PatchCore got no training images; check the train folder")
        self.train_patches = sum(len(p) for p in projected)
        self._source_base = 0
        index = sampler.select(projected)  # consumes the list: projections are not held twice
        # gather the chosen rows batch by batch: concatenating all features first would hold
        # them twice (2 x 3.2 GB for 2,000 images with wide_resnet50_2)
        self.bank = _gather_rows(kept, index)
        self.bank_source = torch.cat(sources)[index.cpu()]
        kept.clear()
        self.search.fit(self.bank)
        log.info("memory bank: %d of %d patches", self.bank.shape[0], self.train_patches)

    def update(self, train_loader: Iterable[dict[str, Any]]) -> None:
        """Add new images: a coreset of (bank rows + their patches) to ratio x all patches seen."""
        bank, source = self._fitted("update")
        dtype = _DTYPES[self.config.feature_dtype]
        base = int(source.max()) + 1 if len(source) else 0
        chunks, sources, images = [bank], [source], 0
        for batch in train_loader:
            emb, grid = self.embedder(batch["image"].to(self.components.device))
            if grid != self.grid:
                raise DataError(
                    f"the new images give a {grid} feature grid but PatchCore was fitted on "
                    f"{self.grid}. Use the training image size (data.image_size/crop_size)"
                )
            chunks.append(emb.reshape(-1, emb.shape[-1]).to(dtype))  # (B, P, D) -> (B*P, D)
            sources.append(_owners(base + images, *emb.shape[:2]))
            images += emb.shape[0]
        if images == 0:
            raise DataError("PatchCore.update got no images; check the folder's train/good")
        patches = self.train_patches + sum(len(c) for c in chunks[1:])
        self._reduce(chunks, sources, patches, keep=len(bank))
        self._source_base = base

    def merge(self, others: Sequence[Model]) -> None:
        """Pool other sites' banks and re-reduce them to ratio x all the patches they stand for."""
        bank, source = self._fitted("merge")
        chunks, sources, patches = [bank], [source], self.train_patches
        for other in others:
            if not isinstance(other, PatchCore) or other.grid != self.grid:
                raise ConfigError("PatchCore merges only PatchCore runs with the same feature grid")
            other_bank, other_source = other._fitted("merge")
            offset = int(torch.cat(sources).max()) + 1
            chunks.append(other_bank.to(bank.dtype))
            # image ids stay distinct across sites; unknown ones (-1) stay unknown
            sources.append(torch.where(other_source < 0, other_source, other_source + offset))
            patches += other.train_patches
        self._reduce(chunks, sources, patches)

    def outlier_score(self, others: Sequence[Model]) -> float:
        """Mean distance of (up to 2,000 of) this bank's rows to the nearest row of the others'."""
        bank, _ = self._fitted("merge")
        pooled = torch.cat([o._fitted("merge")[0] for o in others])  # type: ignore[attr-defined]
        step = max(1, len(bank) // 2000)
        search = self.components.search(backend="torch")
        search.fit(pooled)
        dist, _ = search.search(bank[::step].float(), k=1)
        return float(dist.float().mean())

    def _fitted(self, action: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The bank and its rows' source images (-1: unknown, saved before they were kept)."""
        if self.bank is None:
            raise ConfigError(f"PatchCore has not been fitted; fit before {action}")
        if self.bank_source is None:
            return self.bank, torch.full((len(self.bank),), -1, dtype=torch.int32)
        return self.bank, self.bank_source

    def _reduce(
        self, chunks: list[torch.Tensor], sources: list[torch.Tensor], patches: int, keep: int = 0
    ) -> None:
        """Keep a greedy coreset of the rows of ``chunks`` sized as a fit on ``patches`` would.

        ``keep``: the first ``keep`` rows are a coreset already (the bank being updated); they
        stay, as the greedy's first picks, while the target leaves room for new rows (else the
        greedy re-reduces all rows together, e.g. at ``max_bank_size``).
        """
        rows = sum(len(c) for c in chunks)
        target = max(1, math.ceil(patches * self.config.coreset_ratio))
        target = min(rows, target, self.config.max_bank_size or target)
        index = torch.arange(rows)
        if target < rows:
            sampler = self.components.sampler(
                ratio=target / rows,
                max_size=target,
                projection_dim=self.config.projection_dim,
                seed=self.config.seed,
            )
            keep = keep if keep < target else 0  # no room to grow: all rows compete
            index = sampler.select([sampler.project(c) for c in chunks], keep=keep)
        self.bank = _gather_rows(chunks, index)
        self.bank_source = torch.cat(sources)[index.cpu()]
        self.train_patches = patches
        self.search.fit(self.bank)
        log.info("memory bank: %d rows standing for %d patches", len(self.bank), patches)

    def _announce(self, loader: Any, patches: int, dim: int) -> None:
        """Log the features a fit holds, from the images (tiles) the loader says it yields."""
        n_images = getattr(loader, "num_images", None)  # the engine's Batches: tiles counted
        if n_images is None:  # a plain DataLoader, as a Python caller may pass
            try:
                n_images = len(loader.dataset)
            except (AttributeError, TypeError):
                return
        total = n_images * patches
        rows = max(1, math.ceil(total * self.config.coreset_ratio))
        if self.config.max_bank_size:
            rows = min(rows, self.config.max_bank_size)
        itemsize = _DTYPES[self.config.feature_dtype].itemsize
        held = total * (dim * itemsize + 4 * min(dim, self.config.projection_dim))
        log.info(
            "PatchCore: %d images x %d patches = %d features of %d dims; bank of %d rows "
            "(%.0f MB); about %.0f MB held during fit",
            n_images,
            patches,
            total,
            dim,
            rows,
            rows * dim * itemsize / 2**20,
            held / 2**20,
        )

    def predict(self, images: torch.Tensor) -> Prediction:
        """Nearest-neighbour distance per patch -> anomaly map; image score = max (or paper's)."""
        if self.bank is None:
            raise ConfigError("PatchCore.predict called before fit or load_state_dict")
        emb, grid = self.embedder(images.to(self.components.device))
        b, p, d = emb.shape
        dist, idx = self.search.search(emb.reshape(b * p, d), k=1)
        patch_scores = dist.reshape(b, p)
        if self.config.score == "paper":
            scores = reweighted_scores(
                patch_scores,
                emb,
                self.bank,  # read where it lives: never copied per batch
                idx.reshape(b, p),
                self.search,
                self.config.num_neighbors,
            )
        else:
            scores = patch_scores.amax(dim=1)
        maps = self.anomaly_map(patch_scores.reshape(b, *grid), tuple(images.shape[-2:]))
        return Prediction(scores=scores, maps=maps)

    def training_scores(self, train_loader: Iterable[dict[str, Any]]) -> torch.Tensor | None:
        """Leave-one-out image scores: each training image against the bank minus its own rows."""
        if self.bank is None or self.bank_source is None:
            return None  # an artifact saved before bank_source was kept
        if bool((self.bank_source == self.bank_source[0]).all()):
            return None  # one training image: there is no other image to score it against
        scores, images = [], 0
        other = loo.OtherImageSearch(self.bank, self.bank_source, self.config.search_candidates_dim)
        # the paper's re-weighting reads the bank in float32 on the CPU: convert it once
        paper_bank = other.full.cpu() if self.config.score == "paper" else None
        for batch in train_loader:
            emb, _ = self.embedder(batch["image"].to(self.components.device))
            b, p, d = emb.shape
            owner = _owners(self._source_base + images, b, p)
            dist, idx = other.nearest(emb.reshape(b * p, d), owner)
            patch_scores = dist.reshape(b, p)
            if paper_bank is not None:
                scores.append(
                    loo.reweighted_other(
                        patch_scores,
                        emb.cpu(),
                        paper_bank,
                        idx.reshape(b, p),
                        self.bank_source,
                        owner.reshape(b, p)[:, 0],
                        self.config.num_neighbors,
                    )
                )
            else:
                scores.append(patch_scores.amax(dim=1))
            images += b
        return torch.cat(scores)

    def export_module(self) -> torch.nn.Module:
        """hamacho's export hook: normalised (N, 3, h, w) -> (scores (N,), maps (N, h, w))."""
        from hamacho_patchcore.export import PatchCoreGraph

        return PatchCoreGraph(self)

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.bank is None:
            raise ConfigError("PatchCore has not been fitted; call fit before saving")
        state = {"memory_bank": self.bank, "grid": torch.tensor(self.grid)}
        state["train_patches"] = torch.tensor(self.train_patches, dtype=torch.int64)
        if self.bank_source is not None:
            state["bank_source"] = self.bank_source
        state.update({f"search.{k}": v for k, v in self.search.state_dict().items() if k != "bank"})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        bank = state.get("memory_bank")
        if bank is None or bank.ndim != 2 or bank.shape[1] != self.embedder.dim:
            got = None if bank is None else tuple(bank.shape)
            raise ArtifactError(
                f"PatchCore memory_bank is {got}, expected (N, {self.embedder.dim}) for this "
                "backbone/layers/embedding_dim; load it with the config it was trained with"
            )
        # on the run's device in feature_dtype: the search keeps this tensor itself, not a copy
        self.bank = bank.to(self.components.device, _DTYPES[self.config.feature_dtype])
        self.grid = tuple(int(v) for v in state["grid"]) if "grid" in state else None
        source = state.get("bank_source")  # absent in artifacts saved before it was kept
        self.bank_source = None if source is None else source.to(torch.int32)
        patches = state.get("train_patches")  # absent before 0.2: what a fit of that size saw
        ratio_guess = math.ceil(len(bank) / self.config.coreset_ratio)
        self.train_patches = ratio_guess if patches is None else int(patches)
        search_state = {
            k.removeprefix("search."): v for k, v in state.items() if k.startswith("search.")
        }
        self.search.load_state_dict({"bank": self.bank, **search_state})

    def info(self) -> dict[str, Any]:
        rows = 0 if self.bank is None else int(self.bank.shape[0])
        return {
            "memory_bank_rows": rows,
            "train_patches": self.train_patches,
            "embedding_dim": self.config.embedding_dim,
            "stored_dim": self.embedder.dim,  # < embedding_dim: exact low-rank coordinates
            "backbone": self.config.backbone,
            "weights": self.aggregator.weights,
        }
