"""``hamacho benchmark``: train and test every model x backbone x dataset x seed cell.

``grid`` reads what to run (options or a grid YAML), ``plan`` expands it into cells, ``runner``
runs each cell in its own process and writes results.csv / results.md (``results``) and
results.png (``scatter``). Not to be confused with the repository's top-level ``benchmarks/``
folder: standalone scripts that compare hamacho with other libraries, not part of the package.
"""

from __future__ import annotations

from hamacho.benchmark.grid import BackboneSpec, Grid, make_grid, parse_backbone
from hamacho.benchmark.plan import Cell, plan
from hamacho.benchmark.runner import run, run_cell

__all__ = ["BackboneSpec", "Cell", "Grid", "make_grid", "parse_backbone", "plan", "run", "run_cell"]
