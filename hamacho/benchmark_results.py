"""Benchmark results: results.csv (every cell), results.md (tables) and results.png (scatter).

Each row is one cell's dict, keyed by COLUMNS; these functions only read rows, never run cells.
"""

from __future__ import annotations

import csv
import math
import os
import platform
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hamacho.report import nice_ticks

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


def write_results(output: Path, rows: list[dict[str, Any]]) -> None:
    """results.csv (every cell), results.md (tables) and results.png (accuracy vs latency)."""
    with (output / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: ("" if row[k] is None else row[k]) for k in COLUMNS} for row in rows)
    (output / "results.md").write_text(results_markdown(rows))
    draw_scatter(rows, output / "results.png")


def _setups(rows: list[dict[str, Any]]) -> dict[tuple[str, ...], str]:
    """(model, backbone, layers, weights) -> display label, in first-seen order."""
    keys = list(dict.fromkeys((r["model"], r["backbone"], r["layers"], r["weights"]) for r in rows))
    labels: dict[tuple[str, ...], str] = {}
    for model, backbone, layers, weights in keys:
        label = backbone + (f"@{weights}" if weights else "")
        twins = {k[2] for k in keys if k[:2] == (model, backbone) and k[3] == weights}
        labels[(model, backbone, layers, weights)] = f"{model} · {label}" + (
            f" ({layers})" if len(twins) > 1 else ""
        )
    return labels


def _key(row: dict[str, Any]) -> tuple[str, ...]:
    return (row["model"], row["backbone"], row["layers"], row["weights"])


def _mean(values: Iterable[Any]) -> float | None:
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
            cells.setdefault((r["dataset"], _key(r)), []).append(float(r[metric]))
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
            _num(_mean(v), 3) + ("" if len(v) in (0, len(datasets)) else partial)
            for v in per_setup.values()
        ]
    )
    return _table(["category", *setups.values()], body)


