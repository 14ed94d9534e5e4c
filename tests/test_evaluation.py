"""End-to-end numbers on crafted data whose metrics, decisions and tiled scores are known."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hamacho import Model, Prediction, engine, evaluation, hookimpl, predicting
from hamacho.components import visualize
from hamacho.model import IMAGENET_MEAN, IMAGENET_STD

SIZE = 16
GOOD_G = (10, 30, 50, 70)  # test/good green levels: the image score ranks on these
DEFECT_G = (40, 60, 80, 90, 100, 110)  # 21 of the 24 (defect, good) pairs rank right: 0.875
TRAIN_G = 45  # every training image: the threshold is this score, between the test scores


class _Channels(Model):
    """Map = red channel per pixel; image score = mean green: the two metrics independent."""

    name = "channels"
    summary = "test model scoring two colour channels"
    fitted_paths: list[str] = []  # what the last fit saw, in order

    def fit(self, train_loader):
        _Channels.fitted_paths = [p for batch in train_loader for p in batch["path"]]

    def predict(self, images):
        return Prediction(scores=images[:, 1].flatten(1).mean(1), maps=images[:, 0].clone())

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class _Plugin:
    @hookimpl
    def hamacho_register_models(self):
        return [_Channels]


@pytest.fixture
def channels(register_plugin):
    register_plugin(_Plugin(), name="channels-test")


def _png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)


def _image(green: int, red_rows: slice = slice(0, 0), size: int = SIZE) -> np.ndarray:
    pixels = np.zeros((size, size, 3), np.uint8)
    pixels[..., 1] = green
    pixels[red_rows, 0:2, 0] = 200
    return pixels


@pytest.fixture
def crafted(tmp_path):
    """Defects: a 2x2 mask in the corner whose top row only is red (12 of 24 mask pixels).

    Pixel AUROC: half the defect pixels outrank every good pixel, half tie with them:
    0.5 + 0.5 * 0.5 = 0.75. Image AUROC from the green levels: 21 / 24 = 0.875.
    """
    root = tmp_path / "crafted"
    for i in range(4):
        _png(root / "train" / "good" / f"{i:03d}.png", _image(TRAIN_G))
    for i, g in enumerate(GOOD_G):
        _png(root / "test" / "good" / f"{i:03d}.png", _image(g))
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[0:2, 0:2] = 255
    for i, g in enumerate(DEFECT_G):
        _png(root / "test" / "spot" / f"{i:03d}.png", _image(g, slice(0, 1)))
        _png(root / "ground_truth" / "spot" / f"{i:03d}_mask.png", mask)
    return root


def _sets(size: int = SIZE, *extra: str) -> list[str]:
    return [f"data.image_size={size}", "data.crop_size=null", "data.batch_size=4", *extra]


def _normalised_green(level: float) -> float:
    return (level / 255 - IMAGENET_MEAN[1]) / IMAGENET_STD[1]


def test_metrics_json_has_the_known_image_and_pixel_auroc(channels, crafted, tmp_path):
    run = engine.train("channels", crafted, overrides=_sets(), output=tmp_path / "run")
    train_images = sorted(str(p) for p in (crafted / "train" / "good").iterdir())
    assert _Channels.fitted_paths == train_images  # every image once, in order: not shuffled
    result = engine.test(run, write_maps=False)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["image_auroc"] == pytest.approx(0.875)
    assert metrics["pixel_auroc"] == pytest.approx(0.75)
    assert result["image_auroc"] == metrics["image_auroc"]


def test_predict_flags_exactly_the_images_at_or_above_the_threshold(channels, crafted, tmp_path):
    sets = _sets(SIZE, "threshold.source=holdout", "threshold.holdout=0.5")
    run = engine.train("channels", crafted, overrides=sets, output=tmp_path / "run")
    threshold = json.loads((run / "train.json").read_text())["threshold"]["value"]
    assert threshold == pytest.approx(_normalised_green(TRAIN_G), abs=1e-5)
    engine.test(run, write_maps=False)
    scores = {r["path"]: r for r in csv.DictReader((run / "scores.csv").open())}
    rows = list(predicting.predict(run, [str(crafted / "test")]))
    assert len(rows) == len(GOOD_G) + len(DEFECT_G) == len(scores)
    flagged = sorted(round(r["score"], 3) for r in rows if r["is_anomalous"])
    expected = [_normalised_green(g) for g in (*GOOD_G, *DEFECT_G) if g > TRAIN_G]
    assert flagged == sorted(round(v, 3) for v in expected)
    for row in rows:
        assert row["threshold"] == threshold
        assert row["score"] == pytest.approx(float(scores[row["path"]]["score"]), abs=1e-5)
        assert int(row["is_anomalous"]) == int(scores[row["path"]]["prediction"])


def test_tiled_image_score_is_its_worst_tile(channels, tmp_path):
    """40 px images in 16 px tiles (starts 0, 16, 24): the score is the greenest tile's mean."""
    root = tmp_path / "tiles"
    for i in range(2):
        _png(root / "train" / "good" / f"{i:03d}.png", _image(0, size=40))
    _png(root / "test" / "good" / "000.png", _image(0, size=40))
    spot = _image(0, size=40)
    spot[26:34, 0:8, 1] = 255  # 8 x 8 green square, fully inside the tiles starting at row 24
    _png(root / "test" / "spot" / "000.png", spot)
    sets = _sets(40, "tiler.tile_size=16", "threshold.source=holdout", "threshold.holdout=0.5")
    run = engine.train("channels", root, overrides=sets, output=tmp_path / "run")
    engine.test(run, write_maps=False)
    rows = {Path(r["path"]).parent.name: r for r in csv.DictReader((run / "scores.csv").open())}
    worst = max(
        spot[r : r + 16, c : c + 16, 1].mean() for r in (0, 16, 24) for c in (0, 16, 24)
    )  # 64 * 255 / 256
    assert float(rows["spot"]["score"]) == pytest.approx(_normalised_green(worst), abs=1e-5)
    assert float(rows["good"]["score"]) == pytest.approx(_normalised_green(0), abs=1e-5)


