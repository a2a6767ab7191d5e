"""The ``segscope`` command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from segscope.cli import main
from segscope.evaluation.rle import rle_to_masks


def test_predict_writes_overlay_and_segments(tiny_checkpoint: Path, picture: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = main(["predict", str(picture), "--model", str(tiny_checkpoint), "--out", str(out), "--device", "cpu"])
    assert code == 0
    overlay = Image.open(out / "picture.png")
    assert overlay.size == (110, 75)
    # The overlay is the picture with colour blended in, not a copy and not a blank.
    original = np.asarray(Image.open(picture).convert("RGB"), dtype=int)
    assert np.abs(np.asarray(overlay.convert("RGB"), dtype=int) - original).mean() > 5
    record = json.loads((out / "picture.json").read_text())
    assert record["task"] == "panoptic" and record["segments"]
    masks = rle_to_masks([s["segmentation"] for s in record["segments"]])
    assert masks.shape[1:] == (75, 110)
    assert not (masks.sum(0) > 1).any()  # panoptic segments do not overlap


def test_predict_over_a_folder_writes_one_pair_per_image(tiny_checkpoint: Path, picture: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for name in ("one.png", "two.jpg"):
        Image.open(picture).convert("RGB").save(images / name)
    out = tmp_path / "out"
    args = ["predict", str(images), "-m", str(tiny_checkpoint), "-o", str(out), "--task", "instance"]
    args += ["--threshold", "0"]
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["one.json", "one.png", "two.json", "two.png"]
    record = json.loads((out / "two.json").read_text())
    assert all(len(s["bbox"]) == 4 for s in record["segments"])


def test_errors_are_one_line_and_exit_code_2(tiny_checkpoint: Path, tmp_path: Path) -> None:
    process = subprocess.run(
        [sys.executable, "-m", "segscope.cli", "predict", str(tmp_path / "nope.jpg"), "-m", str(tiny_checkpoint),
         "-o", str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert process.returncode == 2
    assert process.stderr.startswith("segscope: error:") and "nope.jpg" in process.stderr
    assert "Traceback" not in process.stderr


def test_models_lists_the_zoo(capsys) -> None:
    assert main(["models"]) == 0
    listing = capsys.readouterr().out
    assert "mask2former-r50-coco-panoptic" in listing and "mask2former-swin-l-coco-panoptic" in listing
