from __future__ import annotations

import io
import re
import socket
import struct
import threading
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segscope.errors import ImageLoadError
from segscope.io import is_image_file, list_images, load_image


def _encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _noise(height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` but holds almost no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


# Sources and conversions -------------------------------------------------------------------


def test_png_file_loads_as_contiguous_rgb_uint8(tmp_path: Path) -> None:
    pixels = _noise()
    path = tmp_path / "a.png"
    Image.fromarray(pixels).save(path)
    loaded = load_image(path)
    assert loaded.dtype == np.uint8 and loaded.flags.c_contiguous
    np.testing.assert_array_equal(loaded, pixels)
    np.testing.assert_array_equal(load_image(str(path)), pixels)


def test_bytes_and_pil_sources_decode_to_the_same_pixels() -> None:
    pixels = _noise()
    np.testing.assert_array_equal(load_image(_encode(Image.fromarray(pixels), "PNG")), pixels)
    np.testing.assert_array_equal(load_image(Image.fromarray(pixels)), pixels)


def test_exif_orientation_6_rotates_the_image_clockwise() -> None:
    # Stored 20 high x 40 wide: left half red, right half blue. Orientation 6 means "rotate
    # 90 degrees clockwise to display", which puts the stored left half on top.
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20] = (255, 0, 0)
    stored[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    loaded = load_image(_encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif.tobytes()))
    assert loaded.shape == (40, 20, 3)
    assert loaded[5, 10, 0] > 200 and loaded[5, 10, 2] < 50
    assert loaded[35, 10, 2] > 200 and loaded[35, 10, 0] < 50


def test_grayscale_and_one_bit_images_are_expanded_to_rgb() -> None:
    gray = np.arange(48 * 64, dtype=np.uint32).reshape(48, 64).astype(np.uint8)
    loaded = load_image(_encode(Image.fromarray(gray), "PNG"))
    assert loaded.shape == (48, 64, 3)
    np.testing.assert_array_equal(loaded, np.repeat(gray[..., None], 3, axis=2))
    bits = Image.fromarray(gray > 100).convert("1")
    assert set(np.unique(load_image(_encode(bits, "PNG")))) == {0, 255}


def test_palette_image_without_transparency_is_expanded_through_its_palette() -> None:
    palette_image = Image.new("P", (8, 4), 1)
    palette_image.putpalette([0, 0, 0, 10, 200, 30])
    loaded = load_image(_encode(palette_image, "PNG"))
    assert loaded.shape == (4, 8, 3)
    assert (loaded == (10, 200, 30)).all()


def test_cmyk_jpeg_is_converted_to_rgb() -> None:
    cmyk = Image.new("CMYK", (16, 8), (0, 255, 255, 0))  # pure red in CMYK
    loaded = load_image(_encode(cmyk, "JPEG", quality=95))
    assert loaded.shape == (8, 16, 3)
    assert loaded[4, 8, 0] > 200 and loaded[4, 8, 1] < 60


def test_opaque_rgba_is_accepted_and_drops_its_alpha() -> None:
    pixels = _noise()
    rgba = np.dstack([pixels, np.full(pixels.shape[:2], 255, np.uint8)])
    np.testing.assert_array_equal(load_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG")), pixels)


def test_rgba_with_transparent_pixels_is_refused() -> None:
    rgba = np.full((8, 8, 4), 255, np.uint8)
    rgba[0, 0, 3] = 0
    with pytest.raises(ImageLoadError, match="transparent pixels; flatten it onto a background"):
        load_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG"))


def test_palette_image_with_a_transparent_index_is_refused() -> None:
    palette_image = Image.new("P", (8, 8), 0)
    palette_image.putpalette([0, 0, 0, 255, 0, 0])
    palette_image.putpixel((1, 1), 1)
    with pytest.raises(ImageLoadError, match="transparent"):
        load_image(_encode(palette_image, "PNG", transparency=1))


def test_sixteen_bit_png_is_refused_naming_its_mode() -> None:
    deep = Image.fromarray(np.full((8, 8), 40000, np.uint16))
    with pytest.raises(ImageLoadError, match=r"'I.*8-bit"):
        load_image(_encode(deep, "PNG"))


def test_float_pil_image_is_refused_naming_its_mode() -> None:
    with pytest.raises(ImageLoadError, match=r"'F'"):
        load_image(Image.new("F", (4, 4)))


# Numpy arrays ---------------------------------------------------------------------------------


def test_array_is_copied_into_a_contiguous_array() -> None:
    pixels = _noise()
    flipped = pixels[:, ::-1]
    loaded = load_image(flipped)
    assert loaded.flags.c_contiguous and not np.shares_memory(loaded, pixels)
    np.testing.assert_array_equal(loaded, flipped)


@pytest.mark.parametrize("shape", [(8, 8), (8, 8, 1)])
def test_grayscale_array_is_expanded(shape: tuple[int, ...]) -> None:
    gray = np.arange(64, dtype=np.uint8).reshape(shape)
    loaded = load_image(gray)
    assert loaded.shape == (8, 8, 3)
    np.testing.assert_array_equal(loaded[..., 2], gray.reshape(8, 8))


@pytest.mark.parametrize(
    ("array", "named"),
    [
        (np.zeros((8, 8, 3), np.float32), r"\(8, 8, 3\) dtype float32 \(scale it to 0-255"),
        (np.zeros((8, 8, 4), np.uint8), r"\(8, 8, 4\) dtype uint8"),
        (np.zeros((3, 8, 8), np.uint8), r"\(3, 8, 8\)"),
        (np.zeros(8, np.uint8), r"\(8,\)"),
    ],
)
def test_array_of_wrong_shape_or_dtype_is_refused_naming_both(array: np.ndarray, named: str) -> None:
    with pytest.raises(ImageLoadError, match=named):
        load_image(array)


def test_unsupported_source_type_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="int"):
        load_image(42)  # type: ignore[arg-type]


# Broken input ---------------------------------------------------------------------------------


def test_missing_file_raises_file_not_found_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.jpg"
    with pytest.raises(FileNotFoundError, match=r"nowhere\.jpg"):
        load_image(path)


def test_folder_given_as_an_image_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match="folder"):
        load_image(tmp_path)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_image_is_refused(fmt: str) -> None:
    data = _encode(Image.fromarray(_noise(96, 96)), fmt)
    with pytest.raises(ImageLoadError, match=r"<\d+ bytes>.*(truncated|corrupt)"):
        load_image(data[: len(data) // 2])


def test_corrupt_file_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.png"
    path.write_bytes(b"this is not an image")
    with pytest.raises(ImageLoadError, match=r"broken\.png is not a readable image"):
        load_image(path)
    # ImageLoadError is a ValueError, so callers may catch either.
    with pytest.raises(ValueError):
        load_image(b"\x00" * 64)


def test_image_over_the_pixel_limit_is_refused_naming_size_and_limit() -> None:
    data = _encode(Image.fromarray(_noise(100, 120)), "PNG")
    with pytest.raises(ImageLoadError, match=r"120x100 \(12,000 pixels\), over the limit of 10,000"):
        load_image(data, max_pixels=10_000)
    assert load_image(data, max_pixels=12_000).shape == (100, 120, 3)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pixel_limit_is_checked_from_the_header_before_decoding() -> None:
    # The header says 12000 x 12000 but the data is 16 bytes: decoding would fail as truncated,
    # so an "over the limit" error proves the check ran first.
    with pytest.raises(ImageLoadError, match=r"12000x12000 \(144,000,000 pixels\), over the limit of 100,000,000"):
        load_image(_png_header_only(12_000, 12_000))


def test_decompression_bomb_guard_of_pillow_becomes_an_image_load_error() -> None:
    with pytest.raises(ImageLoadError, match="decompression-bomb"):
        load_image(_png_header_only(40_000, 40_000), max_pixels=10**10)


# URLs -------------------------------------------------------------------------------------------


@pytest.fixture
def image_server() -> Iterator[tuple[str, bytes]]:
    """A local HTTP server; ``/image.png`` is a PNG, anything else a 404."""
    payload = _encode(Image.fromarray(_noise()), "PNG")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/image.png":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            else:
                self.send_error(404)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", payload
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_url_is_downloaded_and_decoded(image_server: tuple[str, bytes]) -> None:
    base, payload = image_server
    np.testing.assert_array_equal(load_image(f"{base}/image.png"), load_image(payload))


def test_url_http_error_is_reported_with_url_and_status(image_server: tuple[str, bytes]) -> None:
    base, _ = image_server
    with pytest.raises(ImageLoadError, match=re.escape(f"{base}/missing.png: HTTP 404")):
        load_image(f"{base}/missing.png")


def test_unreachable_url_is_reported_with_the_url() -> None:
    with socket.socket() as probe:  # find a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/x.jpg"
    with pytest.raises(ImageLoadError, match=re.escape(f"could not reach {url}")):
        load_image(url, timeout=2.0)


# Folders ----------------------------------------------------------------------------------------


def test_list_images_returns_sorted_image_files_only(tmp_path: Path) -> None:
    for name in ("b.PNG", "a.jpg", "c.webp", "notes.txt", ".hidden.jpg"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub.jpg").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.PNG", "c.webp"]
    assert is_image_file(tmp_path / "a.jpg")
    assert not is_image_file(tmp_path / "notes.txt")
    assert not is_image_file(tmp_path / "sub.jpg")


def test_list_images_refuses_empty_missing_and_non_folders(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_bytes(b"")
    with pytest.raises(ImageLoadError, match="no image files"):
        list_images(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing"):
        list_images(tmp_path / "missing")
    with pytest.raises(ImageLoadError, match=r"not a folder: .*notes\.txt"):
        list_images(tmp_path / "notes.txt")
