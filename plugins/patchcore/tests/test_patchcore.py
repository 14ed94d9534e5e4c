"""PatchCore plugin: embeddings, memory bank, scores, save/load and config errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hamacho_patchcore import loo
from hamacho_patchcore.model import PatchCore, PatchCoreConfig
from hamacho_patchcore.torch_model import PatchEmbedder
from torch import nn

from hamacho import config as config_mod
from hamacho.components import artifact, data, metrics
from hamacho.components.features import NetworkFeatureAggregator
from hamacho.components.synthetic import make_synthetic_dataset
from hamacho.engine import make_components
from hamacho.errors import ArtifactError, BackboneError, ConfigError

# resnet18 with random weights, small embeddings: fast, and enough to check the mechanics
TINY = {"backbone": "resnet18", "weights": "none", "pretrain_embed_dim": 64, "embedding_dim": 32}


def test_approximate_search_backends_build_without_pca_candidates():
    pytest.importorskip("faiss")
    for backend in ("faiss_hnsw", "faiss_ivfpq"):
        assert _model(search=backend).search.candidates_dim == 0  # they cannot be certified
    assert _model(aggregation="official").search.candidates_dim == 512


def _model(**overrides: object) -> PatchCore:
    cfg = config_mod.resolve(
        PatchCoreConfig, [{"model": {**TINY, **overrides}, "run": {"device": "cpu"}}]
    )
    return PatchCore(cfg.model, make_components(cfg))


def test_a_retired_setting_says_it_has_no_effect(caplog: pytest.LogCaptureFixture) -> None:
    def said() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "hamacho.patchcore"]

    with caplog.at_level(logging.WARNING, logger="hamacho.patchcore"):
        _model()
        assert not said()  # the default, as older runs saved it: silent
        _model(loo_candidates=8)
    (line,) = said()
    assert line.startswith("model.loo_candidates has no effect") and "drop the setting" in line


def _images(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _batches(images: torch.Tensor, size: int = 4) -> list[dict[str, torch.Tensor]]:
    return [{"image": images[i : i + size]} for i in range(0, len(images), size)]


@pytest.fixture(scope="module")
def fitted() -> PatchCore:
    model = _model(coreset_ratio=0.25)
    model.fit(_batches(_images(8)))
    return model


def _mean(features: list[torch.Tensor], pretrain: int, dim: int) -> torch.Tensor:
    """aggregation=mean written out step by step: (B, h*w, dim)."""
    grid = features[0].shape[-2:]
    pooled = []
    for fmap in features:
        fmap = F.avg_pool2d(fmap, 3, stride=1, padding=1)
        fmap = F.interpolate(fmap, size=grid, mode="bilinear", align_corners=False)
        vectors = fmap.flatten(2).transpose(1, 2)  # (B, h*w, C)
        b, p, c = vectors.shape
        pooled.append(
            F.adaptive_avg_pool1d(vectors.reshape(b * p, 1, c), pretrain).reshape(b, p, -1)
        )
    stacked = torch.cat(pooled, dim=2)
    b, p, c = stacked.shape
    return F.adaptive_avg_pool1d(stacked.reshape(b * p, 1, c), dim).reshape(b, p, dim)


def _tiny_aggregator() -> NetworkFeatureAggregator:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 10, 3, stride=2, padding=1),
        nn.ReLU(),
    )
    return NetworkFeatureAggregator(net, ["1", "3"], device="cpu")


def _official(features: list[torch.Tensor], pretrain: int, dim: int) -> torch.Tensor:
    """The official embedding step by step, as patchcore-inspection does it: (B, h*w, dim)."""
    b = features[0].shape[0]
    ref_h, ref_w = features[0].shape[-2:]
    vectors = []
    for fmap in features:
        c, h, w = fmap.shape[1:]
        # PatchMaker.patchify: (B, C*9, h*w) -> (B, C, 3, 3, h*w) -> (B, h*w, C, 3, 3)
        patches = F.unfold(fmap, kernel_size=3, stride=1, padding=1, dilation=1)
        patches = patches.reshape(b, c, 3, 3, -1).permute(0, 4, 1, 2, 3)
        if (h, w) != (ref_h, ref_w):  # every one of the C*9 components upsampled on its own
            grid = patches.reshape(b, h, w, c, 3, 3).permute(0, 3, 4, 5, 1, 2)
            ups = F.interpolate(
                grid.reshape(-1, h, w).unsqueeze(1),
                size=(ref_h, ref_w),
                mode="bilinear",
                align_corners=False,
            ).squeeze(1)
            ups = ups.reshape(b, c, 3, 3, ref_h, ref_w).permute(0, 4, 5, 1, 2, 3)
            patches = ups.reshape(b, -1, c, 3, 3)
        patches = patches.reshape(-1, c, 3, 3)  # (B*h*w, C, 3, 3)
        # MeanMapper: flatten each patch (channel-major) and pool it to `pretrain`
        flat = patches.reshape(len(patches), 1, -1)
        vectors.append(F.adaptive_avg_pool1d(flat, pretrain).squeeze(1))
    stacked = torch.stack(vectors, dim=1)  # Preprocessing: (B*h*w, layers, pretrain)
    # Aggregator: (B*h*w, 1, layers*pretrain) -> pooled to dim
    pooled = F.adaptive_avg_pool1d(stacked.reshape(len(stacked), 1, -1), dim)
    return pooled.reshape(b, ref_h * ref_w, dim)


class _Fixed(nn.Module):
    """A stand-in aggregator that returns the given feature maps."""

    def __init__(self, features: list[torch.Tensor]) -> None:
        super().__init__()
        self.features = features

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {str(i): f for i, f in enumerate(self.features)}


@pytest.mark.parametrize(
    ("shapes", "pretrain", "dim"),
    [
        ([(40, 28), (112, 14)], 1024, 1024),  # lite0 blocks.2 + blocks.4
        ([(512, 28), (1024, 14)], 1024, 1024),  # wide_resnet50_2 layer2 + layer3
        ([(128, 28), (256, 14)], 1024, 1024),  # resnet18
        ([(6, 9), (10, 5), (7, 3)], 50, 37),  # three layers, odd grids, straddling windows
        ([(16, 8)], 30, 20),  # one layer
    ],
)
def test_embedder_official_matches_step_by_step_reference(shapes, pretrain, dim) -> None:
    g = torch.Generator().manual_seed(len(shapes) + pretrain)
    features = [torch.randn(2 if c < 500 else 1, c, s, s, generator=g) for c, s in shapes]
    features = [f[: min(len(f) for f in features)] for f in features]
    channels = [c for c, _ in shapes]
    embedder = PatchEmbedder(_Fixed(features), channels, 3, pretrain, dim)
    emb, grid = embedder(torch.zeros(len(features[0]), 3, 8, 8))
    assert embedder.aggregation == "official" and embedder.dim == dim
    assert grid == (shapes[0][1], shapes[0][1])
    torch.testing.assert_close(emb, _official(features, pretrain, dim), atol=1e-5, rtol=1e-5)


def test_embedder_official_keeps_patch_structure_mean_does_not() -> None:
    """Columns 1, -1, 0, ...: every 3x3 channel mean inside is 0, the official sees the rest."""
    stripes = torch.tensor([1.0, -1.0, 0.0]).repeat(3).expand(1, 4, 9, 9).contiguous()
    flat = torch.zeros_like(stripes)
    for aggregation, differs in (("official", True), ("mean", False)):
        a, _ = PatchEmbedder(_Fixed([stripes]), [4], 3, 36, 36, aggregation=aggregation)(flat)
        b, _ = PatchEmbedder(_Fixed([flat]), [4], 3, 36, 36, aggregation=aggregation)(flat)
        centre = 4 * 9 + 4  # away from the zero padding
        gap = (a[0, centre] - b[0, centre]).abs().max().item()
        assert (gap > 0.1) is differs, aggregation


def test_embedder_resnet18_shapes() -> None:
    agg = NetworkFeatureAggregator("resnet18", ["layer2", "layer3"], weights="none", device="cpu")
    embedder = PatchEmbedder(agg, agg.feature_dimensions(), 3, 1024, 1024, aggregation="mean")
    emb, grid = embedder(_images(2, 224))
    assert grid == (28, 28)
    # 128 + 256 channels pooled up to 1024: stored in their 384 exact coordinates
    assert embedder.dim == 384 and emb.shape == (2, 784, 384)
    small = PatchEmbedder(agg, agg.feature_dimensions(), 3, 64, 32, aggregation="mean")
    emb, _ = small(_images(1, 224))
    assert small.basis is None and emb.shape == (1, 784, 32)


def test_embedder_pooled_path_matches_mean() -> None:
    agg = _tiny_aggregator()
    # rank 4 == embedding_dim: the pooled path
    embedder = PatchEmbedder(agg, [6, 10], 3, 8, 4, aggregation="mean")
    images = _images(2, 32)
    emb, grid = embedder(images)
    expected = _mean(list(agg(images).values()), 8, 4)
    assert grid == (16, 16) and embedder.basis is None
    torch.testing.assert_close(emb, expected)


def test_embedder_low_rank_path_is_isometric_to_mean() -> None:
    agg = _tiny_aggregator()
    # 16 channels pooled up to 64: stored in 16 exact coordinates
    embedder = PatchEmbedder(agg, [6, 10], 3, 32, 64, aggregation="mean")
    images = _images(2, 32)
    emb, _ = embedder(images)
    expected = _mean(list(agg(images).values()), 32, 64)
    assert emb.shape == (2, 256, 16) and embedder.basis.shape == (64, 16)
    torch.testing.assert_close(emb @ embedder.basis.T, expected, atol=1e-5, rtol=1e-5)
    a, b = emb.reshape(-1, 16), expected.reshape(-1, 64)
    dist_a = (a[:40, None] - a[None]).norm(dim=-1)
    dist_b = (b[:40, None] - b[None]).norm(dim=-1)
    torch.testing.assert_close(dist_a, dist_b, atol=1e-5, rtol=1e-5)


def test_embedder_concat_is_the_plain_channel_stack() -> None:
    agg = _tiny_aggregator()
    embedder = PatchEmbedder(agg, [6, 10], 3, 32, 64, aggregation="concat")
    images = _images(2, 32)
    emb, grid = embedder(images)
    first, second = agg(images).values()
    local = [F.avg_pool2d(f, 3, stride=1, padding=1) for f in (first, second)]
    local[1] = F.interpolate(local[1], size=grid, mode="bilinear", align_corners=False)
    expected = torch.cat(local, dim=1).flatten(2).transpose(1, 2)
    assert embedder.dim == 16 and emb.shape == (2, 256, 16)
    torch.testing.assert_close(emb, expected)


def test_embedder_chunks_match_whole_batch() -> None:
    agg = _tiny_aggregator()
    images = _images(5, 32)
    for aggregation in ("official", "mean"):
        whole, grid = PatchEmbedder(agg, [6, 10], 3, 32, 64, aggregation=aggregation)(images)
        chunked, grid2 = PatchEmbedder(agg, [6, 10], 3, 32, 64, 2, aggregation)(images)
        assert grid == grid2 and chunked.shape == whole.shape
        torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)


def test_fit_bank_honours_coreset_ratio_and_max_bank_size() -> None:
    images = _images(10)  # 64 px -> 8 x 8 layer2 grid -> 640 patches
    model = _model(coreset_ratio=0.1)
    model.fit(_batches(images))
    assert model.train_patches == 640 and model.bank.shape == (64, 32)
    assert model.bank.dtype == torch.float16
    capped = _model(coreset_ratio=0.1, max_bank_size=20)
    capped.fit(_batches(images))
    assert capped.bank.shape == (20, 32) and capped.info()["memory_bank_rows"] == 20


def test_fit_bank_is_the_coresets_rows_across_uneven_batches() -> None:
    images = _images(10)
    batches = _batches(images, size=3)  # 3 + 3 + 3 + 1 images: rows cross batch boundaries
    model = _model(coreset_ratio=0.2)
    model.fit(batches)
    flat = [model.embedder(b["image"])[0].flatten(0, 1) for b in batches]
    sampler = model._sampler()
    index = sampler.select(torch.cat([sampler.project(f) for f in flat]))
    assert len(index.unique()) == len(index) == 128
    assert torch.equal(model.bank, torch.cat(flat).half()[index])


def test_fit_float16_bank_scores_like_float32(fitted: PatchCore) -> None:
    wide = _model(coreset_ratio=0.25, feature_dtype="float32")
    wide.fit(_batches(_images(8)))
    assert wide.bank.dtype == torch.float32
    torch.testing.assert_close(fitted.bank.float(), wide.bank, atol=2e-3, rtol=2e-3)
    test = _images(3, seed=1)
    half, full = fitted.predict(test), wide.predict(test)
    torch.testing.assert_close(half.scores, full.scores, rtol=2e-3, atol=1e-3)
    torch.testing.assert_close(half.maps, full.maps, rtol=2e-3, atol=1e-3)


def test_predict_paper_score_is_reweighted_max(fitted: PatchCore) -> None:
    test = _images(3, seed=2)
    by_max = fitted.predict(test)
    fitted.config.score = "paper"
    try:
        by_paper = fitted.predict(test)
    finally:
        fitted.config.score = "max"
    assert by_max.scores.shape == by_paper.scores.shape == (3,)
    assert (by_paper.scores < by_max.scores).all() and (by_paper.scores > 0).all()
    torch.testing.assert_close(by_paper.maps, by_max.maps)
    fitted.config.score, fitted.config.num_neighbors = "paper", 1
    try:  # one neighbour: the re-weighting is undefined, the max score is kept
        torch.testing.assert_close(fitted.predict(test).scores, by_max.scores)
    finally:
        fitted.config.score, fitted.config.num_neighbors = "max", 9


def test_predict_maps_and_scores_shapes(fitted: PatchCore) -> None:
    pred = fitted.predict(_images(2, size=80, seed=3))
    assert pred.scores.shape == (2,) and pred.maps.shape == (2, 80, 80)
    assert torch.allclose(pred.scores, pred.maps.flatten(1).amax(1), rtol=0.5)  # blur lowers it


def test_state_dict_round_trip_identical(fitted: PatchCore, tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    artifact.save_artifact(path, fitted.state_dict(), {"model": "patchcore"})
    state, _ = artifact.load_artifact(path)
    loaded = _model(coreset_ratio=0.25)
    loaded.load_state_dict(state)
    test = _images(3, seed=4)
    first, second = fitted.predict(test), loaded.predict(test)
    assert torch.equal(first.scores, second.scores) and torch.equal(first.maps, second.maps)
    assert torch.equal(loaded.bank, fitted.bank) and loaded.grid == fitted.grid
    for model in (fitted, loaded):  # the bank is held once: the search reads the model's tensor
        assert model.search._fitted_bank().data_ptr() == model.bank.data_ptr()


def test_predict_defect_scores_higher_with_imagenet_lite0(tmp_path: Path) -> None:
    root = make_synthetic_dataset(
        tmp_path / "d", n_train=12, n_test_good=4, n_test_defect=6, size=96
    )
    model = _model(
        backbone="tf_efficientnet_lite0",
        layers=["blocks.2", "blocks.4"],
        weights="imagenet",
        pretrain_embed_dim=1024,
        embedding_dim=1024,
        aggregation="mean",
    )
    assert model.embedder.dim == 152  # 40 + 112 channels: exact low-rank coordinates
    cfg = data.DataConfig(image_size=96, crop_size=None, batch_size=6)
    mean, std = model.normalization()
    train = data.ImageDataset(data.find_samples(root, "train"), cfg, mean, std)
    model.fit(data.make_loader(train, cfg.batch_size))
    test = data.ImageDataset(data.find_samples(root, "test"), cfg, mean, std)
    batch = next(iter(data.make_loader(test, len(test))))
    pred = model.predict(batch["image"])
    labels = torch.as_tensor(batch["label"])
    assert pred.scores[labels == 1].min() > pred.scores[labels == 0].max()
    assert metrics.pixel_auroc(batch["mask"][:, 0], pred.maps) > 0.95


def _loo_reference(model: PatchCore, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Brute force: every patch against every bank row of another image; (images, patches)."""
    emb = torch.cat([model.embedder(b["image"])[0] for b in batches])  # (n, P, D)
    n, p, d = emb.shape
    dist = torch.cdist(emb.reshape(n * p, d).double(), model.bank.double())  # (n*P, N)
    owner = torch.arange(n).repeat_interleave(p)
    dist[model.bank_source[None].long() == owner[:, None]] = torch.inf
    return dist.min(dim=1).values.reshape(n, p).float()


