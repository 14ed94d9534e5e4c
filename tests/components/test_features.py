from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from hamacho.components.features import NetworkFeatureAggregator, map_chunks, resize_maps
from hamacho.errors import BackboneError, DataError


@pytest.fixture(scope="module")
def resnet18() -> NetworkFeatureAggregator:
    return NetworkFeatureAggregator("resnet18", ["layer2", "layer3"], weights="none", device="cpu")


def test_aggregator_resnet18_dims_and_strides(resnet18: NetworkFeatureAggregator) -> None:
    assert resnet18.feature_dimensions() == [128, 256]
    assert resnet18.feature_shapes((3, 224, 224)) == {
        "layer2": (128, 28, 28),
        "layer3": (256, 14, 14),
    }
    assert resnet18.backbone_name == "resnet18" and resnet18.weights == "none (seed 0)"
    assert resnet18.device == torch.device("cpu") and resnet18.method == "fx"


def test_aggregator_forward_matches_feature_shapes(resnet18: NetworkFeatureAggregator) -> None:
    out = resnet18(torch.randn(2, 3, 100, 130))
    assert list(out) == ["layer2", "layer3"]
    shapes = resnet18.feature_shapes((3, 100, 130))
    for name, feats in out.items():
        assert feats.shape == (2, *shapes[name])
        assert feats.dtype == torch.float32 and feats.is_contiguous()
        assert not feats.is_inference() and not feats.requires_grad
    out["layer2"].mul_(2)  # callers may post-process in place


def test_aggregator_wide_resnet_truncates_after_last_layer() -> None:
    torch.manual_seed(0)
    net = torchvision.models.wide_resnet50_2()
    ran: list[str] = []
    for name, module in net.named_modules():
        if name.startswith(("layer3.", "layer4.")) and not list(module.children()):
            module.register_forward_hook(lambda m, i, o, name=name: ran.append(name))
    # fx first: the hooks method registers its own hooks on the shared modules.
    for method in ("fx", "hooks"):
        agg = NetworkFeatureAggregator(net, ["layer2", "layer3"], device="cpu", method=method)
        assert agg.method == method
        assert agg.feature_dimensions() == [512, 1024]
        ran.clear()
        out = agg(torch.randn(1, 3, 32, 32))
        assert out["layer2"].shape == (1, 512, 4, 4) and out["layer3"].shape == (1, 1024, 2, 2)
        assert ran and all(name.startswith("layer3.") for name in ran)  # layer4 never ran
        if method == "fx":  # the pruned graph does not even hold layer4
            assert "layer4" not in dict(agg.extractor.named_modules())


def test_aggregator_dot_notation_selects_block(resnet18: NetworkFeatureAggregator) -> None:
    agg = NetworkFeatureAggregator("resnet18", ["layer2.1", "layer2"], weights="none")
    agg.load_state_dict(resnet18.state_dict(), strict=False)
    images = torch.randn(1, 3, 64, 64)
    out = agg(images)
    # layer2.1 is the last block of layer2, so both names give the same map.
    assert torch.equal(out["layer2.1"], out["layer2"])
    assert agg.feature_dimensions((3, 64, 64)) == [128, 128]


def test_aggregator_unknown_layer_lists_valid_names() -> None:
    with pytest.raises(BackboneError, match="unknown layer 'layer5'") as info:
        NetworkFeatureAggregator("resnet18", ["layer2", "layer5"], weights="none")
    message = str(info.value)
    assert "layer4" in message and "layer2.1" in message and "\n" not in message


def test_aggregator_is_frozen_and_stays_in_eval(resnet18: NetworkFeatureAggregator) -> None:
    assert not any(p.requires_grad for p in resnet18.parameters())
    resnet18.train()
    assert not resnet18.extractor.training
    stats = resnet18.extractor.bn1.running_mean.clone()
    resnet18(torch.randn(2, 3, 64, 64) * 5 + 3)
    assert torch.equal(stats, resnet18.extractor.bn1.running_mean)


