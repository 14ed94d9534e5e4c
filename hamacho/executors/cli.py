"""The ``--executor`` options and the predict / multi-dataset train flows the CLI runs on them."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import click

from hamacho.errors import HamachoError, UsageError

Echo = Callable[[str], None]


def executor_options(cells: bool = True, workers: bool = False) -> Callable[[Any], Any]:
    """``--executor local|ray``, ``--ray-address`` and ``--cpus-per-cell`` / ``--workers``."""

    def decorate(command: Any) -> Any:
        if workers:
            command = click.option(
                "--workers",
                type=click.IntRange(min=1),
                help="Ray predict workers, each loading the model once (default: one per CPU).",
            )(command)
        if cells:
            command = click.option(
                "--cpus-per-cell",
                type=click.FloatRange(min=0, min_open=True),
                default=1.0,
                show_default=True,
                help="CPUs Ray reserves for each cell or training.",
            )(command)
        command = click.option(
            "--ray-address", help="Join this Ray cluster (default: start Ray here, on 127.0.0.1)."
        )(command)
        return click.option(
            "--executor",
            type=click.Choice(["local", "ray"]),
            default="local",
            show_default=True,
            help="Run here, one at a time, or on Ray (pip install 'hamacho[ray]').",
        )(command)

    return decorate


def emit_rows(rows: Iterable[dict[str, Any]], output: str | None, echo: Echo, timed: bool) -> int:
    """Write predict rows as they come (stdout, FILE.jsonl or FILE.parquet); count error rows."""
    from hamacho.executors.output import open_output

    failed = count = 0
    start = time.perf_counter()
    with open_output(output) as write:
        for row in rows:
            count += 1
            if "error" in row:
                failed += 1
                click.echo(f"error: {row['path']}: {row['error']}", err=True)
            write(row)
    seconds = time.perf_counter() - start
    if timed:
        rate = count / seconds if seconds > 0 else float("inf")
        echo(f"scored {count} inputs ({failed} errors) in {seconds:.1f} s: {rate:.1f} images/s")
    return failed


def train_jobs(
    model: str,
    datasets: Sequence[str],
    config_file: str | None,
    overrides: Sequence[str],
    output: str | None,
) -> list[dict[str, Any]]:
    """One ``engine.train`` job per dataset; with several, ``--output`` is their parent folder."""
    if not datasets:
        raise UsageError("--executor ray trains the --data folders given; name at least one")
    names = [Path(d).resolve().name for d in datasets]
    if len(set(names)) < len(names):
        raise UsageError(f"two --data folders share a name ({', '.join(names)}); rename one")
    jobs = []
    for root, name in zip(datasets, names, strict=True):
        if len(datasets) == 1:
            out = Path(output) if output else Path("results") / model / Path(root).name
        else:
            out = Path(output or Path("results") / model) / name
        jobs.append(
            {
                "model": model,
                "data_dir": root,
                "config_file": config_file,
                "overrides": list(overrides),
                "output": str(out),
            }
        )
    return jobs


def train_all(executor: Any, jobs: list[dict[str, Any]], echo: Echo) -> None:
    """Train every job on ``executor``; print each run folder; exit 1 if any failed."""
    failed = 0
    for job, result in executor.train_many(jobs, echo):
        if isinstance(result, HamachoError):
            failed += 1
            click.echo(f"error: {job['data_dir']}: {result}", err=True)
        else:
            click.echo(str(result))
    if failed:
        sys.exit(1)
