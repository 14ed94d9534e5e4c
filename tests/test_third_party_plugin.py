"""The plugin of docs/writing-a-plugin.md, pip-installed outside this repo, run by the CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from .conftest import hamacho_cli, pip_install

DOC = Path(__file__).parents[1] / "docs" / "writing-a-plugin.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), flags=re.S)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The doc's two files as a package, pip-installed into a target folder of its own."""
    src = tmp_path_factory.mktemp("hamacho-meandiff")
    (src / "pyproject.toml").write_text(_blocks("toml")[0])
    (src / "hamacho_meandiff.py").write_text(_blocks("python")[0])
    return pip_install(src, tmp_path_factory.mktemp("site"))


hamacho = hamacho_cli


def test_installed_plugin_is_listed(installed):
    rows = json.loads(hamacho(installed, "models", "--json").stdout)
    mine = [r for r in rows if r["name"] == "meandiff"]
    assert mine == [
        {
            "name": "meandiff",
            "distribution": "hamacho-meandiff",
            "version": "0.1.0",
            "summary": "Per-pixel distance from the mean good image",
        }
    ]


def test_installed_plugin_trains_and_tests(installed, tiny_mvtec, tmp_path):
    run_dir = tmp_path / "run"
    trained = hamacho(
        installed,
        "train",
        "--model",
        "meandiff",
        "--data",
        str(tiny_mvtec),
        "--set",
        "model.sigma=2",
        "--set",
        "data.crop_size=null",
        "--output",
        str(run_dir),
    )
    assert trained.returncode == 0, trained.stderr
    tested = hamacho(installed, "test", "--run", str(run_dir))
    assert tested.returncode == 0, tested.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["image_auroc"] > 0.5  # the synthetic defects change pixels visibly


def test_load_plugins_picks_entry_points(installed):
    bundled = {"HAMACHO_LOAD_PLUGINS": "patchcore,padim"}
    result = hamacho(installed, "models", "--json", **bundled)
    assert [r["name"] for r in json.loads(result.stdout)] == ["padim", "patchcore"]
    unknown = hamacho(installed, "train", "--model", "meandiff", **bundled)
    assert unknown.returncode == 2
    assert unknown.stderr.strip() == (
        "error: Unknown model 'meandiff'. Available: padim, patchcore "
        "(HAMACHO_LOAD_PLUGINS='patchcore,padim' limits the plugins loaded)"
    )
    none = hamacho(installed, "models", "--json", HAMACHO_LOAD_PLUGINS="")
    assert json.loads(none.stdout) == []
