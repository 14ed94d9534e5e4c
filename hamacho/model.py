"""The model contract every plugin implements, and the components handed to it."""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    from hamacho.components.features import NetworkFeatureAggregator
    from hamacho.components.maps import AnomalyMapGenerator
    from hamacho.components.sampling import CoresetSampler
    from hamacho.components.search import NearestNeighbourSearch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Prediction:
    """What ``Model.predict`` returns: one score and one anomaly map per image."""

    scores: torch.Tensor  # (B,)
    maps: torch.Tensor  # (B, H, W), at the input resolution


@dataclass
class Components:
    """Shared building blocks set up by the core for one run and handed to each model.

    The factories take the component's own arguments and bind the run's device, so a model
    writes ``components.feature_aggregator("resnet18", ["layer2"])``. A model that needs none
    of them may ignore the argument.
    """

    device: torch.device
    # (backbone, layers, weights=..., bf16=...) -> frozen backbone returning {layer: (B, C, h, w)}
    feature_aggregator: Callable[..., NetworkFeatureAggregator]
    # (backend=...) -> k-NN index: .fit(bank (N, D)), .search(queries (M, D), k)
    search: Callable[..., NearestNeighbourSearch]
    # (ratio=..., max_size=..., projection_dim=..., seed=...) -> greedy k-center coreset
    sampler: Callable[..., CoresetSampler]
    # (sigma=..., border=...) -> callable (B, h, w) patch scores -> (B, H, W) smoothed maps
    anomaly_map: type[AnomalyMapGenerator]


@dataclass
class NoConfig:
    """Config of a model that has no settings."""


class Model:
    """Base class of every hamacho model, bundled or third-party.

    Subclasses set ``name``, ``summary`` and ``Config`` and implement ``fit``, ``predict``,
    ``state_dict`` and ``load_state_dict``. The core builds them as ``Model(config, components)``
    and reads nothing else from a model but the optional hooks below (``training_scores``,
    ``update``, ``merge``, ``outlier_score``, ``export_module``, ...); a subclass need not call
    ``super().__init__``.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Config: ClassVar[type] = NoConfig
    # model-section overrides used when the default backbone's ImageNet weights cannot be had
    # offline and the user did not choose a backbone (e.g. a backbone with bundled weights).
    offline_fallback: ClassVar[dict[str, Any]] = {}
    # model-section overrides that make the model tiny, for the contract test.
    test_overrides: ClassVar[dict[str, Any]] = {}
    # backbone-name pattern (fnmatch, first match wins) -> the feature layers this model uses
    # with it; ``default_layers`` reads it (``hamacho benchmark --backbones NAME``).
    layer_presets: ClassVar[dict[str, list[str]]] = {}

    def __init__(self, config: Any, components: Components) -> None:
        self.config = config
        self.components = components

    def fit(self, train_loader: Iterable[dict[str, Any]]) -> None:
        """Learn normality in one pass over batches ``{"image": (B, 3, H, W), ...}``."""
        raise NotImplementedError

    def predict(self, images: torch.Tensor) -> Prediction:
        """Score a normalised batch (B, 3, H, W)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything ``load_state_dict`` needs, as tensors only."""
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what ``state_dict`` returned."""
        raise NotImplementedError

    def training_scores(self, train_loader: Iterable[dict[str, Any]]) -> torch.Tensor | None:
        """Optional: leave-one-out image scores (N,) of the fitted training images, in order.

        Called after ``fit`` with the same images, unshuffled. Each image is scored as if it had
        not been in the fit (e.g. against a memory bank without that image's rows), so the
        engine sets the decision threshold without withholding any image. Return None (the
        default) when the model cannot: the run then has no threshold. A model that does not
        override this hook gets ``threshold.holdout`` images held out of its fit instead.
        """
        return None

    def update(self, train_loader: Iterable[dict[str, Any]]) -> None:
        """Optional: add more good images to the fitted model (``hamacho update``).

        The result should be what ``fit`` on the old and new images together would give (exactly,
        or as closely as the model can without the old images). Afterwards ``training_scores``
        is called with the new images only. Not overriding it means the model cannot be updated.
        """
        raise NotImplementedError

    def merge(self, others: Sequence[Model]) -> None:
        """Optional: absorb fitted models of this class and settings (``hamacho merge``).

        ``others`` were trained elsewhere on other images; afterwards this model should be what
        ``fit`` on all their images would give. The core has checked that the runs' settings and
        backbone weights agree; refuse a model it cannot absorb (another class, another feature
        grid) with a ``hamacho.errors`` error, before changing anything. Not overriding it means
        the model cannot be merged.
        """
        raise NotImplementedError

    def outlier_score(self, others: Sequence[Model]) -> float:
        """Optional: how unlike ``others`` this fitted model is, larger = less alike.

        Any unit, as long as every site's score is comparable (``merge --reject-outliers``
        compares each site's score with the others'). Needed only for outlier rejection.
        """
        raise NotImplementedError

    def export_module(self) -> torch.nn.Module | None:
        """Optional: a traceable module, normalised (N, 3, h, w) -> (scores (N,), maps (N, h, w)).

        ``hamacho export`` wraps it with the run's preprocessing into one ONNX graph; None (the
        default) means the model does not support export.
        """
        return None

    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The (mean, std) the input images must be normalised with (default: ImageNet's)."""
        return IMAGENET_MEAN, IMAGENET_STD

    def info(self) -> dict[str, Any]:
        """Model-specific facts for ``train.json`` (sizes, backbone identity, ...)."""
        return {}

    @classmethod
    def default_layers(cls, backbone: str) -> list[str] | None:
        """The feature layers to use with ``backbone`` (a bare name), or None if not known."""
        for pattern, layers in cls.layer_presets.items():
            if fnmatch.fnmatchcase(backbone, pattern):
                return list(layers)
        return None


def offers(model_cls: type[Model], hook: str) -> bool:
    """Whether ``model_cls`` overrides the optional ``hook`` (``update``, ``merge``, ...)."""
    return getattr(model_cls, hook, None) not in (None, getattr(Model, hook))


def config_to_dict(config: Any) -> dict[str, Any]:
    """A dataclass config as a plain dict."""
    return dataclasses.asdict(config)
