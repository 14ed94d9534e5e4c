"""Where the decision threshold comes from: leave-one-out training scores, or a holdout."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from hamacho import Model, Prediction, hookimpl
from hamacho.components import data
from hamacho.components.artifact import load_artifact
from hamacho.engine import load_run, train
from hamacho.errors import ConfigError
from hamacho.runtime import batch_loader


@dataclass
class _MeanConfig:
    offset: float = 0.0


class _MeanDiff(Model):
    """Score = mean |image - mean training image|; LOO scores = the same without that image."""

    name = "meandiff-loo"
    summary = "test model with leave-one-out training scores"
    Config = _MeanConfig

    def fit(self, train_loader):
        self.images = torch.cat([b["image"] for b in train_loader])
        self.mean = self.images.mean(0)

    def predict(self, images):
        diff = (images - self.mean).abs().mean(1)
        return Prediction(scores=diff.flatten(1).mean(1), maps=diff)

    def training_scores(self, train_loader):
        seen = torch.cat([b["image"] for b in train_loader])
        assert torch.equal(seen, self.images), "training_scores gets the fitted images, in order"
        n = len(seen)
        loo_mean = (self.mean * n - seen) / (n - 1)  # the mean without each image
        return (seen - loo_mean).abs().mean(1).flatten(1).mean(1)

    def state_dict(self):
        return {"mean": self.mean}

    def load_state_dict(self, state):
        self.mean = state["mean"]


class _NoLoo(_MeanDiff):
    name = "meandiff-noloo"
    training_scores = Model.training_scores


class _Plugin:
    @hookimpl
    def hamacho_register_models(self):
        return [_MeanDiff, _NoLoo]


@pytest.fixture
def models(register_plugin):
    register_plugin(_Plugin(), name="threshold-source-test")


def _sets(*items):
    return ["data.image_size=32", "data.crop_size=null", "data.batch_size=5", *items]


def test_auto_scores_every_training_image_leave_one_out(models, tiny_mvtec, tmp_path):
    run = train("meandiff-loo", tiny_mvtec, overrides=_sets(), output=tmp_path / "run")
    summary = json.loads((run / "train.json").read_text())
    assert summary["train_images"] == 12 and summary["holdout_images"] == 0
    threshold = summary["threshold"]
    assert threshold["source"] == "12 good training images, each scored leave-one-out"
    assert threshold["method"] == "percentile" and threshold["parameter"] == 99.0
    _, meta = load_artifact(run / "model.safetensors")
    assert meta["threshold"] == threshold
    # the value is the 99th percentile of the model's own leave-one-out scores
    expected = np.percentile(_loo_scores(run, tiny_mvtec), 99.0)
    assert threshold["value"] == pytest.approx(float(expected), rel=1e-6)


def _threshold(run):
    return json.loads((run / "train.json").read_text())["threshold"]


def test_sigma_method_uses_its_own_setting(models, tiny_mvtec, tmp_path):
    base = train("meandiff-loo", tiny_mvtec, overrides=_sets(), output=tmp_path / "p")
    one = train(
        "meandiff-loo",
        tiny_mvtec,
        overrides=_sets("threshold.method=sigma", "threshold.sigma=1"),
        output=tmp_path / "s1",
    )
    three = train(
        "meandiff-loo",
        tiny_mvtec,
        overrides=_sets("threshold.method=sigma"),
        output=tmp_path / "s3",
    )
    t1, t3, tp = (_threshold(r) for r in (one, three, base))
    assert t3["parameter"] == 3.0 and t1["parameter"] == 1.0
    # mean + 3 std - (mean + 1 std) = 2 std > 0, and percentile differs from both
    assert t3["value"] > t1["value"]
    assert tp["value"] not in (t1["value"], t3["value"])


def test_holdout_source_withholds_images(models, tiny_mvtec, tmp_path):
    run = train(
        "meandiff-loo",
        tiny_mvtec,
        overrides=_sets("threshold.source=holdout", "threshold.holdout=0.25"),
        output=tmp_path / "h",
    )
    summary = json.loads((run / "train.json").read_text())
    assert summary["train_images"] == 9 and summary["holdout_images"] == 3
    assert summary["threshold"]["source"] == "3 held-out good training images"


def test_model_without_hook_falls_back_to_holdout(models, tiny_mvtec, tmp_path):
    run = train("meandiff-noloo", tiny_mvtec, overrides=_sets(), output=tmp_path / "n")
    summary = json.loads((run / "train.json").read_text())
    assert summary["holdout_images"] == 1 and summary["train_images"] == 11  # 10 % of 12


def test_loo_source_refused_for_model_without_hook(models, tiny_mvtec, tmp_path):
    with pytest.raises(ConfigError, match="cannot score its training images leave-one-out"):
        train(
            "meandiff-noloo",
            tiny_mvtec,
            overrides=_sets("threshold.source=loo"),
            output=tmp_path / "x",
        )
    assert not (tmp_path / "x").exists()


def _loo_scores(run, root):
    """The leave-one-out training scores the threshold of ``run`` was derived from."""
    loaded = load_run(run)
    loader = batch_loader(data.find_samples(root, "train"), loaded.config, loaded.mean, loaded.std)
    net = _MeanDiff(loaded.config.model, None)
    net.fit(loader)
    return net.training_scores(loader).numpy().astype(np.float64)


@pytest.mark.parametrize(
    ("sets", "expected"),
    [
        (["threshold.percentile=50"], lambda s: np.percentile(s, 50)),
        (["threshold.method=sigma", "threshold.sigma=2"], lambda s: s.mean() + 2 * s.std(ddof=1)),
    ],
    ids=["percentile-50", "sigma-2"],
)
def test_each_method_uses_its_value(models, tiny_mvtec, tmp_path, sets, expected):
    run = train("meandiff-loo", tiny_mvtec, overrides=_sets(*sets), output=tmp_path / "r")
    threshold = _threshold(run)
    assert threshold["parameter"] == float(sets[-1].partition("=")[2])
    want = float(expected(_loo_scores(run, tiny_mvtec)))
    assert threshold["value"] == pytest.approx(want, rel=1e-6)
