"""hamacho: a plugin-based anomaly-model zoo for industrial visual inspection."""

from __future__ import annotations

from hamacho.errors import HamachoError
from hamacho.hookspecs import hookimpl
from hamacho.model import Components, Model, Prediction

__version__ = "0.1.0"
__all__ = ["Components", "HamachoError", "Model", "Prediction", "__version__", "hookimpl"]
