"""The ``hamacho`` command line: argument parsing and error printing only."""

from __future__ import annotations

import errno
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import click

from hamacho.errors import HamachoError, UsageError
from hamacho.executors.cli import executor_options


class _Group(click.Group):
    """Prints HamachoError as one line (a traceback only with --debug)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except HamachoError as exc:
            if ctx.meta.get("hamacho.debug"):
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            if ctx.meta.get("hamacho.debug"):
                raise
            message = "interrupted (Ctrl-C); run folders keep their last complete state"
            click.echo(f"error: {message}", err=True)
            sys.exit(130)
        except OSError as exc:
            # a write no check foresaw (e.g. the disk fills while predict writes its maps)
            if ctx.meta.get("hamacho.debug") or exc.errno not in _WRITE_ERRORS:
                raise
            from hamacho.rundir import cannot

            message = cannot("output", Path(exc.filename or "."), exc, "Choose a writable folder")
            click.echo(f"error: {message}", err=True)
            sys.exit(1)


_WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


class _EchoHandler(logging.Handler):
    """Sends hamacho's log records (e.g. a plugin's size estimates) to stderr via click."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(self.format(record), err=True)


def _setup_logging(quiet: bool) -> None:
    logger = logging.getLogger("hamacho")
    for handler in [h for h in logger.handlers if isinstance(h, _EchoHandler)]:
        logger.removeHandler(handler)
    logger.addHandler(_EchoHandler())
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


def _echo(ctx: click.Context) -> Any:
    if ctx.meta.get("hamacho.quiet"):
        return lambda _msg: None
    return lambda msg: click.echo(msg, err=True)


def _progress(ctx: click.Context) -> bool:
    return not ctx.meta.get("hamacho.quiet") and sys.stderr.isatty()


def _finite_threshold(_ctx: click.Context, _param: click.Parameter, value: float | None) -> Any:
    # nan would print as NaN, which no strict JSON parser accepts; inf decides nothing.
    if value is not None and not math.isfinite(value):
        raise UsageError(f"--threshold {value} is not a finite number; pass e.g. --threshold 1.5")
    return value


def _positive_timeout(_ctx: click.Context, _param: click.Parameter, value: float | None) -> Any:
    from hamacho.benchmark.grid import check_timeout

    return check_timeout(value, "--timeout")


_RUN_OPTION = click.option(
    "--run", "run_dir", required=True, type=click.Path(), help="Run directory from train."
)


@click.group(cls=_Group)
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or notes.")
@click.version_option(package_name="hamacho")
@click.pass_context
def main(ctx: click.Context, debug: bool, quiet: bool) -> None:
    """hamacho: train anomaly models on good parts, find the defective ones."""
    ctx.meta["hamacho.debug"] = debug
    ctx.meta["hamacho.quiet"] = quiet
    _setup_logging(quiet)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def models(as_json: bool) -> None:
    """List the installed models."""
    from hamacho import engine

    rows = engine.list_models()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    headers = {
        "name": "MODEL",
        "distribution": "DISTRIBUTION",
        "version": "VERSION",
        "summary": "SUMMARY",
    }
    widths = {k: max([len(h)] + [len(r[k]) for r in rows]) for k, h in headers.items()}
    for row in [headers, *rows]:
        click.echo("  ".join(row[k].ljust(widths[k]) for k in headers).rstrip())


@main.command()
@click.option(
    "--model", "-m", "model_name", required=True, help="Model name (see `hamacho models`)."
)
@click.option(
    "--data", "data_dir", type=click.Path(), help="Dataset folder(s) (default: built-in)."
)
@click.argument("more_data", nargs=-1, type=click.Path(), metavar="[DIR]...")
@click.option("--config", "config_file", type=click.Path(), help="YAML file of overrides.")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="SECTION.KEY=VALUE",
    help="Override one setting, e.g. --set model.backbone=resnet18 (repeatable).",
)
@click.option(
    "--output", "-o", type=click.Path(), help="Run directory (default results/MODEL/DATASET)."
)
@executor_options()
@click.pass_context
def train(
    ctx: click.Context,
    model_name: str,
    data_dir: str | None,
    more_data: tuple[str, ...],
    config_file: str | None,
    overrides: tuple[str, ...],
    output: str | None,
    **run_on: Any,
) -> None:
    """Train a model on good images and save it (several --data: one run each)."""
    from hamacho import engine

    if more_data or run_on["executor"] != "local":
        from hamacho.executors import cli as on
        from hamacho.executors import open_executor

        datasets = [d for d in (data_dir, *more_data) if d]
        jobs = on.train_jobs(model_name, datasets, config_file, overrides, output)
        with open_executor(**run_on, progress=_progress(ctx)) as executor:
            return on.train_all(executor, jobs, _echo(ctx))
    run_dir = engine.train(
        model_name,
        data_dir,
        config_file,
        overrides,
        output,
        progress=_progress(ctx),
        echo=_echo(ctx),
    )
    click.echo(str(run_dir))


