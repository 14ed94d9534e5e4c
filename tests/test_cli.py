from __future__ import annotations

import csv
import json

import pytest
from click.testing import CliRunner

from hamacho.cli import main
from hamacho.components.artifact import load_artifact

from .conftest import FAST


def _sets(*extra: str) -> list[str]:
    return [arg for item in (*FAST, *extra) for arg in ("--set", item)]


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _one_line_error(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_models_table_and_json():
    table = run("models")
    assert table.exit_code == 0
    header, *rows = table.stdout.splitlines()
    assert header.split()[:4] == ["MODEL", "DISTRIBUTION", "VERSION", "SUMMARY"]
    assert [r.split()[:3] for r in rows] == [
        ["padim", "hamacho-padim", "0.1.0"],
        ["patchcore", "hamacho-patchcore", "0.1.0"],
    ]
    listed = json.loads(run("models", "--json").stdout)
    assert [m["name"] for m in listed] == ["padim", "patchcore"]
    assert set(listed[0]) == {"name", "distribution", "version", "summary"}


def test_unknown_model_is_one_line_exit_2(tiny_mvtec):
    result = run("train", "--model", "patchcor", "--data", str(tiny_mvtec))
    assert result.exit_code == 2
    assert _one_line_error(result) == "error: Unknown model 'patchcor'. Available: padim, patchcore"


def test_unknown_config_key_is_one_line_exit_2(tiny_mvtec):
    result = run("train", "--model", "padim", "--data", str(tiny_mvtec), "--set", "model.nope=1")
    assert result.exit_code == 2
    assert "unknown config key 'model.nope'" in _one_line_error(result)


def test_missing_weights_for_chosen_backbone_is_one_line(tiny_mvtec, tmp_path):
    result = run(
        "train",
        "--model",
        "patchcore",
        "--data",
        str(tiny_mvtec),
        "--set",
        "model.backbone=wide_resnet50_2",
        "--output",
        str(tmp_path / "r"),
    )
    assert result.exit_code == 1
    line = _one_line_error(result)
    assert "wide_resnet50_2" in line and "model.weights" in line
    assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def trained(tiny_mvtec, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "pc"
    result = run(
        "train",
        "--model",
        "patchcore",
        "--data",
        str(tiny_mvtec),
        "--output",
        str(out),
        *_sets("model.embedding_dim=64", "threshold.source=holdout", "threshold.holdout=0.25"),
    )
    assert result.exit_code == 0, result.output
    return out


def test_train_writes_run_directory(trained):
    summary = json.loads((trained / "train.json").read_text())
    assert summary["train_images"] == 9 and summary["holdout_images"] == 3
    assert (
        summary["fit_seconds"] > 0
        and summary["threshold_seconds"] > 0
        and summary["peak_rss_mb"] > 0
    )
    assert summary["memory_bank_rows"] > 0
    assert summary["threshold"]["value"] > 0
    tensors, meta = load_artifact(trained / "model.safetensors")
    assert meta["model"] == "patchcore"
    assert meta["config"]["model"]["embedding_dim"] == 64
    assert tensors["memory_bank"].shape == (summary["memory_bank_rows"], 64)
    assert "embedding_dim: 64" in (trained / "config.yaml").read_text()


def test_test_writes_metrics_scores_and_maps(trained):
    result = run("test", "--run", str(trained))
    assert result.exit_code == 0, result.output
    metrics = json.loads((trained / "metrics.json").read_text())
    assert 0 <= metrics["image_auroc"] <= 1 and 0 <= metrics["pixel_auroc"] <= 1
    assert metrics["inference_ms_per_image"] > 0
    assert metrics["images"] == {"good": 4, "defect": 6}
    rows = list(csv.DictReader((trained / "scores.csv").open()))
    assert len(rows) == 10 and {r["label"] for r in rows} == {"0", "1"}
    assert len(list((trained / "maps").rglob("*.png"))) == 10


def test_predict_prints_json_lines_and_reports_bad_images(trained, tiny_mvtec, tmp_path):
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    good_dir = tiny_mvtec / "test" / "good"
    result = run(
        "predict", "--run", str(trained), str(good_dir), str(bad), "--maps", str(tmp_path / "maps")
    )
    assert result.exit_code == 1
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 5
    ok = [r for r in rows if "error" not in r]
    assert len(ok) == 4 and all(isinstance(r["is_anomalous"], bool) for r in ok)
    assert [r["path"] for r in rows if "error" in r] == [str(bad)]
    assert "corrupt.png" in result.stderr
    assert len(list((tmp_path / "maps").glob("*.png"))) == 4


def test_tampered_artifact_is_one_line(trained, tmp_path):
    copy = tmp_path / "run"
    copy.mkdir()
    payload = bytearray((trained / "model.safetensors").read_bytes())
    payload[-10] ^= 0xFF
    (copy / "model.safetensors").write_bytes(bytes(payload))
    result = run("test", "--run", str(copy))
    assert result.exit_code == 1
    assert "model.safetensors" in _one_line_error(result)


def test_default_backbone_falls_back_to_offline_weights(tiny_mvtec, tmp_path):
    result = run(
        "train",
        "--model",
        "padim",
        "--data",
        str(tiny_mvtec),
        "--output",
        str(tmp_path / "r"),
        "--set",
        "data.image_size=64",
        "--set",
        "data.crop_size=null",
    )
    assert result.exit_code == 0, result.output
    assert "using model.backbone=tf_efficientnet_lite0" in result.stderr
    meta = load_artifact(tmp_path / "r" / "model.safetensors")[1]
    assert meta["config"]["model"]["backbone"] == "tf_efficientnet_lite0"
    assert "efficientnet-lite0" in meta["info"]["weights"]


def test_tiled_training_sees_tiles_and_maps_cover_the_image(tiny_mvtec, tmp_path):
    out = tmp_path / "tiled"
    sets = _sets("model.n_features=16", "tiler.tile_size=32", "tiler.stride=32")
    result = run(
        "train", "--model", "padim", "--data", str(tiny_mvtec), "--output", str(out), *sets
    )
    assert result.exit_code == 0, result.output
    tensors, _ = load_artifact(out / "model.safetensors")
    assert tensors["grid"].tolist() == [8, 8]  # resnet18 layer1 of a 32 px tile, not a 64 px image
    tested = run("test", "--run", str(out))
    assert tested.exit_code == 0, tested.output
    assert json.loads((out / "metrics.json").read_text())["pixel_auroc"] is not None
