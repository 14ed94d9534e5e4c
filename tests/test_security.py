"""No file read can run code, nothing is written outside the run, crafted input is one line."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from hamacho import engine, predicting
from hamacho.cli import main
from hamacho.components.artifact import load_artifact, save_artifact
from hamacho.errors import ArtifactError, one_line

from .conftest import FAST


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def _error_line(result) -> str:
    """The one ``error:`` line on stderr (notes and warnings may precede it, never a traceback)."""
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


class _Planted:
    """Unpickling this creates ``marker``: it stands for any code a pickle can run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


@pytest.fixture
def planted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A code-running pickle cached as torchvision's resnet18 ImageNet file; returns the marker."""
    home = tmp_path / "torch"
    monkeypatch.setenv("TORCH_HOME", str(home))
    checkpoints = home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    marker = tmp_path / "code-ran"
    torch.save({"conv1.weight": _Planted(marker)}, checkpoints / "resnet18-f37072fd.pth")
    return marker


@pytest.fixture(scope="module")
def trained(tiny_mvtec, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "pc"
    engine.train("patchcore", tiny_mvtec, overrides=FAST, output=out)
    return out


def _crafted(trained: Path, tmp_path: Path, edit) -> Path:
    """A copy of the run whose artifact metadata ``edit`` changed, checksum recomputed."""
    copy = tmp_path / "crafted"
    shutil.copytree(trained, copy)
    tensors, meta = load_artifact(copy / engine.ARTIFACT)
    edit(meta)
    save_artifact(copy / engine.ARTIFACT, tensors, meta)
    return copy


# -- 1. weight files never run code --------------------------------------------------------------
def test_train_refuses_planted_torchvision_weights(planted, tiny_mvtec, tmp_path):
    result = run(
        "train", "--model", "patchcore", "--data", str(tiny_mvtec), "-o", str(tmp_path / "r"),
        *_sets("model.backbone=resnet18", "data.image_size=64", "data.crop_size=null"),
    )  # fmt: skip
    assert result.exit_code == 1
    line = _error_line(result)
    assert "resnet18-f37072fd.pth" in line and "integrity check" in line
    assert not planted.exists()


def test_crafted_artifact_naming_planted_backbone_runs_nothing(planted, trained, tmp_path):
    def use_imagenet(meta: dict) -> None:
        meta["config"]["model"]["weights"] = "imagenet"

    crafted = _crafted(trained, tmp_path, use_imagenet)
    image = next((trained / "maps").rglob("*.png"), None) or _any_image(trained)
    for args in (("predict", "--run", str(crafted), str(image)), ("test", "--run", str(crafted))):
        result = run(*args)
        assert result.exit_code == 1
        assert "resnet18-f37072fd.pth" in _error_line(result)
    assert not planted.exists()


def _any_image(trained: Path) -> Path:
    dataset = Path(load_artifact(trained / engine.ARTIFACT)[1]["dataset"])
    return next((dataset / "test" / "good").glob("*.png"))


# -- 2. nothing written outside the run ----------------------------------------------------------
def _tree(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*")}


def test_test_maps_stay_inside_the_run_whatever_the_labels(trained, tiny_mvtec, tmp_path):
    outside = tmp_path / "outside"
    images = sorted((tiny_mvtec / "test").rglob("*.png"))[:4]
    labels = ["good", "../../escaped", str(outside), ".."]
    csv = tmp_path / "list.csv"
    csv.write_text("".join(f"{p},{label}\n" for p, label in zip(images, labels, strict=True)))
    run_dir = tmp_path / "deep" / "er" / "run"
    shutil.copytree(trained, run_dir)
    before = _tree(tmp_path)
    result = run("test", "--run", str(run_dir), "--data", str(csv))
    assert result.exit_code == 0, result.output
    changed = {p for p, t in _tree(tmp_path).items() if before.get(p) != t}
    # the one file beside the run is its lock (hamacho.rundir), named after the run itself
    lock = run_dir.parent / f".{run_dir.name}.lock"
    inside = {p for p in changed if Path(p).is_relative_to(run_dir)}
    assert inside and changed - inside <= {str(lock), str(run_dir.parent)}, sorted(changed)
    panels = sorted(p.relative_to(run_dir / "maps") for p in (run_dir / "maps").rglob("*.png"))
    assert len(panels) == 4 and all(len(p.parts) == 2 for p in panels)
    assert not outside.exists()


def test_predict_maps_stay_inside_the_maps_folder(trained, tiny_mvtec, tmp_path):
    image = next((tiny_mvtec / "test" / "good").glob("*.png"))
    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    shutil.copy(image, nested / image.name)
    shutil.copy(image, tmp_path / "a" / image.name)
    # The third input's parent is named "..": the map name built from it must not start with a dot
    inputs = [str(tmp_path / "a"), str(nested / ".." / image.name), str(nested / image.name)]
    maps = tmp_path / "maps"
    before = _tree(tmp_path)
    result = run("predict", "--run", str(trained), *inputs, "--maps", str(maps))
    assert result.exit_code == 0, result.output
    changed = {p for p, t in _tree(tmp_path).items() if before.get(p) != t}
    assert all(Path(p).is_relative_to(maps) for p in changed), sorted(changed)
    written = sorted(p.name for p in maps.iterdir())
    assert len(written) == 4 and not any(name.startswith(".") for name in written), written


# -- 3. crafted artifacts --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda m: m.pop("config"), "no 'config'"),
        (lambda m: m.pop("normalization"), "no 'normalization'"),
        (lambda m: m.update(threshold={"value": "abc"}), "threshold="),
        (lambda m: m.update(threshold={"method": "percentile"}), "threshold="),
        (lambda m: m.update(normalization={"mean": [0.5] * 3, "std": [0, 1, 1]}), "std"),
        (lambda m: m.update(normalization={"mean": "abc", "std": [1, 1, 1]}), "mean"),
        (lambda m: m.update(config=[1, 2]), "'config' is a list"),
        (lambda m: m.update(dataset=7), "'dataset' is a int"),
        (lambda m: m.update(info="x"), "'info' is not a mapping"),
    ],
)
def test_crafted_metadata_is_one_artifact_error(trained, tmp_path, edit, named):
    crafted = _crafted(trained, tmp_path, edit)
    with pytest.raises(ArtifactError) as info:
        engine.load_run(crafted)
    message = str(info.value)
    assert named in message and "invalid hamacho metadata" in message and "\n" not in message


