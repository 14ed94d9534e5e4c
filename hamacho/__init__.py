"""hamacho: a plugin-based anomaly-model zoo for industrial visual inspection."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hamacho.errors import HamachoError
from hamacho.hookspecs import hookimpl
from hamacho.model import Components, Model, Prediction

if TYPE_CHECKING:
    from hamacho.api import Detector, Result, load, merge, train, update

__version__ = "0.1.0"
__all__ = [
    "Components",
    "Detector",
    "HamachoError",
    "Model",
    "Prediction",
    "Result",
    "__version__",
    "hookimpl",
    "load",
    "merge",
    "train",
    "update",
]
_API = ("Detector", "Result", "load", "merge", "train", "update")


def __getattr__(name: str) -> Any:
    """``hamacho.load`` etc. from hamacho.api, imported on first use (plugins import hamacho)."""
    if name in _API:
        from hamacho import api

        return getattr(api, name)
    raise AttributeError(f"module 'hamacho' has no attribute {name!r}")
