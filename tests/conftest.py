from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

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
TINY_PATCHCORE = [*FAST, "model.pretrain_embed_dim=64", "model.embedding_dim=32"]
# The same for hamacho.train(overrides=...): PatchCore with small embeddings.
API_FAST = {
    "model.backbone": "resnet18",
    "model.weights": "none",
    "model.pretrain_embed_dim": 64,
    "model.embedding_dim": 32,
    "data.image_size": 64,
    "data.crop_size": None,
    "data.batch_size": 8,
}


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


def fake_dist(root: Path, dist: str, module: str, source: str, ep_name: str) -> None:
    """Install a distribution by hand: a module plus the dist-info entry point metadata."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[hamacho]\n{ep_name} = {module}\n")


def pip_install(src: Path, target: Path) -> Path:
    """pip-install the package in ``src`` into ``target`` only (no deps), as a user would."""
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps"]
    if importlib.util.find_spec("setuptools"):
        cmd.append("--no-build-isolation")
    subprocess.run([*cmd, "--target", str(target), str(src)], check=True, capture_output=True)
    return target


def hamacho_cli(site: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """``python -m hamacho ARGS`` in a fresh process that also sees the packages in ``site``."""
    paths = [str(site), *filter(None, [os.environ.get("PYTHONPATH")])]  # keep this checkout's
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), **env}
    return subprocess.run(
        [sys.executable, "-m", "hamacho", *args], capture_output=True, text=True, env=environ
    )


def need_chromium(note: str = "") -> str:
    """The chromium binary; else skip, but fail under CI=true (never a silent skip in CI)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        why = "chromium not installed (apt-get install -y chromium)" + note
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(f"CI must run the browser check: {why}")
        pytest.skip(why)
    return browser
