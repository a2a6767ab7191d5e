"""Shared fixtures: tiny models saved in segscope's format, synthetic pictures, a local HTTP server."""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segscope.checkpoints.segscope_format import ModelDescription, save_model
from segscope.config import Mask2FormerConfig, PreprocessConfig, ResNetConfig
from segscope.data.categories import CategorySet
from segscope.models import build_model

# A Mask2Former small enough to build and run in well under a second on a CPU.
TINY_CONFIG = Mask2FormerConfig(
    backbone=ResNetConfig(depth=18),
    num_classes=4,
    pixel_decoder_dim=32,
    mask_dim=32,
    pixel_decoder_layers=1,
    pixel_decoder_ffn_dim=64,
    pixel_decoder_heads=4,
    hidden_dim=32,
    num_queries=8,
    decoder_layers=2,
    decoder_heads=4,
    decoder_ffn_dim=64,
    train_num_points=256,
    # Random weights score low: keep every query so that the post-processing has work to do.
    object_mask_threshold=0.0,
    overlap_threshold=0.0,
)
TINY_CATEGORIES = CategorySet.from_names(["disc", "square", "grass", "sky"], thing_flags=[True, True, False, False])
TINY_PREPROCESS = PreprocessConfig(short_side=64, max_size=128)

# Every test starts from the same global random state, whatever ran before it, so a result never
# depends on test order. SEGSCOPE_TEST_SEED=N reruns the suite under other draws, to find tests
# whose assertions hold only for a lucky seed.
TEST_SEED = int(os.environ.get("SEGSCOPE_TEST_SEED", "0"))


@pytest.fixture(autouse=True)
def _seed_global_random_state() -> None:
    random.seed(TEST_SEED)
    np.random.seed(TEST_SEED)
    torch.manual_seed(TEST_SEED)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Mask2Former saved as a segscope ``.safetensors`` file."""
    torch.manual_seed(0)
    model = build_model(TINY_CONFIG)
    description = ModelDescription(TINY_CONFIG, TINY_CATEGORIES, TINY_PREPROCESS, "panoptic")
    path = tmp_path_factory.mktemp("tiny") / "tiny.safetensors"
    return save_model(path, model.state_dict(), description)


@pytest.fixture(scope="session")
def picture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 75 x 110 RGB PNG (sizes not multiples of 32) with some structure in it."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 60, size=(75, 110, 3), dtype=np.uint8)
    image[10:40, 20:60] = (220, 40, 40)
    image[45:70, 70:105] = (40, 200, 60)
    path = tmp_path_factory.mktemp("pictures") / "picture.png"
    Image.fromarray(image).save(path)
    return path



# A local HTTP server whose routes misbehave on purpose ------------------------------------------

Route = Callable[[BaseHTTPRequestHandler], None]


def serve_bytes(body: bytes, *, status: int = 200) -> Route:
    """A route answering ``body`` with its Content-Length."""

    def route(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(status)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    return route


def trickle(body: bytes, interval_s: float) -> Route:
    """A route sending ``body`` one byte per ``interval_s`` (each read is quick, the whole is not)."""

    def route(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        for byte in body:
            handler.wfile.write(bytes([byte]))
            handler.wfile.flush()
            if handler.server.stopping.wait(interval_s):
                return

    return route


def drop_after(body: bytes, sent: int) -> Route:
    """A route announcing ``body`` but closing the connection after ``sent`` bytes."""

    def route(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body[:sent])
        handler.wfile.flush()
        handler.close_connection = True

    return route


def never_answer(handler: BaseHTTPRequestHandler) -> None:
    """A route that accepts the request and stays silent until the server stops."""
    handler.server.stopping.wait(30)


@pytest.fixture()
def http_server() -> Iterator[Callable[[dict[str, Route]], str]]:
    """``start(routes)`` serves ``{path: route}`` on 127.0.0.1 and returns the base URL; other
    paths answer 404. Everything is stopped (silent routes released) when the test ends."""
    servers: list[ThreadingHTTPServer] = []

    def start(routes: dict[str, Route]) -> str:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                route = routes.get(self.path)
                if route is None:
                    self.send_error(404)
                else:
                    route(self)

            def log_message(self, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        server.stopping = threading.Event()
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.stopping.set()
        server.shutdown()
        server.server_close()
