"""``hamacho benchmark``: train and test a grid of model x backbone x dataset x seed cells.

Each cell runs in its own Python process (one failure or out-of-memory kill leaves the rest
running) and writes a normal run directory; a cell whose metrics.json exists for the same
settings is not recomputed. The grid's results go to results.csv, results.md and results.png.
"""

from __future__ import annotations

import csv
import dataclasses
import fnmatch
import itertools
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hamacho.errors import ConfigError, DataError, HamachoError
from hamacho.report import nice_ticks

Echo = Callable[[str], None]

# Feature layers per model for backbones the user names without layers (fnmatch patterns, first
# match wins): the papers' choices for ResNets, and stride 4/8/16 stages for EfficientNet-Lite.
DEFAULT_LAYERS: dict[str, list[tuple[str, list[str]]]] = {
    "patchcore": [
        ("resnet*", ["layer2", "layer3"]),
        ("wide_resnet*", ["layer2", "layer3"]),
        ("tf_efficientnet_lite*", ["blocks.2", "blocks.4"]),
    ],
    "padim": [
        ("resnet*", ["layer1", "layer2", "layer3"]),
        ("wide_resnet*", ["layer1", "layer2", "layer3"]),
        ("tf_efficientnet_lite*", ["blocks.1", "blocks.2", "blocks.4"]),
    ],
}
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


@dataclass(frozen=True)
class BackboneSpec:
    """One ``--backbones`` entry: ``NAME[:LAYER+LAYER][@WEIGHTS]`` (weights: imagenet|none|path)."""

    name: str
    layers: tuple[str, ...] = ()
    weights: str | None = None

    @property
    def label(self) -> str:
        """Short display name, e.g. ``resnet18@none``."""
        layers = ":" + "+".join(self.layers) if self.layers else ""
        return f"{self.name}{layers}" + (f"@{self.weights}" if self.weights else "")


@dataclass
class Grid:
    """Everything one benchmark needs (from the command line and/or a grid YAML file)."""

    models: list[str]
    backbones: list[BackboneSpec]
    datasets: list[Path]
    output: Path
    seeds: list[int] = field(default_factory=lambda: [0])
    overrides: list[str] = field(default_factory=list)  # `--set`, optionally `MODEL:key=value`
    timeout: float | None = None  # seconds per cell
    maps: bool = False  # write heat-map panels (slow on large test sets)


@dataclass
class Cell:
    """One model x backbone x dataset x seed run."""

    model: str
    backbone: BackboneSpec
    layers: list[str]
    dataset: Path
    dataset_name: str
    seed: int
    overrides: list[str]
    directory: Path


def parse_backbone(text: str) -> BackboneSpec:
    """``resnet18``, ``resnet18@none``, ``timm:resnet18:layer2+layer3@/w.pth`` -> BackboneSpec."""
    spec, _, weights = text.strip().partition("@")
    prefix = "timm:" if spec.startswith("timm:") else ""
    name, _, layers = spec[len(prefix) :].partition(":")
    if not name:
        raise ConfigError(f"backbone {text!r} has no name; write NAME[:LAYER+LAYER][@WEIGHTS]")
    return BackboneSpec(
        prefix + name, tuple(x for x in layers.split("+") if x), weights.strip() or None
    )


def default_layers(model: str, backbone: BackboneSpec, model_defaults: Any = None) -> list[str]:
    """The backbone's layers for ``model``: explicit, from DEFAULT_LAYERS, or the model's own."""
    if backbone.layers:
        return list(backbone.layers)
    bare = backbone.name.removeprefix("timm:")
    for pattern, layers in DEFAULT_LAYERS.get(model, []):
        if fnmatch.fnmatchcase(bare, pattern):
            return list(layers)
    if model_defaults is not None and getattr(model_defaults, "backbone", None) == backbone.name:
        return list(model_defaults.layers)
    known = ", ".join(p for p, _ in DEFAULT_LAYERS.get(model, [])) or "none"
    raise ConfigError(
        f"no default layers of backbone '{backbone.name}' for {model} (known: {known}); "
        f"name them: --backbones {backbone.name}:LAYER+LAYER"
    )


