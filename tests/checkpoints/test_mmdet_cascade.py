"""The Swin project's mmdetection 2.x Cascade Mask R-CNN release -> segscope, loaded strictly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from segscope.checkpoints.convert import converted_weights
from segscope.errors import CheckpointError
from segscope.models import build_model
from segscope.registry import get_architecture
from segscope.zoo import get_entry

# Key names and shapes of the released cascade_mask_rcnn_swin_base_patch4_window7.pth, from the
# mmdetection 2.11 modules and the Swin config (80 classes, class-specific regression, FPN 256,
# 4conv1fc heads with 1024-wide fc, 3 anchors per location, 28x28 FCN masks).
RELEASED_SHAPES = {
    "backbone.patch_embed.proj.weight": (128, 3, 4, 4),
    "backbone.layers.2.blocks.17.attn.relative_position_bias_table": (169, 16),
    "backbone.layers.2.downsample.reduction.weight": (1024, 2048),
    "backbone.norm3.weight": (1024,),
    "neck.lateral_convs.0.conv.weight": (256, 128, 1, 1),
    "neck.fpn_convs.3.conv.weight": (256, 256, 3, 3),
    "rpn_head.rpn_conv.weight": (256, 256, 3, 3),
    "rpn_head.rpn_cls.weight": (3, 256, 1, 1),
    "rpn_head.rpn_reg.weight": (12, 256, 1, 1),
    "roi_head.bbox_head.0.shared_convs.0.conv.weight": (256, 256, 3, 3),
    "roi_head.bbox_head.2.shared_convs.3.bn.running_var": (256,),
    "roi_head.bbox_head.1.shared_fcs.0.weight": (1024, 256 * 7 * 7),
    "roi_head.bbox_head.0.fc_cls.weight": (81, 1024),
    "roi_head.bbox_head.2.fc_reg.weight": (320, 1024),
    "roi_head.mask_head.0.convs.3.conv.weight": (256, 256, 3, 3),
    "roi_head.mask_head.1.upsample.weight": (256, 256, 2, 2),
    "roi_head.mask_head.2.conv_logits.weight": (80, 256, 1, 1),
}


def _released_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A segscope state dict in the release's names, with the buffers the release also holds."""
    released = {("rpn_head." + k.removeprefix("rpn.head.") if k.startswith("rpn.head.") else k): v
                for k, v in state_dict.items()}
    for key in [k for k in released if k.endswith("attn.relative_position_bias_table")]:
        released[key.replace("relative_position_bias_table", "relative_position_index")] = torch.zeros(49, 49).long()
    return released


def test_full_size_layout_has_the_released_names_and_shapes() -> None:
    with torch.device("meta"):
        model = build_model(get_entry("cascade-mask-rcnn-swin-b-coco-instance").config)
    # The Swin project lists this model at 145M parameters.
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == 145
    released = _released_layout(model.state_dict())
    for key, shape in RELEASED_SHAPES.items():
        assert key in released, key
        assert tuple(released[key].shape) == shape, key


def _randomised(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every float tensor redrawn, so that a misplaced weight cannot pass unseen."""
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.normal_(0.0, 0.1)
    return model


def test_release_loads_strictly_through_the_converter(tmp_path: Path) -> None:
    config = get_architecture("cascade_mask_rcnn").example_config(4)
    source = _randomised(build_model(config))
    path = tmp_path / "cascade.pth"
    meta = {"CLASSES": ("a", "b", "c", "d"), "hook_msgs": {"best_score": np.float64(0.5)}}
    torch.save({"meta": meta, "state_dict": _released_layout(source.state_dict())}, path)
    target = build_model(config)
    converted_weights(path, "mmdet2", target)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_a_mask2former_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save({"state_dict": {"panoptic_head.query_feat.weight": torch.zeros(2, 2)}}, path)
    model = build_model(get_architecture("cascade_mask_rcnn").example_config(4))
    with pytest.raises(CheckpointError, match="not an mmdetection Cascade R-CNN checkpoint"):
        converted_weights(path, "mmdet2", model)


def test_the_cards_training_preset() -> None:
    from segscope.checkpoints.backbone_init import IMAGENET_WEIGHTS
    from segscope.engine.train_config import TRAIN_CONFIGS

    preset = TRAIN_CONFIGS["cascade-mask-rcnn-swin-b-coco-instance"]
    assert (preset.task, preset.solver.lr, preset.solver.weight_decay) == ("instance", 1e-4, 0.05)
    assert preset.crop_size == 1024
    assert preset.copy_paste == 1.0 and preset.model == get_entry("cascade-mask-rcnn-swin-b-coco-instance").config
    assert IMAGENET_WEIGHTS[preset.backbone_init][0].endswith("swin_base_patch4_window7_224_22k.pth")


def _modelscope_folder(folder: Path, state_dict: dict[str, torch.Tensor], model_type: str) -> Path:
    """A ModelScope model folder as the card's release is laid out: configuration.json + pytorch_model.pt."""
    folder.mkdir()
    configuration = {"framework": "pytorch", "task": "image-segmentation", "model": {"type": model_type}}
    (folder / "configuration.json").write_text(json.dumps(configuration))
    torch.save({"meta": {"epoch": 36}, "state_dict": _released_layout(state_dict)}, folder / "pytorch_model.pt")
    return folder


def test_modelscope_release_folder_loads_strictly(tmp_path: Path) -> None:
    config = get_architecture("cascade_mask_rcnn").example_config(4)
    source = _randomised(build_model(config))
    folder = _modelscope_folder(tmp_path / "cv_swin-b", source.state_dict(), "cascade_mask_rcnn_swin")
    for path in (folder, folder / "pytorch_model.pt"):  # the folder or its weights file
        target = build_model(config)
        converted_weights(path, "modelscope", target)
        for key, value in source.state_dict().items():
            assert torch.equal(target.state_dict()[key], value), key


def test_modelscope_folder_of_another_model_is_refused(tmp_path: Path) -> None:
    model = build_model(get_architecture("cascade_mask_rcnn").example_config(4))
    folder = _modelscope_folder(tmp_path / "maskdino", model.state_dict(), "maskdino_swin")
    with pytest.raises(CheckpointError, match="describes a 'maskdino_swin' model"):
        converted_weights(folder, "modelscope", model)
    with pytest.raises(CheckpointError, match="pytorch_model.pt not found"):
        converted_weights(tmp_path, "modelscope", model)
