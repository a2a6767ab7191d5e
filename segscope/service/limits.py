"""Request limits checked before any decoding: the upload's byte size and the image's pixel count."""

from __future__ import annotations

import io

from PIL import Image

from segscope.service.errors import ServiceError


def too_large(size: int, limit: int, what: str = "the upload") -> ServiceError:
    """The 413 for ``what`` of ``size`` bytes (or more) over ``limit`` bytes."""
    return ServiceError(
        413, "too_large", f"{what} is {size:,} bytes or more, over the limit of {limit:,} bytes (--max-upload-mb)"
    )


def check_pixels(data: bytes, max_pixels: int) -> None:
    """Refuse (413) an image whose header gives more than ``max_pixels`` pixels, before decoding it.

    Data Pillow cannot open passes: the loader then says what is wrong with it (a 400).
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Image.DecompressionBombError as error:
        raise ServiceError(413, "too_many_pixels", f"the image is refused as a decompression bomb: {error}") from None
    except (OSError, SyntaxError, ValueError):
        return
    if width * height > max_pixels:
        raise ServiceError(
            413,
            "too_many_pixels",
            f"the image is {width}x{height} ({width * height:,} pixels), over the limit of {max_pixels:,} pixels "
            "(--max-pixels)",
        )