# dims 0: exact masked search; 8: pruned by lower bounds from an 8-d PCA
@pytest.mark.parametrize("dims", [0, 8])
def test_training_scores_match_brute_force_leave_one_out(dims: int) -> None:
    batches = _batches(_images(6, seed=5), size=4)  # 4 + 2 images
    model = _model(coreset_ratio=0.3, search_candidates_dim=dims, feature_dtype="float32")
    model.fit(batches)
    counts = torch.bincount(model.bank_source.long(), minlength=6)
    assert model.bank_source.dtype == torch.int32 and counts.sum() == len(model.bank)
    assert (counts > 0).all()  # every image has rows of its own to leave out
    expected = _loo_reference(model, batches).amax(dim=1)
    scores = model.training_scores(batches)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)
    assert (scores > model.predict(torch.cat([b["image"] for b in batches])).scores).all()


def test_training_scores_paper_score_leaves_the_image_out() -> None:
    batches = _batches(_images(5, seed=6), size=5)
    model = _model(coreset_ratio=0.3, score="paper", num_neighbors=3, feature_dtype="float32")
    model.fit(batches)
    images = batches[0]["image"]
    emb = model.embedder(images)[0]
    patch = _loo_reference(model, batches)  # (5, P)
    worst = patch.argmax(dim=1)
    bank, source = model.bank, model.bank_source.long()
    expected = []
    for i in range(5):
        vec = emb[i, worst[i]]
        other = bank[source != i]
        star = other[(other - vec).norm(dim=1).argmin()]
        support = other[(other - star).norm(dim=1).topk(3, largest=False).indices]
        weight = 1 - torch.softmax((support - vec).norm(dim=1), dim=0)[0]
        expected.append(weight * patch[i, worst[i]])
    scores = model.training_scores(batches)
    torch.testing.assert_close(scores, torch.stack(expected), rtol=1e-4, atol=1e-4)


