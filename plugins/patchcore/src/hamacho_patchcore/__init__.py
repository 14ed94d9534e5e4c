"""PatchCore for hamacho: registered through the public ``hamacho_register_models`` hook."""

from __future__ import annotations

from hamacho import hookimpl
from hamacho_patchcore.model import PatchCore

__all__ = ["PatchCore"]


@hookimpl
def hamacho_register_models() -> list[type]:
    """PatchCore is this plugin's one model."""
    return [PatchCore]
