"""Every registered model honours the model contract (fit, predict, save, load)."""

from __future__ import annotations

import pytest

from hamacho.components.synthetic import make_synthetic_dataset
from hamacho.plugins import get_registry
from hamacho.testing import assert_model_contract


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "tiny"
    return make_synthetic_dataset(root, n_train=8, n_test_good=3, n_test_defect=3, size=64)


@pytest.mark.parametrize("name", sorted(get_registry().models()))
def test_model_contract(name, tiny_dataset):
    assert_model_contract(get_registry().get(name).cls, tiny_dataset)
