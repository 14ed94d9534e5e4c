"""Benchmark results: results.csv (every cell) and results.md (tables); results.png: scatter.

Each row is one cell's dict, keyed by COLUMNS; these functions only read rows, never run cells.
"""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Iterable
from typing import Any

from hamacho.benchmark.plan import NO_BACKBONE

# metrics.json values copied into results.csv, then every column of results.csv
SCALARS = tuple(
    "image_auroc pixel_auroc aupro image_f1_max image_f1_threshold threshold "
    "inference_ms_per_image".split()
)
COLUMNS = (
    *"model backbone layers weights dataset seed status".split(),
    *SCALARS,
    *"fit_seconds peak_rss_mb artifact_mb train_images test_images cell_seconds cached".split(),
    *"image_auroc_per_defect error run_dir".split(),
)


def setup_labels(rows: list[dict[str, Any]]) -> dict[tuple[str, ...], str]:
    """(model, backbone, layers, weights) -> display label, in first-seen order."""
    keys = list(dict.fromkeys((r["model"], r["backbone"], r["layers"], r["weights"]) for r in rows))
    labels: dict[tuple[str, ...], str] = {}
    for model, backbone, layers, weights in keys:
        label = backbone + (f"@{weights}" if weights else "")
        twins = {k[2] for k in keys if k[:2] == (model, backbone) and k[3] == weights}
        if backbone == NO_BACKBONE:  # the model ran its own configuration
            labels[(model, backbone, layers, weights)] = model
            continue
        labels[(model, backbone, layers, weights)] = f"{model} · {label}" + (
            f" ({layers})" if len(twins) > 1 else ""
        )
    return labels


def setup_key(row: dict[str, Any]) -> tuple[str, ...]:
    """The (model, backbone, layers, weights) a row belongs to."""
    return (row["model"], row["backbone"], row["layers"], row["weights"])


def mean_of(values: Iterable[Any]) -> float | None:
    """Mean of the values that are numbers (None and nan skipped), or None if there are none."""
    numbers = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return sum(numbers) / len(numbers) if numbers else None


def _spread(values: list[float]) -> str:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return f"{mean:.3f}"
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{mean:.3f} ± {std:.3f}"


def _num(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in body]


def _category_table(rows: list[dict[str, Any]], setups: dict, metric: str) -> list[str]:
    """Rows = categories (+ mean), columns = model/backbone; the best of each row in bold."""
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    cells: dict[tuple, list[float]] = {}
    for r in rows:
        if r["status"] == "ok" and r[metric] is not None:
            cells.setdefault((r["dataset"], setup_key(r)), []).append(float(r[metric]))
    body: list[list[str]] = []
    per_setup: dict[tuple[str, ...], list[float]] = {key: [] for key in setups}
    for dataset in datasets:
        means = {k: sum(v) / len(v) for k in setups if (v := cells.get((dataset, k)))}
        for k, mean in means.items():
            per_setup[k].append(mean)
        best = max(means.values(), default=None)
        line = [dataset]
        for k in setups:
            text = _spread(cells[(dataset, k)]) if k in means else "failed"
            line.append(f"**{text}**" if k in means and means[k] == best else text)
        body.append(line)
    partial = "*"  # marks a mean over fewer categories than the others
    body.append(
        ["mean"]
        + [
            _num(mean_of(v), 3) + ("" if len(v) in (0, len(datasets)) else partial)
            for v in per_setup.values()
        ]
    )
    return _table(["category", *setups.values()], body)


def results_markdown(rows: list[dict[str, Any]]) -> str:
    """The benchmark as Markdown: means per model/backbone, then per-category tables."""
    setups = setup_labels(rows)
    ok = [r for r in rows if r["status"] == "ok"]
    failed = [r for r in rows if r["status"] != "ok"]
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    seeds = sorted({r["seed"] for r in rows})
    out = [
        "# Benchmark results",
        "",
        f"{len(rows)} cells ({len(ok)} ok, {len(failed)} failed): {len(setups)} model/backbone "
        f"pair(s) x {len(datasets)} dataset(s) x seed(s) {', '.join(map(str, seeds))}, on "
        f"{platform.system()} {platform.machine()} with {os.cpu_count()} CPUs.",
        "",
        "## Mean over datasets and seeds",
        "",
    ]
    header = ["model", "backbone", "layers", "image AUROC", "pixel AUROC", "AUPRO", "F1-max"]
    header += ["fit s", "ms/image", "peak RSS MB", "artifact MB", "cells ok"]
    body = []
    for key in setups:
        mine = [r for r in ok if setup_key(r) == key]
        body.append(
            [key[0], key[1] + (f"@{key[3]}" if key[3] else ""), key[2]]
            + [_num(mean_of(r[m] for r in mine), 3) for m in _ACCURACY]
            + [_num(mean_of(r[m] for r in mine), 1) for m in _COSTS]
            + [f"{len(mine)}/{sum(setup_key(r) == key for r in rows)}"]
        )
    out += _table(header, body)
    for metric, title in list(_ACCURACY.items())[:3]:
        if not ok or any(r[metric] is not None for r in ok):  # skip pixel metrics without masks
            out += ["", f"## {title} per category", ""] + _category_table(rows, setups, metric)
    out += [
        "",
        "Best of each row in bold"
        + ("; mean ± std over seeds" if len(seeds) > 1 else "")
        + "; * = mean over the categories that finished. Per-cell numbers, costs and per-defect "
        "AUROC are in results.csv.",
    ]
    if any(r["backbone"] == NO_BACKBONE for r in rows):
        out[-1] += (
            f" Backbone {NO_BACKBONE}: the backbone axis does not apply (the model has no "
            "backbone setting, or no --backbones were given), so it ran once per dataset and "
            "seed with its own configuration."
        )
    if failed:
        groups: dict[tuple[str, str], list[str]] = {}
        for r in failed:  # one line per setup and error, not per cell
            cell = f"{r['dataset']} seed {r['seed']}"
            groups.setdefault((setups[setup_key(r)], r["error"]), []).append(cell)
        out += ["", "## Failed cells", ""]
        out += [f"- {name} on {', '.join(cells)}: {err}" for (name, err), cells in groups.items()]
    return "\n".join(out) + "\n"


_ACCURACY = {
    "image_auroc": "Image AUROC",
    "pixel_auroc": "Pixel AUROC",
    "aupro": "AUPRO",
    "image_f1_max": "Image F1-max",
}
_COSTS = ("fit_seconds", "inference_ms_per_image", "peak_rss_mb", "artifact_mb")
