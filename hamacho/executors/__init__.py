"""Where the work of ``benchmark``, ``predict`` and multi-dataset ``train`` runs.

``local`` runs it here, one cell or one batch after another (the default); ``ray`` runs it on a
Ray cluster, or on Ray started on this machine (optional extra ``hamacho[ray]``, imported only
when asked for). Both offer the same three methods, so the commands do not care which runs.
"""

from __future__ import annotations

from typing import Any

from hamacho.errors import UsageError

EXECUTORS = ("local", "ray")


def open_executor(
    executor: str = "local",
    ray_address: str | None = None,
    cpus_per_cell: float = 1.0,
    workers: int | None = None,
    progress: bool = False,
) -> Any:
    """The executor called ``executor``, a context manager (a Ray it started ends on exit)."""
    name, address = executor, ray_address
    if name == "local":
        given = [f for f, v in (("--ray-address", address), ("--workers", workers)) if v]
        if given:
            raise UsageError(f"{', '.join(given)} only apply with --executor ray; add it")
        from hamacho.executors.local import LocalExecutor

        return LocalExecutor()
    if name == "ray":
        from hamacho.executors.ray import RayExecutor

        return RayExecutor(address, cpus_per_cell, workers, progress)
    raise UsageError(f"unknown executor {name!r}; choose one of {', '.join(EXECUTORS)}")
