"""The FastAPI app: ``POST /v1/segment``, ``GET /v1/models``, ``GET /healthz``, the web page and docs.

The model runs in the batcher's worker thread; image decoding and response encoding run in
Starlette's thread pool; the event loop only moves bytes.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from segscope import __version__
from segscope.io import load_image
from segscope.loading import LoadedModel
from segscope.results import SegmentationResult
from segscope.service.batching import Batcher
from segscope.service.config import ServiceConfig
from segscope.service.errors import ServiceError, error_response, install_error_handlers
from segscope.service.limits import check_pixels
from segscope.service.options import OUTPUTS, parse_options
from segscope.service.segmenters import Segmenters, run_batch
from segscope.service.uploads import IMAGE_FIELD, Upload, read_upload

STATIC = Path(__file__).parent / "static"

_SEGMENT_BODY = {
    "requestBody": {
        "required": True,
        "description": f"The image: a multipart upload (field {IMAGE_FIELD!r}, optional fields task, threshold, "
        "output) or the raw encoded bytes as the body. URLs and paths are refused, never fetched.",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [IMAGE_FIELD],
                    "properties": {
                        IMAGE_FIELD: {"type": "string", "format": "binary"},
                        "task": {"type": "string"},
                        "threshold": {"type": "number"},
                        "output": {"type": "string", "enum": list(OUTPUTS)},
                    },
                }
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
# Every error body is {"error": {"type": ..., "message": ...}}.
_ERRORS = {
    400: "bad request or unreadable image",
    408: "the upload did not arrive in time",
    413: "upload or image too large",
    422: "bad option (task, threshold, output)",
    500: "internal error, or a model that produced NaN",
    503: "server busy (queue full) or stopping",
    504: "no result within the request timeout",
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"description": f"{_ERRORS[code]} (JSON error body)"} for code in codes}


def create_app(model: LoadedModel, config: ServiceConfig) -> FastAPI:
    """The service over ``model``; its batch worker starts and stops with the app's lifespan.

    Raises:
        OptionError: ``config.task`` is not served by the model, or ``config.device`` is absent.
    """
    segmenters = Segmenters(model, config.task, config.device, config.batch_size)
    batcher = Batcher(run_batch, config.batch_size, config.max_wait_ms / 1000, config.capacity)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    # FastAPI's own /docs and /redoc load their scripts from a CDN; /docs here is a static page.
    app = FastAPI(
        title="segscope",
        version=__version__,
        description="Image segmentation over HTTP (panoptic, semantic, instance).",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.config = config
    app.state.batcher = batcher
    app.state.segmenters = segmenters
    install_error_handlers(app)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.post(
        "/v1/segment",
        openapi_extra=_SEGMENT_BODY,
        responses={
            200: {"content": {"application/json": {}, "image/png": {}}, "description": "the result"},
            **_errors(400, 408, 413, 422, 500, 503, 504),
        },
    )
    async def segment(
        request: Request,
        task: str | None = Query(None, description="panoptic, semantic or instance (default: the server's)"),
        threshold: str | None = Query(None, description="lowest score kept, in [0, 1] (not for semantic)"),
        output: str | None = Query(None, description="json (segments with COCO RLE masks) or png (the overlay)"),
    ) -> Response:
        """Segment one image: the JSON record that `segscope predict --format json` writes, or the overlay PNG."""
        with batcher.slot():
            upload = await _read_in_time(request, config)
            options = parse_options({"task": task, "threshold": threshold, "output": output}, upload.fields)
            segmenter = segmenters.cached(options.task, options.threshold) or await batcher.in_worker(
                segmenters.get, options.task, options.threshold, timeout_s=config.timeout_s
            )
            check_pixels(upload.data, config.max_pixels)
            image = await run_in_threadpool(load_image, upload.data, max_pixels=config.max_pixels)
            result = await batcher.submit(segmenter, image, config.timeout_s)
            return await run_in_threadpool(_render, result, options.output, model.name, upload.name)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        """The loaded model: name, architecture, tasks, default task and classes (with colours)."""
        return {"models": [segmenters.model_info()]}

    @app.get("/healthz", responses=_errors(503))
    async def healthz() -> Response:
        """Status "ok" while the batch worker runs, with the queue's state and the recent batches' mean size."""
        if not batcher.running:
            return error_response(503, "unavailable", "the batch worker is not running")
        return JSONResponse(
            {
                "status": "ok",
                "model": model.name,
                "in_progress": batcher.admitted,
                "queued": batcher.waiting,
                "capacity": batcher.capacity,
                "batch_size": batcher.batch_size,
                "batches_run": len(batcher.batch_sizes),
                "mean_batch_size": round(sum(batcher.batch_sizes) / max(len(batcher.batch_sizes), 1), 3),
            }
        )

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> FileResponse:
        return FileResponse(STATIC / "docs.html")

    return app


async def _read_in_time(request: Request, config: ServiceConfig) -> Upload:
    """The upload, which must arrive within the request timeout (408): a slow sender cannot hold a slot."""
    try:
        return await asyncio.wait_for(read_upload(request, config.max_upload_bytes), config.timeout_s)
    except asyncio.TimeoutError:
        raise ServiceError(
            408, "upload_timeout", f"the upload did not arrive within the request timeout of {config.timeout_s:g} s"
        ) from None


def _render(result: SegmentationResult, output: str, model_name: str, source: str) -> Response:
    """The response body: the predict command's JSON record, or the overlay as PNG."""
    if output == "png":
        buffer = io.BytesIO()
        result.draw().save(buffer, format="PNG")
        return Response(buffer.getvalue(), media_type="image/png")
    return JSONResponse({"source": source, "model": model_name, **result.to_json()})
