"""Accuracy as a user gets it: `hamacho train` then `hamacho test`, defaults, on real categories.

    python benchmarks/accuracy.py ../shared/datasets/{bottle,screw,magnetic_tile} \\
        [--models patchcore,padim] [--seeds 0,1,2] \\
        [--variant patchcore:model.aggregation=concat ...] [--output DIR] [--threads N]

Each row runs the two CLI commands in fresh processes with nothing set but ``run.seed`` and the
model's ``seed`` (and a variant's overrides), exactly as a user types them; figures are read from
the run's train.json, metrics.json and scores.csv. Rows over seeds are summarised as the mean
with the min-max spread. ``fpr@thr`` is the share of test/good images at or above the
threshold hamacho set at training time (from leave-one-out or held-out good training scores);
``fnr@thr`` the share of defective images below it.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import print_table

METRICS = ("image_auroc", "pixel_auroc", "aupro", "fpr", "fnr", "fit_s", "ms_image", "peak_mb")
COLUMNS = (
    ("model", "model", ""),
    ("variant", "variant", ""),
    ("category", "category", ""),
    ("seeds", "seeds", ""),
    *(
        (key, title, "")
        for key, title in zip(
            METRICS,
            (
                "image AUROC",
                "pixel AUROC",
                "AUPRO",
                "fpr@thr",
                "fnr@thr",
                "fit s",
                "ms/image",
                "peak MB",
            ),
            strict=True,
        )
    ),
)
_FORMATS = {"fit_s": ".1f", "ms_image": ".1f", "peak_mb": ".0f", "fpr": ".3f", "fnr": ".3f"}


def hamacho(*args: str, threads: int) -> None:
    """Run one `hamacho` command as a user would (a fresh process); raise with its last line."""
    env = {**os.environ}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "hamacho", "--quiet", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        raise RuntimeError(f"{' '.join(cmd)} failed: {last}")


def run_cell(
    model: str, data: Path, sets: list[str], seed: int, out: Path, threads: int
) -> dict[str, Any]:
    """train + test one model on one category; the figures a user sees."""
    seeds = [f"run.seed={seed}", f"model.seed={seed}"]
    flags = [arg for item in (*seeds, *sets) for arg in ("--set", item)]
    hamacho(
        "train",
        "--model",
        model,
        "--data",
        str(data),
        "--output",
        str(out),
        *flags,
        threads=threads,
    )
    hamacho("test", "--run", str(out), threads=threads)
    train = json.loads((out / "train.json").read_text())
    result = json.loads((out / "metrics.json").read_text())
    with (out / "scores.csv").open() as f:
        rows = list(csv.DictReader(f))
    good = [r for r in rows if r["label"] == "0" and r["prediction"] != ""]
    bad = [r for r in rows if r["label"] == "1" and r["prediction"] != ""]
    return {
        "image_auroc": result["image_auroc"],
        "pixel_auroc": result["pixel_auroc"],
        "aupro": result["aupro"],
        "fpr": sum(r["prediction"] == "1" for r in good) / len(good) if good else None,
        "fnr": sum(r["prediction"] == "0" for r in bad) / len(bad) if bad else None,
        "fit_s": train["fit_seconds"],
        "ms_image": result["inference_ms_per_image"],
        "peak_mb": max(train["peak_rss_mb"], result["peak_rss_mb"]),
    }


def summarise(cells: list[dict[str, Any]]) -> dict[str, str]:
    """Mean over seeds, with (min-max) when there is more than one."""
    out = {}
    for key in METRICS:
        values = [c[key] for c in cells if c.get(key) is not None]
        if not values:
            out[key] = "-"
            continue
        spec = _FORMATS.get(key, ".4f")
        mean = format(statistics.fmean(values), spec)
        spread = f" ({format(min(values), spec)}-{format(max(values), spec)})"
        out[key] = mean + (spread if len(values) > 1 else "")
    return out


def _variants(models: list[str], specs: list[str]) -> list[tuple[str, str, list[str]]]:
    """(model, label, overrides): the defaults of every model, then each MODEL:k=v[,k=v]."""
    rows: list[tuple[str, str, list[str]]] = [(m, "defaults", []) for m in models]
    for spec in specs:
        model, sep, sets = spec.partition(":")
        if not sep or model not in models:
            raise SystemExit(
                f"--variant {spec!r} must look like MODEL:key=value with MODEL in "
                f"{','.join(models)}"
            )
        rows.append((model, sets, sets.split(",")))
    return rows


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="+", type=Path, help="MVTec-layout category folders")
    parser.add_argument("--models", default="patchcore,padim")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    parser.add_argument("--variant", action="append", default=[], metavar="MODEL:KEY=VALUE")
    parser.add_argument("--output", type=Path, help="keep the run directories here")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = parser.parse_args(argv)
    models = args.models.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    table = []
    with tempfile.TemporaryDirectory(prefix="hamacho-accuracy-") as tmp:
        root = args.output or Path(tmp)
        for model, label, sets in _variants(models, args.variant):
            for data in args.data:
                cells = []
                for seed in seeds:
                    tag = f"{model}-{label}-{data.name}-{seed}".replace("/", "_")
                    print(f"running {tag} ...", file=sys.stderr, flush=True)
                    try:
                        cells.append(run_cell(model, data, sets, seed, root / tag, args.threads))
                    except RuntimeError as exc:
                        print(f"  {exc}", file=sys.stderr)
                row = {"model": model, "variant": label, "category": data.name}
                table.append({**row, "seeds": f"{len(cells)}/{len(seeds)}", **summarise(cells)})
    print(
        f"\nhamacho train + test through the CLI, defaults; seeds {args.seeds}; "
        f"{args.threads or os.cpu_count()} threads\n"
    )
    print_table(table, COLUMNS)


if __name__ == "__main__":
    main(sys.argv[1:])
