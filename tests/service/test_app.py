"""The endpoints through the real app: results equal the pipeline's, models, health, page and docs."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'segscope[serve]'")

import io
import json
from collections.abc import Callable

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from segscope.loading import LoadedModel
from segscope.pipeline import SegmentationPipeline
from segscope.service.app import STATIC

from .conftest import EXAMPLE


def _expected(model: LoadedModel, **options: object) -> dict:
    result = SegmentationPipeline(model, device="cpu", **options)(EXAMPLE)
    # The same record `segscope predict --format json` writes, made JSON and back.
    return json.loads(json.dumps({"source": "shapes.png", "model": "demo", **result.to_json()}))


def test_multipart_json_equals_the_pipeline_result(
    make_client: Callable[..., TestClient], demo_model: LoadedModel, shapes_png: bytes
) -> None:
    client = make_client(batch_size=1)
    response = client.post("/v1/segment", files={"image": ("shapes.png", shapes_png, "image/png")})
    assert response.status_code == 200
    assert response.json() == _expected(demo_model)
    assert {s["label"] for s in response.json()["segments"]} >= {"circle", "square"}


def test_options_come_from_query_or_form_fields(
    make_client: Callable[..., TestClient], demo_model: LoadedModel, shapes_png: bytes
) -> None:
    client = make_client(batch_size=1)
    files = {"image": ("shapes.png", shapes_png, "image/png")}
    semantic = client.post("/v1/segment", files=files, data={"task": "semantic"})
    assert semantic.status_code == 200 and semantic.json() == _expected(demo_model, task="semantic")
    instance = client.post("/v1/segment?task=instance&threshold=0.3", files=files)
    assert instance.status_code == 200 and instance.json() == _expected(demo_model, task="instance", threshold=0.3)
    assert all("bbox" in segment for segment in instance.json()["segments"])


def test_raw_body_png_output_is_the_overlay(
    make_client: Callable[..., TestClient], demo_model: LoadedModel, shapes_png: bytes
) -> None:
    client = make_client(batch_size=1)
    response = client.post("/v1/segment?output=png", content=shapes_png, headers={"content-type": "image/png"})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    served = np.array(Image.open(io.BytesIO(response.content)))
    drawn = np.array(SegmentationPipeline(demo_model, device="cpu")(EXAMPLE).draw())
    assert np.array_equal(served, drawn)
    # `curl --data-binary @shapes.png` labels the bytes as a URL-encoded form; they are the image all the same.
    form_type = {"content-type": "application/x-www-form-urlencoded"}
    curl_like = client.post("/v1/segment", content=shapes_png, headers=form_type)
    assert curl_like.status_code == 200


def test_models_names_the_model_its_tasks_and_classes(make_client: Callable[..., TestClient]) -> None:
    client = make_client(task="semantic")
    (model,) = client.get("/v1/models").json()["models"]
    assert model["name"] == "demo" and model["architecture"] == "mask2former"
    assert model["default_task"] == "semantic"
    assert set(model["tasks"]) == {"panoptic", "semantic", "instance"}
    assert [c["name"] for c in model["classes"]][:2] == ["circle", "square"]
    assert all(len(c["color"]) == 3 and {"id", "isthing", "index"} <= set(c) for c in model["classes"])


def test_healthz_reports_the_worker_and_queue(make_client: Callable[..., TestClient]) -> None:
    body = make_client(batch_size=4, queue_size=5).get("/healthz").json()
    assert body == {
        "status": "ok",
        "model": "demo",
        "in_progress": 0,
        "queued": 0,
        "capacity": 9,
        "batch_size": 4,
        "batches_run": 0,
        "mean_batch_size": 0.0,
    }


def test_openapi_is_served_and_docs_need_no_cdn(make_client: Callable[..., TestClient]) -> None:
    client = make_client()
    api = client.get("/openapi.json").json()
    assert {"/v1/segment", "/v1/models", "/healthz"} <= set(api["paths"])
    assert "multipart/form-data" in api["paths"]["/v1/segment"]["post"]["requestBody"]["content"]
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/static/docs.js" in docs.text
    assert client.get("/redoc").status_code == 404


def test_web_page_and_its_assets_are_served_from_the_package(make_client: Callable[..., TestClient]) -> None:
    client = make_client()
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for asset in ("app.js", "rle.js", "style.css", "docs.js"):
        assert f"/static/{asset}" in page.text + client.get("/docs").text
        response = client.get(f"/static/{asset}")
        assert response.status_code == 200
    # Offline: nothing on the pages loads from another host.
    for path in STATIC.iterdir():
        assert "//cdn" not in path.read_text() and "https://" not in path.read_text(), path.name
