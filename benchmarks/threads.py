"""ms/image of ``hamacho.load(run).predict`` by thread setting: where a shared CPU loses time.

    python benchmarks/threads.py --run RUN --images DIR [--count 8] [--repeats 3] [--busy 0]

Each row is a fresh process (OMP_WAIT_POLICY is read when torch loads) scoring the same
``--count`` images (the first of DIR's ``*/*.png``, sorted, e.g. a dataset's test split) at
batch 1 and 8, from the main thread or from one worker thread, with torch's default thread
count or 1, and OpenMP's default (spinning) wait or OMP_WAIT_POLICY=PASSIVE. ``--busy N`` runs
N pure-Python busy loops beside it (ended after the table). Cells: median ms/image over
--repeats passes after a warm-up, with min-max; "scores" is the largest relative difference of
the row's scores from the first row's. The 1-minute load average is printed with each row.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from _common import print_table

COLUMNS = (
    ("where", "thread", ""),
    ("threads", "torch threads", ""),
    ("wait", "OMP_WAIT_POLICY", ""),
    ("b1", "ms/img b1 (median, min-max)", ""),
    ("b8", "ms/img b8 (median, min-max)", ""),
    ("scores", "max rel. d score", ".1e"),
    ("load", "load1", ".2f"),
)


def measure(run: str, files: list[str], repeats: int, where: str, threads: int) -> dict:
    """One configuration, in this process: {"b1": [ms...], "b8": [ms...], "scores": [...]}."""
    import torch

    import hamacho
    from hamacho.api import as_uint8

    if threads:
        torch.set_num_threads(threads)
    detector = hamacho.load(run)
    images = [as_uint8(f) for f in files]
    out: dict = {}

    def body() -> None:
        out["threads"] = torch.get_num_threads()
        detector.predict(images[:1], batch_size=1)  # warm-up
        for batch in (1, 8):
            times = []
            for _ in range(max(1, repeats)):
                start = time.perf_counter()
                results = detector.predict(images, batch_size=batch)
                times.append(1000 * (time.perf_counter() - start) / len(images))
            out[f"b{batch}"] = times
        out["scores"] = [r.score for r in results]

    if where == "main":
        body()
    else:
        worker = threading.Thread(target=body)
        worker.start()
        worker.join()
    return out


def cell(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a trained run directory")
    parser.add_argument("--images", required=True, help="a folder of */*.png images")
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--busy", type=int, default=0, help="busy-loop processes beside it")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    files = [str(p) for p in sorted(Path(args.images).glob("*/*.png"))[: args.count]]
    if args.child:
        where, threads = args.child.split(",")
        print(json.dumps(measure(args.run, files, args.repeats, where, int(threads))))
        return
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    rows, first = [], None
    try:
        for where in ("main", "worker"):
            for threads, wait in ((0, None), (1, None), (0, "PASSIVE")):
                env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
                if wait:
                    env["OMP_WAIT_POLICY"] = wait
                command = [sys.executable, __file__, "--run", args.run, "--images", args.images]
                command += ["--count", str(args.count), "--repeats", str(args.repeats)]
                command += ["--child", f"{where},{threads}"]
                done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
                out = json.loads(done.stdout.strip().splitlines()[-1])
                first = first or out["scores"]
                diff = max(
                    abs(a - b) / max(abs(b), 1e-12)
                    for a, b in zip(out["scores"], first, strict=True)
                )
                row = {"where": where, "threads": out["threads"], "wait": wait or "(default)"}
                row |= {"b1": cell(out["b1"]), "b8": cell(out["b8"]), "scores": diff}
                rows.append({**row, "load": os.getloadavg()[0]})
                print(f"done {where} {row['threads']} {row['wait']}", file=sys.stderr, flush=True)
    finally:
        for process in busy:
            process.kill()
            process.wait()
    print(f"\n{args.count} images, {args.repeats} repeats, {args.busy} busy loop(s) beside it\n")
    print_table(rows, COLUMNS)


if __name__ == "__main__":
    main()
