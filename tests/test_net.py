"""Downloads that misbehave: slow, silent, cut short, too big, or a different file.

Every case must end in segscope's own error, in bounded time, with nothing left in the cache.
"""

from __future__ import annotations

import hashlib
import io
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segscope.checkpoints import download as checkpoint_download
from segscope.errors import CheckpointError, ImageLoadError
from segscope.io import load_image
from segscope.net import download
from tests.conftest import drop_after, never_answer, serve_bytes, trickle


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 7, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_download_returns_the_body_and_its_sha256(http_server) -> None:
    body = b"weights" * 1000
    base = http_server({"/w": serve_bytes(body)})
    sink = io.BytesIO()
    digest = download(f"{base}/w", sink, error=CheckpointError, timeout=5, deadline=10, max_bytes=10**6)
    assert sink.getvalue() == body
    assert digest == hashlib.sha256(body).hexdigest()


def test_trickling_image_url_stops_at_the_deadline(http_server) -> None:
    # One byte every 0.2 s never trips the per-read timeout; only the overall deadline ends it.
    base = http_server({"/slow.png": trickle(_png(), interval_s=0.2)})
    started = time.monotonic()
    with pytest.raises(ImageLoadError, match=r"slow\.png took longer than 1 s"):
        load_image(f"{base}/slow.png", timeout=5, deadline=1)
    assert time.monotonic() - started < 4


def test_connection_dropped_mid_body_is_an_image_load_error(http_server) -> None:
    body = _png()
    base = http_server({"/cut.png": drop_after(body, sent=len(body) // 2)})
    with pytest.raises(ImageLoadError, match=r"cut\.png"):
        load_image(f"{base}/cut.png", timeout=5)


def test_announced_size_over_the_cap_is_refused_before_reading(http_server) -> None:
    base = http_server({"/big": serve_bytes(b"x" * 5000)})
    with pytest.raises(CheckpointError, match=r"5,000 bytes, over the limit of 1,000"):
        download(f"{base}/big", io.BytesIO(), error=CheckpointError, timeout=5, deadline=10, max_bytes=1000)


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SEGSCOPE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _cached_files(cache: Path) -> list[Path]:
    return sorted(p for p in cache.rglob("*") if p.is_file()) if cache.exists() else []


def test_cache_is_keyed_by_the_whole_url_not_the_file_name(http_server, cache: Path) -> None:
    base = http_server({"/a/model.safetensors": serve_bytes(b"first"), "/b/model.safetensors": serve_bytes(b"second")})
    first = checkpoint_download.fetch_url(f"{base}/a/model.safetensors")
    second = checkpoint_download.fetch_url(f"{base}/b/model.safetensors")
    assert first != second
    assert (first.read_bytes(), second.read_bytes()) == (b"first", b"second")
    assert first.name == second.name == "model.safetensors"


def test_interrupted_checkpoint_download_leaves_nothing_in_the_cache(http_server, cache: Path) -> None:
    body = b"w" * 10_000
    base = http_server({"/cut.pth": drop_after(body, sent=4000), "/ok.pth": serve_bytes(body)})
    with pytest.raises(CheckpointError, match=r"closed after 4,000 of 10,000 bytes"):
        checkpoint_download.fetch_url(f"{base}/cut.pth")
    assert _cached_files(cache) == []
    # The same URL answered properly later is downloaded afresh, not read from a poisoned cache.
    assert checkpoint_download.fetch_url(f"{base}/ok.pth").read_bytes() == body


def test_checkpoint_with_the_wrong_sha256_is_refused_and_not_cached(http_server, cache: Path) -> None:
    body = b"not the published weights"
    base = http_server({"/m.pkl": serve_bytes(body)})
    with pytest.raises(CheckpointError, match="has sha256 .*, expected 00ff"):
        checkpoint_download.fetch_url(f"{base}/m.pkl", sha256="00ff" * 16)
    assert _cached_files(cache) == []
    good = checkpoint_download.fetch_url(f"{base}/m.pkl", sha256=hashlib.sha256(body).hexdigest())
    assert good.read_bytes() == body


def test_checkpoint_url_that_never_answers_times_out(http_server, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checkpoint_download, "READ_TIMEOUT_S", 0.5)
    base = http_server({"/silent.pth": never_answer})
    started = time.monotonic()
    with pytest.raises(CheckpointError, match=r"no answer from .*silent\.pth within 0\.5 s"):
        checkpoint_download.fetch_url(f"{base}/silent.pth")
    assert time.monotonic() - started < 3
    assert _cached_files(cache) == []
