"""Leave-one-out threshold cost of a trained PatchCore run vs one scoring pass.

Embeds the first ``--images`` training images of the run's dataset once, then times, over
``--repeats`` runs: the run's own search (one scoring pass, k=1), the leave-one-out search
(other images' rows pruned by PCA lower bounds), and the plain exact masked search it falls
back to. Prints a table (median and spread in seconds) and the fraction of queries the bounds
did not settle. Usage: python benchmarks/loo_threshold.py RUN_DIR [--images 64]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from _common import timed
from hamacho_patchcore import loo

from hamacho import engine
from hamacho.components import data
from hamacho.runtime import batch_loader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--exact", action="store_true", help="also time the exact masked search")
    args = parser.parse_args()
    run = engine.load_run(args.run_dir)
    net: Any = run.model  # a PatchCore run: its bank, bank_source, embedder and search
    cfg = run.config
    samples = data.find_samples(run.metadata["dataset"], "train", skip_bad=cfg.data.skip_bad)
    norm = run.metadata["normalization"]
    loader = batch_loader(samples[: args.images], cfg, norm["mean"], norm["std"])
    rows = []
    with torch.inference_mode():
        start = time.perf_counter()
        emb = torch.cat([net.embedder(b["image"])[0] for b in loader])  # (n, P, D)
        rows.append(("embed (backbone)", [time.perf_counter() - start]))
        n, p, d = emb.shape
        queries = emb.reshape(n * p, d)
        owner = torch.arange(n, dtype=torch.int32).repeat_interleave(p)
        times, _ = timed(lambda: net.search.search(queries, k=1), args.repeats)
        rows.append(("scoring search (k=1)", times))
        times, other = timed(
            lambda: loo.OtherImageSearch(
                net.bank, net.bank_source, cfg.model.search_candidates_dim
            ),
            args.repeats,
        )
        rows.append(("loo setup (once per pass)", times))
        times, (dist, _) = timed(lambda: other.nearest(queries, owner), args.repeats)
        rows.append(("loo search", times))
        if args.exact:
            times, (ref, _) = timed(
                lambda: loo.masked_nearest(other.full, other.full_sq, other.source, queries, owner),
                1,
            )
            rows.append(("exact masked search", times))
            print(f"max |loo - exact| = {float((dist - ref).abs().max()):.3g}")
    print(f"{n} images x {p} patches of {d} dims; bank {tuple(net.bank.shape)}")
    print(f"loo queries the bounds did not settle: {other.last_uncertain / len(queries):.2%}")
    print(f"{'step':<28}{'median s':>10}{'min s':>9}{'max s':>9}")
    for name, times in rows:
        med = statistics.median(times)
        print(f"{name:<28}{med:>10.2f}{min(times):>9.2f}{max(times):>9.2f}")


if __name__ == "__main__":
    main()
