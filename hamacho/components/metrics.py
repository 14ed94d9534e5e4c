"""Image- and pixel-level anomaly detection metrics (AUROC, AUPRO, F1-max) and thresholds.

Every function accepts numpy arrays or torch tensors (any device). AUROC-type metrics return
float('nan') when they are undefined, i.e. when the labels hold only one class, so a test set
without defects still reports its other numbers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

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
    from sklearn.metrics import roc_auc_score  # on use: sklearn + scipy import in ~1.3 s

    return float(roc_auc_score(y, s))


def pixel_auroc(masks: ArrayLike, maps: ArrayLike) -> float:
    """Pixel-level AUROC of (N, H, W) anomaly maps against ground-truth masks (nan with one class).

    Pixels are pooled over all images; maps are cast to float32 (see PixelMetrics).
    """
    gt, amap = _masks_maps(masks, maps)
    store = PixelMetrics(len(gt))
    store.add(gt, amap)
    return store.compute()[0]


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
    from scipy import ndimage  # on use, as sklearn above

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


def aupro(masks: ArrayLike, maps: ArrayLike, fpr_limit: float = 0.3) -> float:
    """Area under the PRO curve up to `fpr_limit`, divided by `fpr_limit` (MVTec AD, 0..1).

    Returns nan when the masks have no defect region or no normal pixel.
    """
    _check_limit(fpr_limit)
    gt, amap = _masks_maps(masks, maps)
    store = PixelMetrics(len(gt))
    store.add(gt, amap)
    return store.compute(fpr_limit)[1]


def _check_limit(fpr_limit: float) -> None:
    if not 0.0 < fpr_limit <= 1.0:
        raise ConfigError(f"aupro fpr_limit must be in (0, 1], got {fpr_limit!r}; 0.3 is usual")


class PixelMetrics:
    """Pixel AUROC and AUPRO of many images in little memory, filled a batch at a time.

    It keeps what the two metrics need and no more: the maps as float32 in one (capacity, H, W)
    array allocated on the first batch (4 bytes a pixel) and the masks packed to bits. Both
    metrics come from one in-place sort of the maps and a binary search of each defect pixel's
    score among the normal ones, which needs ~8 bytes per defect pixel more; sklearn's
    roc_auc_score and an argsort of all pixels copy every pixel several times. The values are
    those of roc_auc_score and of the trapezoid area under `pro_curve` up to float64 rounding
    (ties count half, as there). `compute` consumes the maps: call it once.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity, self.count = capacity, 0
        self._maps: np.ndarray | None = None  # (capacity, H, W) float32
        self._masks: np.ndarray | None = None  # (capacity, H, ceil(W / 8)) uint8, packed bits

    def add(self, masks: ArrayLike, maps: ArrayLike) -> None:
        """Append (B, H, W) masks and maps."""
        gt, amap = _masks_maps(masks, maps)
        n = len(gt)
        if self._maps is None or self._masks is None:
            height, width = amap.shape[1:]
            self._maps = np.empty((self.capacity, height, width), np.float32)
            self._masks = np.empty((self.capacity, height, (width + 7) // 8), np.uint8)
        if amap.shape[1:] != self._maps.shape[1:]:
            raise DataError(
                f"anomaly maps of {amap.shape[1:]} after maps of {self._maps.shape[1:]}; "
                "every map of one evaluation must have the same size"
            )
        if self.count + n > self.capacity:
            raise DataError(f"more maps than the {self.capacity} this PixelMetrics was made for")
        self._maps[self.count : self.count + n] = amap
        self._masks[self.count : self.count + n] = np.packbits(gt, axis=-1)
        self.count += n

    def compute(self, fpr_limit: float = 0.3) -> tuple[float, float]:
        """(pixel AUROC, AUPRO up to `fpr_limit`); nan without defect or normal pixels."""
        _check_limit(fpr_limit)
        if self._maps is None or self._masks is None or self.count == 0:
            return float("nan"), float("nan")
        maps, masks = self._maps[: self.count], self._masks[: self.count]
        self._maps = self._masks = None
        defect, sizes, n_regions = _take_defects(maps, masks)
        n_defect, n_normal = defect.size, maps.size - defect.size
        if n_defect == 0 or n_normal == 0:
            return float("nan"), float("nan")
        flat = maps.reshape(-1)
        flat.sort()  # in place: the defect pixels (-inf) first, then the normal ones ascending
        normal = flat[n_defect:]
        # The PRO curve is cut inside the run of normal scores equal to the k-th highest one,
        # k the fewest normal pixels whose FPR passes the limit.
        k = int(fpr_limit * n_normal)
        while k > 0 and k / n_normal > fpr_limit:
            k -= 1
        while k <= n_normal and k / n_normal <= fpr_limit:
            k += 1
        cut = normal[n_normal - k] if k <= n_normal else np.float32(-np.inf)
        n_to_cut = int(np.searchsorted(normal, cut, "right"))  # normal pixels at or below it
        ranks, area, above, at_or_above = 0, 0.0, 0.0, 0.0
        for start in range(0, n_defect, _CHUNK_PIXELS):
            u = defect[start : start + _CHUNK_PIXELS]
            weight = 1.0 / (sizes[start : start + _CHUNK_PIXELS] * float(n_regions))
            # twice the normal pixels below each defect pixel, plus those tied with it
            both = np.searchsorted(normal, u, "left") + np.searchsorted(normal, u, "right")
            ranks += int(both.sum())
            # Each normal pixel above the cut is an FPR step of 1 / n_normal; the PRO across
            # it rises by the weight of the defect pixels tied with it: take the mean.
            over = u > cut
            area += float(np.sum(weight[over] * (both[over] / 2 - n_to_cut)))
            above += float(weight[over].sum())
            at_or_above += float(weight[u >= cut].sum())
        area /= n_normal
        if k <= n_normal:  # the step at the cut, up to the limit, PRO interpolated along it
            fpr_before = (n_normal - n_to_cut) / n_normal
            fpr_after = (n_normal - int(np.searchsorted(normal, cut, "left"))) / n_normal
            slope = (at_or_above - above) / (fpr_after - fpr_before)
            pro_at_limit = above + (fpr_limit - fpr_before) * slope
            area += (fpr_limit - fpr_before) * (above + pro_at_limit) / 2.0
        return ranks / (2 * n_defect * n_normal), area / fpr_limit


def _take_defects(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Defect pixels' scores and the sizes of their regions; their map entries become -inf.

    Regions are the 8-connected components of each mask (labelled image by image).
    """
    from scipy import ndimage  # on use, as sklearn above

    values, sizes, n_regions = [], [], 0
    for start in range(0, len(maps), _CHUNK_IMAGES):
        block = maps[start : start + _CHUNK_IMAGES]
        bits = masks[start : start + _CHUNK_IMAGES]
        gt = np.unpackbits(bits, axis=-1, count=maps.shape[-1]).view(bool)
        regions, found = ndimage.label(gt, structure=_REGION_STRUCTURE)
        region_sizes = np.bincount(regions.reshape(-1)).astype(np.int32)
        values.append(block[gt])
        sizes.append(region_sizes[regions[gt]])
        block[gt] = -np.inf  # the maps are finite: -inf marks a defect pixel
        n_regions += found
    return np.concatenate(values), np.concatenate(sizes), n_regions


_CHUNK_IMAGES = 64  # masks unpacked and labelled at a time
_CHUNK_PIXELS = 1 << 20  # defect pixels searched at a time


def f1_max(labels: ArrayLike, scores: ArrayLike) -> tuple[float, float]:
    """Best F1 over all thresholds and that threshold (predict defect when score >= it).

    Returns (nan, nan) when there is no positive label.
    """
    y, s = _labels_scores(labels, scores)
    if not y.any():
        return float("nan"), float("nan")
    from sklearn.metrics import precision_recall_curve  # on use, as above

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
