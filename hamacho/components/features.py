"""Frozen, truncated backbones that return intermediate feature maps by layer name."""

from __future__ import annotations

import contextlib
import difflib
import logging
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from timm.models import create_feature_extractor
from torch import nn
from torch.func import functional_call

from hamacho.components.backbones import IMAGENET_MEAN, IMAGENET_STD, Backbone, load_backbone
from hamacho.errors import BackboneError, DataError, one_line

logger = logging.getLogger(__name__)

Method = Literal["auto", "fx", "hooks"]
Resize = Literal["bilinear", "nearest"]


class _StopForward(Exception):
    """Raised by the last hook so layers after the requested ones never run."""


class _HookExtractor(nn.Module):
    """Fallback for networks FX cannot trace: forward hooks plus an early stop."""

    def __init__(self, net: nn.Module, layers: list[str]) -> None:
        super().__init__()
        self.net = net
        self.layers = layers
        self._out: dict[str, torch.Tensor] = {}
        modules = dict(net.named_modules())
        for name in layers:
            modules[name].register_forward_hook(self._make_hook(name))

    def _make_hook(self, name: str):
        def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
            self._out[name] = output
            if len(self._out) == len(self.layers):
                raise _StopForward

        return hook

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self._out = {}
        try:
            self.net(x)
        except _StopForward:
            pass
        out, self._out = self._out, {}
        return out


class NetworkFeatureAggregator(nn.Module):
    """Run a frozen backbone up to its last requested layer and return those layers' maps."""

    def __init__(
        self,
        backbone: str | nn.Module | Backbone,
        layers: Sequence[str],
        weights: str = "imagenet",
        device: str | torch.device | None = None,
        bf16: bool = False,
        *,
        method: Method = "auto",
    ) -> None:
        """Build the extractor.

        Args:
            backbone: a name for `load_backbone`, a loaded `Backbone`, or any nn.Module
                (ImageNet normalisation assumed; `weights` is then ignored).
            layers: module names in dot notation, e.g. ``["layer2", "layer3"]`` or ``"blocks.4"``.
            method: "fx" prunes the traced graph, "hooks" stops the forward after the last layer,
                "auto" is fx with a fallback to hooks when tracing fails.
        """
        super().__init__()
        if isinstance(backbone, str):
            backbone = load_backbone(backbone, weights)
        elif not isinstance(backbone, Backbone):
            name = type(backbone).__name__
            backbone = Backbone(backbone, name, IMAGENET_MEAN, IMAGENET_STD, "module", "module")
        self.backbone_name = backbone.name
        self.mean, self.std, self.weights = backbone.mean, backbone.std, backbone.weights
        self.layers = list(layers)
        self.bf16 = bf16
        _check_layers(backbone.module, self.layers, backbone.name)
        net = backbone.module.eval().requires_grad_(False)
        self.extractor, self.method = _build_extractor(net, self.layers, method, backbone.name)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.extractor.to(device).to(memory_format=torch.channels_last).eval()
        self._device = device
        self._shapes: dict[tuple[int, ...], dict[str, tuple[int, int, int]]] = {}

    @property
    def device(self) -> torch.device:
        """Device the backbone's weights live on."""
        param = next(self.extractor.parameters(), None)
        return param.device if param is not None else self._device

    def train(self, mode: bool = True) -> NetworkFeatureAggregator:
        """Keep the backbone in eval mode whatever the caller asks (frozen batch-norm stats)."""
        super().train(mode)
        self.extractor.eval()
        return self

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, H, W) float -> {layer: (B, C, h, w) contiguous float32}, ordered like layers."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise DataError(
                f"backbone input must be (B, 3, H, W), got {tuple(images.shape)}. "
                "Pass RGB batches from the data loader"
            )
        device = self.device
        autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16)
            if self.bf16
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            x = images.to(device, torch.float32, memory_format=torch.channels_last)
            raw = self.extractor(x)
        # Copy outside inference_mode: callers get ordinary tensors they may modify in place.
        return {name: self._plain(name, raw.get(name)) for name in self.layers}

    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The (mean, std) the backbone's inputs are normalised with (``Model.normalization``)."""
        return tuple(self.mean), tuple(self.std)

    def feature_shapes(
        self, input_shape: Sequence[int] = (3, 224, 224)
    ) -> dict[str, tuple[int, int, int]]:
        """(C, h, w) of each layer for one (C, H, W) input, found on meta tensors (no compute)."""
        key = tuple(int(s) for s in input_shape)
        if key not in self._shapes:
            out = self._shape_probe(key)
            self._shapes[key] = {
                name: _chw(self._plain(name, out.get(name))) for name in self.layers
            }
        return dict(self._shapes[key])

    def feature_dimensions(self, input_shape: Sequence[int] = (3, 224, 224)) -> list[int]:
        """Channels of each requested layer, in `layers` order."""
        return [shape[0] for shape in self.feature_shapes(input_shape).values()]

    def _shape_probe(self, key: tuple[int, ...]) -> dict[str, torch.Tensor]:
        """Run on meta tensors (shapes only, no compute); fall back to a real batch-1 forward."""
        state = {
            k: torch.empty_like(v, device="meta")
            for k, v in [*self.extractor.named_parameters(), *self.extractor.named_buffers()]
        }
        x = torch.empty((1, *key), device="meta")
        try:
            out = functional_call(self.extractor, state, (x,))
            if all(isinstance(out.get(n), torch.Tensor) for n in self.layers):
                return out
        except Exception as exc:  # some ops lack meta kernels; a real forward still works
            logger.debug("meta shape probe failed for %s: %s", self.backbone_name, exc)
        return self.forward(torch.zeros((1, *key)))

    def _plain(self, name: str, out: object) -> torch.Tensor:
        if not isinstance(out, torch.Tensor) or out.ndim != 4:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise BackboneError(
                f"layer '{name}' of {self.backbone_name} gives {got}, not a (B, C, h, w) map. "
                "Pick a convolutional layer"
            )
        return out.to(torch.float32, memory_format=torch.contiguous_format, copy=True)


