"""Where a trained PatchCore run spends its inference time, stage by stage, at two batch sizes.

    python benchmarks/patchcore_stages.py RUN [--batches 1 32] [--images 32] [--repeats 3]

Stages, each timed on its own over the same test images of the run's dataset: decode (file ->
uint8 RGB), preprocess (resize, crop, normalise), backbone, embedding, search (nearest bank
row per patch) and map (upsample + blur). Prints ms per image for each batch size: the median
of --repeats passes, with the min-max spread.
"""

from __future__ import annotations

import argparse
import functools
import statistics
from typing import Any

import torch
from _common import timed

from hamacho import engine
from hamacho.components import data
from hamacho.preprocess import Preprocess

warm = functools.partial(timed, warmup=True)  # a first untimed call: caches, lazy set-up


def _stages(net: Any, pre: Preprocess, paths: list, repeats: int) -> dict[str, list[float]]:
    """Seconds per pass of each stage over ``paths`` as one batch."""
    out: dict[str, list[float]] = {}
    out["decode"], uint8 = warm(
        lambda: [data.pil_to_uint8(data.read_image(p)) for p in paths], repeats
    )
    out["preprocess"], x = warm(lambda: torch.cat([pre(u[None]) for u in uint8]), repeats)
    step = net.embedder.chunk or len(paths)  # images per backbone call, as predict() runs it
    chunks = [x[s : s + step] for s in range(0, len(paths), step)]
    out["backbone"], feats = warm(
        lambda: [list(net.aggregator(c).values()) for c in chunks], repeats
    )
    out["embedding"], parts = warm(lambda: [net.embedder.embed_features(f) for f in feats], repeats)
    emb, grid = torch.cat([e for e, _ in parts]), parts[0][1]
    queries = emb.reshape(-1, emb.shape[-1])
    out["search"], (dist, _) = warm(lambda: net.search.search(queries, k=1), repeats)
    patch = dist.reshape(len(paths), *grid)
    out["map"], _ = warm(lambda: net.anomaly_map(patch, tuple(x.shape[-2:])), repeats)
    out["predict() (backbone..map)"], _ = warm(lambda: net.predict(x), repeats)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    run = engine.load_run(args.run)
    net: Any = run.model  # a PatchCore run: embedder, search, anomaly_map
    cfg = run.config
    paths = [s.path for s in data.find_samples(run.metadata["dataset"], "test")][: args.images]
    pre = Preprocess(cfg.data.image_size, cfg.data.crop_size, run.mean, run.std)
    table: dict[str, dict[int, list[float]]] = {}
    with torch.inference_mode():
        for batch in args.batches:
            n = min(batch, len(paths))
            for stage, times in _stages(net, pre, paths[:n], args.repeats).items():
                table.setdefault(stage, {})[batch] = [1e3 * t / n for t in times]
    print(f"{args.run}: bank {tuple(net.bank.shape)}, {torch.get_num_threads()} threads")
    head = " | ".join(f"ms/image b{b} (min-max)" for b in args.batches)
    print(f"| stage | {head} |\n|---|" + "---|" * len(args.batches))
    for stage, cells in table.items():
        text = " | ".join(
            f"{statistics.median(t):.1f} ({min(t):.1f}-{max(t):.1f})" for t in cells.values()
        )
        print(f"| {stage} | {text} |")


if __name__ == "__main__":
    main()
