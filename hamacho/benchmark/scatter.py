"""results.png: image AUROC against inference time, one colour per model/backbone (PIL)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from hamacho.benchmark.results import mean_of, setup_key, setup_labels
from hamacho.report import nice_ticks

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
            points.setdefault(setup_key(row), []).append(row)
    out: dict[tuple[str, ...], list[tuple]] = {}
    for key, mine in points.items():
        datasets = dict.fromkeys(r["dataset"] for r in mine)
        out[key] = [
            (
                mean_of(r["inference_ms_per_image"] for r in mine if r["dataset"] == d),
                mean_of(r["image_auroc"] for r in mine if r["dataset"] == d),
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
    setups, points = setup_labels(rows), _scatter_points(rows)
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
