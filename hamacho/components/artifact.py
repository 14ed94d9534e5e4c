"""One safetensors file per trained model: tensors, JSON metadata and a checksum over both."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import secrets
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from hamacho.errors import ArtifactError, one_line

FORMAT_VERSION = 1
_KEY = "hamacho"  # the one `__metadata__` entry hamacho owns
_RETRAIN = "retrain with `hamacho train`"


def save_artifact(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict
) -> None:
    """Write `tensors` and `metadata` to `path` atomically: a crash leaves the old file intact."""
    path = Path(path)
    cpu: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, value in tensors.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise ArtifactError(
                f"cannot save '{path}': entry {name!r} is a {type(value).__name__}, not a tensor "
                "keyed by a str. Put non-tensor values in the metadata dict"
            )
        if value.layout != torch.strided:
            raise ArtifactError(f"cannot save '{path}': tensor {name!r} is sparse. Use .to_dense()")
        t = value.detach().to("cpu").contiguous()
        # safetensors refuses tensors sharing storage (e.g. two views of one bank): copy repeats
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:
            t = t.clone()
        seen.add(ptr)
        cpu[name] = t
    try:
        metadata = json.loads(json.dumps(metadata))  # normalise (tuples, int keys) before hashing
        meta_json = _canonical(metadata)
    except (TypeError, ValueError) as exc:
        raise ArtifactError(
            f"cannot save '{path}': metadata is not JSON-serialisable ({exc}). "
            "Use str/int/float/bool/list/dict values"
        ) from exc
    envelope = {"format_version": FORMAT_VERSION, "sha256": _checksum(cpu, meta_json)}
    header = {_KEY: json.dumps({**envelope, "metadata": metadata})}

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        mode = tmp.stat().st_mode & 0o777  # 0o666 less the umask, as the kernel applied it
        save_file(cpu, tmp, metadata=header)  # leaves a 0o600 file: give it the umask's mode
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):  # e.g. EROFS: must not bury the error below
            tmp.unlink(missing_ok=True)
        if isinstance(exc, (OSError, ValueError, RuntimeError, SafetensorError)):
            raise ArtifactError(
                f"cannot save '{path}': {one_line(exc)}. Check the folder is writable and has "
                "free space; the previous file (if any) is unchanged"
            ) from exc
        raise
    _fsync_dir(path.parent)


def load_artifact(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict]:
    """Read and verify an artifact; returns (tensors on `map_location`, metadata)."""
    path = Path(path)
    envelope = _read_envelope(path)
    with safe_open(path, framework="pt", device="cpu") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    if _checksum(tensors, _canonical(envelope["metadata"])) != envelope.get("sha256"):
        raise ArtifactError(
            f"'{path}' was modified after it was saved (checksum mismatch). "
            f"Restore the original file or {_RETRAIN}"
        )
    return {k: t.to(map_location) for k, t in tensors.items()}, envelope["metadata"]


def check_run_metadata(metadata: dict, path: str | os.PathLike) -> dict:
    """Raise ArtifactError unless ``metadata`` has the keys and types a trained run needs."""
    problem = _run_metadata_problem(metadata)
    if problem:
        raise ArtifactError(
            f"'{path}' has invalid hamacho metadata ({problem}): it was not written by "
            f"`hamacho train` or was edited. {_RETRAIN}"
        )
    return metadata


def _run_metadata_problem(meta: dict) -> str | None:
    for key, kind in _REQUIRED.items():
        if key not in meta:
            return f"no '{key}'"
        if not isinstance(meta[key], kind):
            return f"'{key}' is a {type(meta[key]).__name__}, not a {kind.__name__}"
    for key in ("mean", "std"):
        values = meta["normalization"].get(key)
        if not (isinstance(values, list) and len(values) == 3 and all(map(_finite, values))):
            return f"normalization.{key}={values!r} is not 3 finite numbers"
    if min(meta["normalization"]["std"]) <= 0:
        return "normalization.std has a value <= 0"
    threshold = meta.get("threshold")
    if threshold is not None and not (
        isinstance(threshold, dict) and _finite(threshold.get("value"))
    ):
        return f"threshold={threshold!r} is neither null nor {{value: finite number}}"
    for key in ("plugin", "info"):
        if not isinstance(meta.get(key, {}), dict):
            return f"'{key}' is not a mapping"
    return None


_REQUIRED: dict[str, type] = {"model": str, "config": dict, "normalization": dict, "dataset": str}


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_metadata(path: str | os.PathLike) -> dict:
    """Return an artifact's metadata from its header alone (cheap; the checksum is not verified)."""
    return _read_envelope(Path(path))["metadata"]


def read_checksum(path: str | os.PathLike) -> str:
    """The checksum an artifact's header records (what an exported file names its run by)."""
    return str(_read_envelope(Path(path)).get("sha256", ""))


def _read_envelope(path: Path) -> dict:
    """Parse and version-check the hamacho entry of the safetensors header."""
    if not path.is_file():
        raise ArtifactError(f"model artifact '{path}' does not exist. Check the path or {_RETRAIN}")
    if path.stat().st_size == 0:
        raise ArtifactError(f"'{path}' is empty (0 bytes): its save was interrupted. {_RETRAIN}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(
            f"'{path}' is not a safetensors file or is truncated ({one_line(exc)}). {_RETRAIN}"
        ) from exc
    if _KEY not in header:
        raise ArtifactError(
            f"'{path}' has no hamacho metadata: it was not written by hamacho. "
            f"Pass a file saved by `hamacho train` or {_RETRAIN}"
        )
    try:
        envelope = json.loads(header[_KEY])
        version = envelope["format_version"]
        if not isinstance(version, int) or not isinstance(envelope["metadata"], dict):
            raise ValueError("bad field types")
    except (ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(
            f"'{path}' was modified after it was saved (hamacho metadata unreadable: "
            f"{one_line(exc)}). Restore the original file or {_RETRAIN}"
        ) from exc
    if version > FORMAT_VERSION:
        raise ArtifactError(
            f"'{path}' was written by a newer hamacho (artifact format {version}; this one reads "
            f"up to {FORMAT_VERSION}). Upgrade with `pip install -U hamacho`"
        )
    return envelope


def _canonical(metadata: dict) -> str:
    return json.dumps(metadata, sort_keys=True, separators=(",", ":"))


def _checksum(tensors: dict[str, torch.Tensor], meta_json: str) -> str:
    """sha256 over the metadata JSON and every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256(f"hamacho-artifact/{FORMAT_VERSION}\n".encode())
    meta = meta_json.encode()
    h.update(f"{len(meta)}\n".encode() + meta)
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        raw = t.reshape(-1).view(torch.uint8)  # works for bf16/bool, which numpy lacks
        h.update(json.dumps([name, str(t.dtype), list(t.shape), raw.numel()]).encode() + b"\n")
        h.update(raw.numpy().data)  # the array's memoryview: no copy
    return h.hexdigest()


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable; not possible on every OS, so best effort."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
