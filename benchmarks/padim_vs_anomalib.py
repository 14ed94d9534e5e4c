"""hamacho PaDiM against anomalib's PadimModel on MVTec-layout categories.

    python benchmarks/padim_vs_anomalib.py ../shared/datasets/{bottle,screw} \\
        [--backbone tf_efficientnet_lite0 --layers blocks.1 blocks.2 blocks.4 --n-features 100] \\
        [--anomalib-python VENV/bin/python] [--memory-scaling] \\
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
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from _common import (
    add_aurocs,
    add_common_arguments,
    common_options,
    cycled_batches,
    fit_hamacho,
    hamacho_model,
    hamacho_predict,
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

    model_cfg = {key: options[key] for key in ("backbone", "layers", "weights", "seed")}
    model = hamacho_model(Padim, options, {**model_cfg, "n_features": options["n_features"]})
    stats = fit_hamacho(model, options, data)
    out = {**stats, "n_train": model.n_train, "channels": model.channels.clone()}
    if options.get("fit_only"):
        return out
    return {**out, **inference_stats(hamacho_predict(model), data["test"], options["repeats"])}


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
    add_common_arguments(parser, layers=["blocks.1", "blocks.2", "blocks.4"])
    parser.add_argument("--n-features", type=int, default=100, help="channel subset size")
    parser.add_argument(
        "--memory-scaling",
        action="store_true",
        help="fit on 100 and 1,000 images (first category) and compare peak RSS",
    )
    parser.add_argument("--scaling-sizes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument(
        "--anomalib-own-channels",
        action="store_true",
        help="anomalib draws its own channel subset (torch.randperm under --seed), as its "
        "users get it, instead of hamacho's",
    )
    return parser.parse_args(argv)


def _compare(args: argparse.Namespace, options: dict[str, Any], work: Path, data: dict) -> list:
    rows, channels = [], None
    runs = tool_runs(args.variant, args.anomalib_python, args.skip_anomalib)
    for i, (label, python, tool, extra) in enumerate(runs):
        print(f"running {label} on {Path(options['category']).name} ...", file=sys.stderr)
        shared = None if tool == "anomalib" and args.anomalib_own_channels else channels
        opts = {**options, "tool": tool, "channels": shared, "overrides": args.overrides + extra}
        out = run_tool(python, __file__, opts, work, f"{tool}-{i}", args.timeout)
        if channels is None and tool == "hamacho":
            channels = out["channels"].tolist()
        row = {"category": Path(options["category"]).name, "tool": label, **out}
        rows.append(add_aurocs(row, data))
    return rows


def _scaling(args: argparse.Namespace, options: dict[str, Any], work: Path) -> list:
    rows, channels = [], None
    for _, python, tool, _ in tool_runs([], args.anomalib_python, args.skip_anomalib):
        for n in args.scaling_sizes:
            print(f"fitting {tool} on {n} images ...", file=sys.stderr)
            opts = {**options, "tool": tool, "n_train": n, "fit_only": True, "channels": channels}
            out = run_tool(python, __file__, opts, work, f"{tool}-{n}", args.timeout)
            channels = out["channels"].tolist() if tool == "hamacho" else channels
            rows.append({"tool": tool, **out})
    return rows


def main(argv: list[str]) -> None:
    """Prepare data once per category, run each tool in its own process, print one table."""
    if argv[:1] == ["--worker"]:
        worker_main(argv[1:], {"hamacho": run_hamacho, "anomalib": run_anomalib})
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
            options = {
                **common_options(args, work, weights_file),
                "n_features": args.n_features,
                "category": category,
            }
            if args.memory_scaling:
                rows += _scaling(args, options, work)
            else:
                rows += _compare(args, options, work, data)
    crop = f"centre crop {args.crop_size}" if args.crop_size else "no crop"
    own = args.anomalib_own_channels
    channels = "anomalib's own draw" if own else "same channels in both tools"
    print(
        f"\nPaDiM: resize {args.image_size} + {crop}, {args.backbone} {'+'.join(args.layers)}, "
        f"{args.n_features} features ({channels}), weights {backbone['weights']},"
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
