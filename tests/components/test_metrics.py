from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from hamacho.components.metrics import (
    PixelMetrics,
    aupro,
    f1_max,
    image_auroc,
    pixel_auroc,
    pro_curve,
    threshold_from_normal,
)
from hamacho.errors import ConfigError, DataError

LABELS = [0, 0, 1, 1]
SCORES = [0.1, 0.4, 0.35, 0.8]  # 3 of the 4 (defect, good) pairs are ranked right


def _masks_with_blobs(n: int = 4, size: int = 32) -> np.ndarray:
    masks = np.zeros((n, size, size), dtype=bool)
    masks[0, 4:10, 4:12] = True
    masks[0, 20:22, 25:30] = True
    masks[2, 10:20, 10:14] = True
    return masks


def test_image_auroc_perfect_reversed_and_hand_case():
    assert image_auroc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert image_auroc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0
    assert image_auroc(LABELS, SCORES) == pytest.approx(0.75)
    assert image_auroc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)  # a tie counts half


def test_image_auroc_one_class_is_nan():
    assert math.isnan(image_auroc([0, 0, 0], [0.1, 0.2, 0.3]))
    assert math.isnan(image_auroc([1, 1], [0.1, 0.2]))


def test_image_auroc_accepts_tensors():
    labels = torch.tensor(LABELS)
    scores = torch.tensor(SCORES, dtype=torch.bfloat16)
    assert image_auroc(labels, scores) == pytest.approx(0.75)


def test_image_auroc_length_mismatch_raises():
    with pytest.raises(DataError, match="3 labels but 2 scores"):
        image_auroc([0, 1, 1], [0.1, 0.2])


def test_pixel_auroc_perfect_reversed_and_hand_case():
    masks = _masks_with_blobs()
    assert pixel_auroc(masks, masks.astype(np.float32)) == 1.0
    assert pixel_auroc(masks, -masks.astype(np.float32)) == 0.0
    gt = np.array([[[1, 0], [1, 0]]])
    amap = np.array([[[0.9, 0.8], [0.2, 0.1]]])  # 3 of 4 (defect, normal) pairs ranked right
    assert pixel_auroc(gt, amap) == pytest.approx(0.75)


def test_pixel_auroc_channel_axis_tensors_and_one_class():
    masks = torch.from_numpy(_masks_with_blobs()).float()[:, None]  # (N, 1, H, W)
    assert pixel_auroc(masks, masks[:, 0] * 2) == 1.0
    assert math.isnan(pixel_auroc(np.zeros((2, 4, 4)), np.random.rand(2, 4, 4)))


def test_pixel_auroc_shape_mismatch_raises():
    with pytest.raises(DataError, match="resize the maps"):
        pixel_auroc(np.zeros((2, 8, 8)), np.zeros((2, 4, 4)))


def test_aupro_perfect_and_reversed_maps():
    masks = _masks_with_blobs()
    assert aupro(masks, masks.astype(np.float32)) == pytest.approx(1.0)
    assert aupro(masks, 1.0 - masks) == pytest.approx(0.0)


def test_aupro_random_map_is_low():
    masks = _masks_with_blobs(8, 64)
    masks[5, 30:50, 5:25] = True
    amap = np.random.default_rng(0).random(masks.shape)
    # PRO ~ FPR for noise, so the normalised area is ~ 0.3 / 2.
    assert aupro(masks, amap) == pytest.approx(0.15, abs=0.03)


def test_pro_curve_hand_computed_two_regions():
    gt = np.array([[[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]]])
    amap = np.array([[[0.9, 0.5, 0.1, 0.1], [0.8, 0.1, 0.6, 0.1], [0.1, 0.1, 0.1, 0.7]]])
    fpr, pro = pro_curve(gt, amap)
    # Region A (2 px) at 0.9/0.5, region B (1 px) at 0.7, normal pixels at 0.8, 0.6, rest 0.1.
    assert np.allclose(fpr, [0, 0, 1 / 9, 1 / 9, 2 / 9, 2 / 9, 1])
    assert np.allclose(pro, [0, 0.25, 0.25, 0.75, 0.75, 1, 1])
    area = 0.25 / 9 + 0.75 / 9 + (0.3 - 2 / 9)
    assert aupro(gt, amap) == pytest.approx(area / 0.3)
    assert aupro(gt, amap, fpr_limit=1.0) == pytest.approx(8 / 9)


