from __future__ import annotations

import json
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from hamacho import engine, predicting, report

from .conftest import FAST, need_chromium

SECTIONS = {"metrics", "roc", "histogram", "worst-good", "worst-defect"}
VOID = {"meta", "img", "br", "hr", "input", "link", "source", "circle", "line", "rect"}
VOID |= {"polyline", "path"}  # written self-closing inside the SVG charts


class _Checker(HTMLParser):
    """Collects section ids, image sources and links, and checks that every tag is closed."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.sections: set[str] = set()
        self.srcs: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "section":
            self.sections.add(attrs.get("id"))
        for key in ("src", "href"):
            if attrs.get(key):
                self.srcs.append(attrs[key])
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append(tag)
        for key in ("src", "href"):
            if dict(attrs).get(key):
                self.srcs.append(dict(attrs)[key])

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
        else:
            self.stack.pop()


def _check_html(path: Path) -> _Checker:
    checker = _Checker()
    checker.feed(path.read_text(encoding="utf-8"))
    checker.close()
    assert checker.errors == [] and checker.stack == [], (checker.errors, checker.stack)
    assert "script" not in checker.tags  # viewable offline, no JS
    assert not any(s.startswith(("http:", "https:", "//")) for s in checker.srcs)
    return checker


@pytest.fixture(scope="module")
def tested(tiny_mvtec, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("report") / "run"
    sets = [*FAST, "model.embedding_dim=64", "threshold.source=holdout", "threshold.holdout=0.25"]
    engine.train("patchcore", tiny_mvtec, overrides=sets, output=run_dir)
    return run_dir, engine.test(run_dir)


def test_metrics_json_per_defect_counts_and_threshold(tested, tiny_mvtec):
    run_dir, result = tested
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved == result
    types = sorted(p.name for p in (tiny_mvtec / "test").iterdir())
    assert list(saved["images_per_type"]) == ["good"] + [t for t in types if t != "good"]
    assert sum(saved["images_per_type"].values()) == 10
    assert set(saved["image_auroc_per_defect"]) == set(types) - {"good"}
    assert all(0 <= v <= 1 for v in saved["image_auroc_per_defect"].values())
    assert saved["threshold"] > 0
    assert saved["threshold_source"].startswith("99th percentile of the scores of 3 held-out")
    assert saved["peak_rss_mb"] > 0 and saved["inference_ms_per_image"] > 0


def test_report_html_is_valid_with_charts_and_panels(tested):
    run_dir, result = tested
    page = run_dir / "report.html"
    checker = _check_html(page)
    assert checker.sections == SECTIONS
    assert checker.tags.count("svg") == 2 and "polyline" in checker.tags  # ROC + histogram
    images = [s for s in checker.srcs if s.endswith(".png")]
    assert images and all(not Path(s).is_absolute() for s in images)
    assert all((run_dir / s).exists() for s in images)  # relative to report.html
    text = page.read_text()
    assert f"{result['image_auroc']:.4f}" in text and "held-out good training images" in text


def test_class_summary_separable_type_scores_one():
    labels = [0, 0, 0, 1, 1, 1, 1]
    defects = ["good", "good", "good", "dent", "dent", "scratch", "scratch"]
    scores = [0.1, 0.2, 0.3, 0.9, 0.8, 0.25, 0.05]
    summary = report.class_summary(labels, defects, scores)
    assert summary["images_per_type"] == {"good": 3, "dent": 2, "scratch": 2}
    assert summary["image_auroc_per_defect"]["dent"] == 1.0
    assert summary["image_auroc_per_defect"]["scratch"] == pytest.approx(
        2 / 6, abs=1e-6
    )  # 0.25 beats 2 of 3 goods


def test_report_without_defects_or_panels_still_valid(tmp_path):
    images = [report.ScoredImage(Path(f"g{i}.png"), 0, "good", float(i)) for i in range(4)]
    result = {"image_auroc": None, "threshold": None, "images": {"good": 4, "defect": 0}}
    path = report.write_report(tmp_path / "report.html", result, images, "model on <data>")
    checker = _check_html(path)
    assert checker.sections == SECTIONS
    text = path.read_text()
    assert "needs both good and defective" in text and "model on &lt;data&gt;" in text


def test_describe_threshold_methods():
    info = {"method": "sigma", "parameter": 3.0, "source": "5 held-out good training images"}
    assert report.describe_threshold(info) == (
        "mean + 3 std of the scores of 5 held-out good training images"
    )
    assert report.describe_threshold(None).startswith("none")


def test_report_renders_in_headless_chromium(tested, tmp_path):
    browser = need_chromium("; html.parser still ran")
    run_dir, _ = tested
    shot = tmp_path / "shot.png"
    args = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1200,1600",
    ]
    url = (run_dir / "report.html").resolve().as_uri()
    dom = subprocess.run([*args, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert all(f'id="{s}"' in dom.stdout for s in SECTIONS) and "<svg" in dom.stdout
    subprocess.run([*args, f"--screenshot={shot}", url], capture_output=True, timeout=120)
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape == (1600, 1200) and pixels.std() > 10  # something was drawn


def test_predict_maps_keep_same_named_images_apart(tested, tiny_mvtec, tmp_path):
    run_dir, _ = tested
    inputs = [str(tiny_mvtec / "test" / kind / "000.png") for kind in ("good", "hole")]
    rows = list(predicting.predict(run_dir, inputs, maps_dir=tmp_path / "maps"))
    assert [Path(r["map"]).name for r in rows] == ["000.png", "hole_000.png"]
    assert all(Path(r["map"]).exists() for r in rows)


def test_predict_map_panel_shows_each_image_resized_and_cropped_once(tested, tiny_mvtec, tmp_path):
    from PIL import Image

    from hamacho.api import as_uint8
    from hamacho.export.runtimes import open_backend

    run_dir, _ = tested
    image = tiny_mvtec / "test" / "hole" / "000.png"
    (row,) = predicting.predict(run_dir, [str(image)], maps_dir=tmp_path / "maps")
    panel = np.asarray(Image.open(row["map"]).convert("RGB"))
    preprocess = open_backend(run_dir).preprocess
    crop = preprocess.pixels(as_uint8(image)[None])[0].permute(1, 2, 0).byte().numpy()
    side = crop.shape[1]
    assert panel.shape[0] == crop.shape[0] and panel.shape[1] % side == 0
    assert np.array_equal(panel[:, :side], crop)  # the input panel: the model's crop, exactly
    _, _, pixels = open_backend(run_dir).score_with_pixels([as_uint8(image)])
    assert np.array_equal(pixels[0], crop)
