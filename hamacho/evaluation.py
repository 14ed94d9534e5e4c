"""What ``hamacho test`` makes of a run's test split: one scoring pass, metrics, the files written.

Memory stays flat in the number of test images but for what the metrics need: a score per
image, and the maps (float32) and masks (bits) of the good and the masked images for the pixel
metrics (components.metrics.PixelMetrics). Each batch's heat-map panels are written as it is
scored, so no input image is kept.
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hamacho import report
from hamacho.components import data, metrics, visualize
from hamacho.runtime import Run, peak_rss_mb, predict_batch, progress_bar, to_uint8, write_json


def evaluate(
    run: Run,
    root: Path,
    loader: Any,
    out: Path | None = None,
    write_maps: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """Score ``loader``'s test images; write metrics.json, scores.csv, maps/, report.html.

    The files go to ``out`` (default: the run folder; the engine passes a staging folder);
    ``maps/`` only with ``write_maps``.
    """
    out = run.path if out is None else out
    samples: list[data.Sample] = list(loader.dataset.samples)
    panels = Panels(out / "maps", run) if write_maps else None
    scored = _score(run, loader, samples, panels, progress)
    labels = np.array([s.label for s in samples])
    result = _metrics(labels, scored.scores, scored.pixels)
    threshold = run.threshold
    result.update(
        threshold=threshold,
        threshold_source=report.describe_threshold(run.metadata.get("threshold")),
        inference_ms_per_image=round(1000 * scored.seconds / max(len(samples), 1), 3),
        images={"good": int((labels == 0).sum()), "defect": int((labels == 1).sum())},
        **report.class_summary(labels, [s.defect for s in samples], scored.scores),
        peak_rss_mb=round(peak_rss_mb(), 1),
        dataset=str(root),
    )
    write_json(out / "metrics.json", result)
    _write_scores(out / "scores.csv", samples, scored.scores, threshold)
    paths = panels.paths if panels is not None else [None] * len(samples)
    images = [
        report.ScoredImage(s.path, s.label, s.defect, float(v), p)
        for s, v, p in zip(samples, scored.scores, paths, strict=True)
    ]
    title = f"{run.metadata.get('model', '?')} on {root.name}"
    report.write_report(out / "report.html", result, images, title, run.metadata)
    return result


@dataclass
class _Scored:
    scores: np.ndarray  # (N,) float32
    pixels: metrics.PixelMetrics  # maps and masks of the good and the masked images
    seconds: float = 0.0  # spent predicting


def _score(
    run: Run,
    loader: Any,
    samples: list[data.Sample],
    panels: Panels | None,
    progress: bool,
) -> _Scored:
    """One pass over the test images, in ``samples`` order (the loader does not shuffle)."""
    # Pixel metrics pool the good images and the defects with a mask (others have no truth);
    # without any mask there is no defect pixel: nothing to keep.
    masked = any(s.mask is not None for s in samples)
    known = np.array([masked and (s.label == 0 or s.mask is not None) for s in samples])
    scored = _Scored(np.empty(len(samples), np.float32), metrics.PixelMetrics(int(known.sum())))
    done = 0
    for batch in progress_bar(loader, progress, "test"):
        start = time.perf_counter()
        pred = predict_batch(run.model, batch["image"], run.tiler)
        scored.seconds += time.perf_counter() - start
        part = slice(done, done + len(batch["path"]))
        done = part.stop
        scored.scores[part] = pred.scores.float().cpu().numpy()
        maps = pred.maps.float().cpu().numpy()
        masks = batch["mask"][:, 0].numpy() > 0.5
        if known[part].any():
            scored.pixels.add(masks[known[part]], maps[known[part]])
        if panels is not None:
            images = to_uint8(batch["image"], run.mean, run.std)
            panels.write(samples[part], images, maps, masks)
    if done != len(samples):
        raise RuntimeError(f"the test loader gave {done} images for {len(samples)} samples")
    return scored


def _metrics(labels: np.ndarray, score: np.ndarray, pixels: metrics.PixelMetrics) -> dict:
    result: dict[str, Any] = {"image_auroc": metrics.image_auroc(labels, score)}
    f1, f1_threshold = metrics.f1_max(labels, score) if len(set(labels)) > 1 else (None, None)
    result.update(image_f1_max=f1, image_f1_threshold=f1_threshold)
    # nan (no defect pixel, e.g. no masks) -> None, as for every undefined metric
    result["pixel_auroc"], result["aupro"] = pixels.compute()
    # nan (undefined, e.g. one class only) -> None: json has no nan
    return {
        k: (round(float(v), 6) if v is not None and not np.isnan(v) else None)
        for k, v in result.items()
    }


@dataclass
class Panels:
    """Heat-map panels at ``out/<defect>/<stem>.png``, written batch by batch.

    Names are made safe and kept distinct. Every panel of a test shares one colour scale
    (``scale``), fixed before the first batch so no map waits for the last: see colour_scale.
    """

    out: Path
    run: Run
    paths: list[Path | None] = field(default_factory=list)
    taken: set[Path] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.scale = colour_scale(self.run)

    def write(
        self,
        samples: list[data.Sample],
        images: list[np.ndarray],
        maps: np.ndarray,
        masks: np.ndarray,
    ) -> None:
        """One panel per sample: its (H, W, 3) uint8 input, its map and mask (if it has one)."""
        vmin, vmax = self.scale
        for sample, image, amap, mask in zip(samples, images, maps, masks, strict=True):
            truth = mask if sample.mask else None
            panel = visualize.overlay_panel(
                image, amap, truth, self.run.threshold, vmin=vmin, vmax=vmax
            )
            visualize.save_png(self._path(sample), panel)

    def _path(self, sample: data.Sample) -> Path:
        # Labels come from the data (a CSV's label column): never let one leave `out`.
        folder = self.out / data.safe_name(sample.defect)
        stem = data.safe_name(sample.path.stem)
        path, n = folder / f"{stem}.png", 1
        while path in self.taken:  # two rows with one stem (CSV lists span folders)
            n += 1
            path = folder / f"{stem}_{n}.png"
        self.taken.add(path)
        self.paths.append(path)
        return path


def colour_scale(run: Run) -> tuple[float | None, float | None]:
    """One heat-map range for every panel of the run's tests, known before the first batch.

    The median good training image's score sits a quarter of the way up the scale and the
    threshold halfway, so the scale runs from ``2 * median - threshold`` (dark blue) to
    ``3 * threshold - 2 * median`` (dark red). A run without a threshold above its median
    good score (none recorded, or all alike) gets (None, None): each panel its own range.
    """
    good = [float(v) for v in run.metadata.get("good_scores") or []]
    threshold = run.threshold
    if not good or threshold is None:
        return None, None
    median = float(np.median(good))
    if not np.isfinite(threshold - median) or threshold <= median:
        return None, None
    return 2 * median - threshold, 3 * threshold - 2 * median


def _write_scores(
    path: Path, samples: list[data.Sample], score: np.ndarray, threshold: float | None
) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "defect", "score", "prediction"])
        for sample, value in zip(samples, score, strict=True):
            pred = "" if threshold is None else int(value >= threshold)
            writer.writerow([sample.path, sample.label, sample.defect, f"{value:.6f}", pred])
