from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from hamacho import config
from hamacho.errors import ConfigError


@dataclass
class _ToyConfig:
    backbone: str = "resnet18"
    layers: list[str] = field(default_factory=lambda: ["layer2"])
    k: int = 1
    ratio: float = 0.1
    cap: int | None = None
    flag: bool = False


def test_resolve_defaults_then_layers_in_order():
    cfg = config.resolve(
        _ToyConfig,
        [{"model": {"k": 3}, "data": {"image_size": 128, "crop_size": 112}}],
        [{"model": {"k": 5}}],
    )
    assert cfg.model.k == 5
    assert cfg.data.image_size == 128
    assert cfg.model.backbone == "resnet18"
    assert cfg.explicit == {"model.k"}


def test_parse_overrides_reads_yaml_values():
    parsed = config.parse_overrides(
        ["model.k=9", "model.layers=[layer2, layer3]", "model.cap=null", "model.flag=true"]
    )
    cfg = config.resolve(_ToyConfig, [], [parsed])
    assert cfg.model.k == 9
    assert cfg.model.layers == ["layer2", "layer3"]
    assert cfg.model.cap is None
    assert cfg.model.flag is True


def test_single_value_for_list_becomes_list():
    cfg = config.resolve(_ToyConfig, [], [config.parse_overrides(["model.layers=layer4"])])
    assert cfg.model.layers == ["layer4"]


def test_int_widens_to_float_but_not_the_reverse():
    cfg = config.resolve(_ToyConfig, [], [{"model": {"ratio": 1}}])
    assert cfg.model.ratio == 1.0 and isinstance(cfg.model.ratio, float)
    with pytest.raises(ConfigError, match="model.k must be a whole number, got 0.5"):
        config.resolve(_ToyConfig, [], [{"model": {"k": 0.5}}])


def test_unknown_key_names_it_and_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        config.resolve(_ToyConfig, [], [config.parse_overrides(["model.bakcbone=x"])])
    message = str(err.value)
    assert "unknown config key 'model.bakcbone'" in message
    assert "backbone, layers, k, ratio, cap, flag" in message


def test_unknown_section_lists_sections():
    with pytest.raises(ConfigError, match="unknown config section 'modle'. Valid sections: model"):
        config.resolve(_ToyConfig, [], [{"modle": {"k": 1}}])


def test_override_without_section_is_rejected():
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        config.parse_overrides(["k=1"])


def test_bool_is_not_a_number():
    with pytest.raises(ConfigError, match="model.k must be a whole number"):
        config.resolve(_ToyConfig, [], [{"model": {"k": True}}])


def test_load_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.load_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load_yaml(bad)
    flat = tmp_path / "flat.yaml"
    flat.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping of sections"):
        config.load_yaml(flat)


def test_to_dict_round_trips():
    cfg = config.resolve(_ToyConfig, [], [{"model": {"k": 4}, "tiler": {"tile_size": 64}}])
    again = config.from_dict(_ToyConfig, cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()


def test_apply_marks_keys_explicit_only_when_asked():
    cfg = config.resolve(_ToyConfig)
    config.apply(cfg, {"model": {"backbone": "x"}})
    assert cfg.model.backbone == "x" and not cfg.explicit
    config.apply(cfg, {"model": {"k": 2}}, explicit=True)
    assert cfg.explicit == {"model.k"}


def test_resolve_checks_ranges_after_overrides():
    # an override that makes the data section inconsistent is caught before any work
    with pytest.raises(ConfigError, match="data.crop_size=224 is larger than data.image_size=128"):
        config.resolve(_ToyConfig, [], [{"data": {"image_size": 128}}])


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("holdout", 1.5, r"threshold.holdout must be in \[0, 1\)"),
        ("holdout", -0.1, r"threshold.holdout must be in \[0, 1\)"),
        ("percentile", 101, r"threshold.percentile must be in \[0, 100\]"),
        ("sigma", float("inf"), "threshold.sigma must be a finite number"),
        ("method", "median", "threshold.method must be one of percentile, sigma"),
        ("source", "oracle", "threshold.source must be one of auto, loo, holdout"),
    ],
)
def test_threshold_settings_out_of_range(key, value, match):
    with pytest.raises(ConfigError, match=match):
        config.resolve(_ToyConfig, [], [{"threshold": {key: value}}])


@pytest.mark.parametrize(("method", "key"), [("percentile", "percentile"), ("sigma", "sigma")])
def test_from_dict_reads_runs_saved_with_threshold_value(method, key):
    saved = {"threshold": {"method": method, "value": 2.5, "holdout": 0.1}}
    cfg = config.from_dict(_ToyConfig, saved)
    assert getattr(cfg.threshold, key) == 2.5 and cfg.threshold.source == "holdout"
    assert saved["threshold"]["value"] == 2.5  # the saved mapping itself is left as it was
