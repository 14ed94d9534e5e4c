"""The Ray executor: cells and trainings as Ray tasks, predict as Ray Data over actors.

Ray does the scheduling, retries and placement; this module only says what to run and with
which resources. Without an address Ray starts on this machine, bound to 127.0.0.1.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from hamacho.benchmark.plan import Cell
from hamacho.benchmark.runner import Echo, failed_row, finished_row
from hamacho.errors import HamachoError, UsageError, one_line

INSTALL = "--executor ray needs Ray: pip install 'hamacho[ray]'"
OBJECT_STORE_BYTES = 200 * 2**20  # rows and paths only: images are read by the workers
RETRIES = 2  # a cell or batch whose worker (process or node) died is run again this often


def import_ray() -> Any:
    """The ``ray`` module, or a UsageError saying what to install."""
    try:
        import ray
        import ray.data  # noqa: F401  (ray[data], not bare ray)
    except ImportError:
        raise UsageError(INSTALL) from None
    return ray


def _run_cell(cell: Cell, maps: bool, timeout: float | None) -> dict[str, Any]:
    from hamacho.benchmark.runner import run_cell

    return run_cell(cell, maps, timeout)


def _train(job: dict[str, Any]) -> str:
    from hamacho import engine

    return str(engine.train(**job))


def _absolute(job: dict[str, Any]) -> dict[str, Any]:
    """``job`` with its paths absolute: a Ray worker's folder is not the driver's."""
    keys = ("data_dir", "config_file", "output")
    return {k: str(Path(v).resolve()) if k in keys and v else v for k, v in job.items()}


class _Scorer:
    """One predict worker: opens the run once, then scores batches of paths into JSON rows."""

    def __init__(
        self, cwd: str, run_dir: str, runtime: str, threshold: float | None, batch: int
    ) -> None:
        from hamacho.export.runtimes import open_backend

        if os.path.isdir(cwd):  # relative inputs, --run and --maps mean what they do on the
            os.chdir(cwd)  # driver (this process is the actor's alone); rows show them as given
        self.backend = open_backend(run_dir, runtime)
        self.threshold, self.batch = threshold, batch

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        from hamacho import predicting

        items = [  # "" stands for None (no image matched the input; no map asked for)
            (str(item), Path(path) if path else None, Path(out) if out else None)
            for item, path, out in zip(batch["item"], batch["path"], batch["map"], strict=True)
        ]
        rows = predicting.score_targets(self.backend, items, self.threshold, self.batch)
        return {"row": [json.dumps(row) for row in rows]}  # one JSON text per row, as local


class RayExecutor:
    """Runs on the Ray cluster at ``address``, else on Ray started here (shut down on exit)."""

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        cpus_per_cell: float = 1.0,
        workers: int | None = None,
        progress: bool = False,
    ) -> None:
        self.address, self.cpus_per_cell, self.workers = address, cpus_per_cell, workers
        self.progress, self.started = progress, False
        if address is None:  # before ray is imported: keep 127.0.0.1 loopback (Ray's own switch)
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        self.ray = import_ray()

    def __enter__(self) -> RayExecutor:
        ray = self.ray
        if not ray.is_initialized():
            if self.address:
                ray.init(address=self.address, log_to_driver=False, logging_level="warning")
            else:
                ray.init(
                    num_cpus=os.cpu_count() or 1,
                    object_store_memory=OBJECT_STORE_BYTES,
                    include_dashboard=False,
                    _node_ip_address="127.0.0.1",
                    log_to_driver=False,
                    logging_level="warning",
                )
            self.started = True
        ray.data.DataContext.get_current().enable_progress_bars = self.progress
        logging.getLogger("ray.data").setLevel(logging.INFO if self.progress else logging.WARNING)
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.started:
            self.ray.shutdown()

    def _bar(self, total: int, desc: str) -> Any:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, disable=not self.progress, file=sys.stderr)

    def run_cells(
        self, cells: list[Cell], maps: bool, timeout: float | None, echo: Echo
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        """Finished cells from their folders; the rest as Ray tasks, yielded as they end."""
        ray = self.ray
        task = ray.remote(_run_cell).options(
            num_cpus=self.cpus_per_cell, max_retries=RETRIES, retry_exceptions=False
        )
        pending: dict[Any, int] = {}
        for i, cell in enumerate(cells):
            row = finished_row(cell, maps)
            if row is not None:
                yield i, row
            else:  # absolute paths: a worker's folder is not the driver's
                here = dataclasses.replace(
                    cell, dataset=cell.dataset.resolve(), directory=cell.directory.resolve()
                )
                pending[task.remote(here, maps, timeout)] = i
        echo(f"{len(pending)} cell(s) submitted to Ray ({self.cpus_per_cell:g} CPU each)")
        with self._bar(len(pending), "cells") as bar:
            while pending:
                (ref,), _ = ray.wait(list(pending), num_returns=1)
                i = pending.pop(ref)
                try:
                    row = ray.get(ref)
                except ray.exceptions.RayError as exc:  # the worker died every try
                    row = failed_row(cells[i], f"lost on Ray {RETRIES + 1} times: {one_line(exc)}")
                row["run_dir"] = str(cells[i].directory)  # as the local executor writes it
                bar.update()
                yield i, row

    def predict(
        self,
        run_dir: str,
        inputs: Iterable[str],
        threshold: float | None = None,
        batch_size: int = 16,
        runtime: str = "torch",
        maps_dir: str | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Rows as each batch finishes (not in input order); every input exactly once."""
        from hamacho import predicting, rundir
        from hamacho.export.runtimes import open_backend

        if maps_dir:  # the workers write the panels there (on a cluster: a shared folder)
            rundir.check_folder(maps_dir, "heat maps", "Choose a writable --maps folder")
        open_backend(run_dir, runtime)  # a missing or broken run fails here, in one line
        items = [
            {"item": item, "path": str(path or ""), "map": str(out or "")}
            for item, path, out in predicting.targets(inputs, maps_dir)
        ]  # map names given here, in input order, as local predict names them
        ray = self.ray
        workers = self.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        blocks = max(1, min(math.ceil(len(items) / batch_size), 10_000))
        data = ray.data.from_items(items, override_num_blocks=blocks)
        scored = data.map_batches(
            _Scorer,
            fn_constructor_args=(os.getcwd(), str(run_dir), runtime, threshold, batch_size),
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=1,  # Ray Data's defaults replace a lost actor and retry its batch
        )
        for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
            for text in batch["row"]:
                yield json.loads(text)

    def train_many(
        self, jobs: Sequence[dict[str, Any]], echo: Echo
    ) -> Iterator[tuple[dict[str, Any], Path | HamachoError]]:
        """One Ray task per job, in parallel; yield (job, run folder or its error) as each ends."""
        ray = self.ray
        task = ray.remote(_train).options(
            num_cpus=self.cpus_per_cell, max_retries=RETRIES, retry_exceptions=False
        )
        pending = {task.remote(_absolute(job)): job for job in jobs}
        echo(f"{len(pending)} training(s) submitted to Ray ({self.cpus_per_cell:g} CPU each)")
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(ref)
            try:
                ray.get(ref)
                yield job, Path(job["output"])
            except HamachoError as exc:  # Ray re-raises the task's error as a subclass of it
                yield job, getattr(exc, "cause", exc)
            except ray.exceptions.RayError as exc:
                yield job, HamachoError(f"lost on Ray {RETRIES + 1} times: {one_line(exc)}")
