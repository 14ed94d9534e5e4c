"""Every registered model honours the model contract (fit, predict, save, load)."""

from __future__ import annotations

import pytest
import torch

from hamacho import Model, Prediction
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


class _Zeros(Model):
    """Fits nothing and scores every image 0: shapes right, detection absent."""

    name = "zeros"

    def fit(self, train_loader):
        for _ in train_loader:
            pass

    def predict(self, images):
        b, _, h, w = images.shape
        return Prediction(scores=torch.zeros(b), maps=torch.zeros(b, h, w))

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_contract_fails_a_model_blind_to_defects(tiny_dataset):
    with pytest.raises(AssertionError, match="does not respond to anomalies"):
        assert_model_contract(_Zeros, tiny_dataset)
