from __future__ import annotations

import pytest

from hamacho.components.synthetic import make_synthetic_dataset

# Small, fast settings for end-to-end runs: random resnet18 features on 64 px images.
FAST = [
    "model.backbone=resnet18",
    "model.weights=none",
    "data.image_size=64",
    "data.crop_size=null",
    "data.batch_size=8",
]


@pytest.fixture(scope="session")
def tiny_mvtec(tmp_path_factory):
    """A small MVTec-layout category with masks, made by the synthetic generator."""
    root = tmp_path_factory.mktemp("datasets") / "widget"
    return make_synthetic_dataset(root, n_train=12, n_test_good=4, n_test_defect=6, size=64)


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path_factory):
    """Tests never download weights, and see an empty torch cache."""
    monkeypatch.setenv("HAMACHO_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.getbasetemp() / "torch-home"))
