"""``hamacho test --data A B ...``: one metrics block per dataset, the worst site first."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from hamacho import engine, rundir
from hamacho.components import data
from hamacho.runtime import write_json

_FIX = "Copy the run folder somewhere writable"


def test_sites(
    run_dir: str | Path,
    data_dirs: list[str | Path],
    write_maps: bool = True,
    progress: bool = False,
    echo: engine.Echo = lambda _: None,
) -> dict[str, Any]:
    """Test the run on each dataset: RUN/sites/NAME/ per site, metrics.json + report.html on top.

    Sites are ordered worst image AUROC first, so an unfair merged model shows at the top.
    """
    path = Path(run_dir)
    if not path.exists():
        engine.load_run(path)  # raises the one-line "no trained model" error
    folder = (path if path.is_dir() else path.parent).resolve()
    names = _names(data_dirs)
    with rundir.locked(folder, "test results", _FIX):
        run = engine.load_run(path)
        with rundir.new_results(folder, _FIX) as staging:
            blocks = []
            for name, root in zip(names, data_dirs, strict=True):
                out = staging / "sites" / name
                out.mkdir(parents=True)
                result = engine.evaluate_split(run, out, root, write_maps, progress, echo)
                blocks.append({"site": name, **result})
            blocks.sort(key=lambda b: (_key(b["image_auroc"]), _key(b["pixel_auroc"])))
            summary = {"worst_site": blocks[0]["site"], "sites": blocks}
            write_json(staging / "metrics.json", summary)
            (staging / "report.html").write_text(_report(blocks, run.metadata.get("model", "?")))
    for block in blocks:
        echo(
            f"{block['site']}: image AUROC {block['image_auroc']}  pixel AUROC "
            f"{block['pixel_auroc']}"
        )
    return summary


def _names(data_dirs: list[str | Path]) -> list[str]:
    """A folder name per dataset, unique (``bottle``, ``bottle_2``, ...)."""
    used: set[str] = set()
    return [data.unused_name(data.safe_name(Path(r).resolve().name), used) for r in data_dirs]


def _key(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else float("inf")  # None: last


def _report(blocks: list[dict[str, Any]], model: str) -> str:
    rows = "".join(
        f'<tr><td><a href="sites/{html.escape(b["site"])}/report.html">'
        f"{html.escape(b['site'])}</a></td><td>{b['image_auroc']}</td><td>{b['pixel_auroc']}"
        f"</td><td>{html.escape(str(b['dataset']))}</td></tr>"
        for b in blocks
    )
    return (
        f"<!doctype html><meta charset=utf-8><title>{html.escape(model)} per site</title>"
        f"<h1>{html.escape(model)}: one block per site, worst first</h1><table border=1>"
        f"<tr><th>site</th><th>image AUROC</th><th>pixel AUROC</th><th>dataset</th></tr>{rows}"
        "</table>\n"
    )
