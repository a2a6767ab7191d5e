"""Cascade Mask R-CNN end to end on the command line (a small random model, the same code path)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from segscope.checkpoints.segscope_format import ModelDescription, save_model
from segscope.cli import main
from segscope.config import PreprocessConfig
from segscope.data.categories import CategorySet
from segscope.models import build_model
from segscope.registry import get_architecture


def test_predict_instances_and_coco_results(tmp_path: Path) -> None:
    categories = CategorySet.from_names(["person", "car", "dog"])
    config = get_architecture("cascade_mask_rcnn").example_config(len(categories))
    torch.manual_seed(0)
    model = tmp_path / "cascade.safetensors"
    description = ModelDescription(config, categories, PreprocessConfig(short_side=96, max_size=160), "instance")
    save_model(model, build_model(config).state_dict(), description)
    picture = tmp_path / "000000000042.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 140, 3), dtype=np.uint8)).save(picture)

    out = tmp_path / "out"
    args = ["predict", str(picture), "-m", str(model), "-o", str(out), "--task", "instance", "--threshold", "0"]
    assert main([*args, "-f", "overlay,json,coco-results"]) == 0
    results = json.loads((out / "coco_results.json").read_text())
    assert results, "a random detector still returns its 100 best boxes above 0.05"
    assert {r["image_id"] for r in results} == {42} and {r["category_id"] for r in results} <= set(categories.ids)
    for record in results:
        x, y, w, h = record["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 140 + 1e-3 and y + h <= 90 + 1e-3
        assert record["segmentation"]["size"] == [90, 140]
    assert Image.open(out / "000000000042.png").size == (140, 90)
    assert main(["predict", str(picture), "-m", str(model), "-o", str(tmp_path / "o2"), "--task", "panoptic"]) == 2


def test_convert_a_modelscope_folder_then_predict(tmp_path: Path) -> None:
    categories = CategorySet.from_names(["person", "car"])
    config = get_architecture("cascade_mask_rcnn").example_config(len(categories))
    torch.manual_seed(0)
    weights = build_model(config).state_dict()
    description = ModelDescription(config, categories, PreprocessConfig(short_side=64, max_size=96), "instance")
    template = tmp_path / "template.safetensors"  # architecture, categories and test settings for --model
    save_model(template, weights, description)
    folder = tmp_path / "cv_swin-b_image-instance-segmentation_coco"
    folder.mkdir()
    (folder / "configuration.json").write_text(json.dumps({"model": {"type": "cascade_mask_rcnn_swin"}}))
    release = {("rpn_head." + k.removeprefix("rpn.head.") if k.startswith("rpn.head.") else k): v.clone() + 1
               for k, v in weights.items()}
    torch.save({"state_dict": release}, folder / "pytorch_model.pt")

    out = tmp_path / "converted.safetensors"
    assert main(["convert", str(folder), "-f", "modelscope", "-m", str(template), "-o", str(out)]) == 0
    from segscope.loading import load

    loaded = load(str(out)).module.state_dict()
    assert torch.equal(loaded["rpn.head.rpn_cls.weight"], weights["rpn.head.rpn_cls.weight"] + 1)
    picture = tmp_path / "photo.png"
    Image.fromarray(np.full((50, 70, 3), 128, dtype=np.uint8)).save(picture)
    assert main(["predict", str(picture), "-m", str(out), "-o", str(tmp_path / "out"), "-f", "json"]) == 0
