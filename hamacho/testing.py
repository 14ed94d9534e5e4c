"""Pytest helpers for plugin authors, loaded automatically through the ``pytest11`` entry point.

``register_plugin(module_or_object, name=...)`` registers a throwaway plugin in the process-wide
registry for one test and removes it afterwards::

    def test_my_model(register_plugin):
        register_plugin(my_plugin_module)
        assert "mymodel" in hamacho.plugins.get_registry().models()
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from hamacho.plugins import get_registry

if TYPE_CHECKING:
    from hamacho.model import Model


@pytest.fixture
def register_plugin() -> Iterator[Callable[..., Any]]:
    """Register plugins for the duration of one test; unregistered in ``finally``."""
    registry = get_registry()
    names: list[str] = []

    def _register(plugin: object, name: str | None = None, distribution: str = "") -> Any:
        name = name or getattr(plugin, "__name__", None) or f"inline-{id(plugin)}"
        registry.register(plugin, name, distribution=distribution)
        names.append(name)
        return plugin

    try:
        yield _register
    finally:
        for name in reversed(names):
            if registry.pm.has_plugin(name):
                registry.unregister(name)


def assert_model_contract(
    model_cls: type[Model], data_root: Any, overrides: dict[str, Any] | None = None
) -> None:
    """Run ``model_cls`` through fit -> predict -> save -> load -> predict and check the results.

    Also checks that a good test image with an obvious defect pasted in (a high-contrast
    checkerboard over the middle ninth) scores, and maps, above the same image without it, and
    the optional hooks the model offers (``update``, ``merge``, ``outlier_score``; see
    ``_assert_hooks``): a model without them passes on the rest.
    ``data_root`` is an MVTec-layout folder (``hamacho.components.synthetic`` makes one);
    ``overrides`` are config sections on top of the model's ``test_overrides``.
    """
    import tempfile
    from pathlib import Path

    import torch

    from hamacho import config as config_mod
    from hamacho.components import artifact, data
    from hamacho.engine import make_components

    layers = [
        {"model": dict(getattr(model_cls, "test_overrides", {}))},
        {"data": {"image_size": 64, "crop_size": None, "batch_size": 4}},
        overrides or {},
    ]
    cfg = config_mod.resolve(model_cls.Config, layers)
    model = model_cls(cfg.model, make_components(cfg))
    mean, std = model.normalization()
    train = data.ImageDataset(data.find_samples(Path(data_root), "train"), cfg.data, mean, std)
    model.fit(data.make_loader(train, cfg.data.batch_size))
    test = data.ImageDataset(data.find_samples(Path(data_root), "test"), cfg.data, mean, std)
    images = torch.stack([test[i]["image"] for i in range(min(len(test), 6))])
    first = _predicted(model, images, "fit")
    _assert_defect_scores_higher(model, test, mean, std)
    state = model.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values()), "state_dict: tensors only"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        artifact.save_artifact(path, state, {"model": model_cls.name})
        tensors, _ = artifact.load_artifact(path)
    again = model_cls(cfg.model, make_components(cfg))
    again.load_state_dict(tensors)
    second = again.predict(images)
    torch.testing.assert_close(second.scores, first.scores)
    torch.testing.assert_close(second.maps, first.maps)
    _assert_hooks(model_cls, cfg, train, images)


def _predicted(model: Any, images: Any, after: str) -> Any:
    """``model.predict(images)``, checked: a Prediction of the right shapes, finite."""
    import torch

    from hamacho.model import Prediction

    pred = model.predict(images)
    assert isinstance(pred, Prediction), f"predict after {after} must return hamacho.Prediction"
    b, _, h, w = images.shape
    shape = tuple(pred.scores.shape)
    assert shape == (b,), f"after {after}: scores shape {shape} != ({b},)"
    shape = tuple(pred.maps.shape)
    assert shape == (b, h, w), f"after {after}: maps shape {shape} != {(b, h, w)}"
    assert torch.isfinite(pred.scores).all() and torch.isfinite(pred.maps).all(), (
        f"after {after}: predict returned non-finite scores or maps"
    )
    return pred


def _assert_hooks(model_cls: type[Model], cfg: Any, train: Any, images: Any) -> None:
    """The optional hooks ``model_cls`` offers, on models A and B fitted on train's two halves.

    ``update`` with B's images and ``merge([B])`` must leave a model that predicts the right
    shapes and scores B's images lower than A alone did (a hook that changes nothing fails);
    ``merge`` must refuse a model of another class with a HamachoError (the CLI's one line) and
    stay unchanged; ``outlier_score`` must return a finite float.
    """
    import math

    import torch
    from torch.utils.data import Subset

    from hamacho.components import data
    from hamacho.engine import make_components
    from hamacho.errors import HamachoError
    from hamacho.model import Model, offers

    hooks = [hook for hook in ("update", "merge", "outlier_score") if offers(model_cls, hook)]
    if not hooks:
        return
    half = list(range(len(train) // 2))
    rest = list(range(len(half), len(train)))

    def loader(part: list[int]) -> Any:
        return data.make_loader(Subset(train, part), cfg.data.batch_size)

    def fitted(part: list[int] | None = None, state: dict | None = None) -> Any:
        net = model_cls(cfg.model, make_components(cfg))
        if state is None:
            net.fit(loader(part or []))
        else:  # a copy, as a run loaded from its artifact
            net.load_state_dict({key: value.clone() for key, value in state.items()})
        return net

    a, b = fitted(half), fitted(rest)
    new = torch.stack([train[i]["image"] for i in rest])
    before = float(a.predict(new).scores.mean())
    if "outlier_score" in hooks:
        score = fitted(state=a.state_dict()).outlier_score([fitted(state=b.state_dict())])
        assert isinstance(score, float), f"outlier_score returned {type(score).__name__}, not float"
        assert math.isfinite(score), f"outlier_score returned {score}, not a finite float"
    if "update" in hooks:
        grown = fitted(state=a.state_dict())
        grown.update(loader(rest))
        _assert_grew(grown, new, images, before, "update")
    if "merge" in hooks:
        merged = fitted(state=a.state_dict())
        unchanged = merged.predict(images)
        stranger = type("Stranger", (Model,), {"name": "stranger"})(cfg.model, None)
        try:
            merged.merge([stranger])
        except HamachoError:
            pass
        except Exception as exc:
            raise AssertionError(
                f"merge with a model of another class raised {type(exc).__name__}: {exc}; it "
                "must refuse it with a hamacho.errors.HamachoError naming the mismatch"
            ) from exc
        else:
            raise AssertionError("merge accepted a model of another class: it must refuse it")
        again = merged.predict(images)
        assert torch.equal(again.scores, unchanged.scores), "a refused merge changed the model"
        merged.merge([fitted(state=b.state_dict())])
        _assert_grew(merged, new, images, before, "merge")


def _assert_grew(net: Any, new: Any, images: Any, before: float, hook: str) -> None:
    """After ``hook``, predict keeps its shapes, and the images it added score below before."""
    _predicted(net, images, hook)
    after = float(_predicted(net, new, hook).scores.mean())
    assert after < before, (
        f"{hook} did not change the model: the images it added score {after:.4g} on average, "
        f"not below the {before:.4g} they scored before"
    )


def _assert_defect_scores_higher(model: Any, test: Any, mean: Any, std: Any) -> None:
    """A good image with a pasted checkerboard must score and map above the clean image."""
    import torch

    good = next(i for i in range(len(test)) if test[i]["label"] == 0)
    clean = test[good]["image"]  # (3, H, W), normalised
    _, h, w = clean.shape
    rows, cols = slice(h // 3, 2 * h // 3), slice(w // 3, 2 * w // 3)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    board = ((yy // 4 + xx // 4) % 2).float()  # 4-pixel black/white squares, (H, W)
    m = torch.tensor(mean, dtype=clean.dtype)[:, None, None]
    s = torch.tensor(std, dtype=clean.dtype)[:, None, None]
    defect = clean.clone()
    defect[:, rows, cols] = ((board - m) / s)[:, rows, cols]
    pred = model.predict(torch.stack([clean, defect]))
    normal, anomalous = (float(v) for v in pred.scores)
    assert anomalous > normal, (
        f"an image with an obvious pasted defect scored {anomalous:.4g}, not above the same "
        f"good image without it ({normal:.4g}): predict does not respond to anomalies"
    )
    inside = pred.maps[:, rows, cols].flatten(1).mean(1)
    assert inside[1] > inside[0], "the anomaly map is not higher where the defect was pasted"
