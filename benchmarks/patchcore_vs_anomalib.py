"""hamacho PatchCore against anomalib's PatchcoreModel and the official code on one category.

    python benchmarks/patchcore_vs_anomalib.py ../shared/datasets/bottle \\
        [--backbone tf_efficientnet_lite0 --layers blocks.2 blocks.4] [--coreset 0.1] \\
        [--anomalib-python VENV/bin/python] [--official-checkout DIR] [--set model.score=paper] \\
        [--variant model.search=faiss_flat ...]
    python benchmarks/patchcore_vs_anomalib.py ../shared/datasets/bottle --memory-scaling \\
        --backbone wide_resnet50_2 --layers layer2 layer3 --weights none --scaling-sizes 200 2000

``--official-checkout`` is a checkout of amazon-science/patchcore-inspection (its ``src/``); it
runs in the anomalib venv (``--official-python`` to choose another) with its own approximate
greedy coreset and faiss search, fed the same tensors and weights.

Both tools get the same normalised tensors (hamacho's loader: resize to --image-size, centre crop
to --crop-size) and the same backbone weights (resolved by hamacho, saved to a temp file and
loaded into anomalib's timm extractor). Each tool fits and predicts in its own process, so peak
RSS is per tool. Fit = feature extraction + coreset; inference = predict() per batch, best of
--repeats passes over the test split after a warm-up batch. Metrics: hamacho.components.metrics
on both tools' outputs. anomalib is only a benchmark dependency (its own venv).
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
    ("tool", "tool", ""),
    ("fit_s", "fit s", ".1f"),
    ("ms_b1", "ms/img b1", ".1f"),
    ("ms_b32", "ms/img b32", ".1f"),
    ("peak_mb", "peak MB", ".0f"),
    ("fit_delta_mb", "fit +MB", ".0f"),
    ("bank", "bank", "d"),
    ("image_auroc", "image AUROC", ".4f"),
    ("pixel_auroc", "pixel AUROC", ".4f"),
)

SCALING_COLUMNS = (
    ("n_train", "train images", "d"),
    ("patches", "patches", "d"),
    ("bank", "bank", "d"),
    ("fit_s", "fit s", ".1f"),
    ("peak_mb", "peak MB fit", ".0f"),
    ("fit_delta_mb", "fit +MB", ".0f"),
)


# -- workers -----------------------------------------------------------------------------------
def run_hamacho(options: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """Fit and time hamacho's PatchCore (worker process, hamacho venv)."""
    from hamacho_patchcore import PatchCore

    model_cfg = {key: options[key] for key in ("backbone", "layers", "weights", "num_neighbors")}
    model = hamacho_model(PatchCore, options, {**model_cfg, "coreset_ratio": options["coreset"]})
    stats = fit_hamacho(model, options, data)
    n_train = options.get("n_train") or len(data["train"])
    stats.update(bank=int(model.bank.shape[0]), n_train=n_train, patches=model.train_patches)
    if options.get("fit_only"):
        return stats
    return {**stats, **inference_stats(hamacho_predict(model), data["test"], options["repeats"])}


