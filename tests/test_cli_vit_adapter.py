"""Both ViT-Adapter cards end to end on the command line: ``segscope convert`` a release laid
out as the original's, then ``segscope predict`` with it, at reduced depth and width (the
same code path as the full-size models, whose weights cannot be fetched here)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segscope.checkpoints.segscope_format import ModelDescription, save_model
from segscope.cli import main
from segscope.config import PreprocessConfig
from segscope.data.categories import COCO_PANOPTIC, COCO_STUFF
from segscope.models import build_model
from tests.checkpoints.mmlab_layouts import adapter_config, random_tensors, released_beit_adapter, released_head


def _release(tmp_path: Path, detection: bool, classes: int) -> Path:
    shapes = released_beit_adapter(detection=detection, pretrain_grid=4)
    head = "panoptic_head" if detection else "decode_head"
    shapes |= released_head(head, mmcv2=False, in_channels=(32,) * 4, classes=classes)
    tensors = random_tensors(shapes)
    if detection:
        # A confident "person" query, so that the panoptic output is not empty.
        bias = torch.full((classes + 1,), -5.0)
        bias[0] = 8.0
        tensors["panoptic_head.cls_embed.bias"] = bias
        tensors["panoptic_head.cls_embed.weight"].zero_()
        # Equal (zero) mask logits everywhere: the first query takes the whole image.
        tensors["panoptic_head.mask_embed.4.weight"].zero_()
        tensors["panoptic_head.mask_embed.4.bias"].zero_()
    path = tmp_path / "release.pth"
    torch.save({"meta": {"env_info": "mmcv 1.x"}, "state_dict": tensors}, path)
    return path


def _architecture(tmp_path: Path, detection: bool, classes: int, preprocess: PreprocessConfig, task: str) -> Path:
    """A segscope checkpoint standing for the zoo entry: architecture, categories, test settings."""
    config = replace(adapter_config(detection=detection, table_grid=4), num_classes=classes)
    categories = COCO_PANOPTIC if detection else COCO_STUFF
    path = tmp_path / "architecture.safetensors"
    save_model(path, build_model(config).state_dict(), ModelDescription(config, categories, preprocess, task))
    return path


@pytest.fixture
def picture(tmp_path: Path) -> Path:
    path = tmp_path / "street.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (90, 140, 3), dtype=np.uint8)).save(path)
    return path


def test_semantic_card_converts_and_predicts_by_sliding_windows(tmp_path: Path, picture: Path) -> None:
    sliding = PreprocessConfig(short_side=96, max_size=384, resize_to_multiple=True, window=96, window_stride=64)
    architecture = _architecture(tmp_path, detection=False, classes=171, preprocess=sliding, task="semantic")
    converted = tmp_path / "cocostuff.safetensors"
    args = ["convert", str(_release(tmp_path, False, 171)), "--format", "mmseg0", "-m", str(architecture)]
    assert main([*args, "--out", str(converted)]) == 0
    assert main([*args, "--out", str(converted)]) == 2  # never over an existing file

    out = tmp_path / "out"
    code = main(["predict", str(picture), "-m", str(converted), "-o", str(out), "-f", "overlay,json,label-png"])
    assert code == 0
    labels = np.asarray(Image.open(out / "labels" / "street.png"))
    assert labels.shape == (90, 140) and labels.max() < 171
    record = json.loads((out / "street.json").read_text())
    assert record["task"] == "semantic" and {s["label"] for s in record["segments"]} <= set(COCO_STUFF.names)
    assert all(np.isfinite(s["score"]) for s in record["segments"])


def test_panoptic_card_converts_and_predicts_coco_panoptic(tmp_path: Path, picture: Path) -> None:
    coco_named = picture.rename(picture.with_name("000000000139.png"))  # COCO's file names are image ids
    architecture = _architecture(
        tmp_path, detection=True, classes=133, preprocess=PreprocessConfig(short_side=96, max_size=160), task="panoptic"
    )
    converted = tmp_path / "panoptic.safetensors"
    release = _release(tmp_path, True, 133)
    args = ["convert", str(release), "--format", "mmdet2", "-m", str(architecture), "--out", str(converted)]
    assert main(args) == 0
    out = tmp_path / "out"
    code = main(["predict", str(coco_named), "-m", str(converted), "-o", str(out), "-f", "coco-panoptic,json"])
    assert code == 0
    annotation = json.loads((out / "panoptic.json").read_text())["annotations"][0]
    assert annotation["image_id"] == 139 and annotation["segments_info"]
    assert all(s["category_id"] == 1 for s in annotation["segments_info"])  # the confident "person" query
    segments_png = np.asarray(Image.open(out / "panoptic" / "000000000139.png"))
    assert segments_png.shape == (90, 140, 3)


def test_convert_names_an_unknown_format_a_wrong_suffix_and_a_foreign_file(tmp_path: Path, capsys) -> None:
    source = tmp_path / "x.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, source)
    out = tmp_path / "y.safetensors"
    assert main(["convert", str(source), "-f", "caffe", "-m", "demo", "-o", str(out)]) == 2
    assert "unknown checkpoint format 'caffe'" in capsys.readouterr().err
    assert main(["convert", str(source), "-f", "mmdet2", "-m", "demo", "-o", str(tmp_path / "y.pth")]) == 2
    assert "must name a .safetensors file" in capsys.readouterr().err
    assert main(["convert", str(source), "-f", "mmdet2", "-m", "demo", "-o", str(out)]) == 2
    assert "not a mmdetection 2.x Mask2Former checkpoint" in capsys.readouterr().err
    assert not out.exists()