def test_crafted_threshold_via_cli_is_one_line(trained, tmp_path):
    crafted = _crafted(trained, tmp_path, lambda m: m.update(threshold={"value": "abc"}))
    result = run("predict", "--run", str(crafted), str(_any_image(trained)))
    assert result.exit_code == 1 and "invalid hamacho metadata" in _error_line(result)


def test_test_says_which_dataset_folder_it_reads(trained, tiny_mvtec):
    recorded = load_artifact(trained / engine.ARTIFACT)[1]["dataset"]
    result = run("test", "--run", str(trained), "--no-maps")
    assert result.exit_code == 0
    assert f"testing on {recorded} (recorded at training; --data overrides)" in result.stderr
    result = run("test", "--run", str(trained), "--no-maps", "--data", str(tiny_mvtec))
    assert f"testing on {tiny_mvtec}\n" in result.stderr


# -- 8. rejected with one line; JSON strict -------------------------------------------------------
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_predict_non_finite_threshold_is_one_line(trained, value):
    result = run("predict", "--run", str(trained), str(_any_image(trained)), "--threshold", value)
    assert result.exit_code == 2 and result.stdout == ""
    assert "--threshold" in _error_line(result) and "finite" in _error_line(result)


@pytest.mark.parametrize("value", ["0", "-5", "nan"])
def test_benchmark_timeout_must_be_positive(value, tmp_path):
    result = run("benchmark", "--timeout", value, "-o", str(tmp_path / "b"))
    assert result.exit_code == 2 and "--timeout" in _error_line(result)
    assert not (tmp_path / "b").exists()


def _strict_json(line: str) -> dict:
    def reject(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    return json.loads(line, parse_constant=reject)


def test_predict_json_lines_parse_strictly(trained, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    image = str(_any_image(trained))
    for extra in ((), ("--threshold", "1e308"), ("--threshold", "-0.0")):
        result = run(
            "predict", "--run", str(trained), image, str(bad), str(tmp_path / "x*"), *extra
        )
        rows = [_strict_json(line) for line in result.stdout.splitlines()]
        scored = [row for row in rows if "score" in row]
        assert len(rows) == 3 and len(scored) == 1
        assert math.isfinite(scored[0]["score"]) and math.isfinite(scored[0]["threshold"])


# -- 9. smaller ------------------------------------------------------------------------------------
def test_predict_errors_do_not_suggest_skip_bad(trained, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    (rows,) = list(predicting.predict(trained, [str(bad)]))
    assert "cannot read image" in rows["error"] and "data.skip_bad" not in rows["error"]


def test_predict_existing_folder_without_images_says_so(trained, tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    rows = list(predicting.predict(trained, [str(tmp_path / "empty"), str(tmp_path / "nope")]))
    assert rows[0]["error"].startswith("folder contains no images")
    assert rows[1]["error"] == "no such file, folder or matching image"


def test_training_count_is_what_skip_bad_kept(tiny_mvtec, tmp_path):
    data = tmp_path / "widget"
    shutil.copytree(tiny_mvtec, data)
    (data / "train" / "good" / "zzz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    lines: list[str] = []
    overrides = [*FAST, "data.skip_bad=true"]
    run_dir = engine.train(
        "patchcore", data, overrides=overrides, output=tmp_path / "r", echo=lines.append
    )
    total = len(list((data / "train" / "good").glob("*.png")))
    summary = json.loads((run_dir / "train.json").read_text())
    kept = total - 1 - summary["holdout_images"]  # the broken one is dropped, not counted
    assert summary["skipped_images"] == 1 and summary["train_images"] == kept
    assert any(line.startswith(f"training patchcore on {kept} images") for line in lines), lines


def test_one_line_takes_the_first_non_blank_line():
    assert one_line(ValueError("\n  first   line \nsecond")) == "first line"
    assert one_line(KeyError()) == "KeyError"
    assert os.linesep not in one_line(RuntimeError("a\r\nb"))
