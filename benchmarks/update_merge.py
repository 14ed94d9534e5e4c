"""Grow and merge vs one fit: `hamacho update` / `hamacho merge` against a fit on all images.

    python benchmarks/update_merge.py ../shared/datasets/{bottle,screw,magnetic_tile} \\
        [--models patchcore,padim] [--sites 2,4] [--repeats 3] [--fit-repeats 1] \\
        [--output DIR] [--set [MODEL:]SECTION.KEY=VALUE ...] [--threads 1]

Per category and model: one fit on 100 % of train/good; a fit on the first 90 % (by index) then
``update`` with the other 10 %; train/good split by index into 2 and 4 "sites", each fitted on
its own, then ``merge``d. Every model is tested on the category's test split (image / pixel
AUROC). ``fit s`` is the model's own fit (or update / merge) step, ``wall s`` the whole command
(loading, leave-one-out threshold, saving); for a merge, ``fit s`` is the slowest site's fit and
``merge s`` the merge step. The update is timed ``--repeats`` times and the full fit
``--fit-repeats`` times (the costly one): mean (min-max).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import print_table

from hamacho import engine
from hamacho.components import data
from hamacho.grow.flows import merge, update

LITE0 = {
    "patchcore": ["model.backbone=tf_efficientnet_lite0", "model.layers=[blocks.2, blocks.4]"],
    "padim": [
        "model.backbone=tf_efficientnet_lite0",
        "model.layers=[blocks.1, blocks.2, blocks.4]",
    ],
}
COLUMNS = (
    ("category", "category", ""),
    ("model", "model", ""),
    ("how", "how", ""),
    ("images", "train images", ""),
    ("image_auroc", "image AUROC", ".4f"),
    ("pixel_auroc", "pixel AUROC", ".4f"),
    ("d_image", "Δ image", "+.4f"),
    ("d_pixel", "Δ pixel", "+.4f"),
    ("fit", "fit s", ""),
    ("wall", "wall s", ""),
    ("merge", "merge s", ""),
)


def subset(root: Path, names: list[str], out: Path) -> Path:
    """A category folder whose train/good holds only ``names`` (symlinks), with root's test."""
    (out / "train" / "good").mkdir(parents=True)
    for name in names:
        (out / "train" / "good" / name).symlink_to(root / "train" / "good" / name)
    for part in ("test", "ground_truth"):
        if (root / part).exists():
            (out / part).symlink_to(root / part)
    return out


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def timed(fn: Any, *args: Any, **kw: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - start


def tested(run: Path, root: Path) -> dict[str, float]:
    result = engine.test(run, root, write_maps=False)
    return {"image_auroc": result["image_auroc"], "pixel_auroc": result["pixel_auroc"]}


def seconds(run: Path, key: str) -> float:
    return json.loads((run / "train.json").read_text())[key]


def category_rows(
    root: Path,
    model: str,
    sets: list[str],
    sites: list[int],
    repeats: int,
    fit_repeats: int,
    work: Path,
) -> list[dict[str, Any]]:
    names = sorted(s.path.name for s in data.find_samples(root, "train"))
    cut = int(round(0.9 * len(names)))
    first, rest = subset(root, names[:cut], work / "p90"), subset(root, names[cut:], work / "p10")
    base = {"category": root.name, "model": model}
    fits, walls = [], []
    for i in range(fit_repeats):
        run, wall = timed(engine.train, model, root, overrides=sets, output=work / f"full{i}")
        fits.append(seconds(run, "fit_seconds"))
        walls.append(wall)
    full = tested(work / "full0", root)
    rows = [
        {
            **base,
            "how": "fit 100 %",
            "images": len(names),
            **full,
            "fit": spread(fits),
            "wall": spread(walls),
        }
    ]
    engine.train(model, first, overrides=sets, output=work / "p90run")
    fits, walls = [], []
    for i in range(repeats):
        run, wall = timed(update, work / "p90run", rest, work / f"upd{i}")
        fits.append(seconds(run, "update_seconds"))
        walls.append(wall)
    row = {**base, "how": f"fit {cut} + update {len(names) - cut}", "images": len(names)}
    rows.append({**row, **tested(work / "upd0", root), "fit": spread(fits), "wall": spread(walls)})
    for k in sites:
        parts = [names[i::k] for i in range(k)]  # by index: every k-th image
        runs, fit_times = [], []
        for j, part in enumerate(parts):
            folder = subset(root, part, work / f"s{k}-{j}")
            runs.append(engine.train(model, folder, overrides=sets, output=work / f"s{k}-{j}run"))
            fit_times.append(seconds(runs[-1], "fit_seconds"))
        merged, wall = timed(merge, runs, work / f"merged{k}")
        row = {**base, "how": f"merge {k} sites", "images": len(names), **tested(merged, root)}
        rows.append(
            {
                **row,
                "fit": f"{max(fit_times):.1f}",
                "wall": f"{wall:.1f}",
                "merge": f"{seconds(merged, 'merge_seconds'):.1f}",
            }
        )
    for row in rows[1:]:
        row["d_image"] = row["image_auroc"] - full["image_auroc"]
        row["d_pixel"] = row["pixel_auroc"] - full["pixel_auroc"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("categories", nargs="+", type=Path)
    parser.add_argument("--models", default="patchcore,padim")
    parser.add_argument("--sites", default="2,4")
    parser.add_argument("--repeats", type=int, default=3, help="times each update is timed")
    parser.add_argument("--fit-repeats", type=int, default=1, help="times the full fit is timed")
    parser.add_argument(
        "--set", dest="sets", action="append", default=[], help="[MODEL:]SECTION.KEY=VALUE"
    )
    parser.add_argument("--output", type=Path, help="Keep the runs here (default: a temp dir).")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: its default)")
    args = parser.parse_args()
    if args.threads:  # on a shared CPU one thread avoids spinning workers (eigh: 8 s -> 1.8 s)
        torch.set_num_threads(args.threads)
    sites = [int(k) for k in args.sites.split(",") if k]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.output or Path(tmp)
        for root in args.categories:
            for model in args.models.split(","):
                mine = [v.partition(":")[2] for v in args.sets if v.startswith(f"{model}:")]
                sets = [*LITE0.get(model, []), *[v for v in args.sets if ":" not in v], *mine]
                folder = work / root.name / model
                rows += category_rows(
                    root.resolve(), model, sets, sites, args.repeats, args.fit_repeats, folder
                )
                print(f"done {root.name} {model}", file=sys.stderr, flush=True)
                print_table(rows, COLUMNS)  # the table so far: a long run can be cut short
                print(flush=True)


if __name__ == "__main__":
    main()
