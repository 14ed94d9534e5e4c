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
    ``hamacho.contract_hooks``): a model without them passes on the rest.
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
    from hamacho.contract_hooks import assert_hooks

    assert_hooks(model_cls, cfg, train, images, _predicted)


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