def test_aupro_interpolates_at_the_fpr_limit():
    # Tied scores give one sloped segment (0, 0) -> (0.5, 1); PRO at FPR 0.3 is 0.6.
    gt, amap = np.array([[1, 0, 0]]), np.array([[0.5, 0.5, 0.0]])
    assert aupro(gt, amap) == pytest.approx(0.5 * 0.3 * 0.6 / 0.3)


def test_pro_curve_regions_are_8_connected():
    gt = np.zeros((1, 4, 4), dtype=bool)
    gt[0, 0, 0] = gt[0, 1, 1] = gt[0, 1, 2] = True  # one region when diagonals connect
    amap = np.full((1, 4, 4), 0.5)
    amap[0, 0, 0], amap[0, 1, 1], amap[0, 1, 2] = 0.9, 0.1, 0.1
    fpr, pro = pro_curve(gt, amap)
    assert pro[1] == pytest.approx(1 / 3)  # 4-connectivity would give (1 + 0) / 2


def test_pro_curve_matches_threshold_loop():
    rng = np.random.default_rng(1)
    masks = _masks_with_blobs(3, 16)
    amap = np.round(rng.random(masks.shape) + masks * 0.5, 1)  # many ties
    regions = np.stack([ndimage.label(m, structure=np.ones((3, 3)))[0] for m in masks])
    offsets = np.cumsum([0] + [r.max() for r in regions[:-1]])
    regions = np.where(regions > 0, regions + offsets[:, None, None], 0)
    expected_fpr, expected_pro = [0.0], [0.0]
    for thr in np.unique(amap)[::-1]:
        pred = amap >= thr
        expected_fpr.append(pred[~masks].mean())
        expected_pro.append(
            np.mean([pred[regions == k].mean() for k in range(1, regions.max() + 1)])
        )
    fpr, pro = pro_curve(masks, amap)
    assert np.allclose(fpr, expected_fpr)
    assert np.allclose(pro, expected_pro)


def test_aupro_undefined_and_invalid_inputs():
    assert math.isnan(aupro(np.zeros((2, 4, 4)), np.random.rand(2, 4, 4)))
    with pytest.raises(ConfigError, match="fpr_limit"):
        aupro(np.ones((1, 2, 2)), np.ones((1, 2, 2)), fpr_limit=0.0)
    with pytest.raises(DataError, match="NaN"):
        aupro(np.eye(3)[None], np.full((1, 3, 3), np.nan))


def test_aupro_large_input_is_fast():
    masks = np.zeros((16, 256, 256), dtype=bool)
    masks[::2, 100:140, 60:90] = True
    amap = torch.rand(
        16, 256, 256, generator=torch.Generator().manual_seed(0)
    ) + 0.5 * torch.from_numpy(masks)
    assert 0.5 < aupro(masks, amap) < 1.0  # ~1M pixels; a per-threshold loop would take minutes


def _trapezoid_up_to(fpr: np.ndarray, pro: np.ndarray, limit: float) -> float:
    """The area under the PRO curve up to ``limit`` the plain way: interpolate, np.trapezoid."""
    cut = int(np.searchsorted(fpr, limit, side="right"))
    if cut < len(fpr):
        y = np.interp(limit, fpr[cut - 1 : cut + 1], pro[cut - 1 : cut + 1])
        fpr, pro = np.append(fpr[:cut], limit), np.append(pro[:cut], y)
    return float(np.trapezoid(pro, fpr)) / limit


