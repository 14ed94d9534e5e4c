"""hamacho PaDiM against anomalib's PadimModel on MVTec-layout categories.

    python benchmarks/padim_vs_anomalib.py /work/shared/datasets/{bottle,screw} \\
        [--backbone tf_efficientnet_lite0 --layers blocks.1 blocks.2 blocks.4 --n-features 100] \\
        [--anomalib-python /work/anomalib-venv/bin/python] [--memory-scaling] \\
        [--set model.KEY=VALUE ...] [--variant model.border=mirror ...]

Both tools get the same normalised tensors (hamacho's loader: resize to --image-size, centre crop
to --crop-size), the same backbone weights (resolved by hamacho, loaded into anomalib's timm
extractor) and the same channel subset (hamacho's seeded choice copied into anomalib's ``idx``).
Each tool fits and predicts in its own process, so peak RSS is per tool. Fit = feature extraction
+ Gaussian; inference = predict() per batch, best of --repeats passes over the test split after a
warm-up batch. Metrics: hamacho.components.metrics on both tools' outputs.

``--memory-scaling`` instead fits each tool on 100 and on 1,000 training images (the first
category's train set cycled, each pass shifted and flipped, all lightly noised so no two images
are equal; made batch by batch so the input never holds 1,000 images) and prints peak RSS per fit.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from _common import (
    add_variant_argument,
    cycled_batches,
    default_anomalib_python,
    inference_stats,
    load_into_features_net,
    measure_fit,
    print_table,
    run_tool,
    tool_runs,
    worker_main,
)

COLUMNS = (
    ("category", "category", ""),
    ("tool", "tool", ""),
    ("fit_s", "fit s", ".1f"),
    ("ms_b1", "ms/img b1", ".1f"),
    ("ms_b32", "ms/img b32", ".1f"),
    ("peak_mb", "peak MB fit", ".0f"),
    ("fit_delta_mb", "fit +MB", ".0f"),
    ("image_auroc", "image AUROC", ".4f"),
    ("pixel_auroc", "pixel AUROC", ".4f"),
)
SCALING_COLUMNS = (
    ("tool", "tool", ""),
    ("n_train", "train images", "d"),
    ("fit_s", "fit s", ".1f"),
    ("peak_mb", "peak MB fit", ".0f"),
    ("fit_delta_mb", "fit +MB", ".0f"),
)


# -- workers -----------------------------------------------------------------------------------
def run_hamacho(options: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """Fit and time hamacho's PaDiM (worker process, hamacho venv)."""
    from hamacho_padim import Padim

    from hamacho import config as config_mod
    from hamacho.engine import build_config, make_components

    cfg = build_config(Padim)
    model_cfg = {
        "backbone": options["backbone"],
        "layers": options["layers"],
        "weights": options["weights"],
        "n_features": options["n_features"],
        "seed": options["seed"],
    }
    config_mod.apply(cfg, {"model": model_cfg, "run": {"device": "cpu"}})
    config_mod.apply(cfg, config_mod.parse_overrides(options["overrides"]))
    model = Padim(cfg.model, make_components(cfg))
    batches = cycled_batches(data["train"], options["batch_size"], options.get("n_train", 0))
    stats = measure_fit(lambda: model.fit({"image": b} for b in batches))
    out = {**stats, "n_train": model.n_train, "channels": model.channels.clone()}
    if options.get("fit_only"):
        return out

    def predict(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pred = model.predict(x)
        return pred.scores, pred.maps

    return {**out, **inference_stats(predict, data["test"], options["repeats"])}


def run_anomalib(options: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """Fit and time anomalib's PadimModel (worker process, anomalib venv)."""
    import warnings

    warnings.filterwarnings("ignore")
    from anomalib.models.image.padim.torch_model import PadimModel

    model = PadimModel(
        backbone=options["backbone"],
        layers=options["layers"],
        pre_trained=False,
        n_features=options["n_features"],
    )
    load_into_features_net(model.feature_extractor.feature_extractor, options["weights_file"])
    if options.get("channels") is not None:  # hamacho's subset: same features in both tools
        model.idx.copy_(torch.tensor(options["channels"]))
    n_train = 0

    def fit() -> None:
        nonlocal n_train
        model.train()
        with torch.no_grad():
            for batch in cycled_batches(
                data["train"], options["batch_size"], options.get("n_train", 0)
            ):
                model(batch)
                n_train += len(batch)
        model.fit()

    out = {**measure_fit(fit), "n_train": n_train}
    if options.get("fit_only"):
        return out
    model.eval()

    def predict(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            pred = model(x)
        return pred.pred_score.reshape(-1), pred.anomaly_map[:, 0]

    return {**out, **inference_stats(predict, data["test"], options["repeats"])}


# -- parent ------------------------------------------------------------------------------------
def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("categories", nargs="+", help="MVTec-layout folders")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--layers", nargs="+", default=["blocks.1", "blocks.2", "blocks.4"])
    parser.add_argument("--weights", default="imagenet", help="imagenet | none | weight file")
    parser.add_argument("--n-features", type=int, default=100, help="channel subset size")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--crop-size", type=int, default=224, help="0 = no centre crop")
    parser.add_argument("--batch-size", type=int, default=32, help="fit batch size")
    parser.add_argument("--repeats", type=int, default=2, help="inference passes (best kept)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="hamacho model.KEY=VALUE"
    )
    parser.add_argument(
        "--anomalib-python",
        default=default_anomalib_python(),
        help="interpreter of a venv with anomalib (default: /work/anomalib-venv if present)",
    )
    parser.add_argument("--skip-anomalib", action="store_true")
    add_variant_argument(parser)
    parser.add_argument(
        "--memory-scaling",
        action="store_true",
        help="fit on 100 and 1,000 images (first category) and compare peak RSS",
    )
    parser.add_argument("--scaling-sizes", type=int, nargs="+", default=[100, 1000])
    return parser.parse_args(argv)


def _options(args: argparse.Namespace, work: Path, weights_file: Path) -> dict[str, Any]:
    return {
        "data": str(work / "data.pt"),
        "weights_file": str(weights_file),
        "backbone": args.backbone,
        "layers": args.layers,
        "weights": args.weights,
        "n_features": args.n_features,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "threads": args.threads,
        "seed": args.seed,
        "overrides": args.overrides,
    }


def _compare(args: argparse.Namespace, options: dict[str, Any], work: Path, data: dict) -> list:
    from hamacho.components import metrics

    rows, channels = [], None
    runs = tool_runs(args.variant, args.anomalib_python, args.skip_anomalib)
    for i, (label, python, tool, extra) in enumerate(runs):
        print(f"running {label} on {Path(options['category']).name} ...", file=sys.stderr)
        opts = {**options, "tool": tool, "channels": channels, "overrides": args.overrides + extra}
        out = run_tool(python, __file__, opts, work, f"{tool}-{i}")
        if channels is None and tool == "hamacho":
            channels = out["channels"].tolist()
        out["image_auroc"] = metrics.image_auroc(data["labels"], out["scores"])
        out["pixel_auroc"] = metrics.pixel_auroc(data["masks"], out["maps"])
        rows.append({"category": Path(options["category"]).name, "tool": label, **out})
    return rows


def _scaling(args: argparse.Namespace, options: dict[str, Any], work: Path) -> list:
    rows, channels = [], None
    for _, python, tool, _ in tool_runs([], args.anomalib_python, args.skip_anomalib):
        for n in args.scaling_sizes:
            print(f"fitting {tool} on {n} images ...", file=sys.stderr)
            opts = {**options, "tool": tool, "n_train": n, "fit_only": True, "channels": channels}
            out = run_tool(python, __file__, opts, work, f"{tool}-{n}")
            channels = out["channels"].tolist() if tool == "hamacho" else channels
            rows.append({"tool": tool, **out})
    return rows


def main(argv: list[str]) -> None:
    """Prepare data once per category, run each tool in its own process, print one table."""
    if argv[:1] == ["--worker"]:
        options = json.loads(Path(argv[1]).read_text())
        worker_main(argv[1:], run_anomalib if options["tool"] == "anomalib" else run_hamacho)
        return
    args = _parse(argv)
    from _common import load_category, save_backbone

    rows = []
    categories = args.categories[:1] if args.memory_scaling else args.categories
    with tempfile.TemporaryDirectory(prefix="hamacho-bench-") as tmp:
        work = Path(tmp)
        weights_file = work / "backbone.pt"
        backbone = save_backbone(args.backbone, args.weights, weights_file)
        for category in categories:
            data = load_category(
                category, backbone["mean"], backbone["std"], args.image_size, args.crop_size or None
            )
            torch.save(data, work / "data.pt")
            options = {**_options(args, work, weights_file), "category": category}
            if args.memory_scaling:
                rows += _scaling(args, options, work)
            else:
                rows += _compare(args, options, work, data)
    crop = f"centre crop {args.crop_size}" if args.crop_size else "no crop"
    print(
        f"\nPaDiM: resize {args.image_size} + {crop}, {args.backbone} {'+'.join(args.layers)}, "
        f"{args.n_features} features (same channels in both tools), weights {backbone['weights']},"
        f" {args.threads or torch.get_num_threads()} threads; hamacho overrides: "
        f"{' '.join(args.overrides) or 'none'}\n"
    )
    print_table(rows, SCALING_COLUMNS if args.memory_scaling else COLUMNS)
    if not args.memory_scaling:
        _print_ratios(rows)


def _print_ratios(rows: list[dict[str, Any]]) -> None:
    by = {(r["category"], r["tool"]): r for r in rows}
    for category in dict.fromkeys(r["category"] for r in rows):
        a = by.get((category, "anomalib"))
        for h in [r for r in rows if r["category"] == category and r["tool"] != "anomalib"]:
            if a is None:
                break
            print(
                f"{category}: {h['tool']} fit {a['fit_s'] / h['fit_s']:.1f}x faster, inference "
                f"{a['ms_b1'] / h['ms_b1']:.1f}x (batch 1) / {a['ms_b32'] / h['ms_b32']:.1f}x "
                f"(batch 32) faster, peak RSS during fit {h['peak_mb'] / a['peak_mb']:.2f}x, "
                f"AUROC image {h['image_auroc'] - a['image_auroc']:+.4f} "
                f"pixel {h['pixel_auroc'] - a['pixel_auroc']:+.4f}"
            )


if __name__ == "__main__":
    main(sys.argv[1:])
