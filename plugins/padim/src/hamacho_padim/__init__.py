"""PaDiM for hamacho: registered through the public ``hamacho_register_models`` hook."""

from __future__ import annotations

from hamacho import hookimpl
from hamacho_padim.model import Padim

__all__ = ["Padim"]


@hookimpl
def hamacho_register_models() -> list[type]:
    """PaDiM is this plugin's one model."""
    return [Padim]
