"""The hooks a hamacho plugin can implement."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from hamacho.model import Model

PROJECT = "hamacho"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def hamacho_register_models() -> list[type[Model]]:
    """Return the model classes this plugin provides.

    Each class subclasses :class:`hamacho.Model` and sets an explicit, unique ``name``
    (the key users pass to ``--model``). Called once, when the registry is first used.
    """
    raise NotImplementedError