def _metric_values(run: Path) -> dict:
    saved = json.loads((run / "metrics.json").read_text())
    return {k: v for k, v in saved.items() if k not in ("peak_rss_mb", "inference_ms_per_image")}


def test_panels_written_per_batch_share_the_runs_colour_scale(channels, crafted, tmp_path):
    for i, green in enumerate((20, 30, 40, 50, 60, 70)):  # good scores to set the scale from
        _png(crafted / "train" / "good" / f"{i:03d}.png", _image(green))
    sets = _sets(SIZE, "threshold.source=holdout", "threshold.holdout=0.5")
    run = engine.train("channels", crafted, overrides=sets, output=tmp_path / "run")
    engine.test(run, write_maps=False)
    without = _metric_values(run)
    engine.test(run)  # 10 images in batches of 4
    assert _metric_values(run) == without  # the maps change no number
    loaded = engine.load_run(run)
    vmin, vmax = evaluation.colour_scale(loaded)
    median = float(np.median(loaded.metadata["good_scores"]))
    assert vmin is not None and vmax is not None
    assert (median - vmin) / (vmax - vmin) == pytest.approx(0.25)  # a quarter of the way up
    assert (loaded.threshold - vmin) / (vmax - vmin) == pytest.approx(0.5)  # the threshold halfway
    panels = sorted((run / "maps").rglob("*.png"))
    assert [p.relative_to(run / "maps").parent.name for p in panels] == ["good"] * 4 + ["spot"] * 6
    for panel in panels:
        pixels = np.asarray(Image.open(panel).convert("RGB"))
        tiles = 4 if panel.parent.name == "spot" else 3  # input | heat | [mask] | prediction
        assert pixels.shape == (SIZE, tiles * SIZE, 3)
        image = pixels[:, :SIZE]
        amap = (image[..., 0] / 255 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]  # the model's map
        heat = visualize.overlay_panel(image, amap, vmin=vmin, vmax=vmax)[:, SIZE:]
        assert np.abs(pixels[:, SIZE : 2 * SIZE].astype(int) - heat).max() <= 1


def test_pixel_metrics_leave_out_defects_without_a_mask(channels, crafted, tmp_path):
    """A CSV defect row without a mask has no pixel truth: its all-red map must not count."""
    run = engine.train("channels", crafted, overrides=_sets(), output=tmp_path / "run")
    red = _image(40, slice(0, SIZE))
    red[..., 0] = 255
    _png(tmp_path / "red.png", red)
    rows = [f"{p},good" for p in sorted((crafted / "test" / "good").iterdir())]
    for p in sorted((crafted / "test" / "spot").iterdir()):
        rows.append(f"{p},spot,{crafted / 'ground_truth' / 'spot' / (p.stem + '_mask.png')}")
    rows.append(f"{tmp_path / 'red.png'},spot,")
    (tmp_path / "list.csv").write_text("path,label,mask\n" + "\n".join(rows) + "\n")
    result = engine.test(run, tmp_path / "list.csv")
    assert result["pixel_auroc"] == pytest.approx(0.75)
    assert result["images"] == {"good": 4, "defect": 7}
    assert (run / "maps" / "spot" / "red.png").exists()  # its panel is still drawn


def test_skip_bad_drops_an_unreadable_test_image(channels, crafted, tmp_path):
    (crafted / "test" / "good" / "zzz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    sets = _sets(SIZE, "data.skip_bad=true")
    run = engine.train("channels", crafted, overrides=sets, output=tmp_path / "run")
    result = engine.test(run, write_maps=False)
    assert result["images"] == {"good": 4, "defect": 6}
    assert result["image_auroc"] == pytest.approx(0.875)
    rows = list(csv.DictReader((run / "scores.csv").open()))
    assert len(rows) == 10 and not any("zzz_broken" in r["path"] for r in rows)


def test_a_run_without_good_scores_draws_each_panel_on_its_own_scale(channels, crafted, tmp_path):
    run = engine.train("channels", crafted, overrides=_sets(), output=tmp_path / "run")
    assert evaluation.colour_scale(engine.load_run(run)) == (None, None)  # no threshold
    engine.test(run)
    panel = np.asarray(Image.open(run / "maps" / "spot" / "000.png").convert("RGB"))
    image, heat = panel[:, :SIZE], panel[:, SIZE : 2 * SIZE].astype(int)
    amap = (image[..., 0] / 255 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    own = visualize.overlay_panel(image, amap)[:, SIZE:]  # the map's own min and max
    assert np.abs(heat - own).max() <= 1 and heat[0, 0, 0] > heat[5, 5, 0]  # red spot: red
