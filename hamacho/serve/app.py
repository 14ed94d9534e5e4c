"""The FastAPI application: health, models, predict, metrics, the page and the OpenAPI docs."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import APIKeyHeader
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from hamacho.api import Detector
from hamacho.components import data
from hamacho.errors import one_line
from hamacho.serve.batcher import MicroBatcher
from hamacho.serve.inputs import ServeError, decode, overlay_png, result_row, uploads
from hamacho.serve.metrics import Metrics
from hamacho.serve.page import PAGE

_log = logging.getLogger("hamacho.serve")
_KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False, description="--api-key")
_UPLOAD_DOC = {
    "requestBody": {
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "array", "items": {"format": "binary"}}},
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        }
    }
}


@dataclass
class Settings:
    """How the service batches and what it accepts."""

    max_batch: int = 16
    max_wait_ms: float = 5.0
    api_key: str | None = None
    max_upload_bytes: int = 20 * 2**20


def describe(name: str, detector: Detector) -> dict[str, Any]:
    """One served model as /v1/models lists it (read from its saved, resolved config)."""
    config = detector.backend.config
    model, images = config.get("model", {}), config.get("data", {})
    return {
        "name": name,
        "model": detector.model,
        "backbone": model.get("backbone"),
        "threshold": detector.threshold,
        "image_size": images.get("image_size"),
        "crop_size": images.get("crop_size"),
        "runtime": detector.runtime,
        "source": str(detector.source),
    }


def create_app(
    detectors: dict[str, Detector],
    settings: Settings | None = None,
    load_seconds: dict[str, float] | None = None,
) -> FastAPI:
    """The service for ``detectors`` (name -> loaded Detector)."""
    settings = settings or Settings()
    metrics = Metrics()
    for name, seconds in (load_seconds or {}).items():
        metrics.load_seconds.labels(name).set(seconds)
    batchers: dict[str, MicroBatcher] = {}

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        for name, detector in detectors.items():
            observe = metrics.batch_size.labels(name).observe
            batchers[name] = MicroBatcher(
                detector, settings.max_batch, settings.max_wait_ms / 1000, observe
            )
        yield
        for batcher in batchers.values():  # in-flight requests have finished by now
            batcher.close()

    app = FastAPI(title="hamacho", summary="Anomaly inspection service", lifespan=lifespan)

    def check_key(key: str | None = Depends(_KEY_HEADER)) -> None:
        if settings.api_key and not secrets.compare_digest(
            (key or "").encode(), settings.api_key.encode()
        ):
            raise ServeError(401, "missing or wrong API key: send it in the X-API-Key header")

    @app.exception_handler(ServeError)
    async def _refused(_request: Request, exc: ServeError) -> JSONResponse:
        headers = {"WWW-Authenticate": "APIKey"} if exc.status == 401 else None
        return JSONResponse({"error": exc.message}, exc.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def _http(_request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
        return JSONResponse({"error": "; ".join(problems)}, 400)

    @app.middleware("http")
    async def _observe(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        start = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception:
            _log.exception("%s %s failed", request.method, request.url.path)
            response = JSONResponse({"error": "internal error; see the server log"}, 500)
        route = request.scope.get("route")
        endpoint = getattr(route, "path", "unmatched")
        metrics.observe(endpoint, request.method, response.status_code, time.perf_counter() - start)
        return response

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """200 once the models are loaded (they load before the server listens)."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """200 while every model's batcher runs; 503 before startup or after shutdown."""
        ready = bool(batchers) and len(batchers) == len(detectors)
        body = {"status": "ready" if ready else "not ready", "models": sorted(batchers)}
        return JSONResponse(body, 200 if ready else 503)

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def list_models() -> list[dict[str, Any]]:
        """The served models."""
        return [describe(name, detector) for name, detector in detectors.items()]

    @app.post(
        "/v1/models/{name}/predict", dependencies=[Depends(check_key)], openapi_extra=_UPLOAD_DOC
    )
    async def predict(name: str, request: Request, maps: bool = False) -> dict[str, Any]:
        """Score the uploaded image(s): multipart field ``file`` (repeatable) or a raw image/*
        body. ``?maps=true`` adds ``map_png``, the heat-map overlay as base64 PNG."""
        if name not in detectors:
            served = ", ".join(sorted(detectors))
            raise ServeError(404, f"unknown model '{name}'; served: {served}")
        files = await uploads(request, settings.max_upload_bytes)
        max_pixels = int(detectors[name].backend.config["data"].get("max_pixels", data.MAX_PIXELS))
        images = [await run_in_threadpool(decode, f, max_pixels) for f in files]
        batcher = batchers[name]
        try:
            results = await asyncio.gather(
                *(asyncio.wrap_future(batcher.submit(im)) for im in images)
            )
        except Exception as exc:
            _log.exception("model %s failed", name)
            raise ServeError(500, f"scoring failed: {one_line(exc)}") from exc
        rows = [result_row(f.filename, r) for f, r in zip(files, results, strict=True)]
        if maps:
            pngs = [
                await run_in_threadpool(overlay_png, im, r)
                for im, r in zip(images, results, strict=True)
            ]
            for row, png in zip(rows, pngs, strict=True):
                row["map_png"] = png
        return {"results": rows}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        body, kind = metrics.render()
        return Response(body, media_type=kind)

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE)

    return app
