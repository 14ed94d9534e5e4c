"""ms/image of hamacho's runtimes (torch, onnxruntime, OpenVINO) next to anomalib 2.7's exports.

    python benchmarks/runtimes.py --patchcore-run RUN --padim-run RUN \\
        [--anomalib-python VENV/bin/python] [--images 32] [--repeats 3]

Every row scores the same decoded test images (the first --images of the runs' dataset, read by
hamacho's reader as (H, W, 3) uint8) from the original pixels: hamacho's exported graphs take
the uint8 image; anomalib's take it as float in [0, 1] (the conversion is timed), both resize
and crop inside. Batch 1 = one image per call, batch N = all --images (default 32) in one
call. Each cell is the median over --repeats timed passes (after a warm-up), with min-max.

anomalib (its own venv) gets the same backbone weights (resolved by hamacho, loaded into its
timm extractor), the same layers, the same normalisation and the same train images; its
``Patchcore``/``Padim`` modules are built with post-processing off (raw scores), fitted
(PaDiM: its Gaussian; PatchCore: its embeddings with a seeded random bank of the hamacho run's
bank size instead of its coreset, which takes ~20 min here and does not change the timing),
and exported with its own ``to_onnx`` (``to_openvino`` is ov.convert_model of that file, done
here). The "agrees" column compares each export with its own eager module on the same input,
one image per call, the way hamacho's parity is measured.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import (
    default_anomalib_python,
    load_category,
    print_table,
    run_tool,
    save_backbone,
    worker_main,
)

COLUMNS = (
    ("model", "model", ""),
    ("tool", "tool / runtime", ""),
    ("b1", "ms/img b1 (median, min-max)", ""),
    ("b32", "ms/img batch --images (median, min-max)", ""),
    ("agrees", "export vs own torch: max |d score| / range", ""),
)


def time_calls(score: Callable[[list], Any], images: list, batch: int, repeats: int) -> list[float]:
    """ms/image of each of ``repeats`` passes over ``images`` in calls of ``batch``."""
    score(images[:batch])  # warm-up (and first-call compilation)
    out = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        for i in range(0, len(images), batch):
            score(images[i : i + batch])
        out.append(1000 * (time.perf_counter() - start) / len(images))
    return out


def cell(values: list[float]) -> str:
    """'median (min-max)' of a list of ms/image figures."""
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def timings(score: Callable[[list], Any], images: list, repeats: int) -> dict[str, str]:
    """Batch-1 and batch-N cells of ``score``."""
    return {
        "b1": cell(time_calls(score, images, 1, repeats)),
        "b32": cell(time_calls(score, images, len(images), repeats)),
    }


# -- hamacho (this venv) -----------------------------------------------------------------------
def hamacho_rows(run: Path, images: list, repeats: int, tmp: Path) -> list[dict[str, Any]]:
    """torch, onnxruntime and OpenVINO rows for one trained run."""
    from hamacho.export import export_run
    from hamacho.export.runtimes import OnnxBackend, OpenVinoBackend, TorchBackend

    torch_backend = TorchBackend(run)
    want = torch_backend.score(images)[0]
    backends = {
        "hamacho torch": torch_backend,
        "hamacho onnxruntime": OnnxBackend(export_run(run, "onnx", tmp / f"{run.name}.onnx")),
        "hamacho OpenVINO": OpenVinoBackend(export_run(run, "openvino", tmp / f"{run.name}.xml")),
    }
    rows = []
    for label, backend in backends.items():
        print(f"timing {label} on {run} ...", file=sys.stderr, flush=True)
        got = backend.score(images)[0]
        diff = float(np.abs(got - want).max() / np.ptp(want))
        agrees = "-" if backend is torch_backend else f"{diff:.1e}"
        rows.append({"tool": label, **timings(backend.score, images, repeats), "agrees": agrees})
    return rows


# -- anomalib worker (anomalib venv) -----------------------------------------------------------
def run_anomalib(options: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """Fit anomalib's module, time it eagerly, export it with its own ``to_onnx``."""
    import os
    import warnings

    os.environ["TQDM_DISABLE"] = "1"
    warnings.filterwarnings("ignore")
    from anomalib.models import Padim, Patchcore
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms import v2

    size, crop = options["image_size"], options["crop_size"]
    transform = v2.Compose(
        [
            v2.Resize((size, size), antialias=True),
            v2.CenterCrop((crop, crop)),
            v2.Normalize(mean=options["mean"], std=options["std"]),
        ]
    )
    off = {"post_processor": False, "evaluator": False, "visualizer": False}
    common = {"backbone": options["backbone"], "layers": options["layers"], "pre_trained": False}
    if options["model"] == "patchcore":
        module = Patchcore(**common, pre_processor=PreProcessor(transform), **off)
    else:
        n = options["n_features"]
        module = Padim(**common, n_features=n, pre_processor=PreProcessor(transform), **off)
    net = module.model
    extractor = net.feature_extractor.feature_extractor
    state = torch.load(options["weights_file"], map_location="cpu", weights_only=True)
    missing = [key for key in extractor.state_dict() if key not in state]
    if missing:  # the layers past the last one used may be absent from its truncated net
        raise RuntimeError(f"weights do not fit anomalib's extractor: missing {missing[:3]}")
    extractor.load_state_dict({key: state[key] for key in extractor.state_dict()})
    net.train()
    with torch.no_grad():
        for start in range(0, len(data["train"]), 32):
            net(data["train"][start : start + 32])  # hamacho's preprocessed train tensors
    if options["model"] == "patchcore":
        bank = torch.vstack(net.embedding_store)
        net.embedding_store.clear()
        gen = torch.Generator().manual_seed(0)
        net.memory_bank = bank[torch.randperm(len(bank), generator=gen)[: options["bank"]]]
    else:
        net.fit()
    module.eval()

    def eager(batch: list) -> np.ndarray:
        with torch.no_grad():
            out = module(torch.cat([to_float(i) for i in batch]))
        return out.pred_score.reshape(-1).numpy()

    row = {"tool": "anomalib torch", **timings(eager, data["images"], options["repeats"])}
    path = module.to_onnx(Path(options["tmp"]) / f"anomalib-{options['model']}")
    want = np.concatenate([eager([i]) for i in data["images"]])
    return {"row": row, "onnx": str(path), "scores": torch.from_numpy(want)}