def map_chunks(
    aggregator: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    images: torch.Tensor,
    embed: Callable[[list[torch.Tensor]], torch.Tensor],
    chunk: int = 0,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """``embed`` of the layer maps of ``chunk`` images at a time, stacked along the batch.

    ``aggregator`` maps images to {layer: (b, C_l, h_l, w_l)} (a NetworkFeatureAggregator);
    ``embed`` takes those maps in order and returns (b, ...). Returns the stacked (B, ...) and
    the first layer's grid (h, w). On a CPU a few images' activations stay in cache (~2.5x
    faster per image than 32 at once) and bound the peak memory. ``chunk`` 0 or >= B is one
    call with no loop, so an exported graph has no loop over a dynamic batch size.
    """
    b = images.shape[0]
    if not 0 < chunk < b:  # before any loop: an export then keeps the batch size dynamic
        maps = list(aggregator(images).values())
        return embed(maps), (int(maps[0].shape[-2]), int(maps[0].shape[-1]))
    out: torch.Tensor | None = None
    grid = (0, 0)
    for start in range(0, b, chunk):
        maps = list(aggregator(images[start : start + chunk]).values())
        grid = (int(maps[0].shape[-2]), int(maps[0].shape[-1]))
        part = embed(maps)
        if out is None:
            out = part.new_empty((b, *part.shape[1:]))
        out[start : start + len(part)] = part
    assert out is not None  # b > chunk >= 1, so the loop ran
    return out, grid


def resize_maps(
    maps: Sequence[torch.Tensor], size: Sequence[int], mode: Resize
) -> list[torch.Tensor]:
    """Every (B, K, h_l, w_l) map resized to ``size`` (h, w), e.g. to the first layer's grid.

    ``bilinear`` (align_corners=False) runs as two small matmuls, equal to F.interpolate's up to
    float rounding and ~4x faster on a CPU for ~1,000 maps; ``nearest`` only copies cells, so it
    commutes with any per-channel linear map applied before it.
    """
    h, w = int(size[0]), int(size[1])
    out = []
    for fmap in maps:
        if fmap.shape[-2:] != (h, w):
            if mode == "bilinear":
                rows = _bilinear_matrix(fmap.shape[-2], h, fmap)  # (h, h_l)
                cols = _bilinear_matrix(fmap.shape[-1], w, fmap)  # (w, w_l)
                fmap = rows @ fmap @ cols.T  # (h, h_l) @ (B, K, h_l, w_l) @ (w_l, w)
            else:
                fmap = F.interpolate(fmap, size=(h, w), mode="nearest")
        out.append(fmap)
    return out


def _bilinear_matrix(n_in: int, n_out: int, like: torch.Tensor) -> torch.Tensor:
    """1-D bilinear resampling (align_corners=False) from n_in to n_out as a (n_out, n_in) map."""
    eye = torch.eye(n_in, dtype=torch.float64, device=like.device)[:, None]  # (n_in, 1, n_in)
    weights = F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[:, 0].T
    return weights.to(like.dtype)


def _chw(feats: torch.Tensor) -> tuple[int, int, int]:
    _, c, h, w = feats.shape
    return int(c), int(h), int(w)


def _check_layers(net: nn.Module, layers: list[str], name: str) -> None:
    """Raise BackboneError for an empty, duplicated or unknown layer name."""
    modules = dict(net.named_modules())
    if not layers:
        raise BackboneError(f"no layers requested from {name}. Set model.layers, e.g. [layer2]")
    if len(set(layers)) != len(layers):
        raise BackboneError(f"layers {layers} repeat a name. List each layer once")
    unknown = [layer for layer in layers if layer not in modules or not layer]
    if unknown:
        # Top two levels (e.g. "layer2", "layer2.1") name the useful stages without a wall of text.
        shallow = [n for n in modules if n and n.count(".") <= 1]
        listed = ", ".join(shallow[:40]) + (
            f" (+{len(shallow) - 40} more)" if len(shallow) > 40 else ""
        )
        close = difflib.get_close_matches(unknown[0], list(modules), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise BackboneError(
            f"unknown layer '{unknown[0]}' for backbone {name}.{hint} Valid layers: {listed}; "
            "deeper names from model.named_modules() work too"
        )


def _build_extractor(
    net: nn.Module, layers: list[str], method: Method, name: str
) -> tuple[nn.Module, str]:
    """Return (extractor, method used); fx copies only the modules the outputs depend on."""
    if method not in ("auto", "fx", "hooks"):
        raise BackboneError(f"unknown feature method '{method}'. Use auto, fx or hooks")
    if method != "hooks":
        try:
            # timm's wrapper of torchvision's create_feature_extractor knows timm's untraceable
            # modules; on plain torchvision models it behaves the same.
            return create_feature_extractor(net, return_nodes={n: n for n in layers}), "fx"
        except Exception as exc:
            if method == "fx":
                raise BackboneError(
                    f"cannot trace {name} with torch.fx: {one_line(exc)}. Use method='hooks'"
                ) from None
            logger.info("torch.fx cannot trace %s (%s); using forward hooks", name, exc)
    return _HookExtractor(net, layers), "hooks"
