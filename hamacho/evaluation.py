"""What ``hamacho test`` makes of a run's test-split predictions: metrics and the files written."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from hamacho import report
from hamacho.components import data, metrics, visualize
from hamacho.runtime import Run, peak_rss_mb, write_json


def evaluate(
    run: Run,
    root: Path,
    samples: list[data.Sample],
    score: np.ndarray,
    amap: np.ndarray,
    mask: np.ndarray,
    seconds: float,
    images: list[np.ndarray] | None = None,
    out: Path | None = None,
) -> dict[str, Any]:
    """Score one test pass; write metrics.json, scores.csv, maps/ (given images), report.html.

    ``score`` is (N,), ``amap`` and ``mask`` (N, H, W) in ``samples`` order; ``seconds`` is the
    time spent predicting; ``images`` are the (H, W, 3) uint8 inputs the heat-map panels show.
    The files go to ``out`` (default: the run folder; the engine passes a staging folder).
    """
    out = run.path if out is None else out
    labels = np.array([s.label for s in samples])
    known = np.array([s.label == 0 or s.mask is not None for s in samples])
    result = _metrics(labels, score, mask[known], amap[known])
    threshold = run.threshold
    result.update(
        threshold=threshold,
        threshold_source=report.describe_threshold(run.metadata.get("threshold")),
        inference_ms_per_image=round(1000 * seconds / max(len(samples), 1), 3),
        images={"good": int((labels == 0).sum()), "defect": int((labels == 1).sum())},
        **report.class_summary(labels, [s.defect for s in samples], score),
        peak_rss_mb=round(peak_rss_mb(), 1),
        dataset=str(root),
    )
    write_json(out / "metrics.json", result)
    _write_scores(out / "scores.csv", samples, score, threshold)
    panels: list[Path | None] = [None] * len(samples)
    if images is not None:
        panels = _write_maps(out / "maps", samples, images, amap, mask, threshold)
    scored = [
        report.ScoredImage(s.path, s.label, s.defect, float(v), p)
        for s, v, p in zip(samples, score, panels, strict=True)
    ]
    title = f"{run.metadata.get('model', '?')} on {root.name}"
    report.write_report(out / "report.html", result, scored, title, run.metadata)
    return result


def _metrics(labels: np.ndarray, score: np.ndarray, mask: np.ndarray, amap: np.ndarray) -> dict:
    result: dict[str, Any] = {"image_auroc": metrics.image_auroc(labels, score)}
    f1, f1_threshold = metrics.f1_max(labels, score) if len(set(labels)) > 1 else (None, None)
    result.update(image_f1_max=f1, image_f1_threshold=f1_threshold)
    if mask.any():
        result["pixel_auroc"] = metrics.pixel_auroc(mask, amap)
        result["aupro"] = metrics.aupro(mask, amap)
    else:
        result["pixel_auroc"] = None
        result["aupro"] = None
    # nan (undefined, e.g. one class only) -> None: json has no nan
    return {
        k: (round(float(v), 6) if v is not None and not np.isnan(v) else None)
        for k, v in result.items()
    }


def _write_maps(
    out: Path,
    samples: list[data.Sample],
    images: list[np.ndarray],
    amap: np.ndarray,
    mask: np.ndarray,
    threshold: float | None,
) -> list[Path | None]:
    """One panel per sample at ``out/<defect>/<stem>.png``, names made safe and kept distinct."""
    vmin, vmax = float(amap.min()), float(amap.max())
    paths: list[Path | None] = []
    taken: set[Path] = set()
    for i, sample in enumerate(samples):
        panel = visualize.overlay_panel(
            images[i], amap[i], mask[i] if sample.mask else None, threshold, vmin=vmin, vmax=vmax
        )
        # Labels come from the data (a CSV's label column): never let one leave `out`.
        folder, stem = out / data.safe_name(sample.defect), data.safe_name(sample.path.stem)
        path, n = folder / f"{stem}.png", 1
        while path in taken:  # two rows with one stem (CSV lists span folders)
            n += 1
            path = folder / f"{stem}_{n}.png"
        taken.add(path)
        paths.append(path)
        visualize.save_png(path, panel)
    return paths


def _write_scores(
    path: Path, samples: list[data.Sample], score: np.ndarray, threshold: float | None
) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "defect", "score", "prediction"])
        for sample, value in zip(samples, score, strict=True):
            pred = "" if threshold is None else int(value >= threshold)
            writer.writerow([sample.path, sample.label, sample.defect, f"{value:.6f}", pred])
