"""The demo model shipped in the package: offline, and as good as the README says."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import segscope
from segscope.cli import main
from segscope.data.synthetic import write_synthetic_panoptic

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "shapes.png"


def test_demo_predicts_the_example_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["predict", str(EXAMPLE), "--model", "demo", "--out", str(tmp_path), "--device", "cpu"]) == 0
    record = json.loads((tmp_path / "shapes.json").read_text())
    labels = {segment["label"] for segment in record["segments"]}
    # The example shows circles and squares over checkerboard, speckle and stripes.
    assert {"circle", "square", "checkerboard", "speckle"} <= labels


def test_demo_reaches_pq_60_on_unseen_synthetic_scenes(tmp_path: Path) -> None:
    # Seed 11 draws scenes the demo never saw (it trained on seed 0's training split).
    data = write_synthetic_panoptic(tmp_path / "data", num_train=0, num_val=32, seed=11)
    out = tmp_path / "pq.json"
    args = ["eval", "--model", "demo", "--data", str(data), "--task", "panoptic", "--out", str(out), "--device", "cpu"]
    assert main(args) == 0
    figures = json.loads(out.read_text())
    print(f"demo PQ on 32 unseen scenes: {figures['All']['PQ']:.1f}")
    assert figures["All"]["PQ"] >= 60


def test_demo_serves_semantic_and_instance_too() -> None:
    segment = segscope.pipeline(model="demo", task="semantic", device="cpu")
    result = segment(EXAMPLE)
    assert result["semantic_seg"].shape == (160, 224)
    assert np.array_equal(result["masks"].sum(0), np.ones((160, 224)))
    instances = segscope.pipeline(model="demo", task="instance", device="cpu")(EXAMPLE)
    assert set(instances["labels"]) <= {"circle", "square", "triangle"} and len(instances["labels"]) >= 2
