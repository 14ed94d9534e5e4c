from __future__ import annotations

import csv
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from hamacho import benchmark as bench
from hamacho.benchmark import runner
from hamacho.benchmark.grid import BackboneSpec, parse_backbone
from hamacho.benchmark.plan import default_layers
from hamacho.cli import main
from hamacho.errors import ConfigError, DataError
from hamacho.plugins import get_registry

from .conftest import FAST

GRIDS = Path(__file__).parent.parent / "configs" / "benchmark"


def _rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((path / "results.csv").open()))


def test_parse_backbone_layers_weights_and_timm_prefix():
    assert parse_backbone("resnet18") == BackboneSpec("resnet18")
    assert parse_backbone("resnet18@none") == BackboneSpec("resnet18", (), "none")
    spec = parse_backbone("timm:resnet18:layer2+layer3@/w/r18.pth")
    assert spec == BackboneSpec("timm:resnet18", ("layer2", "layer3"), "/w/r18.pth")
    assert spec.label == "timm:resnet18:layer2+layer3@/w/r18.pth"


def test_default_layers_table_explicit_and_unknown():
    patchcore, padim = (get_registry().get(name).cls for name in ("patchcore", "padim"))
    lite = BackboneSpec("tf_efficientnet_lite0")
    assert default_layers(patchcore, lite) == ["blocks.2", "blocks.4"]
    assert default_layers(padim, lite) == ["blocks.1", "blocks.2", "blocks.4"]
    assert default_layers(padim, BackboneSpec("resnet50")) == [
        "layer1",
        "layer2",
        "layer3",
    ]
    assert default_layers(padim, parse_backbone("vgg16:features.8")) == ["features.8"]
    with pytest.raises(ConfigError) as info:
        default_layers(patchcore, BackboneSpec("vgg16"))
    message = str(info.value)
    assert "\n" not in message and "wide_resnet*" in message
    assert "--backbones vgg16:LAYER+LAYER" in message


def test_plan_sets_seeds_layers_and_model_scoped_overrides(tiny_mvtec, tmp_path):
    grid = bench.make_grid(
        "patchcore,padim",
        "resnet18@none",
        [tiny_mvtec],
        tmp_path,
        "0,3",
        ["data.image_size=64", "patchcore:model.coreset_ratio=0.5"],
    )
    cells = bench.plan(grid)
    assert [(c.model, c.seed) for c in cells] == [
        ("patchcore", 0),
        ("patchcore", 3),
        ("padim", 0),
        ("padim", 3),
    ]
    patchcore, padim = cells[1].overrides, cells[3].overrides
    assert "model.coreset_ratio=0.5" in patchcore and "model.coreset_ratio=0.5" not in padim
    assert {"run.seed=3", "model.seed=3", "model.weights=none"} <= set(padim)
    assert 'model.layers=["layer1", "layer2", "layer3"]' in padim
    assert cells[3].directory == tmp_path / "padim" / "resnet18_none" / "widget" / "seed3"


def test_make_grid_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="benchmark needs data"):
        bench.make_grid("patchcore", "resnet18", output=tmp_path)
    with pytest.raises(DataError, match="'nowhere' does not exist"):
        bench.make_grid("padim", "resnet18", ["nowhere"], tmp_path)
    bad = tmp_path / "grid.yaml"
    bad.write_text("models: [padim]\nbackbone: [resnet18]\n")
    with pytest.raises(ConfigError, match="unknown key"):
        bench.make_grid(grid_file=bad)


@pytest.mark.parametrize("timeout", [0, -5, ".nan", "soon"])
def test_grid_file_timeout_must_be_positive(timeout, tiny_mvtec, tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"models: [padim]\ndata: [{tiny_mvtec}]\noutput: out\ntimeout: {timeout}\n")
    with pytest.raises(ConfigError, match="must be a number of seconds > 0"):
        bench.make_grid(grid_file=grid)
    assert bench.make_grid(grid_file=grid, timeout=30).timeout == 30.0  # the CLI's value wins


@pytest.mark.parametrize("grid_file", sorted(GRIDS.glob("*.yaml")), ids=lambda p: p.name)
def test_example_grid_files_plan(grid_file, tiny_mvtec, tmp_path):
    grid = bench.make_grid(datasets=[tiny_mvtec], output=tmp_path, grid_file=grid_file)
    cells = bench.plan(grid)
    assert len(cells) == len(grid.models) * len(grid.backbones) * len(grid.seeds)


def test_benchmark_records_failed_cell_runs_the_rest_and_resumes(tiny_mvtec, tmp_path):
    out = tmp_path / "bench"
    sets = [arg for item in FAST for arg in ("--set", item)]
    args = ["benchmark", "--models", "padim,patchcore", "--data", str(tiny_mvtec), *sets]
    args += ["--set", "padim:model.n_features=16", "--output", str(out)]
    args += ["--backbones", "resnet18:layer9@none,resnet18@none"]  # layer9 does not exist
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 1  # some cell failed
    rows = _rows(out)
    assert [(r["model"], r["layers"], r["status"]) for r in rows] == [
        ("padim", "layer9", "failed"),
        ("padim", "layer1+layer2+layer3", "ok"),
        ("patchcore", "layer9", "failed"),
        ("patchcore", "layer2+layer3", "ok"),
    ]
    for row in rows[1::2]:
        assert 0 <= float(row["image_auroc"]) <= 1 and float(row["pixel_auroc"]) > 0
        assert float(row["fit_seconds"]) > 0 and float(row["inference_ms_per_image"]) > 0
        assert float(row["peak_rss_mb"]) > 0 and float(row["artifact_mb"]) > 0
        assert row["test_images"] == "10" and row["cached"] == "False"
    for row in rows[::2]:
        assert row["error"].startswith("unknown layer 'layer9' for backbone resnet18")
        assert row["image_auroc"] == ""
    markdown = (out / "results.md").read_text()
    assert "| padim | resnet18@none | layer1+layer2+layer3 |" in markdown
    assert "## Image AUROC per category" in markdown and "| widget |" in markdown
    assert "## Failed cells" in markdown and markdown in first.stdout
    with Image.open(out / "results.png") as png:
        assert png.format == "PNG" and png.size == (1100, 680)

    # Again, with a timeout no cell can meet: finished cells are not recomputed (else they
    # would now fail); the failed ones are retried and fail again.
    finished = sorted(out.rglob("metrics.json"))
    stamps = [p.stat().st_mtime_ns for p in finished]
    second = CliRunner().invoke(main, [*args, "--timeout", "0.01"])
    assert second.exit_code == 1
    assert [p.stat().st_mtime_ns for p in finished] == stamps
    rows = _rows(out)
    assert [(r["status"], r["cached"]) for r in rows] == [
        ("failed", "False"),
        ("ok", "True"),
        ("failed", "False"),
        ("ok", "True"),
    ]
    assert rows[0]["error"] == "timed out after 0.01 s (raise --timeout)"


def test_error_line_prefers_the_cli_error_line():
    stderr = "note: something\nerror: cannot read image 'x.png'\n"
    assert runner._error_line(stderr, 1) == "cannot read image 'x.png'"
    assert runner._error_line("Traceback...\nMemoryError\n", 1) == "MemoryError"
    assert runner._error_line("", -9) == "killed by signal 9 (out of memory?)"
