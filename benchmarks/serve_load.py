"""Load-test ``hamacho serve`` on loopback against the Python API called directly in a loop.

    python benchmarks/serve_load.py --run RUN --images DIR [--clients 1 4 16] [--requests 48] \\
        [--repeats 3] [--max-batch 16] [--max-wait-ms 5] [--python PYTHON]

Starts the server on 127.0.0.1 (a free port), then for each client count sends a bounded number
of requests (one image each, multipart, keep-alive connections) and prints a markdown table:
requests/s, p50/p95/p99 latency, errors and the mean micro-batch size (from /metrics). The
direct row is what the server does for one request, minus HTTP: the same image bytes decoded
as the server decodes them, then ``Detector.predict([image])``, one at a time in a worker
thread of this process, with torch's OpenMP set up as ``hamacho serve`` sets it. A last run
sends every ``--corrupt-every``-th request truncated: those must get 400, the others 200.
Medians over ``--repeats``, with the [min-max] spread of requests/s.
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from hamacho.serve.cli import quiet_openmp

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between order statistics."""
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def start_server(python: str, run: str, args: list[str]) -> tuple[subprocess.Popen, str]:
    """``python -m hamacho serve`` on a free loopback port, once /healthz answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [python, "-m", "hamacho", "-q", "serve", "--run", f"m={run}", "--port", str(port)]
    proc = subprocess.Popen([*cmd, *args], stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not become healthy in 600 s")


def batch_totals(url: str) -> tuple[float, float]:
    """(images scored, model calls) so far, from the server's hamacho_batch_size histogram."""
    images = calls = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        if family.name == "hamacho_batch_size":
            for sample in family.samples:
                if sample.name.endswith("_sum"):
                    images += sample.value
                elif sample.name.endswith("_count"):
                    calls += sample.value
    return images, calls


def load(url: str, bodies: list[tuple[str, bytes, bool]], clients: int, n: int) -> dict[str, Any]:
    """``n`` requests from ``clients`` threads; bodies cycle (name, bytes, is_good)."""
    counter, lock = itertools.count(), threading.Lock()
    records: list[tuple[float, int, bool]] = []  # (seconds, status, was good)

    def client() -> None:
        with httpx.Client(timeout=300) as session:
            while True:
                with lock:
                    i = next(counter)
                if i >= n:
                    return
                name, body, good = bodies[i % len(bodies)]
                start = time.perf_counter()
                try:
                    status = session.post(
                        f"{url}/v1/models/m/predict", files={"file": (name, body)}
                    ).status_code
                except httpx.TransportError:
                    status = 0
                with lock:
                    records.append((time.perf_counter() - start, status, good))

    before = batch_totals(url)
    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    after = batch_totals(url)
    calls = after[1] - before[1]
    return {
        "rps": n / wall,
        "latencies": [r[0] for r in records],
        "errors": sum(1 for _, s, good in records if good and s != 200),
        "bad_refused": sum(1 for _, s, good in records if not good and s == 400),
        "bad": sum(1 for *_, good in records if not good),
        "batch": (after[0] - before[0]) / calls if calls else float("nan"),
    }


def direct(run: str, bodies: list[tuple[str, bytes, bool]], n: int) -> dict[str, Any]:
    """The Python API in a loop on the request bodies, one image per call, in a worker thread."""
    import hamacho
    from hamacho.components import data
    from hamacho.serve.inputs import Upload, decode

    detector = hamacho.load(run)
    max_pixels = int(detector.backend.config["data"].get("max_pixels", data.MAX_PIXELS))
    latencies: list[float] = []
    timing: dict[str, float] = {}

    def one(i: int) -> None:
        name, body, _ = bodies[i % len(bodies)]
        image = decode(Upload(name, body), max_pixels)
        detector.predict([image], batch_size=1)  # as the batcher calls it for one request

    def loop() -> None:
        one(0)  # warm-up
        start = time.perf_counter()
        for i in range(n):
            t0 = time.perf_counter()
            one(i)
            latencies.append(time.perf_counter() - t0)
        timing["wall"] = time.perf_counter() - start

    # a worker thread, as the server's batcher calls the API: on an oversubscribed machine
    # torch's intra-op team on the main thread was measured 10-30x slower than in a thread
    worker = threading.Thread(target=loop)
    worker.start()
    worker.join()
    return {"rps": n / timing["wall"], "latencies": latencies, "errors": 0, "batch": 1.0}