@pytest.mark.parametrize("seed", range(6))
def test_pixel_metrics_in_batches_equal_sklearn_and_the_pro_curve_area(seed):
    rng = np.random.default_rng(seed)
    masks = rng.random((7, 13, 11)) < rng.uniform(0.05, 0.6)
    masks[0] = False  # a good image
    decimals = int(rng.integers(0, 3))  # 0-2 decimals: many ties, within and across classes
    maps = np.round(rng.random(masks.shape) + masks * rng.random(), decimals).astype(np.float32)
    store = PixelMetrics(len(masks) + 2)  # room to spare: only what was added counts
    for start, stop in ((0, 1), (1, 4), (4, 7)):
        store.add(masks[start:stop], maps[start:stop])
    fpr, pro = pro_curve(masks, maps)
    pixel, area = store.compute()
    assert pixel == pytest.approx(roc_auc_score(masks.reshape(-1), maps.reshape(-1)), abs=1e-12)
    assert area == pytest.approx(_trapezoid_up_to(fpr, pro, 0.3), abs=1e-12)
    for limit in (0.001, 0.05, 0.5, 1.0):
        expected = _trapezoid_up_to(fpr, pro, limit)
        assert aupro(masks, maps, fpr_limit=limit) == pytest.approx(expected, abs=1e-12)


def test_pixel_metrics_keep_masks_as_bits_and_maps_once():
    store = PixelMetrics(100)
    store.add(np.zeros((2, 64, 64), bool), np.zeros((2, 64, 64), np.float32))
    assert store._maps is not None and store._masks is not None
    assert store._maps.dtype == np.float32 and store._maps.shape == (100, 64, 64)
    assert store._masks.nbytes == store._maps.nbytes // 32  # 1 bit against 4 bytes a pixel
    with pytest.raises(DataError, match="same size"):
        store.add(np.zeros((1, 32, 32), bool), np.zeros((1, 32, 32)))
    with pytest.raises(DataError, match="100"):
        store.add(np.zeros((99, 64, 64), bool), np.zeros((99, 64, 64)))
    assert all(math.isnan(v) for v in store.compute())  # no defect pixel
    assert all(math.isnan(v) for v in PixelMetrics(0).compute())  # nothing added
    empty = PixelMetrics(0)
    empty.add(np.zeros((0, 4, 4), bool), np.zeros((0, 4, 4)))
    assert all(math.isnan(v) for v in empty.compute())  # a batch without a known image


def test_f1_max_hand_case():
    # thr 0.8: P=1 R=.5 -> .667; 0.4: P=.5 R=.5; 0.35: P=2/3 R=1 -> .8; 0.1: P=.5 R=1 -> .667
    f1, threshold = f1_max(LABELS, SCORES)
    assert f1 == pytest.approx(0.8)
    assert threshold == pytest.approx(0.35)


def test_f1_max_perfect_and_no_positive():
    assert f1_max(torch.tensor([0, 1, 1]), torch.tensor([0.0, 2.0, 3.0])) == (1.0, 2.0)
    f1, threshold = f1_max([0, 0], [0.1, 0.2])
    assert math.isnan(f1) and math.isnan(threshold)


def test_threshold_from_normal_percentile_and_sigma():
    assert threshold_from_normal(np.arange(101.0)) == pytest.approx(99.0)
    assert threshold_from_normal(torch.arange(101.0), value=50) == pytest.approx(50.0)
    scores = [1.0, 2.0, 3.0, 4.0, 5.0]
    expected = 3.0 + 3.0 * math.sqrt(2.5)  # ddof=1 std of 1..5 is sqrt(2.5)
    assert threshold_from_normal(scores, method="sigma") == pytest.approx(expected)
    assert threshold_from_normal(scores, "sigma", 1.0) == pytest.approx(3.0 + math.sqrt(2.5))


@pytest.mark.parametrize(
    ("scores", "method", "value", "match"),
    [
        ([], "percentile", None, "zero normal scores"),
        ([1.0], "sigma", None, "at least 2"),
        ([1.0, 2.0], "median", None, "percentile, sigma"),
        ([1.0, 2.0], "percentile", 101, r"\[0, 100\]"),
    ],
)
def test_threshold_from_normal_invalid_raises(scores, method, value, match):
    with pytest.raises(ConfigError, match=match):
        threshold_from_normal(scores, method, value)
