"""Read backbone weight files without running code in them, checking the hash their name carries.

Every weight file hamacho reads, whether cached by torch hub or Hugging Face, shipped in a package
or named by the user, goes through `read_state_dict`: safetensors, or `torch.load` with
``weights_only=True``, which unpickles tensors and plain containers only. A pickle that would run
code when loaded is refused instead. torch hub names its files ``<name>-<sha256 prefix>.<ext>``
(``resnet18-f37072fd.pth``) and Hugging Face stores them as ``blobs/<sha256>``; a file whose
bytes do not match that hash was corrupted or replaced and is refused before it is read.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch

from hamacho.errors import BackboneError, one_line

# torch.hub.HASH_REGEX, anchored: the hex run right before the extension is the sha256 prefix.
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z]+$")
_HF_BLOB = re.compile(r"^[0-9a-f]{64}$")  # huggingface_hub names LFS blobs by their sha256
_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path, length: int = 12) -> str:
    """Hex sha256 of ``path`` cut to ``length``, cached per path/mtime/size for the process."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _SHA_CACHE:
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
        _SHA_CACHE[key] = digest.hexdigest()
    return _SHA_CACHE[key][:length]


def expected_hash(path: Path) -> str | None:
    """The sha256 (prefix) that ``path``'s name, or its Hugging Face blob's name, promises."""
    found = _HASH_IN_NAME.search(path.name)
    if found:
        return found.group(1)
    blob = path.resolve().name
    return blob if _HF_BLOB.match(blob) else None


def verify_hash(path: Path, required: bool = False) -> None:
    """Raise BackboneError when ``path``'s bytes do not match the hash its name carries."""
    expected = expected_hash(path)
    if expected is None:
        if required:
            raise BackboneError(
                f"weights file '{path}' has no sha256 in its name (<name>-<hash>.pth), so it "
                "cannot be verified. Delete it and retry, or set model.weights=/path/to/file.pth"
            )
        return
    actual = file_sha256(path, 64)
    if not actual.startswith(expected):
        raise BackboneError(
            f"weights file '{path}' fails its integrity check (sha256 {actual[:12]}..., its name "
            f"says {expected[:12]}...): it is corrupt or was replaced. Delete it and retry, or "
            "set model.weights=/path/to/file.pth"
        )


def read_state_dict(path: Path, verify: bool = True) -> dict[str, torch.Tensor]:
    """Tensors of a weight file (unwrapping {"state_dict": ...} and a DataParallel prefix).

    ``verify`` checks the hash in the file's name first (a name without one passes).
    """
    if verify:
        verify_hash(path)
    state: object
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:  # weights_only: a pickle that would build other objects (and run code) is refused
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any reader failure means the same thing to the user
        raise BackboneError(
            f"cannot read weights file '{path}': {one_line(exc)}. Supply a state dict saved with "
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