def load_grid_file(path: str | Path) -> dict[str, Any]:
    """Read a grid YAML (keys: models, backbones, data, seeds, set, output, timeout, maps)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"grid file '{path}' does not exist") from None
    except yaml.YAMLError:
        raise ConfigError(f"grid file '{path}' is not valid YAML") from None
    valid = {"models", "backbones", "data", "seeds", "set", "output", "timeout", "maps"}
    unknown = sorted(set(raw) - valid) if isinstance(raw, dict) else ["(not a mapping)"]
    if unknown:
        raise ConfigError(
            f"grid file '{path}': unknown key(s) {', '.join(unknown)}. Valid: {sorted(valid)}"
        )
    return raw


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value) if isinstance(value, (list, tuple)) else [value]


def make_grid(
    models: Any = None,
    backbones: Any = None,
    datasets: Any = None,
    output: str | Path | None = None,
    seeds: Any = None,
    overrides: Sequence[str] = (),
    timeout: float | None = None,
    maps: bool | None = None,
    grid_file: str | Path | None = None,
) -> Grid:
    """A Grid from arguments; values given here win over the grid file's (``set`` adds up)."""
    raw = load_grid_file(grid_file) if grid_file else {}
    names = _as_list(models) or _as_list(raw.get("models"))
    specs = [parse_backbone(b) for b in (_as_list(backbones) or _as_list(raw.get("backbones")))]
    roots = [Path(d) for d in (_as_list(datasets) or _as_list(raw.get("data")))]
    out = output or raw.get("output")
    missing = [k for k, v in (("models", names), ("backbones", specs), ("data", roots)) if not v]
    if missing or not out:
        missing += [] if out else ["output"]
        raise ConfigError(
            f"benchmark needs {', '.join(missing)}: give --{' --'.join(missing)} or a --grid file"
        )
    for root in roots:
        if not root.exists():
            raise DataError(f"dataset '{root}' does not exist; check the --data paths")
    try:
        seed_list = [int(s) for s in (_as_list(seeds) or _as_list(raw.get("seeds")) or [0])]
    except ValueError:
        raise ConfigError(f"seeds must be whole numbers, e.g. --seeds 0,1; got {seeds!r}") from None
    return Grid(
        models=names,
        backbones=specs,
        datasets=roots,
        output=Path(out),
        seeds=seed_list,
        overrides=[str(s) for s in _as_list_keep(raw.get("set"))] + list(overrides),
        timeout=timeout if timeout is not None else raw.get("timeout"),
        maps=bool(maps if maps is not None else raw.get("maps", False)),
    )


