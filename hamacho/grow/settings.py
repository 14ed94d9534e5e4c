"""What update and merge need from a run: the hook, and settings that agree across runs."""

from __future__ import annotations

from typing import Any

from hamacho.errors import UsageError
from hamacho.model import Model, offers
from hamacho.runtime import Run

_PREPROCESSING = ("image_size", "crop_size")  # data settings that change the features


def require(net: Model, hook: str) -> None:
    """UsageError unless the model overrides the optional ``hook`` (update / merge / ...)."""
    if not offers(type(net), hook):
        what = {"outlier_score": "outlier rejection (drop --reject-outliers)"}.get(hook, hook)
        raise UsageError(f"model {net.name!r} does not support {what}")


def settings(run: Run) -> dict[str, Any]:
    """The settings two runs must share to be merged: model, weights, features, preprocessing."""
    meta = run.metadata
    found: dict[str, Any] = {"model": meta["model"]}
    found["weights identity"] = meta.get("info", {}).get("weights")
    found.update({f"model.{k}": v for k, v in meta["config"].get("model", {}).items()})
    data = meta["config"].get("data", {})
    found.update({f"data.{k}": data.get(k) for k in _PREPROCESSING})
    found.update({f"tiler.{k}": v for k, v in meta["config"].get("tiler", {}).items()})
    found.update({f"normalization.{k}": v for k, v in meta["normalization"].items()})
    return found


def check_alike(runs: list[Run], names: list[str]) -> None:
    """UsageError naming the first setting in which a run differs from the first one."""
    first = settings(runs[0])
    for run, name in zip(runs[1:], names[1:], strict=True):
        other = settings(run)
        for key in sorted(first.keys() | other.keys()):
            if first.get(key) != other.get(key):
                raise UsageError(
                    f"runs differ in {key}: '{names[0]}' has {first.get(key)!r}, '{name}' has "
                    f"{other.get(key)!r}. Merge only runs trained with the same settings"
                )


def history(run: Run) -> list[dict[str, Any]]:
    """The run's history (a run saved before histories: its one training, count unknown)."""
    meta = run.metadata
    if meta.get("history"):
        return list(meta["history"])
    entry = {"action": "train", "dataset": meta["dataset"], "images": None}
    return [{**entry, "when": meta.get("created")}]


def images_seen(run: Run) -> int | None:
    """Good images the run was fitted on, over its whole history (None if not recorded)."""
    counts = [entry.get("images") for entry in history(run)]
    return None if None in counts else sum(int(c or 0) for c in counts)
