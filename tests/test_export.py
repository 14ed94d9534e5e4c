from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import hamacho
from hamacho import engine
from hamacho.api import as_uint8
from hamacho.cli import main
from hamacho.errors import UsageError
from hamacho.export.graph import build_graph
from hamacho.export.runtimes import open_backend
from hamacho.export.writers import require, write_openvino
from hamacho.model import Model
from hamacho.runtime import Run

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

FAST = [
    "model.backbone=resnet18",
    "model.weights=none",
    "data.image_size=64",
    "data.crop_size=56",  # a real centre crop, so the exported crop is exercised
    "data.batch_size=8",
]
MODEL_FAST = {
    "patchcore": ["model.pretrain_embed_dim=64", "model.embedding_dim=32"],
    "padim": ["model.n_features=16"],
    "padim-orthogonal": ["model.selection=orthogonal", "model.n_features=16"],  # a projection
    # overlapping tiles (starts 0 and 24 of the 56 crop): the graph tiles and stitches inside
    "patchcore-tiled": ["model.pretrain_embed_dim=64", "tiler.tile_size=32", "tiler.stride=24"],
}
DOCS = Path(__file__).resolve().parents[1] / "docs" / "python-api.md"


@pytest.fixture(scope="module", params=list(MODEL_FAST))
def exported(request, tiny_mvtec, tmp_path_factory):
    """(run directory, exported .onnx file) of a tiny run of each bundled model."""
    variant = request.param
    name = variant.partition("-")[0]
    out = tmp_path_factory.mktemp(f"export-{variant}") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HAMACHO_OFFLINE", "1")
        run_dir = engine.train(name, tiny_mvtec, None, FAST + MODEL_FAST[variant], out)
        done = CliRunner().invoke(main, ["export", "--run", str(run_dir), "--format", "onnx"])
    assert done.exit_code == 0, done.output
    return run_dir, Path(done.output.strip().splitlines()[-1])


def _tests(tiny_mvtec) -> list[Path]:
    return sorted((tiny_mvtec / "test").rglob("*.png"))


@pytest.mark.slow
def test_export_writes_one_checked_graph_with_metadata(exported):
    run_dir, path = exported
    assert path == run_dir / "model.onnx"
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    meta = {p.key: p.value for p in model.metadata_props}
    run = engine.load_run(run_dir)
    assert meta["model"] == run.metadata["model"]
    assert float(meta["threshold"]) == run.threshold
    assert meta["hamacho_version"] == hamacho.__version__
    assert json.loads(meta["config"]) == run.config.to_dict()
    image = model.graph.input[0]
    assert image.name == "image" and image.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = [d.dim_param or d.dim_value for d in image.type.tensor_type.shape.dim]
    assert dims == ["N", "H", "W", 3]
    assert [o.name for o in model.graph.output] == ["score", "map"]
    ops = {node.op_type for node in model.graph.node}
    assert not {op for op in ops if "dist" in op.lower()}  # nearest neighbour as MatMul + min
    assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}


@pytest.mark.slow
def test_onnxruntime_on_decoded_uint8_scores_like_hamacho(exported, tiny_mvtec):
    run_dir, path = exported
    torch_backend = open_backend(run_dir, "torch")
    session = ort.InferenceSession(str(path))
    images = [np.asarray(Image.open(p).convert("RGB")) for p in _tests(tiny_mvtec)]
    images.append(np.asarray(Image.fromarray(images[0]).resize((83, 71))))  # H, W dynamic
    want_s, want_m = torch_backend.score([as_uint8(i) for i in images])
    got = [session.run(["score", "map"], {"image": image[None]}) for image in images]
    got_s = np.array([s[0] for s, _ in got])
    got_m = np.stack([m[0] for _, m in got])
    assert got_m.shape == want_m.shape == (len(images), 56, 56)
    assert np.abs(got_s - want_s).max() <= 1e-4 * np.ptp(want_s)
    assert np.abs(got_m - want_m).max() <= 1e-3 * np.ptp(want_m)
    limit = torch_backend.threshold
    assert ((got_s >= limit) == (want_s >= limit)).all()
    batch_s, _ = session.run(["score", "map"], {"image": np.stack(images[:3])})  # N dynamic
    np.testing.assert_allclose(batch_s, got_s[:3], rtol=1e-5)
    # predict --maps draws the same resized crops whichever runtime scored them
    _, _, want_px = torch_backend.score_with_pixels([as_uint8(i) for i in images[:3]])
    _, _, got_px = open_backend(path, "onnx").score_with_pixels([as_uint8(i) for i in images[:3]])
    assert want_px.dtype == np.uint8 and np.array_equal(got_px, want_px)


