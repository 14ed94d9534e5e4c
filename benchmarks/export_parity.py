"""Exported models against hamacho's own torch scoring, on every test image of trained runs.

    python benchmarks/export_parity.py RUN [RUN ...] [--runtimes onnx openvino] [--data DIR]

Each run is exported (ONNX, and OpenVINO IR converted from it) into a temp folder, never into
the run. Every test image of the run's dataset (or of --data) is decoded once by hamacho's
reader into (H, W, 3) uint8 RGB; torch scores it through the run (``predict --runtime torch``'s
path), the runtimes score the same uint8 arrays with the exported file and nothing else.
Columns: the largest |score difference| (absolute, and relative to the torch scores' range), the
largest |map difference| relative to the torch maps' range, and how many is_anomalous verdicts
(at the run's threshold) agree. The issue's limits are 1e-4 (scores) and 1e-3 (maps).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from _common import print_table

COLUMNS = (
    ("run", "run", ""),
    ("runtime", "runtime", ""),
    ("images", "images", "d"),
    ("score_abs", "max |d score|", ".2e"),
    ("score_rel", "/ score range", ".2e"),
    ("map_rel", "max |d map| / map range", ".2e"),
    ("agree", "decisions agree", ""),
    ("ok", "within limits", ""),
)


def score_all(backend: Any, images: list[Any], chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores (N,) and maps (N, c, c) of ``images`` in chunks of ``chunk``."""
    parts = [backend.score(images[i : i + chunk]) for i in range(0, len(images), chunk)]
    return np.concatenate([s for s, _ in parts]), np.concatenate([m for _, m in parts])


def compare(run_dir: Path, runtimes: list[str], data_dir: str | None, chunk: int) -> list[dict]:
    """One row per runtime for ``run_dir``."""
    from hamacho.api import as_uint8
    from hamacho.components.datasets import find_samples
    from hamacho.export import export_run
    from hamacho.export.runtimes import OnnxBackend, OpenVinoBackend, TorchBackend

    reference = TorchBackend(run_dir)
    root = Path(data_dir or reference.run.metadata["dataset"])
    images = [as_uint8(sample.path) for sample in find_samples(root, "test")]
    want_s, want_m = score_all(reference, images, chunk)
    limit = reference.threshold
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for runtime in runtimes:
            if runtime == "onnx":
                backend: Any = OnnxBackend(export_run(run_dir, "onnx", Path(tmp) / "m.onnx"))
            else:
                backend = OpenVinoBackend(export_run(run_dir, "openvino", Path(tmp) / "m.xml"))
            got_s, got_m = score_all(backend, images, chunk)
            d_score = float(np.abs(got_s - want_s).max())
            map_rel = float(np.abs(got_m - want_m).max() / np.ptp(want_m))
            same = int(((got_s >= limit) == (want_s >= limit)).sum()) if limit is not None else None
            rel = d_score / float(np.ptp(want_s))
            rows.append(
                {
                    "run": f"{reference.model} {root.name}",
                    "runtime": runtime,
                    "images": len(images),
                    "score_abs": d_score,
                    "score_rel": rel,
                    "map_rel": map_rel,
                    "agree": "-" if same is None else f"{same}/{len(images)}",
                    "ok": "yes"
                    if rel <= 1e-4 and map_rel <= 1e-3 and same in (None, len(images))
                    else "NO",
                }
            )
            print(f"{run_dir} {runtime}: done", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="trained run directories")
    parser.add_argument("--runtimes", nargs="+", default=["onnx", "openvino"])
    parser.add_argument("--data", default=None, help="test images (default: each run's dataset)")
    parser.add_argument("--chunk", type=int, default=8, help="images per scoring call")
    args = parser.parse_args()
    rows = [row for run in args.runs for row in compare(run, args.runtimes, args.data, args.chunk)]
    print_table(rows, COLUMNS)


if __name__ == "__main__":
    main()
