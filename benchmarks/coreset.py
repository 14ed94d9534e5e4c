"""Time greedy k-center coreset selection (PatchCore's memory-bank subsampling).

    python benchmarks/coreset.py [--n 164000] [--dim 1536] [--ratio 0.1] [--anomalib-n 20000]

Each measurement runs in a fresh subprocess so its peak RSS is its own. If `anomalib` imports
(e.g. run this file with the anomalib venv's python), its KCenterGreedy runs on the same
features too. Only hamacho.components.sampling is imported, so any venv with torch works.
Prints a markdown table of measured numbers; nothing is extrapolated. CPU seconds are
listed because wall time on a shared machine depends on what else runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled


def make_features(n: int, d: int, kind: str, seed: int) -> torch.Tensor:
    """(n, d) float32 features, made in chunks so the only large allocation is the result."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n, d)
    mixing = torch.randn(16, d, generator=g) / 4
    for start in range(0, n, 16384):
        rows = out[start : start + 16384]
        if kind == "gaussian":
            rows.normal_(generator=g)
        else:  # non-negative, low-dimensional like CNN patch features
            torch.matmul(torch.randn(len(rows), 16, generator=g), mixing, out=rows).relu_()
            rows.add_(torch.randn(rows.shape, generator=g).abs_(), alpha=0.05)
    return out


def _rss_mb() -> tuple[float, float]:
    """(current, peak) resident set size of this process in MB."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024


def _coreset_sampler() -> type:
    try:
        from hamacho.components.sampling import CoresetSampler
    except ImportError:  # a venv without hamacho's dependencies (pluggy, ...), e.g. anomalib's
        # An empty package object skips hamacho/__init__.py; sampling.py needs only torch.
        package = types.ModuleType("hamacho")
        package.__path__ = [str(Path(__file__).resolve().parents[1] / "hamacho")]
        sys.modules["hamacho"] = package
        from hamacho.components.sampling import CoresetSampler
    return CoresetSampler


def worker(impl: str, args: argparse.Namespace) -> dict:
    """Run one implementation on freshly made features; return timings and memory."""
    features = make_features(args.n, args.dim, args.data, args.seed)
    base, _ = _rss_mb()
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    if impl == "hamacho":
        sampler = _coreset_sampler()(ratio=args.ratio, projection_dim=args.projection_dim, seed=0)
        projected = sampler.project(features)
        t1 = time.perf_counter()
        size = len(sampler.select(projected))
    else:
        from anomalib.models.components.sampling import KCenterGreedy

        torch.manual_seed(args.seed)  # its start point comes from the global generator
        t1 = t0  # anomalib projects inside sample_coreset()
        size = len(KCenterGreedy(embedding=features, sampling_ratio=args.ratio).sample_coreset())
    t2 = time.perf_counter()
    cpu = time.process_time() - cpu0
    _, peak = _rss_mb()
    return {
        "size": size,
        "project": t1 - t0,
        "total": t2 - t0,
        "cpu": cpu,
        "base": base,
        "peak": peak,
    }


def run(impl: str, n: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, "--n", str(n)]
    for key in ("dim", "ratio", "projection_dim", "data", "seed", "threads"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{impl} worker failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    """Run hamacho (and anomalib when importable) and print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=164000, help="feature rows (164000 ~ 209 images)")
    parser.add_argument("--dim", type=int, default=1536, help="feature dimension")
    parser.add_argument("--ratio", type=float, default=0.1, help="coreset fraction")
    parser.add_argument("--projection-dim", type=int, default=128)
    parser.add_argument("--data", choices=("lowrank", "gaussian"), default="lowrank")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument(
        "--anomalib-n", type=int, default=None, help="rows given to anomalib (default: --n)"
    )
    parser.add_argument("--worker", choices=("hamacho", "anomalib"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return

    jobs = [("hamacho", args.n)]
    if importlib.util.find_spec("anomalib") is not None:
        anomalib_n = min(args.n, args.anomalib_n or args.n)
        if anomalib_n != args.n:
            jobs.append(("hamacho", anomalib_n))
        jobs.append(("anomalib", anomalib_n))
    else:
        print("anomalib is not importable here: hamacho only\n")

    print(
        f"coreset {args.ratio:.0%} of N x {args.dim} ({args.data}), projection "
        f"{args.projection_dim}, torch {torch.__version__}, threads={torch.get_num_threads()}\n"
    )
    print(
        "| impl | N | coreset | project s | select s | total s | CPU s (all threads) "
        "| peak RSS MB | over input MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for impl, n in jobs:
        r = run(impl, n, args)
        select = r["total"] - r["project"]
        print(
            f"| {impl} | {n} | {r['size']} | {r['project']:.2f} | {select:.2f} | "
            f"{r['total']:.2f} | {r['cpu']:.1f} | {r['peak']:.0f} | {r['peak'] - r['base']:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
