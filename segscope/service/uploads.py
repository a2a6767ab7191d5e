"""The image bytes of a request: a multipart field ``image`` or the raw body, never a reference.

The body is read with a byte cap (413 past it, before all of it is in memory). A body or field
that is a URL or a file path is refused (400): the service only ever decodes bytes the client
sent, so a request cannot make it fetch a URL or read a file on the server.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from segscope.io import IMAGE_EXTENSIONS
from segscope.service.errors import ServiceError
from segscope.service.limits import too_large

# Room for multipart boundaries, part headers and the small option fields around the image.
MULTIPART_OVERHEAD = 64 * 1024
IMAGE_FIELD = "image"
OPTION_FIELDS = ("task", "threshold", "output")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:(//|[^\s]*$)")
_WINDOWS_PATH = re.compile(r"^[A-Za-z]:[\\/]")
_TEXT_MEDIA = ("application/json",)


@dataclass
class Upload:
    """An uploaded image: its bytes, a name for it, and option fields sent with it (multipart)."""

    data: bytes
    name: str
    fields: dict[str, str] = field(default_factory=dict)


async def read_upload(request: Request, max_bytes: int) -> Upload:
    """The image bytes of ``request`` (multipart field ``image``, else the raw body).

    Raises:
        ServiceError: 413 over ``max_bytes``; 400 for an empty body, a missing ``image`` field, a
            text body or field (JSON, form, a URL, a path).
    """
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";")[0].strip().lower()
    if media == "multipart/form-data":
        body = await read_body(request, max_bytes + MULTIPART_OVERHEAD)
        upload = await _from_multipart(request, body)
    else:
        upload = Upload(await read_body(request, max_bytes), "request body")
        if media == "application/x-www-form-urlencoded":  # also what `curl --data-binary @file` sends
            _refuse_form(upload.data)
        _refuse_reference(upload.data, "the request body")
        if media in _TEXT_MEDIA or media.startswith("text/"):
            raise ServiceError(
                400, "bad_request", f"the request body is {media}, not an image: send the image bytes as the raw "
                f"body (image/*, application/octet-stream) or as the multipart field {IMAGE_FIELD!r}"
            )
    if len(upload.data) > max_bytes:
        raise too_large(len(upload.data), max_bytes, "the image")
    if not upload.data:
        raise ServiceError(400, "bad_request", "no image: the upload is empty")
    return upload


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused (413) as soon as it passes ``limit`` bytes (or declares that it will)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(int(declared), limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def _from_multipart(request: Request, body: bytes) -> Upload:
    async def replay() -> AsyncIterator[bytes]:
        yield body

    try:
        form = await MultiPartParser(request.headers, replay(), max_files=1, max_fields=len(OPTION_FIELDS)).parse()
    except MultiPartException as error:
        raise ServiceError(400, "bad_request", f"malformed multipart upload: {error.message}") from None
    try:
        image = form.get(IMAGE_FIELD)
        if image is None:
            raise ServiceError(400, "bad_request", f"the multipart upload has no field {IMAGE_FIELD!r} (the file)")
        if not isinstance(image, UploadFile):
            _refuse_reference(image.encode(), f"the field {IMAGE_FIELD!r}")
            raise ServiceError(400, "bad_request", f"the field {IMAGE_FIELD!r} must be a file upload, not text")
        data = await image.read()
        fields = {name: value for name, value in form.items() if name in OPTION_FIELDS and isinstance(value, str)}
        return Upload(data, image.filename or "upload", fields)
    finally:
        await form.close()


def _refuse_form(body: bytes) -> None:
    """Refuse (400) a URL-encoded form with an ``image`` field (it carries no file); other bodies of
    that type pass as raw image bytes, as ``curl --data-binary @image.png`` sends them."""
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError:
        return
    fields = dict(parse_qsl(text))
    if IMAGE_FIELD in fields:
        _refuse_reference(fields[IMAGE_FIELD].encode(), f"the field {IMAGE_FIELD!r}")
        raise ServiceError(
            400, "bad_request", f"a URL-encoded form cannot carry an image: send it as the multipart file field "
            f"{IMAGE_FIELD!r} or as the raw body"
        )


def _refuse_reference(data: bytes, where: str) -> None:
    """Refuse (400) ``data`` that is text naming a URL or a file rather than an image."""
    kind = reference_kind(data)
    if kind is not None:
        text = data.decode("utf-8", "replace").strip()
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise ServiceError(
            400, "bad_request", f"{where} is {kind} ({shown!r}), not image data: segscope serve never fetches URLs "
            f"or reads server files for a request; upload the image bytes themselves"
        )


def reference_kind(data: bytes) -> str | None:
    """``"a URL"`` or ``"a file path"`` when ``data`` is one line of text naming one, else None."""
    if len(data) > 4096:
        return None
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
    if not text or "\n" in text or not text.isprintable():
        return None
    if _URL.match(text) and not _WINDOWS_PATH.match(text):
        return "a URL"
    lowered = text.lower()
    if (
        text.startswith(("/", "~", "./", "../", "\\"))
        or _WINDOWS_PATH.match(text)
        or any(lowered.endswith(ext) for ext in IMAGE_EXTENSIONS)
    ):
        return "a file path"
    return None
