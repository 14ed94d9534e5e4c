"""Seal an exported file with a checksum over its own bytes, and tie it to the run it came from.

A run's artifact carries a sha256 over its tensors and metadata (hamacho.components.artifact),
so an edited run is refused. An exported file carries the same protection: its metadata holds
``sha256``, the digest of the file's bytes with that one value replaced by a fixed placeholder of
the same length (ONNX: the .onnx file; OpenVINO: the .xml and its .bin), and ``run_sha256``, the
checksum of the run's artifact it was exported from. Loading an exported file recomputes the
first; when the run's artifact sits beside the file (the default RUN/model.onnx), that artifact
is verified like the run itself and must be the one the file was exported from.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

from hamacho.components import artifact
from hamacho.engine import ARTIFACT
from hamacho.errors import ArtifactError

KEY = "sha256"
RUN_KEY = "run_sha256"
PLACEHOLDER = "0" * 64  # what the digest is computed with, in the digest's own place
_PREFIX = b"hamacho-export/1\n"


def digest(*parts: bytes) -> str:
    """sha256 over the length-prefixed ``parts`` (the file bytes with the placeholder in)."""
    h = hashlib.sha256(_PREFIX)
    for part in parts:
        h.update(f"{len(part)}\n".encode() + part)
    return h.hexdigest()


def seal(main: bytes, *extra: bytes) -> bytes:
    """``main`` with its placeholder replaced by the digest of ``main`` (+ ``extra`` files)."""
    marker = PLACEHOLDER.encode()
    if main.count(marker) != 1:
        raise ArtifactError("cannot seal the exported file: its checksum placeholder is not unique")
    return main.replace(marker, digest(main, *extra).encode())


def verify(path: Path, props: dict[str, str], main: bytes, *extra: bytes) -> None:
    """Raise ArtifactError unless ``main`` (+ ``extra``) hash to the ``sha256`` in ``props``."""
    stored = props.get(KEY, "")
    if len(stored) != len(PLACEHOLDER) or stored == PLACEHOLDER:
        raise ArtifactError(
            f"'{path}' carries no hamacho checksum (not written by this hamacho's export). "
            "Export it again with `hamacho export --run RUN`"
        )
    marker = stored.encode()
    if main.count(marker) != 1 or digest(main.replace(marker, PLACEHOLDER.encode()), *extra) != (
        stored
    ):
        raise ArtifactError(
            f"'{path}' was modified after it was exported (checksum mismatch). Restore the "
            "original file or export it again with `hamacho export --run RUN`"
        )


def check_run(path: Path, props: dict[str, str]) -> None:
    """Verify the run beside ``path`` (if any) and that ``path`` was exported from it."""
    run_file = path.parent / ARTIFACT
    if not run_file.is_file():
        return  # a file copied away from its run stands on its own checksum
    artifact.load_artifact(run_file)  # a tampered run is refused here with its own message
    if artifact.read_checksum(run_file) != props.get(RUN_KEY):
        raise ArtifactError(
            f"'{path}' was not exported from the run beside it ('{run_file}' was retrained or "
            f"replaced since). Export it again: hamacho export --run {path.parent}"
        )


def write_atomic(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` through a temporary file, so no half-written file is left."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        tmp.write_bytes(payload)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
