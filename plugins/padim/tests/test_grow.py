"""PaDiM update and merge: exactly a fit on the union (means, covariances, scores)."""

from __future__ import annotations

import pytest
import torch
from hamacho_padim.model import GaussianAccumulator, Padim

from hamacho import config as config_mod
from hamacho.engine import make_components
from hamacho.errors import ArtifactError, ConfigError

TINY = {
    "backbone": "tf_efficientnet_lite0",
    "layers": ["blocks.1", "blocks.2", "blocks.4"],
    "weights": "none",
    "n_features": 16,
}


@pytest.fixture(autouse=True, scope="module")
def _offline():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HAMACHO_OFFLINE", "1")
        yield


def _model(**model: object) -> Padim:
    sections = {"model": {**TINY, **model}, "data": {"image_size": 32, "crop_size": None}}
    cfg = config_mod.resolve(Padim.Config, [{**sections, "run": {"device": "cpu"}}])
    return Padim(cfg.model, make_components(cfg))


def _images(n: int, seed: int, offset: float = 0.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=gen) + offset


def _batches(images: torch.Tensor, size: int = 5):
    return [{"image": images[i : i + size]} for i in range(0, len(images), size)]


def _covariance(model: Padim) -> torch.Tensor:
    assert model.scatter is not None
    return model.scatter.double() / (model.n_train - 1)


def _assert_same_fit(got: Padim, want: Padim, probe: torch.Tensor) -> None:
    assert got.n_train == want.n_train
    scale = want.mean.abs().max()
    assert (got.mean - want.mean).abs().max() <= 1e-6 * scale
    cov_got, cov_want = _covariance(got), _covariance(want)
    assert (cov_got - cov_want).abs().max() <= 1e-6 * cov_want.abs().max()
    s_got, s_want = got.predict(probe).scores, want.predict(probe).scores
    assert torch.allclose(s_got, s_want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("selection", ["random", "orthogonal"])
def test_update_equals_a_fit_on_the_union(selection):
    old, new, probe = _images(13, 0), _images(7, 1), _images(4, 2, offset=0.5)
    union = _model(selection=selection)
    union.fit(_batches(torch.cat([old, new])))
    grown = _model(selection=selection)
    grown.fit(_batches(old))
    before = grown.predict(probe).scores
    grown.update(_batches(new, size=3))
    assert not torch.allclose(before, union.predict(probe).scores, rtol=1e-3)  # it moved
    _assert_same_fit(grown, union, probe)


def test_merge_of_three_sites_equals_a_fit_on_the_union_and_survives_save_load():
    sites = [_images(n, seed) for n, seed in [(6, 3), (9, 4), (5, 5)]]
    probe = _images(4, 6, offset=0.5)
    union = _model()
    union.fit(_batches(torch.cat(sites)))
    models = []
    for images in sites:
        site = _model()
        site.fit(_batches(images))
        loaded = _model()
        loaded.load_state_dict(site.state_dict())  # sites ship artifacts, not live models
        models.append(loaded)
    models[0].merge(models[1:])
    _assert_same_fit(models[0], union, probe)


def test_chan_merge_matches_one_accumulator():
    gen = torch.Generator().manual_seed(0)
    x = 100 + torch.randn(3, 40, 4, generator=gen, dtype=torch.float64)
    one, a, b = GaussianAccumulator(3, 4), GaussianAccumulator(3, 4), GaussianAccumulator(3, 4)
    one.update(x.float())
    a.update(x[:, :11].float())
    b.update(x[:, 11:].float())
    a.merge_(b)
    want = torch.stack([torch.cov(x[p].T, correction=0) * 40 for p in range(3)])
    assert a.count == 40
    assert torch.allclose(a.mean.double(), x.mean(1), rtol=1e-6)
    assert torch.allclose(a.scatter.double(), want, rtol=1e-4, atol=1e-4)


def test_update_refuses_an_artifact_without_statistics():
    model = _model()
    model.fit(_batches(_images(6, 0)))
    state = {k: v for k, v in model.state_dict().items() if k not in ("scatter", "count")}
    old = _model()
    old.load_state_dict(state)  # an artifact saved before update existed still loads
    assert old.predict(_images(2, 1)).scores.isfinite().all()
    with pytest.raises(ArtifactError, match="without its statistics.*Retrain"):
        old.update(_batches(_images(3, 2)))


def test_variance_selection_refuses_update():
    model = _model(selection="variance")
    model.fit(_batches(_images(6, 0)))
    with pytest.raises(ConfigError, match="selection=variance"):
        model.update(_batches(_images(3, 2)))


def test_merge_refuses_other_channels():
    a, b = _model(seed=0), _model(seed=1)
    a.fit(_batches(_images(6, 0)))
    b.fit(_batches(_images(6, 1)))
    with pytest.raises(ConfigError, match="different channels"):
        a.merge([b])


def test_outlier_score_separates_a_shifted_site():
    alike = [_model() for _ in range(3)]
    for i, m in enumerate(alike):
        m.fit(_batches(_images(8, 10 + i)))
    odd = _model()
    odd.fit(_batches(_images(8, 20, offset=3.0)))
    sites = [*alike, odd]
    scores = [s.outlier_score([o for o in sites if o is not s]) for s in sites]
    assert scores[3] > 3 * max(scores[:3])


def test_statistics_shared_without_a_copy_stay_unchanged():
    gen = torch.Generator().manual_seed(1)
    first, more = torch.randn(3, 10, 4, generator=gen), torch.randn(3, 6, 4, generator=gen)
    saved = GaussianAccumulator(3, 4)
    saved.update(first)
    mean, scatter = saved.mean.clone(), saved.scatter.clone()
    shared = GaussianAccumulator.restore(saved.count, saved.mean, saved.scatter, copy=False)
    copied = GaussianAccumulator.restore(saved.count, saved.mean, saved.scatter)
    for stats in (shared, copied):
        stats.update(more[:, :2])
        stats.update(more[:, 2:])
    pooled = GaussianAccumulator.restore(saved.count, saved.mean, saved.scatter, copy=False)
    pooled.merge_(saved)
    precision = saved.precision(0.01)
    assert torch.equal(saved.mean, mean) and torch.equal(saved.scatter, scatter)
    assert torch.equal(shared.scatter, copied.scatter) and torch.equal(shared.mean, copied.mean)
    assert torch.allclose(pooled.scatter, 2 * scatter) and pooled.count == 20
    want = torch.linalg.inv(scatter.double() / 9 + 0.01 * torch.eye(4, dtype=torch.float64))
    assert torch.allclose(precision.double(), want, rtol=1e-5, atol=1e-6 * want.abs().max())