def results_markdown(rows: list[dict[str, Any]]) -> str:
    """The benchmark as Markdown: means per model/backbone, then per-category tables."""
    setups = _setups(rows)
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
        mine = [r for r in ok if _key(r) == key]
        body.append(
            [key[0], key[1] + (f"@{key[3]}" if key[3] else ""), key[2]]
            + [_num(_mean(r[m] for r in mine), 3) for m in _ACCURACY]
            + [_num(_mean(r[m] for r in mine), 1) for m in _COSTS]
            + [f"{len(mine)}/{sum(_key(r) == key for r in rows)}"]
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
    if failed:
        groups: dict[tuple[str, str], list[str]] = {}
        for r in failed:  # one line per setup and error, not per cell
            cell = f"{r['dataset']} seed {r['seed']}"
            groups.setdefault((setups[_key(r)], r["error"]), []).append(cell)
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


# -- accuracy vs latency scatter (PIL) -------------------------------------------------------
_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"]


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType
    except (TypeError, OSError):
        return ImageFont.load_default()


def _scatter_points(rows: list[dict[str, Any]]) -> dict[tuple[str, ...], list[tuple]]:
    """setup key -> [(ms/image, image AUROC, dataset)] per dataset (means over seeds)."""
    points: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        if row["status"] == "ok" and row["image_auroc"] is not None:
            points.setdefault(_key(row), []).append(row)
    out: dict[tuple[str, ...], list[tuple]] = {}
    for key, mine in points.items():
        datasets = dict.fromkeys(r["dataset"] for r in mine)
        out[key] = [
            (
                _mean(r["inference_ms_per_image"] for r in mine if r["dataset"] == d),
                _mean(r["image_auroc"] for r in mine if r["dataset"] == d),
                d,
            )
            for d in datasets
        ]
    return out


def draw_scatter(rows: list[dict[str, Any]], path: Path) -> None:
    """Image AUROC against ms/image: a big labelled point per model/backbone (mean over the
    datasets) and a small one per dataset."""
    from PIL import Image, ImageDraw

    width, height, box = 1100, 680, (90, 80, 1060, 610)  # plot box: left, top, right, bottom
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image, "RGBA")
    font, small, big = _font(16), _font(13), _font(22)
    draw.text((box[0], 20), "Image AUROC vs inference time", fill="#1f2933", font=big)
    note = "large: mean over datasets (and seeds), labelled (AUROC, ms); small: one dataset"
    draw.text((box[0], 50), note, fill="#52606d", font=small)
    draw.rectangle(box, fill="#fafbfc")
    setups, points = _setups(rows), _scatter_points(rows)
    if not points:
        draw.text((box[0] + 20, box[1] + 20), "no finished cells", fill="#7b8794", font=font)
        image.save(path)
        return
    x_max = max(p[0] for ps in points.values() for p in ps) * 1.1 or 1.0
    y_min = min(p[1] for ps in points.values() for p in ps)
    y_min = max(0.0, min(0.9, math.floor(y_min * 20) / 20))  # down to a multiple of 0.05
    y_top = 1.0 + 0.03 * (1.0 - y_min)  # room above AUROC 1 for the dots and their labels

    def xy(x: float, y: float) -> tuple[float, float]:
        return (
            box[0] + x / x_max * (box[2] - box[0]),
            box[3] - (y - y_min) / (y_top - y_min) * (box[3] - box[1]),
        )

    grey, ink = "#3e4c59", "#1f2933"
    for t in nice_ticks(0.0, x_max, 8):
        px = xy(t, y_min)[0]
        draw.line([(px, box[1]), (px, box[3])], fill="#e4e7eb")
        draw.text((px, box[3] + 8), f"{t:g}", fill=grey, font=small, anchor="mt")
    for t in nice_ticks(y_min, 1.0):
        py = xy(0, t)[1]
        draw.line([(box[0], py), (box[2], py)], fill="#e4e7eb")
        draw.text((box[0] - 8, py), f"{t:g}", fill=grey, font=small, anchor="rm")
    draw.rectangle(box, outline="#9aa5b1")
    x_label = "inference ms per image (lower is faster)"
    draw.text(((box[0] + box[2]) / 2, height - 30), x_label, fill=ink, font=font, anchor="mm")
    label = Image.new("RGBA", (300, 30), (0, 0, 0, 0))
    ImageDraw.Draw(label).text((150, 15), "image AUROC", fill=ink, font=font, anchor="mm")
    label = label.rotate(90, expand=True)
    image.paste(label, (14, (box[1] + box[3]) // 2 - 150), label)

    placed: list[tuple[float, float, float, float]] = []  # boxes of points and labels drawn

    def free(x0: float, y0: float, x1: float, y1: float) -> bool:
        inside = box[0] <= x0 and x1 <= width - 4 and box[1] - 20 <= y0 and y1 <= box[3]
        return inside and not any(
            x0 < r[2] and x1 > r[0] and y0 < r[3] and y1 > r[1] for r in placed
        )

    def put(px: float, py: float, text: str, colour: str, face: Any, pad: float, must: bool):
        """Label a point: right, left, then further up/down (with a leader line) if ``must``."""
        w, h = draw.textlength(text, font=face), face.size + 4
        spots = [(px + pad, py - h / 2), (px - pad - w, py - h / 2)]
        spots += [(px + pad, py - h / 2 - h), (px + pad, py + h / 2)]
        if must:
            spots += [
                (x, py - h / 2 + d * h * k)
                for k in range(2, 12)
                for d in (1, -1)
                for x in (px + pad, px - pad - w)
            ]
        for tx, ty in spots:
            if free(tx - 2, ty, tx + w + 2, ty + h):
                break
        else:
            return  # no room: a small point goes unlabelled rather than mislabelled
        placed.append((tx - 2, ty, tx + w + 2, ty + h))
        if abs(ty + h / 2 - py) > h:
            draw.line([(px, py), (tx if tx > px else tx + w, ty + h / 2)], fill=colour, width=1)
        draw.rectangle([tx - 2, ty, tx + w + 2, ty + h], fill=(255, 255, 255, 200))
        draw.text((tx, ty + 1), text, fill=colour, font=face)

    colours = {key: _PALETTE[i % len(_PALETTE)] for i, key in enumerate(setups)}
    means = {
        key: (sum(p[0] for p in ps) / len(ps), sum(p[1] for p in ps) / len(ps))
        for key, ps in points.items()
    }
    for key, ps in points.items():
        for x, y, _ in ps:
            px, py = xy(x, y)
            draw.ellipse([px - 5, py - 5, px + 5, py + 5], fill=colours[key] + "99")
            placed.append((px - 5, py - 5, px + 5, py + 5))
    for key, (x, y) in means.items():
        px, py = xy(x, y)
        draw.ellipse([px - 9, py - 9, px + 9, py + 9], fill=colours[key], outline=ink, width=2)
        placed.append((px - 9, py - 9, px + 9, py + 9))
    for key, (x, y) in means.items():  # the means' labels first: they matter most
        px, py = xy(x, y)
        put(px, py, f"{setups[key]}  ({y:.3f}, {x:.0f} ms)", colours[key], font, 14, True)
    for key, ps in points.items():
        for x, y, dataset in ps if len(ps) > 1 else []:
            px, py = xy(x, y)
            placed.remove((px - 5, py - 5, px + 5, py + 5))  # its own dot may touch its label
            put(px, py, dataset, colours[key], small, 8, False)
            placed.append((px - 5, py - 5, px + 5, py + 5))
    image.save(path)