def to_float(image: torch.Tensor) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float in [0, 1], the input anomalib's export takes."""
    return image.permute(2, 0, 1)[None].float() / 255


def anomalib_export_rows(out: dict[str, Any], images: list, repeats: int) -> list[dict]:
    """Time anomalib's exported ONNX file (and its OpenVINO conversion) in this venv's runtimes.

    anomalib's ``to_openvino`` is ``ov.convert_model`` of its ``to_onnx`` file (no compression):
    the same conversion is done here, so both tools run on the same runtime versions.
    """
    import onnxruntime as ort
    import openvino as ov

    session = ort.InferenceSession(out["onnx"], providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    score_index = [o.name for o in session.get_outputs()].index("pred_score")
    compiled = ov.Core().compile_model(
        ov.convert_model(out["onnx"]), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
    )

    def onnx_score(batch: list) -> np.ndarray:
        x = torch.cat([to_float(i) for i in batch]).numpy()
        return session.run(None, {name: x})[score_index].reshape(-1)

    def ov_score(batch: list) -> np.ndarray:
        x = torch.cat([to_float(i) for i in batch]).numpy()
        return compiled([x])[compiled.output("pred_score")].reshape(-1)

    want = out["scores"].numpy()
    rows = [{**out["row"], "agrees": "-"}]
    for label, score in (("anomalib onnxruntime", onnx_score), ("anomalib OpenVINO", ov_score)):
        print(f"timing {label} ...", file=sys.stderr, flush=True)
        try:
            got = np.concatenate([score([i]) for i in images])
            diff = float(np.abs(got - want).max() / np.ptp(want))
            rows.append({"tool": label, **timings(score, images, repeats), "agrees": f"{diff:.1e}"})
        except Exception as exc:  # e.g. an export whose batch size was fixed at trace time
            shape = session.get_inputs()[0].shape
            why = str(exc).strip().splitlines()[0][:80]
            rows.append({"tool": label, "b1": f"fails (input {shape}): {why}", "agrees": "-"})
    return rows


def exporter_site(tmp: Path) -> Path:
    """A folder linking this venv's ONNX exporter packages for anomalib's worker.

    anomalib 2.7's ``to_onnx`` needs torch.onnx's dynamo exporter (onnxscript, onnx), which its
    venv may lack; both venvs run the same torch, so the worker borrows these via PYTHONPATH.
    """
    import google.protobuf
    import ml_dtypes
    import onnx
    import onnx_ir
    import onnxscript

    site = tmp / "exporter-site"
    site.mkdir(exist_ok=True)
    for module in (onnx, onnxscript, onnx_ir, ml_dtypes):
        (site / module.__name__).symlink_to(Path(module.__file__).parent)
    (site / "google").symlink_to(Path(google.protobuf.__file__).parent.parent)
    return site


# -- parent ------------------------------------------------------------------------------------
def main(argv: list[str]) -> None:
    """Time hamacho's runtimes and (with an anomalib interpreter) anomalib's exports."""
    if argv[:1] == ["--worker"]:
        worker_main(argv[1:], {"anomalib": run_anomalib})
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patchcore-run", type=Path, required=True)
    parser.add_argument("--padim-run", type=Path, required=True)
    parser.add_argument("--images", type=int, default=32, help="test images timed")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--anomalib-python", default=default_anomalib_python())
    parser.add_argument("--timeout", type=float, default=3600)
    args = parser.parse_args(argv)

    from hamacho import engine
    from hamacho.api import as_uint8
    from hamacho.components.datasets import find_samples

    rows = []
    with tempfile.TemporaryDirectory(prefix="hamacho-runtimes-") as name:
        tmp = Path(name)
        site = exporter_site(tmp) if args.anomalib_python else tmp
        for label, run_dir in (("patchcore", args.patchcore_run), ("padim", args.padim_run)):
            run = engine.load_run(run_dir)
            root = Path(run.metadata["dataset"])
            samples = find_samples(root, "test")[: args.images]
            images = [as_uint8(s.path) for s in samples]
            rows += [
                {"model": label, **r} for r in hamacho_rows(run_dir, images, args.repeats, tmp)
            ]
            print_table(rows, COLUMNS)  # so far, in case a later row fails
            if not args.anomalib_python:
                continue
            print(f"running anomalib {label} ...", file=sys.stderr, flush=True)
            cfg = run.config
            weights_file = tmp / "backbone.pt"
            backbone = save_backbone(cfg.model.backbone, cfg.model.weights, weights_file)
            data = load_category(
                root, backbone["mean"], backbone["std"], cfg.data.image_size, cfg.data.crop_size
            )
            torch.save({"train": data["train"], "images": images}, tmp / "data.pt")
            options = {
                "tool": "anomalib",
                "model": label,
                "data": str(tmp / "data.pt"),
                "weights_file": str(weights_file),
                "backbone": cfg.model.backbone,
                "layers": list(cfg.model.layers),
                # PaDiM: as many features as the run models; PatchCore: its bank's size
                "n_features": int(getattr(run.model, "mean", torch.empty(0, 1)).shape[-1]),
                "bank": int(getattr(run.model, "bank", torch.empty(0)).shape[0]),
                "image_size": cfg.data.image_size,
                "crop_size": cfg.data.crop_size or cfg.data.image_size,
                "mean": backbone["mean"],
                "std": backbone["std"],
                "repeats": args.repeats,
                "tmp": str(tmp),
            }
            saved = os.environ.get("PYTHONPATH")
            os.environ["PYTHONPATH"] = str(site)  # the worker sees no hamacho, only the exporter
            try:
                out = run_tool(args.anomalib_python, __file__, options, tmp, label, args.timeout)
            finally:
                os.environ.pop("PYTHONPATH")
                if saved is not None:
                    os.environ["PYTHONPATH"] = saved
            rows += [{"model": label, **r} for r in anomalib_export_rows(out, images, args.repeats)]
    print(
        f"\n{len(images)} test images from the original pixels, {torch.get_num_threads()} "
        f"threads, median of {args.repeats} passes (min-max); load average (1/5/15 min) at the "
        f"end {' '.join(f'{v:.1f}' for v in os.getloadavg())}\n"
    )
    print_table(rows, COLUMNS)


if __name__ == "__main__":
    main(sys.argv[1:])
