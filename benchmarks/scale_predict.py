"""Local ``hamacho predict`` vs ``--executor ray`` with 1 and 2 workers, and a 2-cell grid.

N images are made from one category (its images cycled, each flipped and/or shifted, so no two
files are alike), written to a temporary folder that is deleted afterwards, then scored by
    local:   engine.predict (what `hamacho predict` runs), one process (torch's threads, then 1)
    ray xW:  RayExecutor.predict (what `hamacho predict --executor ray --workers W` runs)
on Ray started here (127.0.0.1). It prints images/s and the Ray overhead per image (Ray's wall
time minus local's with one torch thread, per image: a Ray worker has one CPU; it includes the
actors' start), then times a benchmark grid of two cells (seeds 0 and 1) run locally (one after
another) and as Ray tasks (``--cpus-per-cell`` 1).

    python benchmarks/scale_predict.py --data DATASETS/bottle --n 20000 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

FAST = ["model.weights=none", "data.batch_size=16"]


def make_images(category: Path, n: int, size: int, out: Path) -> list[Path]:
    """``n`` PNGs from the category's images: each source cycled through flips and shifts."""
    sources = sorted(p for p in category.rglob("*.png") if "ground_truth" not in p.parts)
    bases = [np.asarray(Image.open(p).convert("RGB").resize((size, size))) for p in sources]
    paths = []
    for i in range(n):
        image = bases[i % len(bases)]
        variant = i // len(bases)
        if variant & 1:
            image = image[:, ::-1]
        if variant & 2:
            image = image[::-1]
        shift = (variant // 4) % size  # then shifted by one more pixel each round
        image = np.roll(image, (shift, 2 * shift), axis=(0, 1))
        path = out / f"{i // 1000:03d}" / f"{i:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(image)).save(path)
        paths.append(path)
    return paths


def timed(repeats: int, job: Callable[[], int]) -> tuple[list[float], int]:
    """Wall seconds of each repeat, and the row count of the last."""
    seconds, count = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        count = job()
        seconds.append(time.perf_counter() - start)
    return seconds, count


def spread(values: list[float]) -> str:
    mean = statistics.mean(values)
    return f"{mean:.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{mean:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path, help="An MVTec-layout category.")
    parser.add_argument("--run", type=Path, help="A trained run (default: train --model here).")
    parser.add_argument("--model", default="padim")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--n", type=int, default=20_000, help="Images to score.")
    parser.add_argument("--size", type=int, default=256, help="Side of the generated images.")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--no-grid", action="store_true", help="Skip the 2-cell grid timing.")
    args = parser.parse_args()

    from hamacho import benchmark as bench
    from hamacho import engine
    from hamacho.executors.ray import RayExecutor

    overrides = FAST + args.overrides
    with tempfile.TemporaryDirectory(prefix="scale-predict-") as tmp:
        root = Path(tmp)
        run = args.run or engine.train(args.model, args.data, None, overrides, root / "run")
        start = time.perf_counter()
        make_images(args.data, args.n, args.size, root / "images")
        print(f"made {args.n} images of {args.size} px in {time.perf_counter() - start:.0f} s")
        inputs = [str(root / "images")]
        results = []

        def local() -> int:
            return sum(1 for _ in engine.predict(run, inputs, batch_size=args.batch_size))

        results.append(("local", *timed(args.repeats, local)))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in one Ray worker (Ray sets OMP_NUM_THREADS=1 there)
        results.append(("local, 1 thread", *timed(args.repeats, local)))
        torch.set_num_threads(threads)
        start = time.perf_counter()
        with RayExecutor() as ray_executor:
            print(f"ray.init here: {time.perf_counter() - start:.1f} s (not in the table)")
            for workers in args.workers:
                ray_executor.workers = workers

                def on_ray() -> int:
                    rows = ray_executor.predict(str(run), inputs, batch_size=args.batch_size)
                    return sum(1 for _ in rows)

                results.append((f"ray x{workers}", *timed(args.repeats, on_ray)))

            base = statistics.mean(results[1][1]) / args.n  # one thread, as one Ray worker
            print(f"\n{args.n} images, {args.size} px, {args.model}, batch {args.batch_size}")
            print("| executor | wall s | images/s | ms/image | Ray overhead ms/image |")
            print("|---|---|---|---|---|")
            for name, seconds, count in results:
                assert count == args.n, f"{name} returned {count} rows for {args.n} images"
                rates = [args.n / s for s in seconds]
                per = statistics.mean(seconds) / args.n
                extra = f"{(per - base) * 1e3:+.2f}" if name.startswith("ray") else "–"
                print(
                    f"| {name} | {spread(seconds)} | {spread(rates)} | {per * 1e3:.2f} | {extra} |"
                )

            if not args.no_grid:
                walls = {}
                for name, execute in (("local", None), ("ray", ray_executor.run_cells)):
                    grid = bench.make_grid(
                        args.model, None, [args.data], root / f"grid-{name}", "0,1", overrides
                    )
                    start = time.perf_counter()
                    rows = bench.run(grid, execute=execute)
                    walls[name] = time.perf_counter() - start
                    assert all(r["status"] == "ok" for r in rows), rows
                print("\n| 2-cell grid (seeds 0, 1) | wall s |\n|---|---|")
                for name, wall in walls.items():
                    print(f"| {name} | {wall:.1f} |")


if __name__ == "__main__":
    main()
