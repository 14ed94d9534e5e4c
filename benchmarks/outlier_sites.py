"""`merge --reject-outliers` on real data: sites of one product, with and without an odd site.

    python benchmarks/outlier_sites.py ../shared/datasets/bottle ../shared/datasets/screw \\
        [--models padim,patchcore] [--sites 4] [--set [MODEL:]SECTION.KEY=VALUE ...] \\
        [--output DIR] [--threads 1]

The first category's train/good is split by index into ``--sites`` sites (every k-th image);
the second category gives one stranger site of as many images, its first by name. Two merges
per model: the first ``sites - 1`` sites plus the stranger (it should be rejected), and all
``sites`` sites (none should be). The table shows each site's outlier score, the test's median,
spread and limit, and which sites were rejected, as merge.json records them.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from _common import print_table
from update_merge import LITE0, subset

from hamacho import engine
from hamacho.components import data
from hamacho.grow.flows import merge

COLUMNS = (
    ("model", "model", ""),
    ("merge", "merge", ""),
    ("scores", "outlier score per site", ""),
    ("median", "median", ".4g"),
    ("spread", "spread", ".4g"),
    ("limit", "limit", ".4g"),
    ("rejected", "rejected", ""),
)


def names(root: Path) -> list[str]:
    return sorted(s.path.name for s in data.find_samples(root, "train"))


def merged_row(model: str, label: str, runs: list[Path], out: Path) -> dict[str, Any]:
    """Merge ``runs`` with --reject-outliers; the row merge.json gives."""
    merge(runs, out, reject_outliers=True)
    report = json.loads((out / "merge.json").read_text())
    test, sites = report["outliers"], report["sites"]
    return {
        "model": model,
        "merge": label,
        "scores": ", ".join(f"{Path(s['run']).name} {s['outlier_score']:.4g}" for s in sites),
        **{key: test[key] for key in ("median", "spread", "limit")},
        "rejected": ", ".join(Path(s["run"]).name for s in sites if not s["used"]) or "none",
    }


def model_rows(product: Path, stranger: Path, model: str, sets: list[str], k: int, work: Path):
    own = names(product)
    parts = [own[i::k] for i in range(k)]
    runs = []
    for j, part in enumerate(parts):
        folder = subset(product, part, work / f"{product.name}{j}")
        runs.append(
            engine.train(model, folder, overrides=sets, output=work / f"{product.name}{j}run")
        )
    folder = subset(stranger, names(stranger)[: len(parts[-1])], work / stranger.name)
    odd = engine.train(model, folder, overrides=sets, output=work / f"{stranger.name}run")
    mixed = f"{k - 1} {product.name} + 1 {stranger.name}"
    return [
        merged_row(model, mixed, [*runs[: k - 1], odd], work / "merged-mixed"),
        merged_row(model, f"{k} {product.name}", runs, work / "merged-alike"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("product", type=Path, help="the category every good site makes")
    parser.add_argument("stranger", type=Path, help="the category of the one odd site")
    parser.add_argument("--models", default="padim,patchcore")
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument(
        "--set", dest="sets", action="append", default=[], help="[MODEL:]SECTION.KEY=VALUE"
    )
    parser.add_argument("--output", type=Path, help="Keep the runs here (default: a temp dir).")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: its default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.sites < 3:
        parser.error("--sites must be >= 3 (outlier rejection needs three or more runs)")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.output or Path(tmp)
        for model in args.models.split(","):
            mine = [v.partition(":")[2] for v in args.sets if v.startswith(f"{model}:")]
            sets = [*LITE0.get(model, []), *[v for v in args.sets if ":" not in v], *mine]
            rows += model_rows(
                args.product.resolve(),
                args.stranger.resolve(),
                model,
                sets,
                args.sites,
                work / model,
            )
            print(f"done {model}", file=sys.stderr, flush=True)
            print_table(rows, COLUMNS)
            print(flush=True)


if __name__ == "__main__":
    main()