def test_bank_source_saved_and_old_artifacts_load_without_it(fitted: PatchCore) -> None:
    state = fitted.state_dict()
    assert torch.equal(state["bank_source"], fitted.bank_source)
    old = _model(coreset_ratio=0.25)
    old.load_state_dict({k: v for k, v in state.items() if k != "bank_source"})
    assert old.bank_source is None and old.training_scores(_batches(_images(2))) is None
    torch.testing.assert_close(old.predict(_images(1)).scores, fitted.predict(_images(1)).scores)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"score": "mean"}, "model.score"),
        ({"aggregation": "sum"}, "model.aggregation must be one of official, mean, concat"),
        ({"border": "wrap"}, "border must be one of reflect, mirror"),
        ({"coreset_ratio": 0.0}, "coreset_ratio"),
        ({"coreset_ratio": 1.5}, "coreset_ratio"),
        ({"feature_dtype": "int8"}, "feature_dtype"),
        ({"patch_size": 2}, "patch_size"),
        ({"embedding_dim": 0}, "embedding_dim"),
        ({"num_neighbors": 0}, "num_neighbors"),
        ({"max_bank_size": -1}, "max_bank_size"),
        ({"backbone_batch": -1}, "backbone_batch"),
        ({"search": "annoy"}, "annoy"),
    ],
)
def test_config_errors_name_the_setting(overrides: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _model(**overrides)


def test_config_old_recipe_name_loads_as_mean() -> None:
    model = _model(aggregation="recipe")
    assert model.config.aggregation == "mean" and model.embedder.aggregation == "mean"


def test_config_unknown_layer_lists_valid_ones() -> None:
    with pytest.raises(BackboneError, match="layer5.*Valid layers"):
        _model(layers=["layer2", "layer5"])


def test_predict_before_fit_and_bad_state_raise() -> None:
    model = _model()
    with pytest.raises(ConfigError, match="before fit"):
        model.predict(_images(1))
    with pytest.raises(ConfigError, match="not been fitted"):
        model.state_dict()
    with pytest.raises(ArtifactError, match="memory_bank"):
        model.load_state_dict({"memory_bank": torch.zeros(4, 7), "grid": torch.tensor([8, 8])})


# 32: each 64 px image is 4 tiles, 4 "images" to the model
@pytest.mark.parametrize("tiles", [0, pytest.param(32, marks=pytest.mark.slow)])
def test_train_threshold_from_leave_one_out_scores(tmp_path: Path, tiles: int) -> None:
    from hamacho.engine import load_run, train

    tiny_mvtec = make_synthetic_dataset(tmp_path / "d", n_train=12, n_test_good=2, size=64)
    sets = [f"model.{k}={v}" for k, v in TINY.items()]
    sets += ["data.image_size=64", "data.crop_size=null", f"tiler.tile_size={tiles}"]
    run = train("patchcore", tiny_mvtec, overrides=sets, output=tmp_path / "run")
    summary = json.loads((run / "train.json").read_text())
    assert summary["holdout_images"] == 0 and summary["train_images"] == 12
    assert summary["threshold"]["source"].endswith("each scored leave-one-out")
    loaded = load_run(run)
    sources = loaded.model.bank_source
    assert int(sources.max()) < 12 * (4 if tiles else 1) and len(sources.unique()) > 12 // 2


@pytest.mark.parametrize(("progress", "tiles"), [(False, 0), (True, 32)])
def test_train_logs_memory_held_during_fit_behind_a_bar_and_per_tile(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, progress: bool, tiles: int
) -> None:
    from hamacho.engine import train

    tiny = make_synthetic_dataset(tmp_path / "d", n_train=5, n_test_good=1, size=64)
    sets = [f"model.{k}={v}" for k, v in TINY.items()]
    sets += ["data.image_size=64", "data.crop_size=null", f"tiler.tile_size={tiles}"]
    with caplog.at_level(logging.INFO, logger="hamacho.patchcore"):
        train("patchcore", tiny, overrides=sets, output=tmp_path / "run", progress=progress)
    (line,) = [r.getMessage() for r in caplog.records if "held during fit" in r.getMessage()]
    inputs = 5 * (4 if tiles else 1)  # a 64 px image is 2 x 2 tiles of 32 px
    patches = (4 if tiles else 8) ** 2  # resnet18 layer2: stride 8
    assert line.startswith(f"PatchCore: {inputs} images x {patches} patches = {inputs * patches} ")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_other_image_search_is_exact_through_bounds(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(7)
    mix = torch.randn(8, 64, generator=gen)
    bank = torch.randn(600, 8, generator=gen) @ mix + 0.01 * torch.randn(600, 64, generator=gen)
    source = torch.randint(0, 12, (600,), generator=gen, dtype=torch.int32)
    queries = bank[:300] + 0.05 * torch.randn(300, 64, generator=gen)  # near their own rows
    owner = source[:300]
    other = loo.OtherImageSearch(bank, source, dim=16, dtype=dtype)
    dist, idx = other.nearest(queries, owner)
    brute = torch.cdist(queries.double(), bank.double())
    brute[source[None] == owner[:, None]] = torch.inf
    torch.testing.assert_close(dist, brute.min(dim=1).values.float(), rtol=1e-5, atol=1e-5)
    assert (source[idx] != owner).all()
    assert other.last_uncertain < len(queries) // 10  # the bounds did the work
    crowd = bank.clone()
    crowd[300:] = bank[299]  # 301 equal rows: more than the bounds re-rank, so the fallback
    crowd_source = source.clone()
    crowd_source[299:], crowd_source[0] = 5, 6
    crowded = loo.OtherImageSearch(crowd, crowd_source, dim=16, dtype=dtype)
    near = crowd[299:300] + 0.05
    d2, i2 = crowded.nearest(torch.cat([near, near]), torch.tensor([6, 5], dtype=torch.int32))
    assert crowded.last_uncertain >= 1
    ref = torch.cdist(near.double(), crowd.double())[0]
    assert i2[0] == 299  # the lowest of the equal rows; image 6 owns only row 0
    # the fallback's |q|^2 + |b|^2 - 2 q.b in float32 keeps ~4 digits of a small distance
    assert torch.allclose(d2[0].double(), ref.min(), rtol=1e-3)
    ref[crowd_source == 5] = torch.inf  # image 5's own rows left out
    assert crowd_source[i2[1]] != 5
    assert torch.allclose(d2[1].double(), ref.min(), rtol=1e-3)
    lonely = torch.full((1,), 99, dtype=torch.int32)  # an owner of no row: nothing masked
    d1, i1 = other.nearest(queries[:1], lonely)
    assert torch.allclose(d1.double(), torch.cdist(queries[:1].double(), bank.double()).min())
