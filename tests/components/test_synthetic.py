"""Tests for the synthetic dataset generator and the built-in default dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hamacho.components import synthetic
from hamacho.components.data import DataConfig, ImageDataset, find_samples
from hamacho.components.synthetic import DEFECT_TYPES, default_dataset, make_synthetic_dataset
from hamacho.errors import ConfigError, DataError


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_make_synthetic_dataset_writes_mvtec_layout(tmp_path):
    root = make_synthetic_dataset(tmp_path / "cat")
    names = sorted(_files(root))
    assert sum(n.startswith("train/good/") for n in names) == 20
    assert sum(n.startswith("test/good/") for n in names) == 5
    assert [sum(n.startswith(f"test/{d}/") for n in names) for d in DEFECT_TYPES] == [2, 2, 1]
    assert {"ground_truth/scratch/001_mask.png", "ground_truth/stain/000_mask.png"} <= set(names)
    test = find_samples(root, "test")
    assert sum(s.label for s in test) == 5 and all(s.mask is not None for s in test if s.label)
    dataset = ImageDataset(test, DataConfig(image_size=64, crop_size=None), (0.5,) * 3, (0.5,) * 3)
    item = dataset[len(dataset) - 1]
    assert item["image"].shape == (3, 64, 64) and item["mask"].sum() > 0


@pytest.mark.parametrize("kind", ["texture", "object"])
def test_make_synthetic_dataset_is_deterministic(tmp_path, kind):
    args = {"n_train": 3, "n_test_good": 1, "n_test_defect": 3, "size": 64, "kind": kind}
    first = _files(make_synthetic_dataset(tmp_path / "a", seed=1, **args))
    again = _files(make_synthetic_dataset(tmp_path / "b", seed=1, **args))
    other = _files(make_synthetic_dataset(tmp_path / "c", seed=2, **args))
    assert first == again
    assert first.keys() == other.keys()
    assert all(first[name] != other[name] for name in first if not name.startswith("ground"))


def test_make_synthetic_dataset_images_depend_only_on_their_index(tmp_path):
    small = _files(make_synthetic_dataset(tmp_path / "a", n_train=2, size=48))
    large = _files(make_synthetic_dataset(tmp_path / "b", n_train=4, size=48))
    assert small.items() <= large.items()


@pytest.mark.parametrize("kind", ["texture", "object"])
@pytest.mark.parametrize("defect", DEFECT_TYPES)
def test_defect_mask_marks_exactly_the_visible_change(kind, defect):
    for index in range(3):
        rng = np.random.default_rng([0, 2, index])
        clean, image, mask = synthetic._render_sample(kind, 128, rng, defect)
        inside = mask > 0
        assert set(np.unique(mask)) == {0, 255}
        assert 0.0005 < inside.mean() < 0.05  # visible, yet a small part of the image
        assert np.array_equal(image[~inside], clean[~inside])
        change = np.abs(image.astype(int) - clean.astype(int)).sum(-1)[inside]
        assert change.mean() > 45, (kind, defect, change.mean())


@pytest.mark.parametrize("kind", ["texture", "object"])
def test_good_images_vary_slightly(kind):
    first = synthetic._render_sample(kind, 96, np.random.default_rng(0), None)[1].astype(int)
    second = synthetic._render_sample(kind, 96, np.random.default_rng(1), None)[1].astype(int)
    assert first.shape == (96, 96, 3)
    assert 1 < np.abs(first - second).mean() < 60  # jittered, but the same kind of scene


def test_make_synthetic_dataset_rejects_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="kind='metal'"):
        make_synthetic_dataset(tmp_path / "a", kind="metal")
    with pytest.raises(ConfigError, match="size=8"):
        make_synthetic_dataset(tmp_path / "a", size=8)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(DataError, match="is not empty"):
        make_synthetic_dataset(tmp_path / "full")
    tiny = {"n_train": 1, "n_test_good": 0, "n_test_defect": 0, "size": 32}
    make_synthetic_dataset(tmp_path / "full", overwrite=True, **tiny)
    assert sorted(_files(tmp_path / "full")) == ["train/good/000.png"]


def test_default_dataset_is_generated_once_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("HAMACHO_HOME", str(tmp_path / "home"))
    root = default_dataset()
    assert root == tmp_path / "home" / "datasets" / "synthetic_default"
    assert [p.name for p in root.parent.iterdir()] == ["synthetic_default"]  # no temp dirs left
    assert len(find_samples(root, "train")) == 40 and len(find_samples(root, "test")) == 25
    with Image.open(root / "train" / "good" / "000.png") as image:
        assert image.size == (256, 256)
    sentinel = root / "sentinel"
    sentinel.write_text("reused")
    assert default_dataset() == root and sentinel.exists()
    (root / ".hamacho-dataset").write_text("older generator")
    assert default_dataset() == root and not sentinel.exists()
    assert (root / "test" / "stain" / "004.png").exists()


def test_default_dataset_unwritable_home_raises(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("HAMACHO_HOME", str(blocker))
    with pytest.raises(DataError, match="Set HAMACHO_HOME to a writable folder"):
        default_dataset()
