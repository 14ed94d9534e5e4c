"""Time every nearest-neighbour backend on a PatchCore-sized query batch and bank.

    python benchmarks/search_backends.py [--bank 17000] [--queries 784] [--dim 1024] \\
        [--backends torch faiss_flat]

Prints a markdown table: build time, ms per query batch (wall median/min and CPU time over all
threads, which matters on a shared machine), recall@1 against exact search.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hamacho.components.search import NearestNeighbourSearch
from hamacho.errors import ConfigError

BACKENDS = ("torch", "faiss_flat", "faiss_hnsw", "faiss_ivfpq")


def make_data(n: int, m: int, d: int, kind: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bank (n, d) and queries (m, d) from one distribution.

    'lowrank' mimics CNN patch features: non-negative, on a low-dimensional (16) manifold.
    'gaussian' is the worst case for approximate indexes (no structure at all).
    """
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(n, d, generator=g), torch.randn(m, d, generator=g)
    mixing = torch.randn(16, d, generator=g) / 4

    def draw(k: int) -> torch.Tensor:
        latent = torch.randn(k, 16, generator=g)
        return (latent @ mixing).relu_() + 0.05 * torch.randn(k, d, generator=g).abs_()

    return draw(n), draw(m)


def time_backend(name, bank, queries, k, repeats, device):
    try:
        nn = NearestNeighbourSearch(name, device=device)
    except ConfigError as exc:
        return None, str(exc)
    t0 = time.perf_counter()
    nn.fit(bank)
    build = time.perf_counter() - t0
    nn.search(queries, k=k)  # warm-up
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        _, idx = nn.search(queries, k=k)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    ms = [statistics.median(times) * 1e3, min(times) * 1e3, statistics.median(cpu) * 1e3]
    return (build, *ms, idx[:, 0]), None


def main() -> None:
    """Run the benchmark and print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bank", type=int, default=17000, help="bank size N")
    parser.add_argument("--queries", type=int, default=784, help="queries per batch (28*28)")
    parser.add_argument("--dim", type=int, default=1024, help="feature dimension D")
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--data", choices=("lowrank", "gaussian"), default="lowrank")
    parser.add_argument("--device", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch (and faiss) threads")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    bank, queries = make_data(args.bank, args.queries, args.dim, args.data, args.seed)
    exact = torch.cdist(queries.double(), bank.double()).argmin(1)
    print(
        f"bank {args.bank} x {args.dim}, {args.queries} queries, k={args.k}, data={args.data}, "
        f"threads={torch.get_num_threads()}, auto -> {NearestNeighbourSearch('auto').backend}\n"
    )
    print("| backend | build s | ms/batch (median) | ms/batch (min) | CPU ms/batch | recall@1 |")
    print("|---|---|---|---|---|---|")
    for name in args.backends:
        result, error = time_backend(name, bank, queries, args.k, args.repeats, args.device)
        if result is None:
            print(f"| {name} | - | - | - | - | unavailable: {error} |")
            continue
        build, median, best, cpu, top1 = result
        recall = (top1 == exact).float().mean().item()
        print(f"| {name} | {build:.2f} | {median:.1f} | {best:.1f} | {cpu:.1f} | {recall:.3f} |")


if __name__ == "__main__":
    main()
