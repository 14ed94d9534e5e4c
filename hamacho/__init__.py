"""hamacho: a plugin-based anomaly-model zoo for industrial visual inspection."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hamacho.errors import HamachoError
from hamacho.hookspecs import hookimpl

if TYPE_CHECKING:
    from hamacho.api import Detector, Result, load, merge, train, update
    from hamacho.model import Components, Model, Prediction

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
_MODEL = ("Components", "Model", "Prediction")


def __getattr__(name: str) -> Any:
    """``hamacho.load``, ``hamacho.Model`` etc., imported on first use.

    ``import hamacho`` (and so the CLI) does not import torch: a command can still set what
    torch's OpenMP reads when it loads (``hamacho serve`` and OMP_WAIT_POLICY).
    """
    if name in _API:
        from hamacho import api

        return getattr(api, name)
    if name in _MODEL:
        from hamacho import model

        return getattr(model, name)
    raise AttributeError(f"module 'hamacho' has no attribute {name!r}")
