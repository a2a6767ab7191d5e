"""Deployment export: the exported network reproduces PyTorch in onnxruntime and TorchScript."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from segscope.checkpoints.segscope_format import ModelDescription
from segscope.cli import main
from segscope.config import PreprocessConfig
from segscope.data.categories import CategorySet
from segscope.deploy import METADATA_FILE, export_model
from segscope.errors import OptionError
from segscope.loading import LoadedModel, load
from segscope.models import build_model
from segscope.registry import get_architecture

SIZE = (64, 96)


@pytest.fixture(scope="module")
def demo() -> LoadedModel:
    return load("demo")


def test_onnx_export_matches_pytorch_in_onnxruntime(demo: LoadedModel, tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    report = export_model(demo, tmp_path / "demo.onnx", "onnx", SIZE, batch=2)
    assert report.output_names == ("class_logits", "mask_logits") and report.input_shape == (2, 3, *SIZE)
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-4

    # Independently of the report: a fresh session on other inputs, and the description inside the file.
    session = onnxruntime.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    pixels = torch.randn(2, 3, *SIZE, generator=torch.Generator().manual_seed(1))
    class_logits, mask_logits = session.run(None, {"pixel_values": pixels.numpy()})
    with torch.inference_mode():
        expected = demo.module(pixels)
    np.testing.assert_allclose(class_logits, expected.class_logits.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(mask_logits, expected.mask_logits.numpy(), atol=1e-4, rtol=0)
    metadata = {prop.key: prop.value for prop in onnx.load(str(report.path)).metadata_props}
    described = ModelDescription.from_metadata(metadata, "exported")
    assert described.categories == demo.description.categories and described.config == demo.module.config
    assert {node.op_type for node in onnx.load(str(report.path)).graph.node} >= {"GridSample"}


def test_torchscript_export_reloads_with_its_description(demo: LoadedModel, tmp_path: Path) -> None:
    report = export_model(demo, tmp_path / "demo.pt", "torchscript", SIZE)
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-4
    extra = {METADATA_FILE: ""}
    scripted = torch.jit.load(str(report.path), _extra_files=extra)
    assert json.loads(extra[METADATA_FILE])["model_name"] == demo.name
    pixels = torch.randn(1, 3, *SIZE, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        torch.testing.assert_close(scripted(pixels)[1], demo.module(pixels).mask_logits, atol=1e-4, rtol=0)


def test_bad_requests_are_refused_and_files_kept(demo: LoadedModel, tmp_path: Path) -> None:
    existing = tmp_path / "model.onnx"
    existing.write_text("keep me")
    with pytest.raises(OptionError, match="exists"):
        export_model(demo, existing, "onnx", SIZE)
    assert existing.read_text() == "keep me"
    with pytest.raises(OptionError, match="multiples of 32"):
        export_model(demo, tmp_path / "a.onnx", "onnx", (60, 96))
    with pytest.raises(OptionError, match="unknown export format"):
        export_model(demo, tmp_path / "a.tflite", "tflite", SIZE)  # type: ignore[arg-type]
    config = get_architecture("cascade_mask_rcnn").example_config(2)
    description = ModelDescription(config, CategorySet.from_names(["a", "b"]), PreprocessConfig(), "instance")
    cascade = LoadedModel(build_model(config).eval(), description, "cascade")
    with pytest.raises(OptionError, match="cannot be exported yet"):
        export_model(cascade, tmp_path / "c.onnx", "onnx", SIZE)


def test_cli_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo.pt"
    assert main(["export", "-m", "demo", "-f", "torchscript", "-o", str(out), "--size", *map(str, SIZE)]) == 0
    printed = capsys.readouterr().out
    assert "class_logits, mask_logits" in printed and "max |difference|" in printed
    assert main(["export", "-m", "demo", "-f", "torchscript", "-o", str(out), "--size", *map(str, SIZE)]) == 2
    assert "exists" in capsys.readouterr().err