def _medians(reps: list[dict[str, Any]]) -> tuple[float, float]:
    """(median requests/s, median p50 ms) over the repeats."""
    p50 = statistics.median(percentile(r["latencies"], 50) * 1000 for r in reps)
    return statistics.median(r["rps"] for r in reps), p50


def row(label: str, clients: int | str, reps: list[dict[str, Any]], n: int) -> str:
    """One markdown row: medians over the repeats, requests/s with its [min-max] spread."""
    rps = [r["rps"] for r in reps]
    lat = {
        q: statistics.median(percentile(r["latencies"], q) * 1000 for r in reps)
        for q in (50, 95, 99)
    }
    errors = sum(r["errors"] for r in reps)
    batch = statistics.median(r["batch"] for r in reps)
    return (
        f"| {label} | {clients} | {n} x {len(reps)} | {statistics.median(rps):.2f} "
        f"[{min(rps):.2f}-{max(rps):.2f}] | {lat[50]:.0f} | {lat[95]:.0f} | {lat[99]:.0f} "
        f"| {errors} | {batch:.2f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="Run directory to serve.")
    parser.add_argument("--images", required=True, help="Folder of images (searched recursively).")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=48, help="Requests per measurement.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--corrupt-every", type=int, default=10)
    parser.add_argument("--python", default=sys.executable, help="Interpreter for the server.")
    args = parser.parse_args()
    paths = sorted(p for p in Path(args.images).rglob("*") if p.suffix.lower() in EXTENSIONS)
    if not paths:
        raise SystemExit(f"no images under {args.images}")
    n = args.requests
    policy = os.environ.get("OMP_WAIT_POLICY", "unset: hamacho serve sets PASSIVE")
    print(f"# {len(paths)} images from {args.images}; load average {os.getloadavg()}; "
          f"OMP_WAIT_POLICY {policy}")  # fmt: skip
    print("| mode | clients | requests | req/s median [min-max] | p50 ms | p95 ms | p99 ms "
          "| errors | mean batch |\n|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    good = [(p.name, p.read_bytes(), True) for p in paths]
    quiet_openmp()  # before torch loads here: the direct calls run as the server's do
    reps = [direct(args.run, good, n) for _ in range(args.repeats)]
    print(row("direct API", 1, reps, n), flush=True)
    medians = {"direct": _medians(reps)}
    server_args = ["--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)]
    proc, url = start_server(args.python, args.run, server_args)
    try:
        load(url, good, 1, 4)  # warm-up
        for clients in args.clients:
            reps = [load(url, good, clients, n) for _ in range(args.repeats)]
            print(row("HTTP", clients, reps, n), flush=True)
            medians[clients] = _medians(reps)
        every = args.corrupt_every
        mixed = [
            (name, body[: len(body) // 2], False) if i % every == every - 1 else (name, body, True)
            for i, (name, body, _) in enumerate(good * (1 + n // len(good)))
        ]
        clients = max(args.clients)
        reps = [load(url, mixed, clients, n) for _ in range(args.repeats)]
        print(row(f"HTTP, 1 in {every} corrupt", clients, reps, n))
        refused = sum(r["bad_refused"] for r in reps)
        first = min(args.clients)
        direct_p50, (one_rps, one_p50) = medians["direct"][1], medians[first]
        overhead = 100 * (one_p50 / direct_p50 - 1)
        print(
            f"\nHTTP p50 at {first} client(s) vs direct: {one_p50:.0f} vs {direct_p50:.0f} ms "
            f"({overhead:+.1f} %); requests/s at {clients} vs {first} client(s): "
            f"{medians[clients][0] / one_rps:.2f}x"
        )
        print(f"corrupt requests answered 400: {refused} of {sum(r['bad'] for r in reps)}; "
              f"load average after {os.getloadavg()}")  # fmt: skip
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
        print(f"server exit code after SIGTERM: {code}")


if __name__ == "__main__":
    main()