def test_aggregator_lite0_imagenet_differs_from_random() -> None:
    layers = ["blocks.2", "blocks.4"]
    pretrained = NetworkFeatureAggregator("tf_efficientnet_lite0", layers, device="cpu")
    random = NetworkFeatureAggregator("tf_efficientnet_lite0", layers, weights="none")
    assert pretrained.mean == (0.5, 0.5, 0.5) and pretrained.weights.startswith("imagenet:")
    assert pretrained.feature_shapes((3, 96, 80)) == {
        "blocks.2": (40, 12, 10),
        "blocks.4": (112, 6, 5),
    }
    images = torch.rand(2, 3, 96, 80) * 2 - 1
    a, b = pretrained(images)["blocks.4"], random(images)["blocks.4"]
    assert a.shape == b.shape == (2, 112, 6, 5)
    assert not torch.allclose(a, b, atol=1e-2)


def test_aggregator_bf16_close_to_float32(resnet18: NetworkFeatureAggregator) -> None:
    bf16 = NetworkFeatureAggregator("resnet18", ["layer2"], weights="none", bf16=True)
    bf16.load_state_dict(resnet18.state_dict(), strict=False)
    images = torch.randn(1, 3, 64, 64)
    low, full = bf16(images)["layer2"], resnet18(images)["layer2"]
    assert low.dtype == torch.float32
    assert torch.allclose(low, full, atol=0.1 * full.abs().max().item())


class _Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.head = nn.Conv2d(4, 8, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.head(x) if x.sum() > 0 else self.head(-x)


def test_aggregator_falls_back_to_hooks_when_fx_fails() -> None:
    agg = NetworkFeatureAggregator(_Branchy(), ["stem"], device="cpu")
    assert agg.method == "hooks" and agg.backbone_name == "_Branchy"
    assert agg.feature_shapes((3, 32, 32)) == {"stem": (4, 16, 16)}
    with pytest.raises(BackboneError, match="cannot trace _Branchy"):
        NetworkFeatureAggregator(_Branchy(), ["stem"], method="fx")


def test_aggregator_rejects_bad_input(resnet18: NetworkFeatureAggregator) -> None:
    with pytest.raises(DataError, match=r"\(B, 3, H, W\)"):
        resnet18(torch.randn(3, 64, 64))


def test_map_chunks_equals_one_call_and_runs_the_backbone_per_chunk(
    resnet18: NetworkFeatureAggregator,
) -> None:
    images = torch.randn(7, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    calls: list[int] = []

    def counted(x: torch.Tensor) -> dict[str, torch.Tensor]:
        calls.append(len(x))
        return resnet18(x)

    def embed(maps: list[torch.Tensor]) -> torch.Tensor:  # (b, C2 + C3) per image
        return torch.cat([m.mean((2, 3)) for m in maps], dim=1)

    whole, grid = map_chunks(counted, images, embed)
    chunked, grid3 = map_chunks(counted, images, embed, chunk=3)
    assert calls == [7, 3, 3, 1] and grid == grid3 == (8, 8)  # layer2's grid: stride 8
    assert chunked.shape == whole.shape == (7, 384)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)


def test_resize_maps_to_a_grid_bilinear_and_nearest() -> None:
    g = torch.Generator().manual_seed(0)
    first, deeper = torch.randn(2, 5, 12, 10, generator=g), torch.randn(2, 4, 5, 3, generator=g)
    same, bilinear = resize_maps([first, deeper], first.shape[-2:], "bilinear")
    assert same is first  # already on the grid: untouched
    want = F.interpolate(deeper, size=(12, 10), mode="bilinear", align_corners=False)
    torch.testing.assert_close(bilinear, want, atol=1e-6, rtol=1e-6)
    (nearest,) = resize_maps([deeper], (12, 10), "nearest")
    assert torch.equal(nearest, F.interpolate(deeper, size=(12, 10), mode="nearest"))


def test_aggregator_normalization_is_the_backbones(resnet18: NetworkFeatureAggregator) -> None:
    mean, std = resnet18.normalization()
    assert mean == tuple(resnet18.mean) and std == tuple(resnet18.std) and len(mean) == 3
