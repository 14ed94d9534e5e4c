"""The local executor: benchmark cells, predict batches and trainings one after another here."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from hamacho.benchmark.plan import Cell
from hamacho.benchmark.runner import Echo, describe, run_cell
from hamacho.errors import HamachoError


def run_cells(
    cells: list[Cell], maps: bool, timeout: float | None, echo: Echo
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Run the cells in order, each in its own process; yield (index, results row)."""
    for i, cell in enumerate(cells):
        echo(f"{describe(i, cells)} ...")
        yield i, run_cell(cell, maps, timeout)


class LocalExecutor:
    """Runs everything in this process (cells in child processes), in order."""

    name = "local"

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *_exc: object) -> None:
        return None

    def run_cells(
        self, cells: list[Cell], maps: bool, timeout: float | None, echo: Echo
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        """See ``run_cells``."""
        return run_cells(cells, maps, timeout, echo)

    def predict(self, run_dir: str, inputs: Iterable[str], **options: Any) -> Iterator[dict]:
        """``predicting.predict``: rows in input order."""
        from hamacho import predicting

        return predicting.predict(run_dir, inputs, **options)

    def train_many(
        self, jobs: Sequence[dict[str, Any]], echo: Echo
    ) -> Iterator[tuple[dict[str, Any], Path | HamachoError]]:
        """``engine.train(**job)`` for each job in turn; yield (job, run folder or its error)."""
        from hamacho import engine

        for job in jobs:
            try:
                yield job, engine.train(**job, echo=echo)
            except HamachoError as exc:
                yield job, exc
