"""The update and merge flows: load runs, call the model's hooks, write a new run atomically."""

from __future__ import annotations

import datetime as _dt
import time
from pathlib import Path
from typing import Any

import torch

import hamacho
from hamacho import engine, rundir
from hamacho.components import data
from hamacho.errors import UsageError
from hamacho.grow import outliers
from hamacho.grow.settings import check_alike, history, images_seen, require
from hamacho.runtime import Batches, Run, batch_loader

_FIX = "Choose a writable --output folder"
Echo = engine.Echo


def _quiet(_: str) -> None:
    pass


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def update(
    run_dir: str | Path,
    data_dir: str | Path,
    output: str | Path | None = None,
    progress: bool = False,
    echo: Echo = _quiet,
) -> Path:
    """Add ``data_dir``'s good training images to the run; save to ``output`` (or in place)."""
    shown = Path(output) if output else Path(run_dir)
    target = rundir.check_output(shown)
    root = Path(data_dir)
    with rundir.locked(target, "the run", _FIX):  # in place: no test or train meanwhile
        run = engine.load_run(run_dir)
        require(run.model, "update")
        cfg = run.config
        samples = data.find_samples(root, "train", skip_bad=cfg.data.skip_bad)
        loader = batch_loader(samples, cfg, run.mean, run.std)
        echo(f"updating {run.metadata['model']} with {len(samples)} images from {root}")
        start = time.perf_counter()
        run.model.update(Batches(loader, run.tiler, cfg.data.output_size, progress, "update"))
        seconds = time.perf_counter() - start
        new = None
        if engine.uses_leave_one_out(type(run.model), cfg):
            new = engine.loo_scores(run.model, loader, cfg, run.tiler, progress)
        recorded = run.metadata.get("good_scores") or []
        pooled = recorded + (engine.good_scores(new) or [])
        source = f"{len(recorded)} recorded good-image scores + {len(pooled) - len(recorded)} new"
        entry = engine.history_entry("update", root, len(samples), _now())
        meta = _metadata(run, history(run) + [entry], pooled, source)
        if not pooled:
            echo("note: no good-image scores recorded or new: the run keeps its old threshold")
        seen = images_seen(run)
        summary = {"action": "update", "update_seconds": round(seconds, 3), "dataset": str(root)}
        summary.update(new_images=len(samples), train_images=seen and seen + len(samples))
        _save(run, meta, target, {**summary, "threshold": meta["threshold"], **meta["info"]})
    echo(f"updated in {seconds:.1f} s; run saved to {shown}")
    return shown


def merge(
    run_dirs: list[str | Path],
    output: str | Path,
    reject_outliers: bool = False,
    echo: Echo = _quiet,
) -> Path:
    """Merge runs trained elsewhere on the same settings into one run at ``output``."""
    names = [str(r) for r in run_dirs]
    if len(names) < 2:
        raise UsageError("merge needs two or more runs: hamacho merge RUN1 RUN2 ... -o OUT")
    if reject_outliers and len(names) < 3:
        raise UsageError("--reject-outliers needs three or more runs (a majority to compare with)")
    target = rundir.check_output(output)
    runs = [engine.load_run(r) for r in run_dirs]
    check_alike(runs, names)
    require(runs[0].model, "merge")
    sites: list[dict[str, Any]] = [
        {"run": name, "images": images_seen(run), "info": run.metadata.get("info", {})}
        for name, run in zip(names, runs, strict=True)
    ]
    report: dict[str, Any] = {"outliers": None}
    used = list(range(len(runs)))
    if reject_outliers:
        require(runs[0].model, "outlier_score")
        scores = []
        for i, run in enumerate(runs):
            scores.append(run.model.outlier_score([r.model for r in runs if r is not run]))
            sites[i]["outlier_score"] = round(scores[-1], 6)
        test = outliers.flag(scores)
        rejected = test.pop("rejected")
        used = [i for i in used if not rejected[i]]
        report["outliers"] = test
        for i in range(len(runs)):
            if rejected[i]:
                echo(f"rejected {names[i]}: outlier score {scores[i]:.4g} > {test['limit']:.4g}")
    for i, site in enumerate(sites):
        site["used"] = i in used
    base = runs[used[0]]
    start = time.perf_counter()
    base.model.merge([runs[i].model for i in used[1:]])
    seconds = time.perf_counter() - start
    with rundir.locked(target, "the run", _FIX):
        pooled: list[float] = []
        lines: list[dict[str, Any]] = []
        for i in used:
            pooled += runs[i].metadata.get("good_scores") or []
            lines += [{**e, "site": names[i]} for e in history(runs[i])]
        merged = {"action": "merge", "sites": [names[i] for i in used], "when": _now()}
        meta = _metadata(base, [*lines, merged], pooled, f"{len(used)} sites' good-image scores")
        if not pooled:  # one site's own threshold would pass for the merged model's
            meta["threshold"] = None
            echo("note: no site recorded good-image scores, so the merged run has no threshold")
        report.update(sites=sites, merge_seconds=round(seconds, 3), threshold=meta["threshold"])
        counts = [sites[i]["images"] for i in used]
        images = None if None in counts else sum(counts)
        summary = {"action": "merge", "merge_seconds": round(seconds, 3), "train_images": images}
        _save(
            base, meta, target, {**summary, "threshold": meta["threshold"], **meta["info"]}, report
        )
    echo(f"merged {len(used)} of {len(runs)} runs in {seconds:.1f} s; run saved to {output}")
    return Path(output)


def _metadata(run: Run, lines: list[dict[str, Any]], scores: list[float], source: str) -> dict:
    """The run's metadata with the model's new facts, history and pooled threshold."""
    meta = dict(run.metadata)
    meta.update(info=run.model.info(), history=lines, hamacho_version=hamacho.__version__)
    meta.update(updated=_now(), good_scores=scores or None)
    if scores:
        values = torch.tensor(scores)
        meta["threshold"] = engine.threshold_from_scores(values, run.config, source)
    return meta


def _save(run: Run, meta: dict, target: Path, summary: dict, report: dict | None = None) -> None:
    """Write the run (artifact, config.yaml, train.json, merge.json) in one commit."""
    more = {"merge": report} if report is not None else {}
    engine.save_run(
        target, run.model, meta, run.config, {"model": meta["model"], **summary}, **more
    )
