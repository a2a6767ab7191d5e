"""One JSON error shape for every failure: ``{"error": {"type": ..., "message": ...}}``.

Request problems become 4xx with a message that says what to change; anything unexpected is a
500 whose body says only that (the traceback goes to the server log, never to the client).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from segscope.errors import ImageLoadError, ModelOutputError, OptionError
from segscope.service.batching import QueueFullError, ResultTimeoutError, ShuttingDownError

logger = logging.getLogger("segscope.service")


class ServiceError(Exception):
    """A request refused with ``status``; ``kind`` names the error type in the JSON body."""

    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message
        self.headers = headers


def error_response(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON error body every endpoint uses."""
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Map every exception an endpoint can raise onto the JSON error shape."""

    @app.exception_handler(ServiceError)
    async def _service(request: Request, error: ServiceError) -> JSONResponse:
        return error_response(error.status, error.kind, error.message, error.headers)

    @app.exception_handler(QueueFullError)
    async def _full(request: Request, error: QueueFullError) -> JSONResponse:
        return error_response(503, "busy", str(error), {"Retry-After": "1"})

    @app.exception_handler(ShuttingDownError)
    async def _stopping(request: Request, error: ShuttingDownError) -> JSONResponse:
        return error_response(503, "unavailable", str(error))

    @app.exception_handler(ResultTimeoutError)
    async def _timeout(request: Request, error: ResultTimeoutError) -> JSONResponse:
        return error_response(504, "timeout", str(error))

    @app.exception_handler(ImageLoadError)
    async def _image(request: Request, error: ImageLoadError) -> JSONResponse:
        return error_response(400, "bad_image", str(error))

    @app.exception_handler(OptionError)
    async def _option(request: Request, error: OptionError) -> JSONResponse:
        return error_response(422, "bad_option", str(error))

    @app.exception_handler(ModelOutputError)
    async def _model_output(request: Request, error: ModelOutputError) -> JSONResponse:
        return error_response(500, "model_output", str(error))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, error: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in item.get('loc', ()))}: {item.get('msg', '')}" for item in error.errors()]
        return error_response(422, "bad_option", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        return error_response(error.status_code, kind, str(error.detail), getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unexpected error serving %s %s", request.method, request.url.path)
        return error_response(500, "internal", "internal server error (the server log has the details)")

