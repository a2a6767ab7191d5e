"""Image loading and validation: any supported source in, HxWx3 uint8 RGB out.

Sources: a file path, an http(s) URL, encoded bytes, a ``PIL.Image.Image`` or a numpy array.
Every image is EXIF-rotated, size-checked from its header before decoding, and converted to
8-bit RGB. Images with transparent pixels are refused rather than flattened: the right
background (white, black, a scene) is the caller's choice, and a silent guess changes what
the model sees.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import IO, Union

import numpy as np
from PIL import Image, ImageOps

from segscope.errors import ImageLoadError, InputNotFoundError
from segscope.net import download, is_url

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]

DEFAULT_MAX_PIXELS = 100_000_000
# An encoded image larger than this is refused while downloading (a 100 MP PNG is ~300 MB).
MAX_DOWNLOAD_BYTES = 512 * 1024 * 1024
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})

# Modes Pillow converts to RGB without losing information that matters for segmentation.
_CONVERTIBLE_MODES = frozenset({"1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA"})


def load_image(
    source: ImageSource,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    timeout: float = 10.0,
    deadline: float = 60.0,
) -> np.ndarray:
    """Load ``source`` as an HxWx3 uint8 RGB array (C-contiguous, never a view of the input).

    Args:
        source: a path, an http(s) URL, encoded image bytes, a PIL image, or a numpy array
            (HxWx3 uint8 RGB, or HxW / HxWx1 uint8 grayscale).
        max_pixels: images with more pixels than this are refused before being decoded.
        timeout: seconds a URL's server may take to answer each read.
        deadline: seconds a URL's whole download may take (``MAX_DOWNLOAD_BYTES`` at most).

    Raises:
        InputNotFoundError: a path that does not exist (a ``FileNotFoundError``).
        ImageLoadError: anything else wrong with the image (corrupt, truncated, too large,
            transparent, high bit depth, unreachable URL); the message names the source.
        TypeError: a source of an unsupported type.
    """
    if isinstance(source, np.ndarray):
        return _from_array(source, max_pixels)
    if isinstance(source, Image.Image):
        return _decode(source, "PIL image", max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        return _open_and_decode(io.BytesIO(data), f"<{len(data)} bytes>", max_pixels)
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if isinstance(text, str) and is_url(text):
            body = io.BytesIO()
            download(
                text, body, error=ImageLoadError, timeout=timeout, deadline=deadline, max_bytes=MAX_DOWNLOAD_BYTES
            )
            body.seek(0)
            return _open_and_decode(body, text, max_pixels)
        return _load_file(Path(text), max_pixels)
    raise TypeError(
        f"cannot load an image from {type(source).__name__}; expected a path, URL, bytes, "
        "PIL.Image.Image or numpy array"
    )


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an existing file with a common image extension."""
    path = Path(path)
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def list_images(folder: str | os.PathLike) -> list[Path]:
    """The image files directly inside ``folder``, sorted by name (hidden files skipped).

    Raises:
        InputNotFoundError: ``folder`` does not exist.
        ImageLoadError: ``folder`` is not a folder or holds no image file.
    """
    folder = Path(folder)
    if not folder.exists():
        raise InputNotFoundError(f"no such folder: {folder}")
    if not folder.is_dir():
        raise ImageLoadError(f"not a folder: {folder}")
    # Hidden files include macOS "._name.jpg" resource forks, which are not images.
    images = sorted(p for p in folder.iterdir() if not p.name.startswith(".") and is_image_file(p))
    if not images:
        raise ImageLoadError(f"no image files in {folder} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return images


def _load_file(path: Path, max_pixels: int) -> np.ndarray:
    if not path.exists():
        raise InputNotFoundError(f"no such image file: {path}")
    if path.is_dir():
        raise ImageLoadError(f"{path} is a folder, not an image file (use list_images to read a folder)")
    # Opened outside the decoding try-block so permission errors surface as themselves.
    with open(path, "rb") as stream:
        return _open_and_decode(stream, str(path), max_pixels)


def _open_and_decode(stream: IO[bytes], name: str, max_pixels: int) -> np.ndarray:
    try:
        image = Image.open(stream)
    except Image.DecompressionBombError as error:
        raise ImageLoadError(f"{name}: refused by Pillow's decompression-bomb guard: {error}") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageLoadError(f"{name} is not a readable image: {error}") from error
    with image:
        return _decode(image, name, max_pixels)


def _decode(image: Image.Image, name: str, max_pixels: int) -> np.ndarray:
    """Check the size (known from the header alone), then decode, rotate and convert to RGB."""
    _check_size(image.width, image.height, name, max_pixels)
    try:
        # load() decodes every byte, so truncation and corruption are caught here.
        image.load()
        image = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageLoadError(f"{name} is corrupt or truncated: {error}") from error
    return np.array(_to_rgb(image, name), dtype=np.uint8, order="C")


def _check_size(width: int, height: int, name: str, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageLoadError(
            f"{name} is {width}x{height} ({width * height:,} pixels), over the limit of {max_pixels:,} "
            "pixels (raise max_pixels to allow it)"
        )
    if width == 0 or height == 0:
        raise ImageLoadError(f"{name} is empty ({width}x{height})")


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    mode = image.mode
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        if rgba.getchannel("A").getextrema()[0] < 255:
            raise ImageLoadError(
                f"{name} has an alpha channel with transparent pixels; flatten it onto a background first"
            )
        return rgba.convert("RGB")
    if mode in _CONVERTIBLE_MODES:
        return image if mode == "RGB" else image.convert("RGB")
    if mode.startswith(("I", "F")):
        raise ImageLoadError(
            f"{name} has {mode!r} pixels (more than 8 bits per channel); segscope expects 8-bit RGB, "
            "so scale it to 0-255 and save it as 8-bit first"
        )
    raise ImageLoadError(f"{name} has unsupported mode {mode!r}; segscope expects 8-bit RGB")


def _from_array(array: np.ndarray, max_pixels: int) -> np.ndarray:
    grayscale = array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 1)
    if array.dtype != np.uint8 or not (grayscale or (array.ndim == 3 and array.shape[2] == 3)):
        hint = " (scale it to 0-255 and cast to uint8)" if array.dtype != np.uint8 else ""
        raise ImageLoadError(
            f"expected an HxWx3 uint8 RGB array (or HxW uint8 grayscale), got shape {array.shape} "
            f"dtype {array.dtype}{hint}"
        )
    height, width = array.shape[:2]
    _check_size(width, height, f"array of shape {array.shape}", max_pixels)
    if grayscale:
        return np.repeat(array.reshape(height, width, 1), 3, axis=2)
    return np.array(array, dtype=np.uint8, order="C", copy=True)
