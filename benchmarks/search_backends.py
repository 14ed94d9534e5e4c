"""Time every nearest-neighbour backend on a PatchCore-sized query batch and bank.

    python benchmarks/search_backends.py [--bank 17000] [--queries 784] [--dim 1024] \\
        [--backends torch faiss_flat]
    python benchmarks/search_backends.py --real ../shared/datasets/screw [--set KEY=VALUE]

Prints a markdown table: build time, ms per query batch (wall median/min and CPU time over all
threads, which matters on a shared machine), recall@1 against exact search. ``--real DIR`` fits
PatchCore (defaults; lite0 offline) on DIR's train/good and compares exact float32 search with
the search pruned by PCA lower bounds (bfloat16 and float32) on its real bank and test patches
(recall@1, NN distance error, AUROCs).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

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


def real_features(root: str, overrides: list[str]) -> tuple[Any, torch.Tensor, dict[str, Any]]:
    """PatchCore fitted on ``root``'s train/good; its test embeddings (M, P, D) and labels."""
    from hamacho.components import data
    from hamacho.engine import build_config, build_model
    from hamacho.plugins import get_registry

    entry = get_registry().get("patchcore")
    cfg = build_config(entry.cls, overrides=["model.search_candidates_dim=0", *overrides])
    net = build_model(entry, cfg, echo=print)
    mean, std = net.normalization()
    train = data.ImageDataset(data.find_samples(Path(root), "train"), cfg.data, mean, std)
    t0 = time.perf_counter()
    net.fit(data.make_loader(train, cfg.data.batch_size))
    print(f"fit {len(train)} images in {time.perf_counter() - t0:.0f} s")
    test = data.ImageDataset(data.find_samples(Path(root), "test"), cfg.data, mean, std)
    embs, labels, masks = [], [], []
    for batch in data.make_loader(test, cfg.data.batch_size):
        embs.append(net.embedder(batch["image"])[0].half())  # fp16: 1024-d x 784 per image
        labels.append(torch.as_tensor(batch["label"]))
        masks.append(batch["mask"][:, 0] > 0.5)
    info = {"labels": torch.cat(labels), "masks": torch.cat(masks), "size": masks[0].shape[-2:]}
    return net, torch.cat(embs), info


def compare_real(args: argparse.Namespace) -> None:
    """Exact float32 search vs the search pruned by PCA lower bounds on a real PatchCore bank."""
    from hamacho.components import metrics

    net, emb, info = real_features(args.real, args.set)
    bank = net.bank
    m, p, d = emb.shape
    queries = emb.reshape(m * p, d)
    print(f"bank {tuple(bank.shape)}, {m} test images x {p} patches, dims {d}")
    rows = []
    results = {}
    for name, opts in (
        ("exact torch", {}),
        *(
            (f"bounds pca {c} {t}", {"candidates_dim": c, "bound_dtype": t})
            for c, t in args.candidates
        ),
    ):
        nn = NearestNeighbourSearch("torch", **opts)
        t0 = time.perf_counter()
        nn.fit(bank)
        build = time.perf_counter() - t0
        uncertain, times, dist, idx = 0, [], [], []
        for start in range(0, m, 8):  # 8 images (6,272 queries) per call
            q = queries[start * p : (start + 8) * p].float()
            t0 = time.perf_counter()
            d_, i_ = nn.search(q, k=1)
            times.append(time.perf_counter() - t0)
            uncertain += nn.last_uncertain
            dist.append(d_[:, 0])
            idx.append(i_[:, 0])
        results[name] = (torch.cat(dist), torch.cat(idx))
        patch = results[name][0].reshape(m, p)
        grid = net.grid
        maps = torch.cat(
            [
                net.anomaly_map(patch[s : s + 16].reshape(-1, *grid), info["size"])
                for s in range(0, m, 16)
            ]
        )
        image = metrics.image_auroc(info["labels"], patch.amax(1))
        pixel = metrics.pixel_auroc(info["masks"], maps)
        ms = 1e3 * sum(times) / m
        rows.append((name, build, ms, uncertain / (m * p), image, pixel))
    ref_d, ref_i = results["exact torch"]
    print(
        "| search | build s | ms/image | uncertified | recall@1 | NN distance rel. error "
        "mean / 99.9 % / max | image AUROC | pixel AUROC |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, build, ms, unc, image, pixel in rows:
        d_, i_ = results[name]
        recall = (i_ == ref_i).float().mean().item()
        rel = ((d_ - ref_d).abs() / ref_d.clamp_min(1e-12)).double()
        tail = float(rel.sort().values[int(0.999 * (len(rel) - 1))])
        err = f"{rel.mean():.1e} / {tail:.1e} / {rel.max():.1e}"
        print(
            f"| {name} | {build:.2f} | {ms:.1f} | {unc:.4f} | {recall:.5f} | {err} | "
            f"{image:.4f} | {pixel:.4f} |"
        )


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
    parser.add_argument("--real", metavar="DIR", help="real PatchCore features of this category")
    parser.add_argument("--set", nargs="*", default=[], help="PatchCore overrides for --real")
    parser.add_argument(
        "--candidates",
        nargs="*",
        type=lambda v: (int(v.split(":")[0]), v.split(":")[1]),
        default=[(512, "bfloat16"), (512, "float32"), (384, "bfloat16")],
        help="bounded-search settings for --real, as DIM:DTYPE (e.g. 512:bfloat16 384:float32)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.real:
        compare_real(args)
        return

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
