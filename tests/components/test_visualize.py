from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hamacho.components.visualize import colorize, overlay_panel, save_png
from hamacho.errors import DataError

H, W = 24, 32


def _image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)


def _square_map() -> np.ndarray:
    amap = np.zeros((H, W), dtype=np.float32)
    amap[6:16, 8:20] = 1.0
    return amap


def test_colorize_hits_the_jet_anchors():
    colours = colorize(np.array([-1.0, 0.0, 0.34, 0.65, 1.0, 2.0]))
    assert colours.dtype == np.uint8
    expected = [[0, 0, 128], [0, 0, 128], [0, 255, 255], [255, 255, 0], [128, 0, 0], [128, 0, 0]]
    assert colours.tolist() == expected


def test_overlay_panel_input_and_heatmap_only():
    image = _image()
    panel = overlay_panel(image, _square_map())
    assert panel.shape == (H, 2 * W, 3) and panel.dtype == np.uint8
    assert np.array_equal(panel[:, :W], image)
    heat = colorize(_square_map())
    expected = np.round(0.5 * image + 0.5 * heat.astype(np.float64)).astype(np.uint8)
    assert np.array_equal(panel[:, W:], expected)


def test_overlay_panel_fixed_range_makes_maps_comparable():
    image = np.zeros((H, W, 3), dtype=np.uint8)
    low, high = np.full((H, W), 0.5), np.full((H, W), 0.5)
    low[0, 0], high[0, 0] = 0.0, 4.0  # different own ranges
    a = overlay_panel(image, low, vmin=0.0, vmax=1.0)
    b = overlay_panel(image, high, vmin=0.0, vmax=1.0)
    assert np.array_equal(a[5, W + 5], b[5, W + 5])
    own_a, own_b = overlay_panel(image, low), overlay_panel(image, high)
    assert not np.array_equal(own_a[5, W + 5], own_b[5, W + 5])


def test_overlay_panel_constant_map_uses_lowest_colour():
    panel = overlay_panel(np.zeros((H, W, 3), dtype=np.uint8), np.full((H, W), 3.0))
    assert panel[0, W].tolist() == [0, 0, 64]


def test_overlay_panel_mask_and_predicted_contour():
    image = np.full((H, W, 3), 100, dtype=np.uint8)
    mask = torch.from_numpy(_square_map())[None]  # (1, H, W) tensor
    panel = overlay_panel(image, _square_map(), mask=mask, threshold=0.5)
    assert panel.shape == (H, 4 * W, 3)
    gt, pred = panel[:, 2 * W : 3 * W], panel[:, 3 * W :]
    assert gt[10, 10].tolist() == [255, 255, 255] and gt[0, 0].tolist() == [0, 0, 0]
    red = np.all(pred == [255, 0, 0], axis=-1)
    assert red[6, 8:20].all() and red[15, 8:20].all() and red[7, 9]  # 2-pixel inner boundary
    assert not red[10, 14]  # region interior keeps the input
    assert not red[5].any() and not red[:, 7].any()  # nothing outside the region
    assert np.array_equal(pred[~red], image[~red])


def test_overlay_panel_region_on_border_and_no_region():
    amap = np.zeros((H, W))
    amap[:, :5] = 1.0
    pred = overlay_panel(np.zeros((H, W, 3), dtype=np.uint8), amap, threshold=0.5)[:, 2 * W :]
    assert np.all(pred[:, 0] == [255, 0, 0])  # the image edge closes the contour
    empty = overlay_panel(_image(), amap, threshold=2.0)
    assert np.array_equal(empty[:, 2 * W :], _image())


def test_overlay_panel_grayscale_image():
    panel = overlay_panel(np.zeros((H, W), dtype=np.uint8), _square_map())
    assert panel.shape == (H, 2 * W, 3)


@pytest.mark.parametrize(
    ("image", "amap", "match"),
    [
        (np.zeros((H, W, 3), dtype=np.uint8), np.zeros((H // 2, W)), "resize it"),
        (np.zeros((H, W, 3), dtype=np.float32), np.zeros((H, W)), "uint8"),
        (np.zeros((H, W, 2), dtype=np.uint8), np.zeros((H, W)), r"\(H, W, 3\)"),
    ],
)
def test_overlay_panel_bad_inputs_raise(image, amap, match):
    with pytest.raises(DataError, match=match):
        overlay_panel(image, amap)


def test_save_png_round_trip_creates_dirs(tmp_path):
    panel = overlay_panel(_image(), _square_map(), threshold=0.5)
    path = tmp_path / "a" / "b" / "panel.png"
    save_png(path, panel)
    assert np.array_equal(np.asarray(Image.open(path)), panel)
    save_png(str(tmp_path / "gray.png"), np.zeros((4, 4), dtype=np.uint8))
    assert Image.open(tmp_path / "gray.png").size == (4, 4)


def test_save_png_rejects_float(tmp_path):
    with pytest.raises(DataError, match="uint8"):
        save_png(tmp_path / "x.png", np.zeros((4, 4, 3)))
