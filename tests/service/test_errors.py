"""Every refusal through the real app: the status, and the one JSON error shape with a clear message."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'segscope[serve]'")

import io
import json
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler

import numpy as np
from fastapi.testclient import TestClient
from httpx import Response
from PIL import Image

from .conftest import Gate, batcher_of, wait_until


def _error(response: Response, status: int, kind: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["type"] == kind
    assert "Traceback" not in body["error"]["message"]
    return body["error"]["message"]


def test_oversize_upload_is_413(make_client: Callable[..., TestClient], shapes_png: bytes) -> None:
    client = make_client(max_upload_bytes=1000)
    assert "over the limit of 1,000 bytes" in _error(client.post("/v1/segment", content=shapes_png), 413, "too_large")
    _error(client.post("/v1/segment", files={"image": ("a.png", shapes_png)}), 413, "too_large")
    # Without a Content-Length the body is cut off as it streams in.
    chunks = (shapes_png[i : i + 500] for i in range(0, len(shapes_png), 500))
    _error(client.post("/v1/segment", content=chunks), 413, "too_large")


def test_too_many_pixels_is_413_before_decoding(make_client: Callable[..., TestClient], shapes_png: bytes) -> None:
    message = _error(make_client(max_pixels=1000).post("/v1/segment", content=shapes_png), 413, "too_many_pixels")
    assert "224x160" in message and "over the limit of 1,000 pixels" in message


def test_corrupt_and_truncated_images_are_400_with_the_loader_message(
    make_client: Callable[..., TestClient], shapes_png: bytes
) -> None:
    client = make_client()
    assert "is not a readable image" in _error(client.post("/v1/segment", content=b"\x00\x01garbage"), 400, "bad_image")
    truncated = shapes_png[: len(shapes_png) // 2]
    assert "corrupt or truncated" in _error(client.post("/v1/segment", content=truncated), 400, "bad_image")
    rgba = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 4), dtype=np.uint8)).save(rgba, format="PNG")
    assert "transparent" in _error(client.post("/v1/segment", content=rgba.getvalue()), 400, "bad_image")


def test_urls_and_paths_are_refused_never_fetched(
    make_client: Callable[..., TestClient], http_server: Callable, shapes_png: bytes
) -> None:
    fetched: list[str] = []

    def record(handler: BaseHTTPRequestHandler) -> None:
        fetched.append(handler.path)
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(shapes_png)))
        handler.end_headers()
        handler.wfile.write(shapes_png)

    url = http_server({"/shapes.png": record}) + "/shapes.png"
    client = make_client()
    for body in (url, f"  {url}\n", "/etc/passwd", "examples/shapes.png", "file:///etc/passwd", "C:\\a.png"):
        assert "never fetches URLs" in _error(client.post("/v1/segment", content=body.encode()), 400, "bad_request")
    assert "is a URL" in _error(client.post("/v1/segment", data={"image": url}), 400, "bad_request")
    multipart_text = {"image": (None, "/srv/x.png")}
    assert "is a file path" in _error(client.post("/v1/segment", files=multipart_text), 400, "bad_request")
    _error(client.post("/v1/segment", json={"image": url}), 400, "bad_request")
    form_type = {"content-type": "application/x-www-form-urlencoded"}  # curl --data-binary's default
    assert "is a URL" in _error(client.post("/v1/segment", content=url, headers=form_type), 400, "bad_request")
    assert fetched == []


def test_bad_requests_are_400(make_client: Callable[..., TestClient], shapes_png: bytes) -> None:
    client = make_client()
    wrong_field = {"picture": ("a.png", shapes_png)}
    assert "no field 'image'" in _error(client.post("/v1/segment", files=wrong_field), 400, "bad_request")
    assert "empty" in _error(client.post("/v1/segment", content=b""), 400, "bad_request")
    assert "cannot carry an image" in _error(client.post("/v1/segment", data={"image": "hi"}), 400, "bad_request")
    text_field = {"image": (None, "hello")}
    assert "must be a file" in _error(client.post("/v1/segment", files=text_field), 400, "bad_request")
    headers = {"content-type": "multipart/form-data; boundary=xyz"}
    _error(client.post("/v1/segment", content=b"--xyz\r\nnonsense", headers=headers), 400, "bad_request")


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("task=depth", "unknown task 'depth'"),
        ("threshold=abc", "threshold must be a number in [0, 1]"),
        ("threshold=1.5", "threshold must be a number in [0, 1]"),
        ("threshold=nan", "threshold must be a number in [0, 1]"),
        ("task=semantic&threshold=0.5", "has no score threshold"),
        ("output=gif", "unknown output 'gif'"),
    ],
)
def test_bad_options_are_422(
    make_client: Callable[..., TestClient], shapes_png: bytes, query: str, message: str
) -> None:
    response = make_client().post(f"/v1/segment?{query}", content=shapes_png)
    assert message in _error(response, 422, "bad_option")


def test_unknown_routes_and_methods_use_the_error_shape(make_client: Callable[..., TestClient]) -> None:
    client = make_client()
    _error(client.get("/v2/segment"), 404, "not_found")
    _error(client.get("/v1/segment"), 405, "method_not_allowed")


def test_a_failing_model_is_a_500_without_a_traceback(
    make_client: Callable[..., TestClient], shapes_png: bytes
) -> None:
    client = make_client(raise_server_exceptions=False)

    def broken(key: object, items: object) -> list:
        raise RuntimeError("secret internals")

    batcher_of(client).run = broken
    message = _error(client.post("/v1/segment", content=shapes_png), 500, "internal")
    assert "secret" not in message
    # The worker survives a failed batch.
    assert client.get("/healthz").status_code == 200


def test_full_queue_is_503_and_the_held_requests_still_succeed(
    make_client: Callable[..., TestClient], gate_of: Callable[[TestClient], Gate], shapes_png: bytes
) -> None:
    client = make_client(batch_size=1, queue_size=1, max_wait_ms=0)
    gate = gate_of(client)
    batcher = batcher_of(client)
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(client.post, "/v1/segment", content=shapes_png)
        assert gate.entered.wait(20)
        queued = pool.submit(client.post, "/v1/segment", content=shapes_png)
        wait_until(lambda: batcher.waiting == 1)
        refused = client.post("/v1/segment", content=shapes_png)
        assert "busy" in _error(refused, 503, "busy")
        assert refused.headers["retry-after"] == "1"
        assert client.get("/healthz").json()["in_progress"] == 2
        gate.released.set()
        assert running.result().status_code == 200 and queued.result().status_code == 200
    assert list(batcher.batch_sizes) == [1, 1] and batcher.admitted == 0


def test_a_request_past_its_timeout_is_504_and_leaves_the_queue(
    make_client: Callable[..., TestClient], gate_of: Callable[[TestClient], Gate], shapes_png: bytes
) -> None:
    client = make_client(batch_size=1, max_wait_ms=0, timeout_s=0.3)
    gate = gate_of(client)
    batcher = batcher_of(client)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(client.post, "/v1/segment", content=shapes_png)
        assert gate.entered.wait(20)
        second = pool.submit(client.post, "/v1/segment", content=shapes_png)
        assert "request timeout of 0.3 s" in _error(first.result(), 504, "timeout")
        _error(second.result(), 504, "timeout")
    assert batcher.waiting == 0 and batcher.admitted == 0
    gate.released.set()
    wait_until(lambda: client.get("/healthz").json()["in_progress"] == 0)


def test_an_upload_slower_than_the_timeout_is_408(live_server: Callable[..., str]) -> None:
    port = int(live_server(timeout_s=0.3).rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=20) as connection:
        # Announce 1000 bytes, send 10, then nothing: the server must not wait for the rest forever.
        head = b"POST /v1/segment HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
        connection.sendall(head + b"\x89PNG\r\n\x1a\n\x00\x00")
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = connection.recv(4096)
            if not chunk:
                break
            reply += chunk
    status_line, _, rest = reply.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 408")
    body = json.loads(rest.partition(b"\r\n\r\n")[2])
    assert body["error"]["type"] == "upload_timeout" and "0.3 s" in body["error"]["message"]
