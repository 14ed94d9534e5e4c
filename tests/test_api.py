from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import hamacho
from hamacho.api import as_uint8, to_original
from hamacho.cli import main
from hamacho.errors import ArtifactError, ConfigError, DataError
from hamacho.preprocess import Preprocess

from .conftest import API_FAST as FAST


@pytest.fixture(scope="module")
def detector(tiny_mvtec, tmp_path_factory):
    out = tmp_path_factory.mktemp("api") / "run"
    with pytest.MonkeyPatch.context() as mp:  # module scope: the autouse fixture is per test
        mp.setenv("HAMACHO_OFFLINE", "1")
        return hamacho.train("patchcore", data=tiny_mvtec, output=out, overrides=FAST)


def _file(tiny_mvtec):
    return sorted((tiny_mvtec / "test").rglob("*.png"))[-1]


def test_train_returns_a_detector_with_threshold(detector):
    assert isinstance(detector, hamacho.Detector)
    assert detector.model == "patchcore" and detector.runtime == "torch"
    assert isinstance(detector.threshold, float)


def test_predict_same_score_for_every_input_kind_and_the_cli(detector, tiny_mvtec):
    path = _file(tiny_mvtec)
    rgb = np.asarray(Image.open(path).convert("RGB"))
    results = [
        detector.predict(str(path)),
        detector.predict(path),
        detector.predict(Image.open(path)),
        detector.predict(rgb),
        detector.predict(torch.from_numpy(rgb.copy()).permute(2, 0, 1)),
    ]
    score = results[0].score
    assert all(abs(r.score - score) <= 1e-6 for r in results)
    out = CliRunner().invoke(main, ["predict", "--run", str(detector.source), str(path)])
    assert out.exit_code == 0, out.output
    row = json.loads(out.output.strip().splitlines()[-1])
    assert abs(row["score"] - score) <= 1e-6  # the CLI rounds to 6 decimals
    assert row["is_anomalous"] == results[0].is_anomalous
    r = results[0]
    assert r.threshold == detector.threshold
    assert r.is_anomalous == (r.score >= r.threshold)
    assert r.map.dtype == np.float32 and r.map.shape == rgb.shape[:2]


def test_predict_list_in_list_out_matches_single_images(detector, tiny_mvtec):
    paths = sorted((tiny_mvtec / "test").rglob("*.png"))[:5]
    odd = Image.open(paths[0]).convert("RGB").resize((90, 70))  # another size in one list
    batch = detector.predict([*paths, odd], batch_size=4)
    assert isinstance(batch, list) and len(batch) == 6
    singles = [detector.predict(p).score for p in paths] + [detector.predict(odd).score]
    # batched convolutions round differently from single-image ones: ~1e-5 relative
    np.testing.assert_allclose([r.score for r in batch], singles, rtol=1e-4)
    assert batch[-1].map.shape == (70, 90)


def test_grey_inputs_equal_their_rgb(detector, tiny_mvtec):
    grey = np.asarray(Image.open(_file(tiny_mvtec)).convert("L"))
    rgb = np.repeat(grey[..., None], 3, axis=2)
    assert detector.predict(grey).score == detector.predict(rgb).score
    assert torch.equal(as_uint8(torch.from_numpy(grey.copy())), torch.from_numpy(rgb))


@pytest.mark.parametrize(
    "bad", [np.zeros((8, 8, 3), np.float32), np.zeros((8, 8, 4), np.uint8), 3.0, [b"x"]]
)
def test_predict_rejects_unsupported_inputs_in_one_line(detector, bad):
    with pytest.raises(DataError) as info:
        detector.predict(bad)
    assert "\n" not in str(info.value) and "uint8" in str(info.value)


def test_map_is_nan_outside_the_crop_and_exact_inside():
    pre = Preprocess(64, 48, (0.5,) * 3, (0.5,) * 3)
    amap = np.random.default_rng(0).random((48, 48)).astype(np.float32)
    same = to_original(amap, (64, 64), pre)  # original already at image_size: a pure crop
    assert same.shape == (64, 64)
    np.testing.assert_array_equal(same[8:56, 8:56], amap)
    assert np.isnan(same[:8]).all() and np.isnan(same[:, 56:]).all()
    big = to_original(amap, (90, 120), pre)  # non-square, larger: crop = 12.5 % margins
    assert big.shape == (90, 120)
    inspected = ~np.isnan(big)
    rows, cols = np.where(inspected.any(1))[0], np.where(inspected.any(0))[0]
    assert (rows[0], rows[-1], cols[0], cols[-1]) == (11, 78, 15, 104)
    assert inspected[11:79, 15:105].all()
    assert amap.min() <= np.nanmin(big) and np.nanmax(big) <= amap.max()


def test_load_errors_name_the_fix(detector, tmp_path):
    with pytest.raises(ConfigError, match="runtime"):
        hamacho.load(detector.source, runtime="tensorrt")
    with pytest.raises(ArtifactError, match="hamacho export --run"):
        hamacho.load(detector.source, runtime="onnx")
    with pytest.raises(ArtifactError, match="hamacho train"):
        hamacho.load(tmp_path)


@pytest.mark.parametrize(
    ("score", "threshold", "verdict"),
    [(2.0, 1.0, True), (1.0, 1.0, True), (0.5, 1.0, False), (2.0, None, None)]
    + [(float(v), 1.0, None) for v in ("nan", "inf", "-inf")],
)
def test_one_verdict_rule_for_the_cli_and_the_api(score, threshold, verdict):
    from hamacho.runtime import decide

    assert decide(score, threshold) is verdict  # engine.predict and Detector both use it


def test_predict_honours_the_runs_max_pixels(tiny_mvtec, tmp_path):
    out = tmp_path / "small-limit"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HAMACHO_OFFLINE", "1")
        det = hamacho.train(
            "patchcore", data=tiny_mvtec, output=out, overrides={**FAST, "data.max_pixels": 4096}
        )
    big = tmp_path / "big.png"
    Image.new("RGB", (80, 80)).save(big)  # 6,400 pixels > the run's 4,096
    with pytest.raises(DataError, match="data.max_pixels=4,096"):
        det.predict(big)
    assert det.predict(str(_file(tiny_mvtec))).score > 0  # 64 x 64 = 4,096: allowed
