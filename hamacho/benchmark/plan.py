"""Expand a benchmark Grid into cells: one per model x backbone x dataset x seed.

The backbone axis applies only to a model whose Config has a ``backbone`` setting; any other
model runs once per dataset and seed with its own configuration (backbone shown as ``-``).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from hamacho.benchmark.grid import BackboneSpec, Grid
from hamacho.errors import ConfigError
from hamacho.model import Model

NO_BACKBONE = "-"  # results' backbone of a cell that ran the model's own configuration


@dataclass
class Cell:
    """One model x backbone x dataset x seed run (backbone None: the model's own setting)."""

    model: str
    backbone: BackboneSpec | None
    layers: list[str]
    dataset: Path
    dataset_name: str
    seed: int
    overrides: list[str]
    directory: Path

    @property
    def backbone_label(self) -> str:
        """``resnet18@none``, or ``-`` when the cell keeps the model's own backbone setting."""
        return self.backbone.label if self.backbone else NO_BACKBONE


def default_layers(cls: type[Model], backbone: BackboneSpec) -> list[str]:
    """The layers of ``backbone`` for ``cls``: explicit, the model's preset, or its default."""
    if backbone.layers:
        return list(backbone.layers)
    layers = cls.default_layers(backbone.name.removeprefix("timm:"))
    if layers is not None:
        return list(layers)
    defaults = cls.Config()
    if getattr(defaults, "backbone", None) == backbone.name:
        return list(getattr(defaults, "layers", []))
    known = ", ".join(getattr(cls, "layer_presets", {})) or "none"
    raise ConfigError(
        f"no default layers of backbone '{backbone.name}' for {cls.name} (known: {known}); "
        f"name them: --backbones {backbone.name}:LAYER+LAYER"
    )


def _backbone_sets(cls: type[Model], backbone: BackboneSpec) -> tuple[list[str], list[str]]:
    """(layers, ``--set`` items) that put ``backbone`` into a cell of ``cls``."""
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    sets = [f"model.backbone={backbone.name}"]
    layers: list[str] = []
    if "layers" in fields or backbone.layers:
        layers = default_layers(cls, backbone)
        sets.append(f"model.layers={json.dumps(layers)}")
    sets += [f"model.weights={backbone.weights}"] if backbone.weights else []
    return layers, sets


def _scoped(overrides: Iterable[str], model: str) -> list[str]:
    """The overrides for ``model``: unscoped ones and those written ``MODEL:section.key=value``."""
    chosen = []
    for item in overrides:
        key = item.partition("=")[0]
        scope, sep, _ = key.partition(":")
        if sep and "." not in scope:
            if scope == model:
                chosen.append(item[len(scope) + 1 :])
        else:
            chosen.append(item)
    return chosen


def _label(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)


def _dataset_names(datasets: list[Path]) -> dict[Path, str]:
    names: dict[Path, str] = {}
    for root in datasets:
        name = root.stem if root.is_file() else root.resolve().name
        while name in names.values():
            name += "_"  # two datasets with one folder name: keep both
        names[root] = name
    return names


def plan(grid: Grid) -> list[Cell]:
    """Every cell of the grid, checked up front (unknown model or backbone layers: an error)."""
    from hamacho.plugins import get_registry

    registry = get_registry()
    names = _dataset_names(grid.datasets)
    cells = []
    for model in grid.models:
        cls = registry.get(model).cls
        fields = {f.name for f in dataclasses.fields(cls.Config)}
        axis: list[BackboneSpec | None] = list(grid.backbones) if "backbone" in fields else []
        for backbone in axis or [None]:
            layers, sets = _backbone_sets(cls, backbone) if backbone else ([], [])
            folder_label = _label(backbone.label) if backbone else "default"
            for root, seed in itertools.product(grid.datasets, grid.seeds):
                seeds = [f"run.seed={seed}"]
                seeds += [f"model.seed={seed}"] if "seed" in fields else []
                folder = grid.output / model / folder_label / names[root] / f"seed{seed}"
                overrides = _scoped(grid.overrides, model) + sets + seeds
                cells.append(
                    Cell(model, backbone, layers, root, names[root], seed, overrides, folder)
                )
    return cells
