"""The optional-hook part of ``hamacho.testing.assert_model_contract``: update, merge, outliers."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import Subset

from hamacho.components import data
from hamacho.engine import make_components
from hamacho.errors import HamachoError
from hamacho.model import Model, offers


def assert_hooks(
    model_cls: type[Model], cfg: Any, train: Any, images: Any, predicted: Callable[..., Any]
) -> None:
    """The optional hooks ``model_cls`` offers, on models A and B fitted on train's two halves.

    ``update`` with B's images and ``merge([B])`` must leave a model that predicts the right
    shapes and scores B's images lower than A alone did (a hook that changes nothing fails);
    ``merge`` must refuse a model of another class with a HamachoError (the CLI's one line) and
    stay unchanged; ``outlier_score`` must return a finite float. ``predicted(model, images,
    after)`` predicts and checks shapes and finiteness.
    """
    hooks = [hook for hook in ("update", "merge", "outlier_score") if offers(model_cls, hook)]
    if not hooks:
        return
    half = list(range(len(train) // 2))
    rest = list(range(len(half), len(train)))

    def loader(part: list[int]) -> Any:
        return data.make_loader(Subset(train, part), cfg.data.batch_size)

    def fitted(part: list[int] | None = None, state: dict | None = None) -> Any:
        net = model_cls(cfg.model, make_components(cfg))
        if state is None:
            net.fit(loader(part or []))
        else:  # a copy, as a run loaded from its artifact
            net.load_state_dict(state)
        return net

    a, b = fitted(half), fitted(rest)
    saved = {key: value.clone() for key, value in a.state_dict().items()}
    new = torch.stack([train[i]["image"] for i in rest])
    before = float(a.predict(new).scores.mean())
    if "outlier_score" in hooks:
        score = a.outlier_score([b])
        assert isinstance(score, float), f"outlier_score returned {type(score).__name__}, not float"
        assert math.isfinite(score), f"outlier_score returned {score}, not a finite float"
    if "update" in hooks:
        a.update(loader(rest))
        _assert_grew(a, new, images, before, "update", predicted)
    if "merge" in hooks:
        merged = fitted(state=saved)  # A before its update
        unchanged = merged.predict(images)
        stranger = type("Stranger", (Model,), {"name": "stranger"})(cfg.model, None)
        try:
            merged.merge([stranger])
        except HamachoError:
            pass
        except Exception as exc:
            raise AssertionError(
                f"merge with a model of another class raised {type(exc).__name__}: {exc}; it "
                "must refuse it with a hamacho.errors.HamachoError naming the mismatch"
            ) from exc
        else:
            raise AssertionError("merge accepted a model of another class: it must refuse it")
        again = merged.predict(images)
        assert torch.equal(again.scores, unchanged.scores), "a refused merge changed the model"
        merged.merge([b])
        _assert_grew(merged, new, images, before, "merge", predicted)


def _assert_grew(
    net: Any, new: Any, images: Any, before: float, hook: str, predicted: Callable[..., Any]
) -> None:
    """After ``hook``, predict keeps its shapes, and the images it added score below before."""
    predicted(net, images, hook)
    after = float(predicted(net, new, hook).scores.mean())
    assert after < before, (
        f"{hook} did not change the model: the images it added score {after:.4g} on average, "
        f"not below the {before:.4g} they scored before"
    )