def _lines(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def _assert_same_rows(got: list[dict], want: list[dict]) -> None:
    scores = np.array([r["score"] for r in want])
    assert [r["path"] for r in got] == [r["path"] for r in want]
    assert [r["is_anomalous"] for r in got] == [r["is_anomalous"] for r in want]
    diff = np.abs(np.array([r["score"] for r in got]) - scores).max()
    assert diff <= 1e-4 * np.ptp(scores)


@pytest.mark.slow
def test_predict_runtime_onnx_prints_the_same_json_lines(exported, tiny_mvtec):
    run_dir, _ = exported
    folder = str(tiny_mvtec / "test")
    runs = {
        rt: CliRunner().invoke(main, ["predict", "--run", str(run_dir), "--runtime", rt, folder])
        for rt in ("torch", "onnx")
    }
    assert all(r.exit_code == 0 for r in runs.values()), runs["onnx"].output
    torch_rows, onnx_rows = _lines(runs["torch"].output), _lines(runs["onnx"].output)
    assert len(torch_rows) == len(_tests(tiny_mvtec))
    assert {k for row in onnx_rows for k in row} == {k for row in torch_rows for k in row}
    _assert_same_rows(onnx_rows, torch_rows)


@pytest.mark.slow
def test_docs_script_with_onnxruntime_and_pil_reproduces_predict(exported, tiny_mvtec, tmp_path):
    run_dir, path = exported
    text = DOCS.read_text()
    block = text.split("<!-- standalone-script", 1)[1]
    code = re.search(r"```python\n(.*?)```", block, re.S).group(1)
    assert len(code.strip().splitlines()) <= 12
    script = tmp_path / "score.py"
    script.write_text(code)
    folder = tiny_mvtec / "test"
    done = subprocess.run(
        [sys.executable, str(script), str(path), str(folder)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    cli = CliRunner().invoke(main, ["predict", "--run", str(run_dir), str(folder)])
    _assert_same_rows(_lines(done.stdout), _lines(cli.output))


@pytest.mark.slow
def test_openvino_ir_scores_like_hamacho(exported, tiny_mvtec, tmp_path):
    pytest.importorskip("openvino")
    run_dir, path = exported
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    xml = write_openvino(path, tmp_path / "model.xml", props)
    det_ov, det_torch = hamacho.load(xml), hamacho.load(run_dir)
    assert det_ov.runtime == "openvino" and det_ov.threshold == det_torch.threshold
    files = _tests(tiny_mvtec)
    want = np.array([r.score for r in det_torch.predict(files)])
    got = det_ov.predict(files)
    assert np.abs(np.array([r.score for r in got]) - want).max() <= 1e-4 * np.ptp(want)
    assert [r.is_anomalous for r in got] == [r.score >= det_torch.threshold for r in got]
    assert got[0].map.shape == (64, 64) and np.isnan(got[0].map).any()  # 56 of 64 inspected


def test_export_of_a_model_without_the_hook_says_so(tmp_path):
    class Plain(Model):
        name = "plain"

    run = Run(Plain(None, None), None, {"model": "plain"}, tmp_path)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="model 'plain' does not support export"):
        build_graph(run)


def test_missing_runtime_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(UsageError, match=r"pip install 'hamacho\[onnx\]'"):
        require("onnxruntime")


@pytest.mark.slow
def test_patchcore_paper_score_module_matches_predict(tiny_mvtec, tmp_path, monkeypatch):
    overrides = [*FAST, *MODEL_FAST["patchcore"], "model.score=paper", "model.num_neighbors=3"]
    run = engine.load_run(engine.train("patchcore", tiny_mvtec, None, overrides, tmp_path))
    images = torch.stack(
        [
            engine.data.load_image_tensor(p, run.config.data, run.mean, run.std)
            for p in _tests(tiny_mvtec)[:6]
        ]
    )
    want = run.model.predict(images)
    scores, maps = run.model.export_module()(images)  # the module export traces, run eagerly
    torch.testing.assert_close(scores, want.scores, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(maps, want.maps, rtol=1e-4, atol=1e-5)
    run.model.config.score = "max"
    assert (scores < run.model.predict(images).scores).all()  # reweighted: below the max score
