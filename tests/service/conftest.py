"""Fixtures of the service tests: the demo model, a client factory, a gate that holds the model."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

try:
    import uvicorn
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from segscope.service.app import create_app
    from segscope.service.batching import Batcher
except ModuleNotFoundError:  # the serve extra is missing: each test module skips itself, saying so
    pass

from segscope.loading import LoadedModel, load
from segscope.service.config import ServiceConfig

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "shapes.png"


@pytest.fixture(scope="session")
def demo_model() -> LoadedModel:
    """The shipped demo model, loaded once (every app shares its module)."""
    return load("demo")


@pytest.fixture(scope="session")
def shapes_png() -> bytes:
    return EXAMPLE.read_bytes()


@pytest.fixture()
def make_client(demo_model: LoadedModel) -> Iterator[Callable[..., TestClient]]:
    """``make_client(**settings)``: a started TestClient over the demo model with ``ServiceConfig(**settings)``."""
    with ExitStack() as stack:

        def make(raise_server_exceptions: bool = True, **settings: Any) -> TestClient:
            settings.setdefault("device", "cpu")
            app = create_app(demo_model, ServiceConfig(**settings))
            return stack.enter_context(TestClient(app, raise_server_exceptions=raise_server_exceptions))

        yield make


def batcher_of(client: TestClient) -> Batcher:
    app: FastAPI = client.app  # type: ignore[assignment]
    return app.state.batcher


class Gate:
    """Wraps a batch function so that it blocks until released: a model as slow as a test needs."""

    def __init__(self, run: Callable[[Hashable, Sequence[Any]], Sequence[Any]]) -> None:
        self.run = run
        self.entered = threading.Event()
        self.released = threading.Event()

    def __call__(self, key: Hashable, items: Sequence[Any]) -> Sequence[Any]:
        self.entered.set()
        if not self.released.wait(30):
            raise RuntimeError("the gate was never released")
        return self.run(key, items)


@pytest.fixture()
def gate_of() -> Iterator[Callable[[TestClient], Gate]]:
    """``gate_of(client)`` holds the client's model until ``gate.released.set()`` (set at teardown)."""
    gates: list[Gate] = []

    def install(client: TestClient) -> Gate:
        batcher = batcher_of(client)
        gate = Gate(batcher.run)
        batcher.run = gate
        gates.append(gate)
        return gate

    yield install
    for gate in gates:
        gate.released.set()


def wait_until(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    """Return once ``condition()`` holds; fail the test if it never does within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not reached within {timeout_s} s")
        time.sleep(0.005)


@pytest.fixture()
def live_server(demo_model: LoadedModel) -> Iterator[Callable[..., str]]:
    """``live_server(**settings)``: the app served by uvicorn on 127.0.0.1 (a free port) in a thread;
    returns its base URL. Servers stop when the test ends."""
    running: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(**settings: Any) -> str:
        settings.setdefault("device", "cpu")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        app = create_app(demo_model, ServiceConfig(**settings))
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        running.append((server, thread))
        wait_until(lambda: server.started)
        return f"http://127.0.0.1:{port}"

    yield start
    for server, thread in running:
        server.should_exit = True
        thread.join(10)
