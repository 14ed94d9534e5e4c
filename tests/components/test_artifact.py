from __future__ import annotations

import json
import os
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hamacho.components import artifact
from hamacho.components.artifact import load_artifact, read_metadata, save_artifact
from hamacho.errors import ArtifactError

META = {
    "model": "patchcore",
    "plugin_version": "0.1.0",
    "config": {"model": {"layers": ["blocks.2", "blocks.4"], "ratio": 0.1}},
    "weights": "imagenet:efficientnet-lite0.pth sha256:ab12",
    "thresholds": {"image": 1.25},
}


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "bank": torch.randn(50, 8, generator=g),
        "half": torch.randn(4, 3, generator=g).half(),
        "bf16": torch.randn(5, generator=g).bfloat16(),
        "idx": torch.arange(-3, 7, dtype=torch.int64) * (2**40),
        "flags": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "empty": torch.zeros(0, 4),
    }


def _saved(tmp_path: Path) -> Path:
    path = tmp_path / "model.safetensors"
    save_artifact(path, _tensors(), META)
    return path


def _split(path: Path) -> tuple[dict, bytes]:
    """Return (safetensors header dict, tensor payload)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _join(path: Path, header: dict, payload: bytes) -> None:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + payload)


def _edit_envelope(path: Path, edit) -> None:
    header, payload = _split(path)
    envelope = json.loads(header["__metadata__"]["hamacho"])
    edit(envelope)
    header["__metadata__"]["hamacho"] = json.dumps(envelope)
    _join(path, header, payload)


def test_save_artifact_round_trip_exact(tmp_path):
    tensors, meta = load_artifact(_saved(tmp_path))
    expected = _tensors()
    assert tensors.keys() == expected.keys()
    for name, t in expected.items():
        assert tensors[name].dtype == t.dtype and tensors[name].shape == t.shape
        assert torch.equal(tensors[name], t), name
    assert meta == META


def test_save_artifact_normalises_tensors_and_metadata(tmp_path):
    path = tmp_path / "a.safetensors"
    base = torch.arange(12.0).reshape(3, 4)
    grad = torch.ones(2, requires_grad=True)
    # a transposed view, a tensor needing grad, and two views sharing one storage
    save_artifact(path, {"t": base.T, "g": grad, "v1": base[0], "v2": base[1:]}, {"k": (1, 2)})
    tensors, meta = load_artifact(path)
    assert torch.equal(tensors["t"], base.T) and torch.equal(tensors["v2"], base[1:])
    assert not tensors["g"].requires_grad
    assert meta == {"k": [1, 2]}


def test_save_artifact_is_not_pickle(tmp_path):
    path = _saved(tmp_path)
    assert not zipfile.is_zipfile(path)
    header, _ = _split(path)
    envelope = json.loads(header["__metadata__"]["hamacho"])
    assert envelope["format_version"] == artifact.FORMAT_VERSION == 1
    assert len(envelope["sha256"]) == 64


def test_read_metadata_reads_header(tmp_path):
    assert read_metadata(_saved(tmp_path)) == META


def test_load_artifact_map_location(tmp_path):
    tensors, _ = load_artifact(_saved(tmp_path), map_location=torch.device("cpu"))
    assert all(t.device.type == "cpu" for t in tensors.values())


@pytest.mark.parametrize("value", [[1.0, 2.0], 3, "x"], ids=["list", "int", "str"])
def test_save_artifact_non_tensor(tmp_path, value):
    with pytest.raises(ArtifactError, match="'bad' is a .*not a tensor"):
        save_artifact(tmp_path / "a.safetensors", {"ok": torch.ones(1), "bad": value}, {})
    assert list(tmp_path.iterdir()) == []


def test_save_artifact_sparse_tensor(tmp_path):
    with pytest.raises(ArtifactError, match="sparse"):
        save_artifact(tmp_path / "a.safetensors", {"s": torch.eye(3).to_sparse()}, {})


def test_save_artifact_metadata_not_json(tmp_path):
    with pytest.raises(ArtifactError, match="not JSON-serialisable"):
        save_artifact(tmp_path / "a.safetensors", {"a": torch.ones(1)}, {"p": Path("x")})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("step", ["fsync", "replace"])
def test_save_artifact_interrupted_keeps_old_file(tmp_path, monkeypatch, step):
    path = _saved(tmp_path)
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, step, fail)
    with pytest.raises(ArtifactError, match="No space left.*unchanged"):
        save_artifact(path, {"other": torch.zeros(3)}, {"model": "padim"})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left
    assert load_artifact(path)[1] == META


def test_save_artifact_interrupted_by_keyboard(tmp_path, monkeypatch):
    path = _saved(tmp_path)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(artifact, "save_file", interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_artifact(path, {"other": torch.zeros(3)}, {})
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_save_artifact_overwrites_and_creates_parents(tmp_path):
    path = tmp_path / "run" / "model.safetensors"
    save_artifact(path, {"a": torch.ones(2)}, {"v": 1})
    save_artifact(path, {"b": torch.zeros(3)}, {"v": 2})
    tensors, meta = load_artifact(path)
    assert list(tensors) == ["b"] and meta == {"v": 2}


def test_load_artifact_missing_file(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist.*hamacho train"):
        load_artifact(tmp_path / "nope.safetensors")


def test_load_artifact_empty_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.touch()
    with pytest.raises(ArtifactError, match="empty"):
        load_artifact(path)


@pytest.mark.parametrize("keep", [5, 100, -7], ids=["in-length", "in-header", "in-payload"])
def test_load_artifact_truncated(tmp_path, keep):
    path = _saved(tmp_path)
    path.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(ArtifactError, match="not a safetensors file or is truncated") as info:
        load_artifact(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_load_artifact_pickle_file(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"a": torch.ones(2)}, path)
    with pytest.raises(ArtifactError, match="not a safetensors file"):
        load_artifact(path)


@pytest.mark.parametrize("header", [None, {"format": "pt"}], ids=["none", "foreign"])
def test_load_artifact_without_hamacho_metadata(tmp_path, header):
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.ones(2)}, path, metadata=header)
    with pytest.raises(ArtifactError, match="not written by hamacho"):
        load_artifact(path)
    with pytest.raises(ArtifactError, match="not written by hamacho"):
        read_metadata(path)


def test_load_artifact_newer_format(tmp_path):
    path = _saved(tmp_path)
    _edit_envelope(path, lambda e: e.update(format_version=artifact.FORMAT_VERSION + 1))
    with pytest.raises(ArtifactError, match="newer hamacho.*[Uu]pgrade"):
        load_artifact(path)
    with pytest.raises(ArtifactError, match="newer hamacho"):
        read_metadata(path)


def test_load_artifact_flipped_payload_byte(tmp_path):
    path = _saved(tmp_path)
    header, payload = _split(path)
    start = header["bank"]["data_offsets"][0]
    payload = bytearray(payload)
    payload[start + 17] ^= 0x01
    _join(path, header, bytes(payload))
    with pytest.raises(ArtifactError, match="modified after it was saved"):
        load_artifact(path)


def test_load_artifact_edited_metadata(tmp_path):
    path = _saved(tmp_path)
    _edit_envelope(path, lambda e: e["metadata"]["thresholds"].update(image=0.5))
    assert read_metadata(path)["thresholds"]["image"] == 0.5  # header is still well-formed
    with pytest.raises(ArtifactError, match="modified after it was saved"):
        load_artifact(path)


def test_load_artifact_renamed_tensor(tmp_path):
    path = _saved(tmp_path)
    header, payload = _split(path)
    header["memory"] = header.pop("bank")
    _join(path, header, payload)
    with pytest.raises(ArtifactError, match="modified after it was saved"):
        load_artifact(path)


def test_load_artifact_garbled_envelope(tmp_path):
    path = _saved(tmp_path)
    header, payload = _split(path)
    header["__metadata__"]["hamacho"] = "{not json"
    _join(path, header, payload)
    with pytest.raises(ArtifactError, match="metadata unreadable"):
        load_artifact(path)


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_save_artifact_honours_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        save_artifact(tmp_path / "m.safetensors", _tensors(), META)
    finally:
        os.umask(previous)
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
