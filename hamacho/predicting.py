"""The predict flow behind ``hamacho predict``: score image files, optionally draw their maps."""

from __future__ import annotations

import glob
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from hamacho import rundir
from hamacho.components import data, visualize
from hamacho.errors import DataError
from hamacho.runtime import decide


def expand_inputs(inputs: Iterable[str]) -> Iterator[tuple[str, Path | None]]:
    """Files, folders (recursively) and globs -> image paths; unmatched inputs yield None."""
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in data.IMAGE_EXTENSIONS)
        elif path.exists():
            found = [path]
        else:
            found = sorted(Path(p) for p in glob.glob(item, recursive=True))
        if not found:
            yield item, None
        for p in found:
            yield item, p


# (input as given, the image file or None when nothing matched it, its map file or None)
Target = tuple[str, "Path | None", "Path | None"]


def predict(
    run_dir: str | Path,
    inputs: Iterable[str],
    maps_dir: str | Path | None = None,
    threshold: float | None = None,
    batch_size: int = 16,
    runtime: str = "torch",
) -> Iterator[dict[str, Any]]:
    """Score image files; yield one dict per image (an ``error`` key where it failed).

    ``runtime`` torch scores with the run itself; onnx / openvino with its exported file.
    """
    from hamacho.export.runtimes import open_backend

    if maps_dir:
        rundir.check_folder(maps_dir, "heat maps", "Choose a writable --maps folder")
    backend = open_backend(run_dir, runtime)
    yield from score_targets(backend, targets(inputs, maps_dir), threshold, batch_size)


def targets(inputs: Iterable[str], maps_dir: str | Path | None = None) -> Iterator[Target]:
    """Every image of ``inputs`` with the file its map panel goes to under ``maps_dir``.

    Map names are given here, in input order, one per image found (readable or not), so they
    do not depend on which worker scores which image (stem.png, else parent_stem.png, ...).
    """
    folder = Path(maps_dir) if maps_dir else None
    used: set[str] = set()  # names taken (test/good/000.png vs test/crack/000.png)
    for item, path in expand_inputs(inputs):
        out = folder / _unique_name(path, used) if folder and path else None
        yield item, path, out


def score_targets(
    backend: Any, items: Iterable[Target], threshold: float | None = None, batch_size: int = 16
) -> Iterator[dict[str, Any]]:
    """``predict`` with a backend opened once (export.runtimes.open_backend), e.g. per worker."""
    limit = backend.threshold if threshold is None else threshold
    max_pixels = backend.config["data"].get("max_pixels", data.MAX_PIXELS)
    pending: list[tuple[Path, torch.Tensor, Path | None]] = []  # decoded (H, W, 3) uint8 images

    def flush() -> Iterator[dict[str, Any]]:
        images = [t for _, t, _ in pending]
        crops = None
        if any(out is not None for *_, out in pending):  # maps align with these pixels
            scores, maps, crops = backend.score_with_pixels(images)
        else:
            scores, maps = backend.score(images)  # maps at the crop size
        for i, (path, _, out) in enumerate(pending):
            value = float(scores[i])
            finite = math.isfinite(value)  # NaN is not JSON: a broken score is null
            row = {"path": str(path), "score": round(value, 6) if finite else None}
            row["threshold"] = limit
            row["is_anomalous"] = decide(value, limit)
            if out is not None and crops is not None:
                visualize.save_png(out, visualize.overlay_panel(crops[i], maps[i], None, limit))
                row["map"] = str(out)
            yield row
        pending.clear()

    for item, path, out in items:
        if path is None:
            yield {"path": item, "error": _nothing_found(item)}
            continue
        try:
            tensor = data.pil_to_uint8(data.read_image(path, max_pixels))
        except DataError as exc:
            yield {"path": str(path), "error": str(exc)}
            continue
        pending.append((path, tensor, out))
        if len(pending) >= batch_size:
            yield from flush()
    if pending:
        yield from flush()


def _nothing_found(item: str) -> str:
    if Path(item).is_dir():
        kinds = ", ".join(sorted(data.IMAGE_EXTENSIONS))
        return f"folder contains no images (looked for {kinds}, in subfolders too)"
    return "no such file, folder or matching image"


def _unique_name(path: Path, used: set[str]) -> str:
    """``stem.png``, or ``parent_stem.png`` (then a counter) when that name is already taken.

    Both parts go through data.safe_name, so the map always lands inside ``--maps``.
    """
    stem = data.safe_name(path.stem)
    if f"{stem}.png" in used:
        stem = f"{data.safe_name(path.parent.name)}_{stem}"
    return data.unused_name(stem, used, ".png")
