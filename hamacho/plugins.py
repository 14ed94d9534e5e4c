"""Plugin manager and model registry: models come from ``hamacho`` entry points."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
from collections.abc import Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import cast

import pluggy

from hamacho import hookspecs
from hamacho.errors import PluginError, UnknownModelError
from hamacho.model import Model

ENTRY_POINT_GROUP = "hamacho"
# Picks the entry points to load (comma-separated names; empty: none). Every plugin, bundled
# with hamacho or not, is an entry point like any other, so this applies to all alike.
LOAD_ENV = "HAMACHO_LOAD_PLUGINS"


@dataclass(frozen=True)
class ModelEntry:
    """One registered model and where it came from."""

    cls: type[Model]
    plugin: str
    distribution: str
    version: str

    @property
    def name(self) -> str:
        return self.cls.name


class Registry:
    """Loads plugins lazily and maps model names to their classes."""

    def __init__(self, load_entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self._load_entry_points = load_entry_points
        self._loaded = False
        self._dists: dict[str, tuple[str, str]] = {}  # plugin name -> (distribution, version)
        self._models: dict[str, ModelEntry] | None = None

    # -- plugins ---------------------------------------------------------------------------
    def register(
        self, plugin: ModuleType | object, name: str, distribution: str = "", version: str = ""
    ) -> None:
        """Register a plugin object (module or instance) by hand, e.g. from a test."""
        self._ensure_loaded()
        self._register(plugin, name, distribution or f"{name} (not installed)", version)
        self._models = None

    def unregister(self, name: str) -> None:
        """Remove a plugin registered under ``name``."""
        self.pm.unregister(name=name)
        self._dists.pop(name, None)
        self._models = None

    def _register(self, plugin: object, name: str, distribution: str, version: str) -> None:
        if self.pm.has_plugin(name):
            other = self._dists.get(name, ("another plugin", ""))[0]
            raise PluginError(
                f"plugin name {name!r} from {distribution} is already taken by {other}. "
                "Uninstall one, or disable one with HAMACHO_LOAD_PLUGINS"
            )
        self.pm.register(plugin, name=name)
        self._dists[name] = (distribution, version)
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            self.pm.unregister(name=name)
            self._dists.pop(name, None)
            raise PluginError(
                f"plugin {name!r} ({distribution}) implements an unknown hook: {exc}. "
                "Valid hooks: " + ", ".join(_hook_names())
            ) from None

    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        if not self._load_entry_points:
            return
        wanted = _wanted_plugins()
        for ep in _entry_points():
            dist = ep.dist.name if ep.dist is not None else "unknown"
            if wanted is not None and ep.name not in wanted:
                continue
            try:
                module = ep.load()
            except Exception as exc:  # a broken third-party plugin must not hide the cause
                raise PluginError(
                    f"plugin {ep.name!r} from {dist} failed to import: "
                    f"{type(exc).__name__}: {exc}. Disable it with {LOAD_ENV}= "
                    "(empty) or uninstall it"
                ) from exc
            version = ep.dist.version if ep.dist is not None else ""
            self._register(module, ep.name, dist, version)

    def plugins(self) -> dict[str, tuple[str, str]]:
        """Loaded plugin names -> (distribution, version)."""
        self._ensure_loaded()
        return dict(self._dists)

    # -- models ----------------------------------------------------------------------------
    def models(self) -> dict[str, ModelEntry]:
        """All registered models by name, sorted."""
        self._ensure_loaded()
        if self._models is None:
            self._models = self._collect()
        return self._models

    def _collect(self) -> dict[str, ModelEntry]:
        found: dict[str, ModelEntry] = {}
        for impl in self.pm.hook.hamacho_register_models.get_hookimpls():
            dist, version = self._dists.get(impl.plugin_name, (impl.plugin_name, ""))
            # pluggy types hook results as object; the hookspec returns a list of classes
            classes = cast("Iterable[object]", impl.function() or [])
            for obj in classes:
                cls = _validate_model_class(obj, impl.plugin_name, dist)
                entry = ModelEntry(cls, impl.plugin_name, dist, version)
                if cls.name in found:
                    other = found[cls.name]
                    raise PluginError(
                        f"model name {cls.name!r} is claimed by two plugins: "
                        f"{other.distribution} ({other.plugin}) and {dist} ({impl.plugin_name}). "
                        "Uninstall one, or disable one with HAMACHO_LOAD_PLUGINS"
                    )
                found[cls.name] = entry
        return dict(sorted(found.items()))

    def get(self, name: str) -> ModelEntry:
        """The entry for model ``name``; UnknownModelError lists the valid names."""
        models = self.models()
        if name not in models:
            available = ", ".join(models) or "none (no model plugin is installed)"
            limited = os.environ.get(LOAD_ENV)
            hint = "" if limited is None else f" ({LOAD_ENV}={limited!r} limits the plugins loaded)"
            raise UnknownModelError(f"Unknown model {name!r}. Available: {available}{hint}")
        return models[name]


def _wanted_plugins() -> set[str] | None:
    raw = os.environ.get(LOAD_ENV)
    if raw is None:
        return None
    return {part.strip() for part in raw.split(",") if part.strip()}


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    unique = {(ep.name, ep.value): ep for ep in eps}  # editable + regular installs can repeat
    return sorted(unique.values(), key=lambda ep: ep.name)


def _hook_names() -> list[str]:
    return sorted(n for n in dir(hookspecs) if n.startswith("hamacho_"))


def _validate_model_class(cls: object, plugin: str, dist: str) -> type[Model]:
    """Return `cls` if it is a usable model class, else raise PluginError."""
    where = f"plugin {plugin!r} ({dist})"
    if not (isinstance(cls, type) and issubclass(cls, Model)):
        raise PluginError(f"{where} registered {cls!r}, which is not a subclass of hamacho.Model")
    if not isinstance(cls.name, str) or not cls.name:
        raise PluginError(f"{where}: model class {cls.__qualname__} must set a non-empty `name`")
    if not dataclasses.is_dataclass(cls.Config):
        raise PluginError(f"{where}: {cls.__qualname__}.Config must be a dataclass")
    return cls


_registry: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, created (and plugins loaded) on first use."""
    global _registry
    if _registry is None:
        _registry = Registry()
    return _registry


def reset_registry() -> None:
    """Forget loaded plugins so the next use reloads them (tests, env changes)."""
    global _registry
    _registry = None