@main.command()
@_RUN_OPTION
@click.option("--data", "data_dir", type=click.Path(), help="Dataset(s): --data A [B ...].")
@click.argument("more_data", nargs=-1, type=click.Path(), metavar="[DIR]...")
@click.option("--no-maps", is_flag=True, help="Skip writing heat-map images.")
@click.pass_context
def test(
    ctx: click.Context, run_dir: str, data_dir: str | None, more_data: tuple, no_maps: bool
) -> None:
    """Evaluate a trained model on the test split (of each dataset: worst site first)."""
    from hamacho import engine
    from hamacho.grow.sites import test_sites

    kw = {"write_maps": not no_maps, "progress": _progress(ctx), "echo": _echo(ctx)}
    datasets = [d for d in (data_dir, *more_data) if d]
    if len(datasets) > 1:
        result = test_sites(run_dir, datasets, **kw)
    else:
        result = engine.test(run_dir, datasets[0] if datasets else None, **kw)
    click.echo(json.dumps(result, indent=2))


@main.command()
@_RUN_OPTION
@click.argument("inputs", nargs=-1, required=True)
@click.option("--maps", "maps_dir", type=click.Path(), help="Write heat-map overlays here.")
@click.option(
    "--threshold",
    type=float,
    callback=_finite_threshold,
    help="Override the run's decision threshold.",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option(
    "--runtime",
    type=click.Choice(["torch", "onnx", "openvino"]),
    default="torch",
    show_default=True,
    help="Score with the run (torch) or its exported file (see `hamacho export`).",
)
@click.option("--output", "-o", type=click.Path(), help="Write rows to FILE.jsonl|.parquet.")
@executor_options(cells=False, workers=True)
@click.pass_context
def predict(
    ctx: click.Context,
    run_dir: str,
    inputs: tuple[str, ...],
    maps_dir: str | None,
    threshold: float | None,
    batch_size: int,
    runtime: str,
    output: str | None,
    **run_on: Any,
) -> None:
    """Score images (files, folders, globs): one JSON line per image."""
    from hamacho.executors import cli as on
    from hamacho.executors import open_executor

    with open_executor(**run_on, progress=_progress(ctx)) as executor:
        options = {"maps_dir": maps_dir, "threshold": threshold, "batch_size": batch_size}
        rows = executor.predict(run_dir, inputs, runtime=runtime, **options)
        failed = on.emit_rows(rows, output, _echo(ctx), timed=executor.name == "ray")
    if failed:
        sys.exit(1)


@main.command()
@_RUN_OPTION
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["onnx", "openvino"]),
    default="onnx",
    show_default=True,
    help="onnx: one .onnx graph; openvino: OpenVINO IR (.xml + .bin).",
)
@click.option("--output", "-o", type=click.Path(), help="File (default RUN/model.onnx|xml).")
def export(run_dir: str, fmt: str, output: str | None) -> None:
    """Export a run as one graph: decoded uint8 image in, score and map out."""
    from hamacho.export import export_run

    click.echo(str(export_run(run_dir, fmt, output)))


@main.command()
@click.option("--models", help="Comma-separated model names (see `hamacho models`).")
@click.option(
    "--backbones",
    multiple=True,
    help="Comma-separated NAME[:LAYER+LAYER][@WEIGHTS], e.g. resnet18@none,tf_efficientnet_lite0"
    " (default: each model's own backbone).",
)
@click.option("--data", "data_dir", type=click.Path(), help="Dataset folder(s): --data A B C.")
@click.argument("more_data", nargs=-1, type=click.Path(), metavar="[DIR]...")
@click.option("--seeds", help="Comma-separated seeds (run.seed and the model's seed); default 0.")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="[MODEL:]SECTION.KEY=VALUE",
    help="Override a setting in every cell (or only MODEL's cells), repeatable.",
)
@click.option("--grid", "grid_file", type=click.Path(), help="Grid YAML (the options win).")
@click.option("--output", "-o", type=click.Path(), help="Output folder (resumable).")
@click.option(
    "--timeout",
    type=float,
    callback=_positive_timeout,
    help="Seconds per cell before it is stopped.",
)
@click.option("--maps/--no-maps", default=None, help="Write heat-map panels (default: no).")
@executor_options()
@click.pass_context
def benchmark(
    ctx: click.Context,
    models: str | None,
    backbones: tuple[str, ...],
    data_dir: str | None,
    more_data: tuple[str, ...],
    seeds: str | None,
    overrides: tuple[str, ...],
    grid_file: str | None,
    output: str | None,
    timeout: float | None,
    maps: bool | None,
    **run_on: Any,
) -> None:
    """Train and test every model x backbone x dataset x seed; tabulate and plot the results."""
    from hamacho import benchmark as bench
    from hamacho.executors import open_executor

    grid = bench.make_grid(
        models,
        ",".join(backbones) or None,
        [d for d in (data_dir, *more_data) if d] or None,
        output,
        seeds,
        overrides,
        timeout,
        maps,
        grid_file,
    )
    with open_executor(**run_on, progress=_progress(ctx)) as executor:
        rows = bench.run(grid, echo=_echo(ctx), execute=executor.run_cells)
    click.echo((grid.output / "results.md").read_text())
    if any(row["status"] != "ok" for row in rows):
        sys.exit(1)


# commands of their own subpackages
from hamacho.grow.cli import merge, update  # noqa: E402
from hamacho.serve.cli import serve  # noqa: E402

main.add_command(update)
main.add_command(merge)
main.add_command(serve)
