"""Run configuration: typed dataclass defaults, plugin YAML, user YAML and ``--set`` overrides."""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from hamacho.components.data import DataConfig
from hamacho.errors import ConfigError


@dataclass
class TilerConfig:
    """Split large images into tiles before the model sees them (off when tile_size is 0)."""

    tile_size: int = 0
    stride: int | None = None


@dataclass
class ThresholdConfig:
    """How the decision threshold is derived from scores of good training images.

    ``source: auto`` scores every training image leave-one-out (as if it had not been in the
    fit) when the model offers ``training_scores``, so no image is withheld; otherwise a
    ``holdout`` fraction of train/good is kept out of the fit and scored.
    """

    method: Literal["percentile", "sigma"] = "percentile"
    percentile: float = 99.0  # method percentile: this percentile of the good scores
    sigma: float = 3.0  # method sigma: mean + sigma * std of the good scores
    source: Literal["auto", "loo", "holdout"] = "auto"
    holdout: float = 0.1  # fraction of train/good kept out (source holdout, or auto w/o LOO)

    def validate(self) -> None:
        """Raise ConfigError naming the first value out of range."""
        if not 0 <= self.percentile <= 100:
            raise ConfigError(f"threshold.percentile must be in [0, 100], got {self.percentile}")
        if not math.isfinite(self.sigma):
            raise ConfigError(f"threshold.sigma must be a finite number, got {self.sigma}")
        if not 0 <= self.holdout < 1:
            raise ConfigError(
                f"threshold.holdout must be in [0, 1) (a fraction of train/good), got "
                f"{self.holdout}"
            )


@dataclass
class RunConfig:
    """Where and how a run executes."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    seed: int = 0

    def validate(self) -> None:
        """Raise ConfigError for a device name torch would not parse (availability: engine)."""
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise ConfigError(
                f"run.device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}"
            )


@dataclass
class Config:
    """The fully resolved configuration of one run."""

    model: Any
    data: DataConfig = field(default_factory=DataConfig)
    tiler: TilerConfig = field(default_factory=TilerConfig)
    threshold: ThresholdConfig = field(default_factory=ThresholdConfig)
    run: RunConfig = field(default_factory=RunConfig)
    explicit: frozenset[str] = frozenset()  # dotted keys the user set (--config / --set)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict of every section (what is saved with a run)."""
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}


SECTIONS = ("model", "data", "tiler", "threshold", "run")


def resolve(
    model_config_cls: type,
    layers: list[dict[str, Any]] | None = None,
    explicit_layers: list[dict[str, Any]] | None = None,
) -> Config:
    """Build a Config from dataclass defaults overlaid by each mapping in order.

    ``layers`` are defaults (e.g. the plugin's config.yaml); ``explicit_layers`` come from the
    user and are remembered in ``Config.explicit``.
    """
    config = Config(model=model_config_cls())
    explicit: set[str] = set()
    for mapping in layers or []:
        _apply(config, mapping, explicit=None)
    for mapping in explicit_layers or []:
        _apply(config, mapping, explicit=explicit)
    config.explicit = frozenset(explicit)
    validate(config)
    return config


def validate(config: Config) -> None:
    """Run each section's ``validate()`` (when it has one): ranges are checked before any work."""
    for name in SECTIONS:
        check = getattr(getattr(config, name), "validate", None)
        if callable(check):
            check()


def apply(config: Config, mapping: dict[str, Any], explicit: bool = False) -> None:
    """Overlay ``mapping`` (sections of keys) onto ``config`` in place, with type checks."""
    keys: set[str] = set(config.explicit)
    _apply(config, mapping, explicit=keys if explicit else None)
    config.explicit = frozenset(keys)
    validate(config)


def from_dict(model_config_cls: type, data: dict[str, Any]) -> Config:
    """Rebuild a saved config (e.g. from an artifact; older runs' settings are renamed)."""
    return resolve(model_config_cls, [_upgrade(data)])


def _upgrade(data: dict[str, Any]) -> dict[str, Any]:
    """Rename settings of runs saved before 0.1's rename: threshold.value -> percentile/sigma."""
    threshold = data.get("threshold")
    if not isinstance(threshold, dict) or "value" not in threshold:
        return data
    threshold = dict(threshold)
    value = threshold.pop("value")
    threshold["sigma" if threshold.get("method") == "sigma" else "percentile"] = value
    threshold.setdefault("source", "holdout")  # what those runs did
    return {**data, "threshold": threshold}


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML override file: a mapping of sections to mappings."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file '{path}' is a folder. Pass a YAML file with --config")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8-sig"))  # -sig: a BOM is fine
    except FileNotFoundError:
        raise ConfigError(f"config file '{path}' does not exist") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file '{path}' is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at "
            f"offset {exc.start}). Save it as UTF-8"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file '{path}': {exc.strerror}") from None
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise ConfigError(f"config file '{path}' is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must be a mapping of sections ({_valid()})")
    return data


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Turn ``["model.k=5", "data.batch_size=8"]`` into nested sections; values are YAML."""
    result: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ConfigError(
                f"override {item!r} must look like section.key=value, e.g. model.backbone=resnet18"
            )
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        result.setdefault(section, {})[name] = value
    return result


def _valid() -> str:
    return ", ".join(SECTIONS)


def _apply(config: Config, mapping: dict[str, Any], explicit: set[str] | None) -> None:
    for section, values in mapping.items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section {section!r}. Valid sections: {_valid()}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"config section {section!r} must be a mapping of keys to values")
        target = getattr(config, section)
        hints = typing.get_type_hints(type(target))
        names = [f.name for f in dataclasses.fields(target)]
        for key, value in values.items():
            if key not in names:
                raise ConfigError(
                    f"unknown config key '{section}.{key}'. Valid keys in {section}: "
                    + ", ".join(names)
                )
            setattr(target, key, _coerce(value, hints[key], f"{section}.{key}"))
            if explicit is not None:
                explicit.add(f"{section}.{key}")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against a type hint, converting where it is lossless (int -> float)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0] if errors else ConfigError(f"{key} cannot be {value!r}")
    if origin in (list, tuple):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # `--set model.layers=layer2` means one layer
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (inner, *_) = typing.get_args(hint) or (Any,)
        return [_coerce(v, inner, key) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be a whole number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be text, got {value!r}")
    if typing.get_origin(hint) is typing.Literal:
        if value in typing.get_args(hint):
            return value
        valid = ", ".join(map(str, typing.get_args(hint)))
        raise ConfigError(f"{key} must be one of {valid}, got {value!r}")
    return value
