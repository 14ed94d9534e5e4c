"""Image- and pixel-level anomaly detection metrics (AUROC, AUPRO, F1-max) and thresholds.

Every function accepts numpy arrays or torch tensors (any device). AUROC-type metrics return
float('nan') when they are undefined, i.e. when the labels hold only one class, so a test set
without defects still reports its other numbers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score

from hamacho.errors import ConfigError, DataError

ArrayLike = Any  # np.ndarray | torch.Tensor | sequence of numbers

# 8-connectivity inside one image, no connection across the batch axis (MVTec AD evaluation).
_REGION_STRUCTURE = np.zeros((3, 3, 3), dtype=int)
_REGION_STRUCTURE[1] = 1


def _numpy(x: ArrayLike, dtype: type | None = None) -> np.ndarray:
    """Numpy view of a tensor/array/sequence, optionally cast to `dtype`."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        x = x.numpy()
    return np.asarray(x, dtype=dtype)


def _finite(scores: np.ndarray, what: str) -> np.ndarray:
    if not np.isfinite(scores).all():
        raise DataError(f"{what} contain NaN or inf; check the model output before scoring")
    return scores


def _labels_scores(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Flat binary labels (bool) and float scores of equal length."""
    y = _numpy(labels).reshape(-1) > 0.5
    s = _finite(_numpy(scores, np.float64).reshape(-1), "scores")
    if y.shape != s.shape:
        raise DataError(f"got {y.size} labels but {s.size} scores; pass one score per label")
    return y, s


def _masks_maps(masks: ArrayLike, maps: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W) bool masks and float32 maps; a (N, 1, H, W) channel axis is dropped."""
    arrays = []
    for x, dtype in ((masks, None), (maps, np.float32)):
        x = _numpy(x, dtype)
        x = x[:, 0] if x.ndim == 4 and x.shape[1] == 1 else x
        arrays.append(x[None] if x.ndim == 2 else x)
    gt, amap = arrays[0] > 0.5, _finite(arrays[1], "anomaly maps")
    if gt.shape != amap.shape or gt.ndim != 3:
        raise DataError(
            f"masks {gt.shape} and anomaly maps {amap.shape} must both be (N, H, W); "
            "resize the maps to the mask size first"
        )
    return gt, amap


def image_auroc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve of image scores against 0/1 labels (nan with one class)."""
    y, s = _labels_scores(labels, scores)
    if y.all() or not y.any():
        return float("nan")
    return float(roc_auc_score(y, s))


def pixel_auroc(masks: ArrayLike, maps: ArrayLike) -> float:
    """Pixel-level AUROC of (N, H, W) anomaly maps against ground-truth masks (nan with one class).

    Pixels are pooled over all images; maps are cast to float32 to keep ~1e7 pixels cheap.
    """
    gt, amap = _masks_maps(masks, maps)
    if gt.all() or not gt.any():
        return float("nan")
    return float(roc_auc_score(gt.reshape(-1), amap.reshape(-1)))


def pro_curve(masks: ArrayLike, maps: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Per-region overlap (PRO) against false positive rate for every threshold, ascending FPR.

    Regions are the 8-connected components of each ground-truth mask. At threshold `thr`
    (pixel predicted anomalous when map >= thr) PRO is the mean over all regions of the fraction
    of the region above `thr`; FPR is the fraction of all normal pixels above `thr`. The curve
    starts at (0, 0) (threshold above every score) and ends at (1, 1).
    """
    gt, amap = _masks_maps(masks, maps)
    return _pro_curve(gt, amap)


def _pro_curve(gt: np.ndarray, amap: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """pro_curve on validated (N, H, W) bool masks and float maps."""
    regions, n_regions = ndimage.label(gt, structure=_REGION_STRUCTURE)
    n_normal = int(gt.size - gt.sum())
    if n_regions == 0 or n_normal == 0:
        raise DataError("PRO needs both defect regions and normal pixels in the masks")
    regions = regions.reshape(-1)
    # Each region adds 1 / (|region| * n_regions) to PRO once all its pixels are above thr.
    sizes = np.bincount(regions, minlength=n_regions + 1).astype(np.float64)
    region_weight = np.zeros(n_regions + 1)
    region_weight[1:] = 1.0 / (sizes[1:] * n_regions)

    # Sweep thresholds from the highest score down: cumulative sums over sorted pixels.
    order = np.argsort(amap.reshape(-1))[::-1]
    sorted_scores = amap.reshape(-1)[order]
    sorted_regions = regions[order]
    del order
    pro = np.cumsum(region_weight[sorted_regions])
    fpr = np.cumsum(sorted_regions == 0) / n_normal
    # Keep only the last pixel of each run of equal scores: one point per distinct threshold.
    last = np.flatnonzero(np.diff(sorted_scores, append=-np.inf))
    pro = np.concatenate([[0.0], pro[last]])
    fpr = np.concatenate([[0.0], fpr[last]])
    return fpr, np.clip(pro, 0.0, 1.0)


def _area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under y(x) for x in [x[0], x_max], interpolating y at the cut."""
    cut = int(np.searchsorted(x, x_max, side="right"))  # first point past the limit
    if cut < len(x):
        x0, x1, y0, y1 = x[cut - 1], x[cut], y[cut - 1], y[cut]
        y_cut = y0 + (x_max - x0) / (x1 - x0) * (y1 - y0)
        x, y = np.append(x[:cut], x_max), np.append(y[:cut], y_cut)
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1])) / 2.0)


def aupro(masks: ArrayLike, maps: ArrayLike, fpr_limit: float = 0.3) -> float:
    """Area under the PRO curve up to `fpr_limit`, divided by `fpr_limit` (MVTec AD, 0..1).

    Returns nan when the masks have no defect region or no normal pixel.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ConfigError(f"aupro fpr_limit must be in (0, 1], got {fpr_limit!r}; 0.3 is usual")
    gt, amap = _masks_maps(masks, maps)
    if gt.all() or not gt.any():
        return float("nan")
    fpr, pro = _pro_curve(gt, amap)
    return _area_up_to(fpr, pro, fpr_limit) / fpr_limit


def f1_max(labels: ArrayLike, scores: ArrayLike) -> tuple[float, float]:
    """Best F1 over all thresholds and that threshold (predict defect when score >= it).

    Returns (nan, nan) when there is no positive label.
    """
    y, s = _labels_scores(labels, scores)
    if not y.any():
        return float("nan"), float("nan")
    precision, recall, thresholds = precision_recall_curve(y, s)
    # The last (precision=1, recall=0) point has no threshold.
    precision, recall = precision[:-1], recall[:-1]
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


_METHOD_DEFAULTS = {"percentile": 99.0, "sigma": 3.0}


def threshold_from_normal(
    scores: ArrayLike, method: str = "percentile", value: float | None = None
) -> float:
    """Decision threshold from scores of normal samples only.

    method="percentile": the `value`-th percentile (default 99) of the scores;
    method="sigma": mean + `value` * sample std (ddof=1, default 3).
    """
    if method not in _METHOD_DEFAULTS:
        raise ConfigError(
            f"unknown threshold method {method!r}; use one of: {', '.join(_METHOD_DEFAULTS)}"
        )
    value = _METHOD_DEFAULTS[method] if value is None else float(value)
    s = _finite(_numpy(scores, np.float64).reshape(-1), "normal scores")
    if s.size == 0:
        raise ConfigError("cannot set a threshold from zero normal scores; score some good images")
    if method == "percentile":
        if not 0.0 <= value <= 100.0:
            raise ConfigError(f"threshold percentile must be in [0, 100], got {value}")
        return float(np.percentile(s, value))
    if s.size < 2:
        raise ConfigError(
            "threshold method 'sigma' needs at least 2 normal scores for a std; "
            "score more good images or use method='percentile'"
        )
    return float(s.mean() + value * s.std(ddof=1))
