"""The ``hamacho benchmark`` grid: backbone specs and grid files, from the command line or YAML.

A Grid is what the user asked for; ``plan.plan`` expands it into cells.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hamacho.errors import ConfigError, DataError


@dataclass(frozen=True)
class BackboneSpec:
    """One ``--backbones`` entry: ``NAME[:LAYER+LAYER][@WEIGHTS]`` (weights: imagenet|none|path)."""

    name: str
    layers: tuple[str, ...] = ()
    weights: str | None = None

    @property
    def label(self) -> str:
        """Short display name, e.g. ``resnet18@none``."""
        layers = ":" + "+".join(self.layers) if self.layers else ""
        return f"{self.name}{layers}" + (f"@{self.weights}" if self.weights else "")


@dataclass
class Grid:
    """Everything one benchmark needs (from the command line and/or a grid YAML file)."""

    models: list[str]
    backbones: list[BackboneSpec]  # empty: every model with its own configured backbone
    datasets: list[Path]
    output: Path
    seeds: list[int] = field(default_factory=lambda: [0])
    overrides: list[str] = field(default_factory=list)  # `--set`, optionally `MODEL:key=value`
    timeout: float | None = None  # seconds per cell
    maps: bool = False  # write heat-map panels (slow on large test sets)


def parse_backbone(text: str) -> BackboneSpec:
    """``resnet18``, ``resnet18@none``, ``timm:resnet18:layer2+layer3@/w.pth`` -> BackboneSpec."""
    spec, _, weights = text.strip().partition("@")
    prefix = "timm:" if spec.startswith("timm:") else ""
    name, _, layers = spec[len(prefix) :].partition(":")
    if not name:
        raise ConfigError(f"backbone {text!r} has no name; write NAME[:LAYER+LAYER][@WEIGHTS]")
    return BackboneSpec(
        prefix + name, tuple(x for x in layers.split("+") if x), weights.strip() or None
    )


def load_grid_file(path: str | Path) -> dict[str, Any]:
    """Read a grid YAML (keys: models, backbones, data, seeds, set, output, timeout, maps)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"grid file '{path}' does not exist") from None
    except yaml.YAMLError:
        raise ConfigError(f"grid file '{path}' is not valid YAML") from None
    valid = {"models", "backbones", "data", "seeds", "set", "output", "timeout", "maps"}
    unknown = sorted(set(raw) - valid) if isinstance(raw, dict) else ["(not a mapping)"]
    if unknown:
        raise ConfigError(
            f"grid file '{path}': unknown key(s) {', '.join(unknown)}. Valid: {sorted(valid)}"
        )
    return raw


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value) if isinstance(value, (list, tuple)) else [value]


def check_timeout(value: Any, name: str = "timeout") -> float | None:
    """Seconds per cell (None: no limit); ConfigError unless a number > 0."""
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} {value!r} must be a number of seconds > 0; omit it for no limit")
    return float(value)


def make_grid(
    models: Any = None,
    backbones: Any = None,
    datasets: Any = None,
    output: str | Path | None = None,
    seeds: Any = None,
    overrides: Sequence[str] = (),
    timeout: float | None = None,
    maps: bool | None = None,
    grid_file: str | Path | None = None,
) -> Grid:
    """A Grid from arguments; values given here win over the grid file's (``set`` adds up)."""
    raw = load_grid_file(grid_file) if grid_file else {}
    names = _as_list(models) or _as_list(raw.get("models"))
    specs = [parse_backbone(b) for b in (_as_list(backbones) or _as_list(raw.get("backbones")))]
    roots = [Path(d) for d in (_as_list(datasets) or _as_list(raw.get("data")))]
    out = output or raw.get("output")
    missing = [k for k, v in (("models", names), ("data", roots)) if not v]
    if missing or not out:
        missing += [] if out else ["output"]
        raise ConfigError(
            f"benchmark needs {', '.join(missing)}: give --{' --'.join(missing)} or a --grid file"
        )
    for root in roots:
        if not root.exists():
            raise DataError(f"dataset '{root}' does not exist; check the --data paths")
    try:
        seed_list = [int(s) for s in (_as_list(seeds) or _as_list(raw.get("seeds")) or [0])]
    except ValueError:
        raise ConfigError(f"seeds must be whole numbers, e.g. --seeds 0,1; got {seeds!r}") from None
    limit = check_timeout(timeout if timeout is not None else raw.get("timeout"))
    return Grid(
        models=names,
        backbones=specs,
        datasets=roots,
        output=Path(out),
        seeds=seed_list,
        overrides=[str(s) for s in _as_list_keep(raw.get("set"))] + list(overrides),
        timeout=limit,
        maps=bool(maps if maps is not None else raw.get("maps", False)),
    )


def _as_list_keep(value: Any) -> list[Any]:
    """Like _as_list but never splits a string on commas (a --set value may hold one)."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