def _as_list_keep(value: Any) -> list[Any]:
    """Like _as_list but never splits a string on commas (a --set value may hold one)."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _scoped(overrides: Iterable[str], model: str) -> list[str]:
    """The overrides for ``model``: unscoped ones and those written ``MODEL:section.key=value``."""
    chosen = []
    for item in overrides:
        key = item.partition("=")[0]
        scope, sep, _ = key.partition(":")
        if sep and "." not in scope:
            if scope == model:
                chosen.append(item[len(scope) + 1 :])
        else:
            chosen.append(item)
    return chosen


def _label(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)


def plan(grid: Grid) -> list[Cell]:
    """Every cell of the grid, checked up front (unknown model or backbone layers: an error)."""
    from hamacho.plugins import get_registry

    registry = get_registry()
    names: dict[Path, str] = {}
    for root in grid.datasets:
        name = root.stem if root.is_file() else root.resolve().name
        while name in names.values():
            name += "_"  # two datasets with one folder name: keep both
        names[root] = name
    cells = []
    for model, backbone in itertools.product(grid.models, grid.backbones):
        cls = registry.get(model).cls
        layers = default_layers(model, backbone, cls.Config())
        sets = [f"model.backbone={backbone.name}", f"model.layers={json.dumps(layers)}"]
        sets += [f"model.weights={backbone.weights}"] if backbone.weights else []
        has_seed = "seed" in {f.name for f in dataclasses.fields(cls.Config)}
        for root, seed in itertools.product(grid.datasets, grid.seeds):
            seeds = [f"run.seed={seed}"] + ([f"model.seed={seed}"] if has_seed else [])
            folder = grid.output / model / _label(backbone.label) / names[root] / f"seed{seed}"
            overrides = _scoped(grid.overrides, model) + sets + seeds
            cells.append(Cell(model, backbone, layers, root, names[root], seed, overrides, folder))
    return cells


# -- running ---------------------------------------------------------------------------------
def _cell_spec(cell: Cell, maps: bool) -> dict[str, Any]:
    return {
        "model": cell.model,
        "data": str(cell.dataset),
        "output": str(cell.directory),
        "overrides": cell.overrides,
        "maps": maps,
    }


def _cell_main() -> None:
    """Child-process entry: train then test the cell whose cell.json is ``argv[1]``."""
    from hamacho import engine

    spec = json.loads(Path(sys.argv[1]).read_text())["spec"]
    try:
        engine.train(spec["model"], spec["data"], None, spec["overrides"], spec["output"])
        engine.test(spec["output"], spec["data"], write_maps=spec["maps"])
    except HamachoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


def _error_line(stderr: str, returncode: int) -> str:
    if returncode < 0:
        return f"killed by signal {-returncode} (out of memory?)"
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or [f"exit code {returncode}"])[-1].removeprefix("error: ")


def run_cell(cell: Cell, maps: bool = False, timeout: float | None = None) -> dict[str, Any]:
    """Run one cell in a child process unless it is already done; return its results row."""
    cell.directory.mkdir(parents=True, exist_ok=True)
    record_path = cell.directory / "cell.json"
    spec = _cell_spec(cell, maps)
    previous = _read_json(record_path)
    if (cell.directory / "metrics.json").exists() and previous.get("spec") == spec:
        return _row(cell, previous, cached=True)
    for stale in ("metrics.json", "train.json"):
        (cell.directory / stale).unlink(missing_ok=True)
    record_path.write_text(json.dumps({"spec": spec, "status": "running"}, indent=2))
    code = "from hamacho.benchmark import _cell_main; _cell_main()"
    start = time.perf_counter()
    try:
        argv = [sys.executable, "-c", code, str(record_path)]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        stderr = proc.stderr
        error = None if proc.returncode == 0 else _error_line(stderr, proc.returncode)
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        error = f"timed out after {timeout:g} s (raise --timeout)"
    (cell.directory / "log.txt").write_text(stderr)
    record = {
        "spec": spec,
        "status": "ok" if error is None else "failed",
        "error": error,
        "seconds": round(time.perf_counter() - start, 1),
    }
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return _row(cell, record, cached=False)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _row(cell: Cell, record: dict[str, Any], cached: bool) -> dict[str, Any]:
    metrics = _read_json(cell.directory / "metrics.json")
    trained = _read_json(cell.directory / "train.json")
    artifact = cell.directory / "model.safetensors"
    peaks = [v for v in (trained.get("peak_rss_mb"), metrics.get("peak_rss_mb")) if v]
    return {
        "model": cell.model,
        "backbone": cell.backbone.name,
        "layers": "+".join(cell.layers),
        "weights": cell.backbone.weights or "",
        "dataset": cell.dataset_name,
        "seed": cell.seed,
        "status": "ok" if metrics and record.get("status") == "ok" else "failed",
        **{key: metrics.get(key) for key in SCALARS},
        "fit_seconds": trained.get("fit_seconds"),
        "peak_rss_mb": max(peaks) if peaks else None,
        "artifact_mb": round(artifact.stat().st_size / 2**20, 2) if artifact.exists() else None,
        "train_images": trained.get("train_images"),
        "test_images": sum(metrics.get("images", {}).values()) if metrics else None,
        "cell_seconds": record.get("seconds"),
        "cached": cached,
        "image_auroc_per_defect": json.dumps(metrics.get("image_auroc_per_defect") or {}),
        "error": record.get("error") or "",
        "run_dir": str(cell.directory),
    }


def run(grid: Grid, echo: Echo = lambda _msg: None) -> list[dict[str, Any]]:
    """Run (or resume) every cell, then write results.csv, results.md and results.png."""
    cells = plan(grid)
    grid.output.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, cell in enumerate(cells, 1):
        what = f"[{i}/{len(cells)}] {cell.model} {cell.backbone.label} {cell.dataset_name} "
        what += f"seed {cell.seed}"
        echo(f"{what} ...")
        row = run_cell(cell, grid.maps, grid.timeout)
        rows.append(row)
        if row["status"] == "ok":
            done = "done before" if row["cached"] else f"{row['cell_seconds']} s"
            echo(f"{what}: image AUROC {row['image_auroc']}, {done}")
        else:
            echo(f"{what}: FAILED: {row['error']}")
        write_results(grid.output, rows)  # partial results survive an interrupted benchmark
    return rows


# -- results ---------------------------------------------------------------------------------
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
