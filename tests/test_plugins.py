from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

import hamacho
from hamacho import Model, Prediction, hookimpl
from hamacho.errors import PluginError, UnknownModelError
from hamacho.plugins import Registry, get_registry, reset_registry

from .conftest import fake_dist

CORE = Path(hamacho.__file__).parent


_TOY = """
    from dataclasses import dataclass
    from hamacho import Model, hookimpl

    @dataclass
    class Cfg:
        pass

    class Toy(Model):
        name = "{name}"
        summary = "toy"
        Config = Cfg

    @hookimpl
    def hamacho_register_models():
        return [Toy]
"""


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("toy_")]:
        del sys.modules[name]


def test_bundled_models_come_from_their_distributions():
    models = Registry().models()
    assert models["patchcore"].distribution == "hamacho-patchcore"
    assert models["padim"].distribution == "hamacho-padim"
    assert models["patchcore"].version == "0.1.0"


def test_bundled_plugins_use_only_the_public_hook():
    registry = Registry()
    registry.models()
    for plugin, module in [("patchcore", "hamacho_patchcore"), ("padim", "hamacho_padim")]:
        loaded = registry.pm.get_plugin(plugin)
        assert loaded is sys.modules[module]  # registered as the entry point's module
        hooks = [c.name for c in registry.pm.get_hookcallers(loaded)]
        assert hooks == ["hamacho_register_models"]
    core_source = "\n".join(p.read_text() for p in CORE.rglob("*.py"))
    assert "hamacho_patchcore" not in core_source
    assert "hamacho_padim" not in core_source


def test_unknown_model_lists_available():
    with pytest.raises(UnknownModelError) as err:
        Registry().get("patchcor")
    assert str(err.value) == "Unknown model 'patchcor'. Available: padim, patchcore"


def test_third_party_entry_point_loads_and_env_filters_it(site, monkeypatch):
    fake_dist(site, "toy-plugin", "toy_one", _TOY.format(name="toy"), "toy")
    assert Registry().get("toy").distribution == "toy-plugin"
    assert Registry().get("toy").version == "1.2.3"
    monkeypatch.setenv("HAMACHO_LOAD_PLUGINS", "")
    assert set(Registry().models()) == set()  # bundled or not, every plugin is an entry point
    monkeypatch.setenv("HAMACHO_LOAD_PLUGINS", "patchcore,padim")
    assert set(Registry().models()) == {"padim", "patchcore"}
    monkeypatch.setenv("HAMACHO_LOAD_PLUGINS", "toy, other")
    assert set(Registry().models()) == {"toy"}
    monkeypatch.setenv("HAMACHO_LOAD_PLUGINS", "other")
    assert "toy" not in Registry().models()
    with pytest.raises(UnknownModelError, match="HAMACHO_LOAD_PLUGINS='other' limits"):
        Registry().get("toy")


def test_two_plugins_claiming_one_name_names_both(site):
    fake_dist(site, "toy-clash", "toy_clash", _TOY.format(name="patchcore"), "clash")
    with pytest.raises(PluginError) as err:
        Registry().models()
    assert "hamacho-patchcore" in str(err.value)
    assert "toy-clash" in str(err.value)


def test_misspelt_hook_fails_loudly(site):
    source = """
        from hamacho import hookimpl

        @hookimpl
        def hamacho_register_model():
            return []
    """
    fake_dist(site, "toy-typo", "toy_typo", source, "typo")
    with pytest.raises(PluginError, match="unknown hook.*hamacho_register_models"):
        Registry().models()


def test_broken_plugin_import_names_the_plugin(site):
    fake_dist(site, "toy-broken", "toy_broken", "raise RuntimeError('boom')\n", "broken")
    with pytest.raises(PluginError, match="'broken' from toy-broken failed to import.*boom"):
        Registry().models()


def test_registered_class_must_be_a_model():
    registry = Registry(load_entry_points=False)
    plugin = types.SimpleNamespace(hamacho_register_models=hookimpl(lambda: [dict]))
    registry.register(plugin, "bad")
    with pytest.raises(PluginError, match="not a subclass of hamacho.Model"):
        registry.models()


class _Inline(Model):
    name = "inline"
    summary = "registered by the fixture"

    def predict(self, images):
        return Prediction(scores=images.mean((1, 2, 3)), maps=images.mean(1))


class _InlinePlugin:
    @hookimpl
    def hamacho_register_models(self):
        return [_Inline]


def test_register_plugin_fixture_registers_for_one_test(register_plugin):
    register_plugin(_InlinePlugin(), name="inline-plugin")
    entry = get_registry().get("inline")
    assert entry.distribution == "inline-plugin (not installed)"


def test_register_plugin_fixture_cleaned_up():
    assert "inline" not in get_registry().models()


def test_reset_registry_gives_a_fresh_one():
    first = get_registry()
    reset_registry()
    assert get_registry() is not first


def test_core_names_no_bundled_model():
    """The core reaches bundled models only through the registry, like any plugin's."""
    root = Path(__file__).parents[1]
    bundled = sorted(p.parent.name for p in (root / "plugins").glob("*/pyproject.toml"))
    assert {"patchcore", "padim"} <= set(bundled)
    hits = [
        f"{path.relative_to(root)}:{n}: {line.strip()}"
        for path in sorted((root / "hamacho").rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if any(name in line.lower() for name in bundled)
    ]
    assert hits == []
