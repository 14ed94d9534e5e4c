"""hamacho update / merge: grown and merged runs, refusals, outlier sites, merge.json."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from click.testing import CliRunner

import hamacho
from hamacho import Model, Prediction, hookimpl
from hamacho.cli import main
from hamacho.components.artifact import load_artifact
from hamacho.components.synthetic import make_synthetic_dataset
from hamacho.engine import load_run, train
from hamacho.grow.flows import merge, update
from hamacho.grow.outliers import flag

from .conftest import FAST, TINY_PATCHCORE


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    """Four sites of one product (rendered objects, other seeds) and one of another (texture)."""
    root = tmp_path_factory.mktemp("sites")
    alike = [
        make_synthetic_dataset(
            root / f"caps{i}",
            n_train=6,
            n_test_good=2,
            n_test_defect=3,
            size=64,
            seed=i,
            kind="object",
        )
        for i in range(4)
    ]
    odd = make_synthetic_dataset(
        root / "cloth", n_train=6, n_test_good=1, n_test_defect=1, size=64, seed=9, kind="texture"
    )
    return alike, odd


@pytest.fixture(scope="module")
def patchcore_runs(sites, tmp_path_factory):
    alike, odd = sites
    out = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:  # module scope: the autouse fixture is per test
        mp.setenv("HAMACHO_OFFLINE", "1")
        runs = [
            train("patchcore", d, overrides=TINY_PATCHCORE, output=out / d.name)
            for d in [*alike, odd]
        ]
    return runs[:4], runs[4]


def _history(run):
    return load_run(run).metadata["history"]


def test_update_grows_the_bank_to_ratio_times_all_patches(patchcore_runs, sites, tmp_path):
    runs, _ = patchcore_runs
    grown = update(runs[0], sites[0][1], tmp_path / "grown")
    before, after = load_run(runs[0]), load_run(grown)
    patches = before.model.train_patches
    assert after.model.train_patches == 2 * patches  # 6 + 6 images of one size
    assert after.model.bank.shape[0] == math.ceil(0.1 * 2 * patches)
    # the new images' rows carry new source ids: leave-one-out still excludes only their own
    assert int(after.model.bank_source.max()) >= 6
    assert [h["action"] for h in after.metadata["history"]] == ["train", "update"]
    assert [h["images"] for h in after.metadata["history"]] == [6, 6]
    assert len(after.metadata["good_scores"]) == 12
    assert after.metadata["threshold"]["source"] == "6 recorded good-image scores + 6 new"
    summary = json.loads((grown / "train.json").read_text())
    assert summary["train_images"] == 12 and summary["new_images"] == 6
    result = CliRunner().invoke(main, ["test", "--run", str(grown), "--no-maps"])
    assert result.exit_code == 0, result.output


def test_merge_of_alike_sites_rejects_none(patchcore_runs, tmp_path):
    runs, _ = patchcore_runs
    out = merge(runs, tmp_path / "merged", reject_outliers=True)
    report = json.loads((out / "merge.json").read_text())
    assert [s["used"] for s in report["sites"]] == [True] * 4
    assert all(s["outlier_score"] <= report["outliers"]["limit"] for s in report["sites"])
    merged = load_run(out)
    sizes = [load_run(r).model.train_patches for r in runs]
    assert merged.model.train_patches == sum(sizes)
    assert merged.model.bank.shape[0] == math.ceil(0.1 * sum(sizes))
    assert len(merged.metadata["good_scores"]) == 24
    assert merged.metadata["history"][-1]["action"] == "merge"
    assert [h["site"] for h in merged.metadata["history"][:-1]] == [str(r) for r in runs]


def test_merge_rejects_the_site_of_another_product(patchcore_runs, tmp_path):
    runs, odd = patchcore_runs
    out = merge([*runs[:3], odd], tmp_path / "merged", reject_outliers=True)
    report = json.loads((out / "merge.json").read_text())
    assert [s["used"] for s in report["sites"]] == [True, True, True, False]
    scores = [s["outlier_score"] for s in report["sites"]]
    assert scores[3] > report["outliers"]["limit"] >= max(scores[:3])
    assert load_run(out).metadata["history"][-1]["sites"] == [str(r) for r in runs[:3]]


def test_merge_refuses_runs_with_another_setting_naming_it(patchcore_runs, sites, tmp_path):
    runs, _ = patchcore_runs
    other = train(
        "patchcore",
        sites[0][0],
        overrides=[*TINY_PATCHCORE[:-1], "model.embedding_dim=16"],
        output=tmp_path / "other",
    )
    result = CliRunner().invoke(
        main, ["merge", str(runs[0]), str(other), "-o", str(tmp_path / "m")]
    )
    assert result.exit_code != 0
    assert (
        result.output.strip()
        .splitlines()[-1]
        .startswith("error: runs differ in model.embedding_dim: ")
    )
    assert not (tmp_path / "m").exists()


def test_padim_merge_through_the_cli_equals_a_fit_on_the_union(sites, tmp_path):
    a, b = sites[0][0], sites[0][1]
    union = tmp_path / "union"
    shutil.copytree(a, union)
    for image in sorted((b / "train" / "good").iterdir()):
        shutil.copy(image, union / "train" / "good" / f"b_{image.name}")
    sets = [*FAST, "model.n_features=16"]
    runs = [train("padim", d, overrides=sets, output=tmp_path / d.name) for d in (a, b, union)]
    cli = CliRunner().invoke(main, ["merge", str(runs[0]), str(runs[1]), "-o", str(tmp_path / "m")])
    assert cli.exit_code == 0, cli.output
    merged, fitted = load_run(tmp_path / "m"), load_run(runs[2])
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    got, want = merged.model.predict(images), fitted.model.predict(images)
    assert torch.allclose(got.scores, want.scores, rtol=1e-5, atol=0)
    assert torch.allclose(merged.model.mean, fitted.model.mean, rtol=1e-6, atol=1e-6)


class _Mean(Model):
    name = "mean-noupdate"
    summary = "a model without update or merge hooks"

    def fit(self, train_loader):
        self.mean = torch.cat([b["image"] for b in train_loader]).mean(0)

    def predict(self, images):
        diff = (images - self.mean).abs().mean(1)
        return Prediction(scores=diff.flatten(1).amax(1), maps=diff)

    def state_dict(self):
        return {"mean": self.mean}

    def load_state_dict(self, state):
        self.mean = state["mean"]


class _Plugin:
    @hookimpl
    def hamacho_register_models(self):
        return [_Mean]


def test_a_model_without_the_hooks_gets_one_line(register_plugin, sites, tmp_path):
    register_plugin(_Plugin(), name="grow-test")
    sets = ["data.image_size=32", "data.crop_size=null"]
    run = train("mean-noupdate", sites[0][0], overrides=sets, output=tmp_path / "run")
    runner = CliRunner()
    result = runner.invoke(main, ["update", "--run", str(run), "--data", str(sites[0][1])])
    assert result.exit_code != 0
    assert result.output.strip() == "error: model 'mean-noupdate' does not support update"
    result = runner.invoke(main, ["merge", str(run), str(run), "-o", str(tmp_path / "m")])
    assert result.output.strip() == "error: model 'mean-noupdate' does not support merge"
    _, meta = load_artifact(run / "model.safetensors")
    assert meta["history"][0]["images"] == 5  # every model records its history (1 held out)


def test_flag_keeps_alike_scores_and_never_rejects_a_majority():
    assert flag([1.0, 1.05, 0.97, 1.02])["rejected"] == [False] * 4
    assert flag([1.0, 1.05, 0.97, 3.0])["rejected"] == [False, False, False, True]
    assert flag([1.0, 5.0, 5.1])["rejected"] == [False] * 3  # which side is "normal"? neither


def test_python_api_updates_and_merges(patchcore_runs, sites, tmp_path):
    runs, _ = patchcore_runs
    grown = hamacho.update(runs[1], sites[0][2], output=tmp_path / "grown")
    assert grown.threshold == load_run(tmp_path / "grown").threshold is not None
    merged = hamacho.merge([runs[2], tmp_path / "grown"], tmp_path / "merged")
    image = sorted((sites[0][0] / "test").rglob("*.png"))[0]
    assert merged.predict(image).score > 0


def test_per_site_test_writes_one_block_per_dataset_worst_first(patchcore_runs, sites, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(patchcore_runs[0][0], run)
    args = ["test", "--run", str(run), "--data", str(sites[0][0]), str(sites[1]), "--no-maps"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "metrics.json").read_text())
    aurocs = [b["image_auroc"] for b in metrics["sites"]]
    assert aurocs == sorted(aurocs) and metrics["worst_site"] == metrics["sites"][0]["site"]
    assert {b["site"] for b in metrics["sites"]} == {"caps0", "cloth"}
    for block in metrics["sites"]:
        assert (run / "sites" / block["site"] / "metrics.json").exists()
        assert f"sites/{block['site']}/report.html" in (run / "report.html").read_text()
    assert not (run / "scores.csv").exists()  # the single-dataset files are not left stale
