"""Peak memory of ``hamacho test`` against the number of test images, with and without maps.

Test sets of N images are made from one MVTec-layout category: its test images and their masks
cycled, each round flipped and/or shifted (the mask with its image) so no two files are alike,
in a temporary folder deleted afterwards; ``--n 0`` is the category itself. Each ``hamacho
test`` runs in a fresh process (``--python``, default this interpreter; PYTHONPATH picks the
hamacho) under ``/usr/bin/time -v`` on a copy of the run, so the given run is left as it was.
Printed per test: the maximum resident set (time -v), metrics.json's ``peak_rss_mb``, wall
seconds and the metrics, which must not depend on whether maps were written (``--save DIR``
keeps every metrics.json, to compare two versions of hamacho digit by digit).

    python benchmarks/test_memory.py --run RUN --data DATASETS/magnetic_tile --n 0 2000 10000
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_test_set(category: Path, n: int, out: Path) -> Path:
    """An MVTec-layout test split of ``n`` images cycled from ``category``'s, masks alike."""
    from hamacho.components import data

    sources = data.find_samples(category, "test")
    for i in range(n):
        sample = sources[i % len(sources)]
        variant = i // len(sources)
        shift = (variant // 4) % 256  # one more pixel each round of four flips

        def vary(pixels: np.ndarray, variant: int = variant, shift: int = shift) -> np.ndarray:
            if variant & 1:
                pixels = pixels[:, ::-1]
            if variant & 2:
                pixels = pixels[::-1]
            return np.ascontiguousarray(np.roll(pixels, (shift, 2 * shift), axis=(0, 1)))

        name = f"{i:06d}"
        image = out / "test" / sample.defect / f"{name}.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(vary(np.asarray(Image.open(sample.path).convert("RGB")))).save(image)
        if sample.mask is not None:
            mask = out / "ground_truth" / sample.defect / f"{name}_mask.png"
            mask.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(vary(np.asarray(Image.open(sample.mask).convert("L")))).save(mask)
    return out


def measure(python: str, run: Path, dataset: Path, maps: bool) -> dict:
    """One ``hamacho test`` under /usr/bin/time -v: its peak RSS, seconds and metrics."""
    command = ["/usr/bin/time", "-v", python, "-m", "hamacho", "test", "--run", str(run)]
    command += ["--data", str(dataset)] + ([] if maps else ["--no-maps"])
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"hamacho test failed ({done.returncode}):\n{done.stderr[-2000:]}")
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    if found is None:
        raise SystemExit("no 'Maximum resident set size' in /usr/bin/time -v's output")
    result = json.loads((run / "metrics.json").read_text())
    return {"max_rss_mb": int(found.group(1)) / 1024, "seconds": seconds, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, type=Path, help="A trained run folder.")
    parser.add_argument("--data", required=True, type=Path, help="An MVTec-layout category.")
    parser.add_argument("--n", type=int, nargs="+", default=[0, 2000, 10000])
    parser.add_argument("--maps", choices=["both", "on", "off"], default="both")
    parser.add_argument("--python", default=sys.executable, help="The interpreter to measure.")
    parser.add_argument("--save", type=Path, help="Keep each test's metrics.json in this folder.")
    args = parser.parse_args()
    settings = {"both": [True, False], "on": [True], "off": [False]}[args.maps]

    rows = []
    with tempfile.TemporaryDirectory(prefix="test-memory-") as tmp:
        run = Path(tmp) / "run"
        shutil.copytree(args.run, run)
        for n in args.n:
            dataset = args.data if n == 0 else make_test_set(args.data, n, Path(tmp) / f"n{n}")
            for maps in settings:
                row = measure(args.python, run, dataset, maps)
                images = sum(row["images"].values())
                rows.append((images, maps, row))
                if args.save:
                    args.save.mkdir(parents=True, exist_ok=True)
                    name = f"metrics-{images}-maps-{'on' if maps else 'off'}.json"
                    shutil.copy(run / "metrics.json", args.save / name)
                print(
                    f"{images} images, maps {'on' if maps else 'off'}: {row['max_rss_mb']:.0f} MB"
                )
            if n:
                shutil.rmtree(dataset)

    print(
        "\n| test images | maps | max RSS MB (time -v) | peak_rss_mb | wall s | ms/image "
        "| image AUROC | pixel AUROC | AUPRO |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for images, maps, r in rows:
        print(
            f"| {images} | {'yes' if maps else 'no'} | {r['max_rss_mb']:.0f} | "
            f"{r['peak_rss_mb']:.0f} | {r['seconds']:.0f} | {r['inference_ms_per_image']} | "
            f"{r['image_auroc']} | {r['pixel_auroc']} | {r['aupro']} |"
        )


if __name__ == "__main__":
    main()
