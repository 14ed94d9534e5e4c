"""Request bodies -> decoded images, with the service's limits; results -> JSON rows."""

from __future__ import annotations

import base64
import io
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from hamacho.api import Result
from hamacho.components import data, visualize
from hamacho.errors import DataError, NotAnImageError, TooManyPixelsError, one_line

MAX_FILES = 256  # per request; the byte limit bounds them too


class ServeError(Exception):
    """A request the service refuses: answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Upload:
    """One uploaded file: its name and raw bytes."""

    filename: str
    content: bytes


class _Named(io.BytesIO):
    """Bytes that print as their file name, so decode errors name the upload."""

    def __init__(self, content: bytes, name: str) -> None:
        super().__init__(content)
        self.display = name

    def __str__(self) -> str:
        return self.display


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    too_large = f"request body is larger than --max-upload-mb ({limit / 2**20:g} MB); send less"
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ServeError(413, too_large)  # refused before a byte of it is read
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ServeError(413, too_large)
        chunks.append(chunk)
    return b"".join(chunks)


async def uploads(request: Request, limit: int) -> list[Upload]:
    """The files of a multipart ``file`` field (one or more) or of a raw ``image/*`` body."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in ("multipart/form-data",) and not kind.startswith("image/"):
        raise ServeError(
            415,
            f"content type '{kind or 'none'}' is not accepted: send multipart/form-data with a "
            "'file' field, or the image itself with an image/* content type",
        )
    body = await read_body(request, limit)
    if kind.startswith("image/"):
        if not body:
            raise ServeError(400, "the request body is empty: send the image's bytes")
        return [Upload(request.query_params.get("filename", "image"), body)]

    async def once() -> AsyncGenerator[bytes, None]:
        yield body

    try:
        form = await MultiPartParser(request.headers, once(), max_files=MAX_FILES).parse()
    except MultiPartException as exc:
        raise ServeError(400, f"malformed multipart body: {one_line(exc)}") from None
    files = [f for f in form.getlist("file") if isinstance(f, UploadFile)]
    if not files:
        raise ServeError(400, "no file in the multipart body: send it in a field named 'file'")
    return [Upload(f.filename or "image", await f.read()) for f in files]


def decode(upload: Upload, max_pixels: int) -> np.ndarray:
    """Decode one upload as hamacho decodes files -> (H, W, 3) uint8; 400/413/415 if it cannot."""
    try:
        # PIL opens file objects as it opens paths: read_image's checks apply unchanged
        image = data.read_image(cast(Any, _Named(upload.content, upload.filename)), max_pixels)
    except NotAnImageError as exc:
        raise ServeError(415, str(exc)) from None
    except TooManyPixelsError as exc:
        raise ServeError(413, str(exc)) from None
    except DataError as exc:  # corrupt or truncated
        raise ServeError(400, str(exc)) from None
    return data.pil_to_uint8(image).numpy()


def overlay_png(image: np.ndarray, result: Result) -> str:
    """The heat-map panel ``predict --maps`` draws, on the original image, as base64 PNG."""
    amap = result.map
    inspected = amap[np.isfinite(amap)]
    floor = float(inspected.min()) if inspected.size else 0.0  # not inspected: drawn cold
    panel = visualize.overlay_panel(image, np.nan_to_num(amap, nan=floor), None, result.threshold)
    buffer = io.BytesIO()
    Image.fromarray(panel).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def result_row(filename: str, result: Result) -> dict[str, object]:
    """One result as JSON: a non-finite score is null (NaN is not JSON)."""
    score = result.score if np.isfinite(result.score) else None
    return {
        "filename": filename,
        "score": score,
        "is_anomalous": result.is_anomalous,
        "threshold": result.threshold,
    }
