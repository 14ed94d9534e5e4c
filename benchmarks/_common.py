"""Helpers shared by the ``*_vs_anomalib.py`` benchmarks.

The parent process (hamacho's venv) turns a category folder into normalised tensors once and
saves them, with the backbone's weights, to a temp dir; each tool then runs in its own worker
process (anomalib's in its own venv) so its peak RSS is its own. Worker-side helpers here import
neither hamacho nor anomalib: the anomalib venv has no hamacho.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

_HEADS = ("fc.", "classifier.", "conv_head.", "bn2.", "head.")  # dropped by features_only nets


# -- parent side (hamacho venv) ----------------------------------------------------------------
def default_anomalib_python() -> str | None:
    """The anomalib venv's interpreter from $ANOMALIB_PYTHON, else None (no machine paths)."""
    return os.environ.get("ANOMALIB_PYTHON") or None


def load_category(
    root: str | Path,
    mean: Sequence[float],
    std: Sequence[float],
    image_size: int = 256,
    crop_size: int | None = 224,
) -> dict[str, torch.Tensor]:
    """An MVTec-layout folder as the tensors both tools get, preprocessed by hamacho's loader.

    Returns train (N, 3, S, S), test (M, 3, S, S) float32 normalised, labels (M,) int64 and
    masks (M, S, S) uint8.
    """
    from hamacho.components import data

    cfg = data.DataConfig(image_size=image_size, crop_size=crop_size, batch_size=32)
    out: dict[str, torch.Tensor] = {}
    for split in ("train", "test"):
        dataset = data.ImageDataset(data.find_samples(Path(root), split), cfg, mean, std)
        batches = list(data.make_loader(dataset, cfg.batch_size))
        out[split] = torch.cat([b["image"] for b in batches])
        if split == "test":
            out["labels"] = torch.cat([torch.as_tensor(b["label"]) for b in batches]).long()
            out["masks"] = torch.cat([b["mask"][:, 0] > 0.5 for b in batches]).to(torch.uint8)
    return out


def save_backbone(name: str, weights: str, path: str | Path) -> dict[str, Any]:
    """Resolve a backbone the way hamacho does and save its state dict for the other tool.

    Returns {"mean", "std", "weights"} (normalisation and weights identity).
    """
    from hamacho.components.backbones import load_backbone

    backbone = load_backbone(name, weights)
    torch.save(backbone.module.state_dict(), path)
    return {"mean": list(backbone.mean), "std": list(backbone.std), "weights": backbone.weights}


def run_worker(python: str, script: str | Path, args: Sequence[str], timeout: float) -> None:
    """Run ``python script args`` as a separate process; raise with its stderr tail on failure."""
    cmd = [python, str(script), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"worker failed ({' '.join(cmd)}):\n{tail}")


def tool_runs(
    variants: Sequence[str], anomalib_python: str | None, skip_anomalib: bool
) -> list[tuple[str, str, str, list[str]]]:
    """(label, python, tool, extra overrides) per row: hamacho, each --variant, then anomalib."""
    runs = [("hamacho", sys.executable, "hamacho", [])]
    for spec in variants:
        runs.append(
            (f"hamacho {spec}", sys.executable, "hamacho", [i for i in spec.split(",") if i])
        )
    if anomalib_python and not skip_anomalib:
        runs.append(("anomalib", anomalib_python, "anomalib", []))
    return runs


def add_common_arguments(parser: Any, layers: Sequence[str], timeout: float = 3600) -> None:
    """The options both side-by-side scripts take (data, backbone, timing, tools, rows)."""
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--layers", nargs="+", default=list(layers))
    parser.add_argument("--weights", default="imagenet", help="imagenet | none | weight file")
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
        "--variant",
        action="append",
        default=[],
        metavar="KEY=VALUE[,KEY=VALUE]",
        help="an extra hamacho row with these overrides on top of --set (repeatable)",
    )
    parser.add_argument(
        "--anomalib-python",
        default=default_anomalib_python(),
        help="interpreter of a venv with anomalib 2.7 (default: $ANOMALIB_PYTHON; none: skipped)",
    )
    parser.add_argument("--skip-anomalib", action="store_true")
    parser.add_argument("--timeout", type=float, default=timeout, help="seconds per tool run")


