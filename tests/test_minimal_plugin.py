"""The smallest model the contract allows, pip-installed, through every command of the CLI.

It never calls ``super().__init__``, ignores ``components`` and has no ``Config``: the core must
keep all run state itself and read nothing from the model beyond the documented contract.
"""

from __future__ import annotations

import csv
import json
import types

import pytest

from hamacho import benchmark as bench

from .conftest import hamacho_cli, pip_install

PYPROJECT = """\
[project]
name = "hamacho-minimal"
version = "0.2.0"
entry-points.hamacho = { minimal = "hamacho_minimal" }
"""

MODULE = '''\
"""Per-pixel distance from the mean good image, with no settings and no shared components."""

import torch

from hamacho import Model, Prediction, hookimpl


class Minimal(Model):
    name = "minimal"
    summary = "Distance from the mean good image, no settings"

    def __init__(self, config=None, components=None):
        self.config = config  # no super().__init__(), components ignored

    def fit(self, train_loader):
        self.mean = torch.cat([b["image"] for b in train_loader]).mean(0)

    def predict(self, images):
        maps = (images - self.mean).abs().mean(1)  # (B, H, W)
        return Prediction(scores=maps.flatten(1).amax(1), maps=maps)

    def state_dict(self):
        return {"mean": self.mean}

    def load_state_dict(self, state):
        self.mean = state["mean"]


@hookimpl
def hamacho_register_models():
    return [Minimal]
'''

SETS = ["--set", "data.image_size=64", "--set", "data.crop_size=null"]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    src = tmp_path_factory.mktemp("hamacho-minimal")
    (src / "pyproject.toml").write_text(PYPROJECT)
    (src / "hamacho_minimal.py").write_text(MODULE)
    return pip_install(src, tmp_path_factory.mktemp("site"))


@pytest.mark.slow
def test_minimal_plugin_trains_tests_predicts_and_benchmarks(site, tiny_mvtec, tmp_path):
    run_dir = tmp_path / "run"
    args = ["--model", "minimal", "--data", str(tiny_mvtec), *SETS, "--output", str(run_dir)]
    trained = hamacho_cli(site, "train", *args)
    assert trained.returncode == 0, trained.stderr
    threshold = json.loads((run_dir / "train.json").read_text())["threshold"]["value"]

    tested = hamacho_cli(site, "test", "--run", str(run_dir))
    assert tested.returncode == 0, tested.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["image_auroc"] > 0.5 and metrics["pixel_auroc"] > 0.5
    scores = {r["path"]: r for r in csv.DictReader((run_dir / "scores.csv").open())}

    predicted = hamacho_cli(site, "predict", "--run", str(run_dir), str(tiny_mvtec / "test"))
    assert predicted.returncode == 0, predicted.stderr
    rows = [json.loads(line) for line in predicted.stdout.splitlines()]
    assert sorted(r["path"] for r in rows) == sorted(scores)
    for row in rows:  # the same score and decision as `hamacho test`, against the run's threshold
        assert row["threshold"] == threshold
        assert row["is_anomalous"] == (row["score"] >= threshold)
        assert row["score"] == pytest.approx(float(scores[row["path"]]["score"]), abs=1e-5)
        assert int(row["is_anomalous"]) == int(scores[row["path"]]["prediction"])

    out = tmp_path / "bench"
    data = ["--data", str(tiny_mvtec), *SETS, "--output", str(out)]
    benched = hamacho_cli(site, "benchmark", "--models", "minimal", *data)
    assert benched.returncode == 0, benched.stderr
    (row,) = csv.DictReader((out / "results.csv").open())
    assert (row["model"], row["backbone"], row["status"]) == ("minimal", "-", "ok")
    assert float(row["image_auroc"]) == metrics["image_auroc"]  # same data, same model
    assert "Backbone -: the backbone axis does not apply" in (out / "results.md").read_text()


def test_backbone_axis_skips_a_model_without_backbone(register_plugin, tiny_mvtec, tmp_path):
    module = types.ModuleType("hamacho_minimal_inline")
    exec(MODULE, module.__dict__)  # the same plugin, registered in this process
    register_plugin(module)
    backbones = "resnet18@none,tf_efficientnet_lite0"
    grid = bench.make_grid("minimal,patchcore", backbones, [tiny_mvtec], tmp_path, "0,1")
    cells = bench.plan(grid)
    mine = [c for c in cells if c.model == "minimal"]
    assert [(c.backbone_label, c.seed) for c in mine] == [("-", 0), ("-", 1)]
    assert mine[1].overrides == ["run.seed=1"]  # no model.backbone / layers / seed keys
    assert mine[1].directory == tmp_path / "minimal" / "default" / "widget" / "seed1"
    others = [(c.backbone_label, c.seed, c.layers) for c in cells if c.model == "patchcore"]
    assert others == [
        ("resnet18@none", 0, ["layer2", "layer3"]),
        ("resnet18@none", 1, ["layer2", "layer3"]),
        ("tf_efficientnet_lite0", 0, ["blocks.2", "blocks.4"]),
        ("tf_efficientnet_lite0", 1, ["blocks.2", "blocks.4"]),
    ]
