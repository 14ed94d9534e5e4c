"""An exported file that was edited, or whose run was, is refused in one line like the run."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import hamacho
from hamacho import engine
from hamacho.cli import main
from hamacho.errors import ArtifactError

from .conftest import FAST

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(tiny_mvtec, tmp_path_factory) -> Path:
    """A tiny PaDiM run with its model.onnx and model.xml beside its artifact."""
    out = tmp_path_factory.mktemp("integrity") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HAMACHO_OFFLINE", "1")
        engine.train("padim", tiny_mvtec, None, [*FAST, "model.n_features=16"], out)
        for fmt in ("onnx", "openvino"):
            done = CliRunner().invoke(main, ["export", "--run", str(out), "--format", fmt])
            assert done.exit_code == 0, done.output
    return out


def _copy(run: Path, tmp_path: Path, *names: str) -> Path:
    folder = tmp_path / "copy"
    folder.mkdir()
    for name in names:
        shutil.copy(run / name, folder / name)
    return folder


def _image(tiny_mvtec: Path) -> Path:
    return next((tiny_mvtec / "test" / "good").glob("*.png"))


def test_untouched_files_load_beside_their_run_and_alone(exported, tmp_path, tiny_mvtec):
    alone = _copy(exported, tmp_path, "model.onnx", "model.xml", "model.bin")
    want = hamacho.load(exported).predict(_image(tiny_mvtec)).score
    for source in (exported / "model.onnx", alone / "model.onnx", alone / "model.xml"):
        assert hamacho.load(source).predict(_image(tiny_mvtec)).score == pytest.approx(want)


def test_edited_threshold_in_onnx_metadata_is_refused(exported, tmp_path):
    model = onnx.load(str(exported / "model.onnx"))
    for prop in model.metadata_props:
        if prop.key == "threshold":
            prop.value = "1e9"  # every part would pass
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ArtifactError, match="modified after it was exported"):
        hamacho.load(path)


def test_edited_onnx_weights_are_refused(exported, tmp_path):
    model = onnx.load(str(exported / "model.onnx"))
    biggest = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    values = np.frombuffer(biggest.raw_data, np.float32).copy()
    values[0] += 1.0
    biggest.raw_data = values.tobytes()
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ArtifactError, match="modified after it was exported"):
        hamacho.load(path)


def test_truncated_onnx_file_is_one_line(exported, tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes((exported / "model.onnx").read_bytes()[:5000])
    with pytest.raises(ArtifactError, match="not a readable ONNX file"):
        hamacho.load(path)


def test_edited_openvino_xml_or_bin_is_refused(exported, tmp_path):
    pytest.importorskip("openvino")
    alone = _copy(exported, tmp_path, "model.xml", "model.bin")
    xml = (alone / "model.xml").read_text()
    threshold = hamacho.load(alone / "model.xml").threshold
    (alone / "model.xml").write_text(xml.replace(repr(threshold), "1000000000.0", 1))
    with pytest.raises(ArtifactError, match="modified after it was exported"):
        hamacho.load(alone / "model.xml")
    (alone / "model.xml").write_text(xml)
    weights = bytearray((alone / "model.bin").read_bytes())
    weights[len(weights) // 2] ^= 0x01
    (alone / "model.bin").write_bytes(bytes(weights))
    with pytest.raises(ArtifactError, match="modified after it was exported"):
        hamacho.load(alone / "model.xml")


@pytest.mark.parametrize("runtime", ["onnx", "openvino"])
def test_exported_file_of_a_tampered_run_is_refused_like_the_run(
    exported, tiny_mvtec, tmp_path, runtime
):
    if runtime == "openvino":
        pytest.importorskip("openvino")
    copy = _copy(exported, tmp_path, "model.safetensors", "model.onnx", "model.xml", "model.bin")
    payload = bytearray((copy / "model.safetensors").read_bytes())
    payload[-10] ^= 0xFF  # a tensor byte: the run's own checksum no longer matches
    (copy / "model.safetensors").write_bytes(bytes(payload))
    image = str(_image(tiny_mvtec))
    torch_run = CliRunner().invoke(main, ["predict", "--run", str(copy), image])
    result = CliRunner().invoke(main, ["predict", "--run", str(copy), "--runtime", runtime, image])
    assert result.exit_code == torch_run.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [line for line in torch_run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "model.safetensors" in errors[0] and "modified" in errors[0]
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        hamacho.load(copy / f"model{'.onnx' if runtime == 'onnx' else '.xml'}")


def test_exported_file_beside_another_run_is_refused(exported, tiny_mvtec, tmp_path):
    other = engine.train("padim", tiny_mvtec, None, [*FAST, "model.n_features=8"], tmp_path / "b")
    shutil.copy(exported / "model.onnx", other / "model.onnx")
    with pytest.raises(ArtifactError, match="not exported from the run beside it"):
        hamacho.load(other, runtime="onnx")


def test_file_without_a_checksum_is_refused(exported, tmp_path):
    model = onnx.load(str(exported / "model.onnx"))
    keep = [p for p in model.metadata_props if p.key != "sha256"]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ArtifactError, match="carries no hamacho checksum"):
        hamacho.load(path)