def run_anomalib(options: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """Fit and time anomalib's PatchcoreModel (worker process, anomalib venv)."""
    import os
    import warnings

    import numpy as np

    os.environ["TQDM_DISABLE"] = "1"
    warnings.filterwarnings("ignore")
    np.random.seed(options["seed"])  # KCenterGreedy's random projection draws from numpy
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    model = PatchcoreModel(
        layers=options["layers"],
        backbone=options["backbone"],
        pre_trained=False,
        num_neighbors=options["num_neighbors"],
    )
    load_into_features_net(model.feature_extractor.feature_extractor, options["weights_file"])

    def fit() -> None:
        model.train()
        with torch.no_grad():
            for batch in cycled_batches(data["train"], options["batch_size"]):
                model(batch)
        if options.get("anomalib_coreset") == "random":  # same bank size, no k-center greedy
            store = torch.vstack(model.embedding_store)
            model.embedding_store.clear()
            keep = max(1, int(len(store) * options["coreset"]))
            pick = torch.randperm(len(store), generator=torch.Generator().manual_seed(0))[:keep]
            model.memory_bank = store[pick]
        else:
            model.subsample_embedding(sampling_ratio=options["coreset"])

    stats = measure_fit(fit)
    model.eval()

    def predict(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            out = model(x)
        return out.pred_score.reshape(-1), out.anomaly_map[:, 0]

    bank = int(model.memory_bank.shape[0])
    return {**stats, "bank": bank, **inference_stats(predict, data["test"], options["repeats"])}


def run_official(options: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """Fit and time the official PatchCore code (worker process, the peer venv)."""
    import os

    import numpy as np
    import timm

    os.environ["TQDM_DISABLE"] = "1"
    sys.path.insert(0, str(Path(options["official_checkout"]) / "src"))
    import patchcore.common
    import patchcore.patchcore
    import patchcore.sampler

    np.random.seed(options["seed"])
    backbone = timm.create_model(options["backbone"], pretrained=False)
    state = torch.load(options["weights_file"], map_location="cpu", weights_only=True)
    result = backbone.load_state_dict(state, strict=False)
    if result.missing_keys:  # only the classifier head may be missing from a features net
        heads = [k for k in result.missing_keys if not k.startswith(("classifier.", "fc."))]
        if heads:
            raise RuntimeError(f"weights do not fit the official backbone: missing {heads[:3]}")
    backbone.name = options["backbone"]
    device = torch.device("cpu")
    model = patchcore.patchcore.PatchCore(device)
    threads = options.get("threads") or torch.get_num_threads()
    model.load(
        backbone=backbone,
        layers_to_extract_from=options["layers"],
        device=device,
        input_shape=tuple(data["train"].shape[1:]),
        pretrain_embed_dimension=1024,
        target_embed_dimension=1024,
        patchsize=3,
        anomaly_score_num_nn=1,
        featuresampler=patchcore.sampler.ApproximateGreedyCoresetSampler(
            options["coreset"], device
        ),
        nn_method=patchcore.common.FaissNN(False, threads),
    )
    stats = measure_fit(lambda: model.fit(list(cycled_batches(data["train"], 8))))

    def predict(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores, maps = model.predict(x)
        return torch.as_tensor(np.array(scores)), torch.as_tensor(np.stack(maps))

    bank = int(model.anomaly_scorer.detection_features.shape[0])
    return {**stats, "bank": bank, **inference_stats(predict, data["test"], options["repeats"])}


# -- parent ------------------------------------------------------------------------------------
def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("category", help="MVTec-layout folder (train/good, test/*, ground_truth)")
    add_common_arguments(parser, layers=["blocks.2", "blocks.4"], timeout=3 * 3600)
    parser.add_argument("--coreset", type=float, default=0.1, help="coreset ratio")
    parser.add_argument("--num-neighbors", type=int, default=9)
    parser.add_argument("--official-checkout", help="patchcore-inspection checkout (its src/)")
    parser.add_argument(
        "--official-python", help="interpreter for the official code (default: anomalib's)"
    )
    parser.add_argument(
        "--memory-scaling",
        action="store_true",
        help="hamacho only: fit on --scaling-sizes images (the train set cycled, shifted, "
        "flipped and noised) and print peak RSS per fit; anomalib's coreset would take days",
    )
    parser.add_argument("--scaling-sizes", type=int, nargs="+", default=[200, 2000])
    parser.add_argument(
        "--cli",
        action="store_true",
        help="add a row for `hamacho train` + `hamacho test` run as a user runs them (the "
        "category's own images and hamacho's loader; ms/image as metrics.json reports it)",
    )
    parser.add_argument(
        "--anomalib-coreset",
        choices=("greedy", "random"),
        default="greedy",
        help="random: anomalib's bank is a seeded random subset of the same size (its k-center "
        "greedy takes ~20 min on bottle here); for timing its inference only: that row's "
        "accuracy is not anomalib's",
    )
    return parser.parse_args(argv)


def run_cli(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """`hamacho train` then `hamacho test --no-maps` in fresh processes, as a user runs them:
    fit s, ms/image and AUROCs as train.json and metrics.json report them."""
    from accuracy import hamacho

    run = work / "cli-run"
    model = [
        f"model.backbone={args.backbone}",
        f"model.layers=[{', '.join(args.layers)}]",
        f"model.weights={args.weights}",
        f"model.coreset_ratio={args.coreset}",
        f"data.image_size={args.image_size}",
        f"data.crop_size={args.crop_size or 'null'}",
    ]
    flags = [a for item in (*model, *args.overrides) for a in ("--set", item)]
    data = ["--data", args.category, "--output", str(run)]
    hamacho("train", "--model", "patchcore", *data, *flags, threads=args.threads)
    hamacho("test", "--run", str(run), "--no-maps", threads=args.threads)
    train = json.loads((run / "train.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    return {
        "tool": "hamacho CLI (train + test)",
        "fit_s": train["fit_seconds"],
        "ms_b32": metrics["inference_ms_per_image"],
        "peak_mb": max(train["peak_rss_mb"], metrics["peak_rss_mb"]),
        "bank": train["memory_bank_rows"],
        "image_auroc": metrics["image_auroc"],
        "pixel_auroc": metrics["pixel_auroc"],
    }


def _compare(args: argparse.Namespace, options: dict[str, Any], work: Path, data: dict) -> list:
    rows = [run_cli(args, work)] if args.cli else []
    runs = tool_runs(args.variant, args.anomalib_python, args.skip_anomalib)
    official_python = args.official_python or args.anomalib_python
    if args.official_checkout and official_python:
        runs.append(("official", official_python, "official", []))
    for i, (label, python, tool, extra) in enumerate(runs):
        print(f"running {label} ...", file=sys.stderr, flush=True)
        opts = {**options, "tool": tool, "overrides": args.overrides + extra}
        opts["official_checkout"] = args.official_checkout
        opts["anomalib_coreset"] = args.anomalib_coreset
        if tool == "anomalib" and args.anomalib_coreset == "random":
            label = "anomalib (random bank)"
        out = run_tool(python, __file__, opts, work, f"{tool}-{i}", args.timeout)
        if label == "anomalib (random bank)":
            out["fit_s"] = None  # not anomalib's fit: its coreset was skipped
        rows.append(add_aurocs({"tool": label, **out}, data))
    return rows


def _scaling(args: argparse.Namespace, options: dict[str, Any], work: Path) -> None:
    rows = []
    for n in args.scaling_sizes:
        print(f"fitting hamacho on {n} images ...", file=sys.stderr, flush=True)
        opts = {**options, "tool": "hamacho", "n_train": n, "fit_only": True}
        rows.append(run_tool(sys.executable, __file__, opts, work, f"hamacho-{n}", args.timeout))
    print(
        f"\nPatchCore fit memory: {args.backbone} {'+'.join(args.layers)}, weights "
        f"{options['weights_label']}, {args.crop_size or args.image_size} px, coreset "
        f"{args.coreset}, {args.threads or torch.get_num_threads()} threads; hamacho overrides: "
        f"{' '.join(args.overrides) or 'none'}\n"
    )
    print_table(rows, SCALING_COLUMNS)


def main(argv: list[str]) -> None:
    """Prepare data once, run each tool in its own process, print one table."""
    if argv[:1] == ["--worker"]:
        runners = {"hamacho": run_hamacho, "anomalib": run_anomalib, "official": run_official}
        worker_main(argv[1:], runners)
        return
    args = _parse(argv)
    from _common import load_category, save_backbone

    with tempfile.TemporaryDirectory(prefix="hamacho-bench-") as tmp:
        work = Path(tmp)
        weights_file = work / "backbone.pt"
        backbone = save_backbone(args.backbone, args.weights, weights_file)
        data = load_category(
            args.category,
            backbone["mean"],
            backbone["std"],
            args.image_size,
            args.crop_size or None,
        )
        torch.save(data, work / "data.pt")
        options = {
            **common_options(args, work, weights_file),
            "coreset": args.coreset,
            "num_neighbors": args.num_neighbors,
            "weights_label": backbone["weights"],
        }
        if args.memory_scaling:
            _scaling(args, options, work)
            return
        rows = _compare(args, options, work, data)
    crop = f"centre crop {args.crop_size}" if args.crop_size else "no crop"
    print(
        f"\nPatchCore on {args.category}: {len(data['train'])} train / {len(data['test'])} test, "
        f"resize {args.image_size} + {crop}, {args.backbone} {'+'.join(args.layers)}, "
        f"coreset {args.coreset}, weights {backbone['weights']}, "
        f"{args.threads or torch.get_num_threads()} threads; "
        f"hamacho overrides: {' '.join(args.overrides) or 'none'}\n"
    )
    print_table(rows, COLUMNS)
    peers = [r for r in rows if r["tool"].startswith(("anomalib", "official"))]
    for a in peers:
        print()
        for h in (r for r in rows if r not in peers):
            print(f"{h['tool']} vs {a['tool']}: " + ", ".join(_ratios(h, a)))


def _ratios(h: dict[str, Any], a: dict[str, Any]) -> list[str]:
    """How many times faster (fit, batch 1, batch 32) and how much memory h takes against a.

    The CLI row's one ms/image (hamacho test's batches) is set against the peer's batch 32."""
    out = [] if a["fit_s"] is None else [f"fit {a['fit_s'] / h['fit_s']:.1f}x faster"]
    if h.get("ms_b1") is not None:
        out.append(f"inference {a['ms_b1'] / h['ms_b1']:.1f}x (batch 1)")
    out.append(f"{a['ms_b32'] / h['ms_b32']:.1f}x (batch 32) throughput")
    return [*out, f"peak RSS {h['peak_mb'] / a['peak_mb']:.2f}x"]


if __name__ == "__main__":
    main(sys.argv[1:])
