"""Server-side batching: requests that arrive together run as one batch, settings never mix."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'segscope[serve]'")

import asyncio
import json
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from fastapi.testclient import TestClient

from segscope.io import load_image
from segscope.loading import LoadedModel
from segscope.pipeline import SegmentationPipeline
from segscope.service.batching import Batcher, QueueFullError, ResultTimeoutError

from .conftest import EXAMPLE, Gate, batcher_of, wait_until


def _post_together(client: TestClient, bodies: list[tuple[str, bytes]]) -> list:
    with ThreadPoolExecutor(len(bodies)) as pool:
        futures = [pool.submit(client.post, f"/v1/segment?{query}", content=body) for query, body in bodies]
        return [future.result() for future in futures]


def test_concurrent_requests_run_as_one_batch(
    make_client: Callable[..., TestClient], demo_model: LoadedModel, shapes_png: bytes
) -> None:
    # A long wait: the batch runs as soon as it is full, so the test takes no longer for it.
    client = make_client(batch_size=4, max_wait_ms=30_000)
    responses = _post_together(client, [("", shapes_png)] * 4)
    assert [r.status_code for r in responses] == [200] * 4
    assert list(batcher_of(client).batch_sizes) == [4]
    image = load_image(EXAMPLE)
    batched = SegmentationPipeline(demo_model, device="cpu", batch_size=4)([image] * 4)
    for response, result in zip(responses, batched):
        expected = {"source": "request body", "model": "demo", **result.to_json()}
        assert response.json() == json.loads(json.dumps(expected))


def test_batch_size_one_switches_batching_off(make_client: Callable[..., TestClient], shapes_png: bytes) -> None:
    client = make_client(batch_size=1, max_wait_ms=30_000)
    assert [r.status_code for r in _post_together(client, [("", shapes_png)] * 3)] == [200] * 3
    assert list(batcher_of(client).batch_sizes) == [1, 1, 1]


def test_a_lone_request_waits_at_most_max_wait(make_client: Callable[..., TestClient], shapes_png: bytes) -> None:
    client = make_client(batch_size=8, max_wait_ms=20)
    assert client.post("/v1/segment", content=shapes_png).status_code == 200
    assert list(batcher_of(client).batch_sizes) == [1]


def test_requests_with_other_settings_run_in_their_own_batch(
    make_client: Callable[..., TestClient], gate_of: Callable[[TestClient], Gate], shapes_png: bytes
) -> None:
    client = make_client(batch_size=4, max_wait_ms=0)
    # The semantic pipeline is built (in the worker, between batches) before the worker is held.
    assert client.post("/v1/segment?task=semantic", content=shapes_png).status_code == 200
    gate = gate_of(client)
    batcher = batcher_of(client)
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(client.post, "/v1/segment", content=shapes_png)
        assert gate.entered.wait(20)
        queries = ["task=panoptic", "task=semantic", ""]  # "" is the default task, panoptic
        later = []
        for count, query in enumerate(queries, start=1):
            later.append(pool.submit(client.post, f"/v1/segment?{query}", content=shapes_png))
            wait_until(lambda count=count: batcher.waiting == count)
        gate.released.set()
        tasks = [future.result().json()["task"] for future in [first, *later]]
    assert tasks == ["panoptic", "panoptic", "semantic", "panoptic"]
    assert list(batcher.batch_sizes) == [1, 1, 2, 1]


def test_batcher_bounds_slots_and_drops_timed_out_jobs() -> None:
    release = threading.Event()

    def double(key: object, items: list[int]) -> list[int]:
        release.wait(10)
        return [item * 2 for item in items]

    async def scenario() -> None:
        batcher = Batcher(double, batch_size=1, max_wait_s=0, capacity=2)
        await batcher.start()
        try:
            first = asyncio.create_task(batcher.submit("k", 1, 10))
            while not batcher.batch_sizes:  # until the worker has taken the first job
                await asyncio.sleep(0.001)
            with pytest.raises(ResultTimeoutError):
                await batcher.submit("k", 2, 0.05)
            assert batcher.waiting == 0
            release.set()
            assert await first == 2
            assert list(batcher.batch_sizes) == [1]
            with batcher.slot(), batcher.slot():
                with pytest.raises(QueueFullError):
                    with batcher.slot():
                        pass
            assert batcher.admitted == 0
        finally:
            release.set()
            await batcher.stop()

    asyncio.run(scenario())
