"""Resident memory of a loaded run: what a process holds after ``load_run`` and one predict.

Each repeat runs in a fresh interpreter (``sys.executable``, or ``--python``) so nothing is
cached between them. Reports RSS (Linux /proc/self/status, after glibc's malloc_trim) after
importing hamacho, after loading the run and after one predict of a batch, and the bytes of the
distinct tensor storages the model holds outside nn.Parameters (for PatchCore: the memory bank
and the search's index).

    python benchmarks/load_memory.py --run results/patchcore/bottle --repeats 3
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import statistics
import subprocess
import sys
import types
from pathlib import Path
from typing import Any


def _rss_mb() -> float:
    """Current RSS, after handing freed heap back to the OS (glibc), so it counts what is held."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def _tensor_mb(root: Any) -> float:
    """MiB of the distinct tensor storages reachable from ``root``, parameters excluded."""
    import torch

    seen: set[int] = set()
    storages: dict[int, int] = {}
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (torch.nn.Parameter, types.ModuleType, type)):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__"):
            stack.extend(vars(obj).values())
    return sum(storages.values()) / 2**20


def _measure(run: str) -> dict[str, float]:
    import torch

    from hamacho import engine

    out = {"import": _rss_mb()}
    loaded = engine.load_run(run)
    out["load"] = _rss_mb()
    out["tensors"] = _tensor_mb(loaded.model)
    size = loaded.config.data.output_size
    with torch.no_grad():
        loaded.model.predict(torch.zeros(8, 3, size, size))
    out["predict"] = _rss_mb()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a run directory (hamacho train --output)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--python", default=sys.executable, help="interpreter to measure with")
    parser.add_argument("--once", action="store_true", help=argparse.SUPPRESS)  # one child
    args = parser.parse_args()
    if args.once:
        print(json.dumps(_measure(args.run)))
        return
    rows = []
    for _ in range(args.repeats):
        cmd = [args.python, __file__, "--once", "--run", args.run]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"run {args.run}, {args.repeats} fresh processes; MiB, median (min-max)")
    print(f"{'stage':<34}{'MiB':>10}  spread")
    labels = {
        "import": "RSS after import",
        "load": "RSS after load_run",
        "predict": "RSS after one predict (8 images)",
        "tensors": "model tensors (no parameters)",
    }
    for key, label in labels.items():
        values = [r[key] for r in rows]
        spread = f"{min(values):.1f}-{max(values):.1f}"
        print(f"{label:<34}{statistics.median(values):>10.1f}  {spread}")
    load = [r["load"] - r["import"] for r in rows]
    print(f"{'load_run adds':<34}{statistics.median(load):>10.1f}  {min(load):.1f}-{max(load):.1f}")


if __name__ == "__main__":
    main()
