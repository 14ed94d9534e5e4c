"""``hamacho update`` and ``hamacho merge``."""

from __future__ import annotations

import click


@click.command()
@click.option("--run", "run_dir", required=True, type=click.Path(), help="Run directory to grow.")
@click.option(
    "--data",
    "data_dir",
    required=True,
    type=click.Path(),
    help="Dataset of new good images (train/good).",
)
@click.option(
    "--output", "-o", type=click.Path(), help="Write the grown run here (default: in place)."
)
@click.pass_context
def update(ctx: click.Context, run_dir: str, data_dir: str, output: str | None) -> None:
    """Add good images to a trained model without refitting it."""
    from hamacho.cli import _echo, _progress
    from hamacho.grow.flows import update as run_update

    click.echo(str(run_update(run_dir, data_dir, output, _progress(ctx), _echo(ctx))))


@click.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("--output", "-o", required=True, type=click.Path(), help="Run directory to write.")
@click.option(
    "--reject-outliers",
    is_flag=True,
    help="Leave out sites unlike the others (merge.json says why).",
)
@click.pass_context
def merge(ctx: click.Context, runs: tuple[str, ...], output: str, reject_outliers: bool) -> None:
    """Merge runs trained elsewhere (same settings) into one, without their images."""
    from hamacho.cli import _echo
    from hamacho.grow.flows import merge as run_merge

    click.echo(str(run_merge(list(runs), output, reject_outliers, _echo(ctx))))
