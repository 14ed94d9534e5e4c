"""The ``hamacho serve`` command: load the runs, then run uvicorn on the service."""

from __future__ import annotations

import importlib
import os
import re
import signal
import sys
import time
from pathlib import Path

import click

from hamacho.errors import UsageError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_NEEDS = ("fastapi", "uvicorn", "prometheus_client", "python_multipart")


def require_extra() -> None:
    """Raise one line naming what to install when the serve extra's packages are missing."""
    for module in _NEEDS:
        try:
            importlib.import_module(module)
        except ImportError:
            raise UsageError(
                f"hamacho serve needs the '{module}' package: pip install 'hamacho[serve]'"
            ) from None


def quiet_openmp() -> None:
    """Make torch's idle OpenMP threads sleep, not spin (OMP_WAIT_POLICY=PASSIVE), unless set.

    The server's event loop, decoding and its clients need the cores between (and during) model
    calls; a spinning thread takes them (docs/serve.md). libgomp reads the variable once, when
    torch loads, so this only acts while torch is not imported yet.
    """
    if "OMP_WAIT_POLICY" not in os.environ and "torch" not in sys.modules:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def parse_runs(items: tuple[str, ...]) -> dict[str, str]:
    """``[NAME=]RUN`` items -> {name: run}; a run without a name is served as its folder's name."""
    runs: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not _NAME.fullmatch(name):
            name, path = Path(os.path.abspath(item)).name, item  # lexical: symlinks keep names
        if not _NAME.fullmatch(name):
            raise UsageError(f"cannot serve '{item}' under a URL-safe name: pass --run NAME={item}")
        if name in runs:
            raise UsageError(
                f"two runs are named '{name}' ({runs[name]}, {path}): "
                f"name them, e.g. --run {name}2={path}"
            )
        runs[name] = path
    return runs


@click.command()
@click.option(
    "--run", "runs", multiple=True, required=True, metavar="[NAME=]RUN",
    help="Run directory or exported file to serve (repeatable); NAME defaults to its folder's.",
)  # fmt: skip
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option(
    "--runtime", type=click.Choice(["torch", "onnx", "openvino"]), default=None,
    help="Score with the run (torch, default for a folder) or its exported file.",
)  # fmt: skip
@click.option("--max-batch", type=click.IntRange(min=1), default=16, show_default=True)
@click.option(
    "--max-wait-ms", type=click.FloatRange(min=0), default=5.0, show_default=True,
    help="Longest wait for more images to join a batch.",
)  # fmt: skip
@click.option(
    "--api-key", envvar="HAMACHO_API_KEY", default=None,
    help="Require this key in the X-API-Key header of /v1 calls (or set HAMACHO_API_KEY).",
)  # fmt: skip
@click.option(
    "--max-upload-mb", type=click.FloatRange(min=0, min_open=True), default=20.0,
    show_default=True, help="Largest request body accepted.",
)  # fmt: skip
@click.pass_context
def serve(
    ctx: click.Context,
    runs: tuple[str, ...],
    host: str,
    port: int,
    runtime: str | None,
    max_batch: int,
    max_wait_ms: float,
    api_key: str | None,
    max_upload_mb: float,
) -> None:
    """Serve trained runs over HTTP: JSON API, Prometheus metrics and a page at /."""
    require_extra()
    quiet_openmp()  # before the first import of torch (hamacho.load)
    import uvicorn

    import hamacho
    from hamacho.serve.app import Settings, create_app

    detectors, seconds = {}, {}
    for name, path in parse_runs(runs).items():
        start = time.perf_counter()
        detectors[name] = hamacho.load(path, runtime)
        seconds[name] = time.perf_counter() - start
        if not ctx.meta.get("hamacho.quiet"):
            click.echo(f"loaded {name}: {detectors[name]!r} in {seconds[name]:.1f} s", err=True)
    settings = Settings(max_batch, max_wait_ms, api_key or None, int(max_upload_mb * 2**20))
    app = create_app(detectors, settings, seconds)
    # uvicorn re-raises the SIGTERM it handled once it has shut down gracefully; this handler
    # receives it, so the process exits 0 rather than dying by the signal.
    signal.signal(signal.SIGTERM, lambda *_: None)
    level = "warning" if ctx.meta.get("hamacho.quiet") else "info"
    config = uvicorn.Config(app, host=host, port=port, access_log=False, log_level=level)
    server = uvicorn.Server(config)
    server.run()
    if not server.started:  # e.g. the port is taken: uvicorn has logged why
        sys.exit(1)
