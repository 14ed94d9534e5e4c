"""Run benchmark cells: each in its own Python process, resumable, one results row per cell.

One failure or out-of-memory kill leaves the rest running; every cell writes a normal run
directory, and a cell whose metrics.json exists for the same settings is not recomputed.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hamacho.benchmark.grid import Grid
from hamacho.benchmark.plan import Cell, plan
from hamacho.benchmark.results import COLUMNS, SCALARS, results_markdown
from hamacho.errors import HamachoError

Echo = Callable[[str], None]


def _cell_spec(cell: Cell, maps: bool) -> dict[str, Any]:
    return {
        "model": cell.model,
        "data": str(cell.dataset),
        "output": str(cell.directory),
        "overrides": cell.overrides,
        "maps": maps,
    }


def cell_main() -> None:
    """Child-process entry: train then test the cell whose cell.json is ``argv[1]``."""
    from hamacho import engine

    _die_with_parent()
    spec = json.loads(Path(sys.argv[1]).read_text())["spec"]
    try:
        engine.train(spec["model"], spec["data"], None, spec["overrides"], spec["output"])
        engine.test(spec["output"], spec["data"], write_maps=spec["maps"])
    except HamachoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


def _error_line(stderr: str, returncode: int) -> str:
    if returncode < 0:
        return f"killed by signal {-returncode} (out of memory?)"
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or [f"exit code {returncode}"])[-1].removeprefix("error: ")


def run_cell(cell: Cell, maps: bool = False, timeout: float | None = None) -> dict[str, Any]:
    """Run one cell in a child process unless it is already done; return its results row."""
    cell.directory.mkdir(parents=True, exist_ok=True)
    record_path = cell.directory / "cell.json"
    spec = _cell_spec(cell, maps)
    done = finished_row(cell, maps)
    if done is not None:
        return done
    for stale in ("metrics.json", "train.json"):
        (cell.directory / stale).unlink(missing_ok=True)
    record_path.write_text(json.dumps({"spec": spec, "status": "running"}, indent=2))
    code = "from hamacho.benchmark.runner import cell_main; cell_main()"
    start = time.perf_counter()
    try:
        argv = [sys.executable, "-c", code, str(record_path)]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        stderr = proc.stderr
        error = None if proc.returncode == 0 else _error_line(stderr, proc.returncode)
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        error = f"timed out after {timeout:g} s (raise --timeout)"
    (cell.directory / "log.txt").write_text(stderr)
    record = {
        "spec": spec,
        "status": "ok" if error is None else "failed",
        "error": error,
        "seconds": round(time.perf_counter() - start, 1),
    }
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return _row(cell, record, cached=False)


def finished_row(cell: Cell, maps: bool = False) -> dict[str, Any] | None:
    """The cached row of a cell finished before with the same settings, else None."""
    previous = _read_json(cell.directory / "cell.json")
    if (cell.directory / "metrics.json").exists() and previous.get("spec") == _cell_spec(
        cell, maps
    ):
        return _row(cell, previous, cached=True)
    return None


def failed_row(cell: Cell, error: str) -> dict[str, Any]:
    """The row of a cell that could not run at all (e.g. its Ray worker was lost every try)."""
    return _row(cell, {"status": "failed", "error": error}, cached=False)


def _die_with_parent() -> None:
    """In the cell's process: end with its parent, so a lost worker leaves no orphan behind
    (a retried cell would find the run locked by it)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before the line above
            sys.exit(1)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _row(cell: Cell, record: dict[str, Any], cached: bool) -> dict[str, Any]:
    metrics = _read_json(cell.directory / "metrics.json")
    trained = _read_json(cell.directory / "train.json")
    artifact = cell.directory / "model.safetensors"
    peaks = [v for v in (trained.get("peak_rss_mb"), metrics.get("peak_rss_mb")) if v]
    return {
        "model": cell.model,
        "backbone": cell.backbone.name if cell.backbone else cell.backbone_label,
        "layers": "+".join(cell.layers),
        "weights": (cell.backbone.weights if cell.backbone else None) or "",
        "dataset": cell.dataset_name,
        "seed": cell.seed,
        "status": "ok" if metrics and record.get("status") == "ok" else "failed",
        **{key: metrics.get(key) for key in SCALARS},
        "fit_seconds": trained.get("fit_seconds"),
        "peak_rss_mb": max(peaks) if peaks else None,
        "artifact_mb": round(artifact.stat().st_size / 2**20, 2) if artifact.exists() else None,
        "train_images": trained.get("train_images"),
        "test_images": sum(metrics.get("images", {}).values()) if metrics else None,
        "cell_seconds": record.get("seconds"),
        "cached": cached,
        "image_auroc_per_defect": json.dumps(metrics.get("image_auroc_per_defect") or {}),
        "error": record.get("error") or "",
        "run_dir": str(cell.directory),
    }


Execute = Callable[[list[Cell], bool, "float | None", Echo], Iterator[tuple[int, dict[str, Any]]]]


def describe(i: int, cells: list[Cell]) -> str:
    """``[2/4] MODEL resnet18@none widget seed 0``: cell ``i`` (from 0) for progress lines."""
    cell = cells[i]
    return (
        f"[{i + 1}/{len(cells)}] {cell.model} {cell.backbone_label} {cell.dataset_name} "
        f"seed {cell.seed}"
    )


def run(
    grid: Grid, echo: Echo = lambda _msg: None, execute: Execute | None = None
) -> list[dict[str, Any]]:
    """Run (or resume) every cell, then write results.csv, results.md and results.png.

    ``execute`` runs the cells and yields (index, row) as each ends; the default runs them one
    after another on this machine (hamacho.executors.local), hamacho.executors.ray on Ray.
    """
    if execute is None:
        from hamacho.executors.local import run_cells

        execute = run_cells
    cells = plan(grid)
    grid.output.mkdir(parents=True, exist_ok=True)
    rows: dict[int, dict[str, Any]] = {}
    for i, row in execute(cells, grid.maps, grid.timeout, echo):
        rows[i] = row
        what = describe(i, cells)
        if row["status"] == "ok":
            done = "done before" if row["cached"] else f"{row['cell_seconds']} s"
            echo(f"{what}: image AUROC {row['image_auroc']}, {done}")
        else:
            echo(f"{what}: FAILED: {row['error']}")
        # partial results survive an interrupted benchmark; rows stay in the plan's order
        write_results(grid.output, [rows[k] for k in sorted(rows)])
    return [rows[k] for k in sorted(rows)]


def write_results(output: Path, rows: list[dict[str, Any]]) -> None:
    """results.csv (every cell), results.md (tables) and results.png (accuracy vs latency)."""
    with (output / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: ("" if row[k] is None else row[k]) for k in COLUMNS} for row in rows)
    (output / "results.md").write_text(results_markdown(rows))
    from hamacho.benchmark.scatter import draw_scatter  # here: it imports sklearn (via report),
    # which a process that only runs a cell (a Ray worker) need not load

    draw_scatter(rows, output / "results.png")