def common_options(args: Any, work: Path, weights_file: Path) -> dict[str, Any]:
    """The worker options every tool reads, from ``add_common_arguments``'s arguments."""
    return {
        "data": str(work / "data.pt"),
        "weights_file": str(weights_file),
        "backbone": args.backbone,
        "layers": args.layers,
        "weights": args.weights,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "threads": args.threads,
        "seed": args.seed,
        "overrides": args.overrides,
    }


def add_aurocs(out: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """Add image and pixel AUROC of a worker's scores and maps (hamacho's metrics) to ``out``."""
    from hamacho.components import metrics

    out["image_auroc"] = metrics.image_auroc(data["labels"], out["scores"])
    out["pixel_auroc"] = metrics.pixel_auroc(data["masks"], out["maps"])
    return out


def print_table(rows: list[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> None:
    """Print a markdown table; ``columns`` are (key, header, format spec) and None prints '-'."""
    header = [title for _, title, _ in columns]
    body = [
        [("-" if row.get(key) is None else format(row[key], spec)) for key, _, spec in columns]
        for row in rows
    ]
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row, cells in zip(rows, body, strict=True):
        aligned = [
            c.ljust(w) if isinstance(row.get(key), str) else c.rjust(w)
            for c, w, (key, _, _) in zip(cells, widths, columns, strict=True)
        ]
        print("| " + " | ".join(aligned) + " |")


# -- worker side (either venv; the hamacho_* helpers only in hamacho's) -------------------------
def load_tensors(path: str | Path) -> dict[str, Any]:
    """Read what ``save_tensors``/``torch.save`` wrote (tensors and plain values, no pickles)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def save_tensors(path: str | Path, values: dict[str, Any]) -> None:
    """Write tensors and plain values for ``load_tensors``."""
    torch.save(values, path)


def load_into_features_net(net: torch.nn.Module, path: str | Path) -> None:
    """Load a full-network state dict into a truncated (features_only) copy of that network."""
    result = net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), False)
    extra = [k for k in result.unexpected_keys if not k.startswith(_HEADS)]
    if result.missing_keys or extra:
        raise RuntimeError(
            f"weights {path} do not fit: missing {result.missing_keys[:3]}, unexpected {extra[:3]}"
        )


def rss_mb() -> float:
    """Current resident memory of this process in MiB."""
    return _proc_status("VmRSS") or peak_rss_mb()


def peak_rss_mb() -> float:
    """Peak resident memory since start (or since ``reset_peak_rss``) in MiB."""
    return _proc_status("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Restart the peak-RSS counter at the current RSS (Linux); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _proc_status(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def cycled_batches(images: torch.Tensor, size: int, total: int = 0) -> Iterator[torch.Tensor]:
    """Batches of ``images``; with ``total``, ``total`` images cycled, each pass shifted and
    flipped, and all noised (in place, so runs of any length allocate the same per batch)."""
    gen = torch.Generator().manual_seed(0)
    for start in range(0, total or len(images), size):
        idx = torch.arange(start, min(start + size, total or len(images)))
        batch = images[idx % len(images)]  # a copy
        for i, k in enumerate((idx // len(images)).tolist()):
            if k:  # pass k > 0: a shifted (and every other pass mirrored) copy
                shifted = torch.roll(batch[i], shifts=(k, -k), dims=(1, 2))
                batch[i] = shifted.flip(-1) if k % 2 else shifted
        if total:
            batch.add_(torch.randn(batch.shape, generator=gen), alpha=0.05)
        yield batch


def timed(fn: Callable[[], Any], repeats: int, warmup: bool = False) -> tuple[list[float], Any]:
    """Wall seconds of ``repeats`` calls of ``fn`` (after one untimed call if ``warmup``), and
    the last call's result."""
    if warmup:
        fn()
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return times, out


def measure_fit(fit: Callable[[], None]) -> dict[str, float]:
    """Run ``fit`` once: seconds, peak RSS during it (MiB) and how far above the start it rose."""
    before = rss_mb()
    exact = reset_peak_rss()
    start = time.perf_counter()
    fit()
    seconds = time.perf_counter() - start
    peak = peak_rss_mb()
    return {
        "fit_s": seconds,
        "peak_mb": peak,
        "fit_delta_mb": peak - before if exact else None,
    }


def measure_inference(
    predict: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    images: torch.Tensor,
    batch_size: int,
    repeats: int = 1,
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Best-of-``repeats`` ms per image over ``images`` in batches (after one warm-up batch).

    ``predict`` maps (B, 3, H, W) -> (scores (B,), maps (B, H, W)). Returns (ms/image, scores,
    maps) of the last pass.
    """
    predict(images[:batch_size])
    best = float("inf")
    for _ in range(max(1, repeats)):
        scores, maps = [], []
        start = time.perf_counter()
        for i in range(0, len(images), batch_size):
            s, m = predict(images[i : i + batch_size])
            scores.append(s)
            maps.append(m)
        best = min(best, time.perf_counter() - start)
    return 1000 * best / len(images), torch.cat(scores), torch.cat(maps)


def inference_stats(predict: Callable, test: torch.Tensor, repeats: int) -> dict[str, Any]:
    """ms/image at batch 1 and 32, plus the batch-32 scores and maps (for the metrics)."""
    ms_b1, _, _ = measure_inference(predict, test, 1, repeats)
    ms_b32, scores, maps = measure_inference(predict, test, 32, repeats)
    return {"ms_b1": ms_b1, "ms_b32": ms_b32, "scores": scores.float(), "maps": maps.float()}


def hamacho_model(model_cls: Any, options: dict[str, Any], model_cfg: dict[str, Any]) -> Any:
    """A hamacho model on the CPU: plugin defaults <- ``model_cfg`` <- the --set overrides."""
    from hamacho import config as config_mod
    from hamacho.engine import build_config, make_components

    cfg = build_config(model_cls)
    config_mod.apply(cfg, {"model": model_cfg, "run": {"device": "cpu"}})
    config_mod.apply(cfg, config_mod.parse_overrides(options["overrides"]))
    return model_cls(cfg.model, make_components(cfg))


def fit_hamacho(model: Any, options: dict[str, Any], data: dict[str, Any]) -> dict[str, float]:
    """``measure_fit`` of ``model.fit`` on the (cycled to ``n_train``) training images."""
    batches = cycled_batches(data["train"], options["batch_size"], options.get("n_train", 0))
    return measure_fit(lambda: model.fit({"image": b} for b in batches))


def hamacho_predict(model: Any) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``model.predict`` as the (scores, maps) function ``inference_stats`` times."""

    def predict(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = model.predict(x)
        return out.scores, out.maps

    return predict


def worker_main(argv: Sequence[str], runners: dict[str, Callable[..., dict[str, Any]]]) -> None:
    """Worker entry, ``argv`` = [options.json, out.pt]: ``runners[tool](options, data)`` saved
    to out.pt, the tool named by the options."""
    options = json.loads(Path(argv[0]).read_text())
    if options.get("threads"):
        torch.set_num_threads(int(options["threads"]))
    torch.manual_seed(options.get("seed", 0))
    data = load_tensors(options["data"])
    save_tensors(argv[1], runners[options["tool"]](options, data))


def run_tool(
    python: str,
    script: str | Path,
    options: dict[str, Any],
    workdir: Path,
    tag: str,
    timeout: float = 3600,
) -> dict[str, Any]:
    """Run ``python script --worker options.json out.pt`` (``script`` hands those two to
    ``worker_main``) and return what the worker saved."""
    opts, out = workdir / f"{tag}.json", workdir / f"{tag}.out.pt"
    opts.write_text(json.dumps(options))
    run_worker(python, script, ["--worker", str(opts), str(out)], timeout)
    return load_tensors(out)


if __name__ == "__main__":  # pragma: no cover - a library module
    sys.exit(f"{__file__} is a helper module; run one of the *_vs_anomalib.py scripts")
