"""assert_model_contract checks the optional hooks (update, merge, outlier_score) a model offers."""

from __future__ import annotations

import pytest
import torch

from hamacho import Model, Prediction
from hamacho.components.synthetic import make_synthetic_dataset
from hamacho.errors import ConfigError
from hamacho.testing import assert_model_contract


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "tiny"
    return make_synthetic_dataset(root, n_train=8, n_test_good=3, n_test_defect=3, size=64)


class _Memory(Model):
    """Keeps its training images; a pixel scores its distance to the nearest one's. No hooks."""

    name = "memory"

    def fit(self, train_loader):
        self.images = torch.cat([batch["image"] for batch in train_loader])

    def predict(self, images):
        # compared at the stored resolution (full, unless a broken hook below shrinks it)
        small = torch.nn.functional.interpolate(images, size=self.images.shape[-2:], mode="area")
        maps = (small[:, None] - self.images[None]).abs().sum(2).amin(1)  # (B, h, w)
        return Prediction(scores=maps.flatten(1).amax(1), maps=maps)

    def state_dict(self):
        return {"images": self.images}

    def load_state_dict(self, state):
        self.images = state["images"]


class _Growing(_Memory):
    """_Memory with working hooks: update and merge add images, outlier_score a distance."""

    name = "growing"

    def update(self, train_loader):
        self.images = torch.cat([self.images, *(batch["image"] for batch in train_loader)])

    def merge(self, others):
        for other in others:
            if not isinstance(other, _Memory):
                raise ConfigError("memory merges only memory models")
            self.images = torch.cat([self.images, other.images])

    def outlier_score(self, others):
        pooled = torch.cat([other.images for other in others])
        return float((self.images.mean(0) - pooled.mean(0)).abs().mean())


class _UpdateDoesNothing(_Growing):
    def update(self, train_loader):
        for _ in train_loader:
            pass


class _UpdateShrinks(_Growing):
    """update keeps quarter-resolution images, so maps come out a quarter of the input's size."""

    def update(self, train_loader):
        super().update(train_loader)
        self.images = self.images[..., ::4, ::4]


class _MergeIgnoresOthers(_Growing):
    def merge(self, others):  # refuses a stranger, then adds nothing
        if not all(isinstance(other, _Memory) for other in others):
            raise ConfigError("memory merges only memory models")


class _MergeTakesAnything(_Growing):
    def merge(self, others):  # skips what it cannot use instead of refusing it
        self.images = torch.cat([self.images, *(o.images for o in others if hasattr(o, "images"))])


class _MergeCrashes(_Growing):
    def merge(self, others):  # AttributeError on a stranger, not a one-line HamachoError
        self.images = torch.cat([self.images, *(other.images for other in others)])


class _OutlierNan(_Growing):
    def outlier_score(self, others):
        return float("nan")


class _OutlierTensor(_Growing):
    def outlier_score(self, others):
        return torch.tensor(1.0)


@pytest.mark.parametrize("model", [_Memory, _Growing])
def test_contract_passes_with_and_without_hooks(model, tiny_dataset):
    assert_model_contract(model, tiny_dataset)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (_UpdateDoesNothing, "update did not change the model"),
        (_UpdateShrinks, r"after update: maps shape \(6, 16, 16\) != \(6, 64, 64\)"),
        (_MergeIgnoresOthers, "merge did not change the model"),
        (_MergeTakesAnything, "merge accepted a model of another class"),
        (_MergeCrashes, "merge with a model of another class raised AttributeError"),
        (_OutlierNan, "outlier_score returned nan, not a finite float"),
        (_OutlierTensor, "outlier_score returned Tensor, not float"),
    ],
)
def test_contract_fails_a_broken_hook(model, message, tiny_dataset):
    with pytest.raises(AssertionError, match=message):
        assert_model_contract(model, tiny_dataset)
