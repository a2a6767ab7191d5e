"""OpenMMLab Mask2Former checkpoints -> segscope, on state dicts laid out as the releases are.

The released files cannot be downloaded here, so each test writes one with the key names and
shapes of the original modules (the ViT-Adapter project's ``BEiTAdapter`` and mmseg/mmdet's
``Mask2FormerHead``, read from their code), at reduced depth and width, saves it the way
mmcv does (``{"meta": ..., "state_dict": ...}``) and loads it strictly into segscope's model.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from segscope.checkpoints.mmlab import MMLAB_CONVERTERS, read_mmlab_checkpoint
from segscope.checkpoints.safe_load import load_state_dict_strict
from segscope.config import SwinConfig
from segscope.errors import CheckpointError
from segscope.models import build_model
from tests.checkpoints.mmlab_layouts import (
    CLASSES,
    HEADS,
    QUERIES,
    D,
    adapter_config,
    head_config,
    random_tensors,
    released_beit_adapter,
    released_head,
)


def _save_like_mmcv(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """mmcv saves ``meta`` (numpy scores, class names) and the state dict in one pickle."""
    path = tmp_path / "released.pth"
    meta = {"CLASSES": tuple(f"c{i}" for i in range(CLASSES)), "hook_msgs": {"best_score": np.float64(0.47)}}
    torch.save({"meta": meta, "state_dict": tensors}, path)
    return path


@pytest.mark.parametrize("fmt", ["mmseg0", "mmseg1"])
def test_vit_adapter_semantic_release_loads_strictly_with_tables_resized(tmp_path: Path, fmt: str) -> None:
    # The COCO-Stuff card's backbone was trained at 896 px (56 patches); segscope's model here
    # keeps a 4-patch table, so the converter must resize the 6-patch tables it is given.
    cfg = adapter_config(detection=False, table_grid=4)
    model = build_model(cfg)
    shapes = released_beit_adapter(detection=False, pretrain_grid=6)
    shapes |= released_head("decode_head", mmcv2=fmt == "mmseg1", in_channels=(D,) * 4)
    path = _save_like_mmcv(tmp_path, random_tensors(shapes))
    converted = MMLAB_CONVERTERS[fmt](read_mmlab_checkpoint(path), model)
    load_state_dict_strict(model, converted, "released.pth")
    table = model.backbone.vit.blocks[0].attn.relative_position_bias_table
    assert table.shape == (7 * 7 + 3, HEADS)
    # The class-token rows are carried over as they are.
    released_table = random_tensors(shapes)["backbone.blocks.0.attn.relative_position_bias_table"]
    torch.testing.assert_close(table[-3:], released_table[-3:])
    with torch.no_grad():
        output = model.eval()(torch.randn(1, 3, 64, 64))
    assert output.class_logits.shape == (1, QUERIES, CLASSES + 1)


@pytest.mark.parametrize("fmt", ["mmdet2", "mmdet3"])
def test_vit_adapter_panoptic_release_loads_strictly(tmp_path: Path, fmt: str) -> None:
    cfg = adapter_config(detection=True, table_grid=4)
    model = build_model(cfg)
    shapes = released_beit_adapter(detection=True, pretrain_grid=4)
    shapes |= released_head("panoptic_head", mmcv2=fmt == "mmdet3", in_channels=(D,) * 4)
    # Saved from a DDP-wrapped model (``module.``), and mmdet's EMA hook leaves shadow copies.
    tensors = {f"module.{k}": v for k, v in random_tensors(shapes).items()}
    tensors["ema_backbone_level_embed"] = torch.zeros(3, D)
    converted = MMLAB_CONVERTERS[fmt](read_mmlab_checkpoint(_save_like_mmcv(tmp_path, tensors)), model)
    load_state_dict_strict(model, converted, "released.pth")
    # Facts of the original's layout, checked on the values: mmcv 1.x's attentions.0 is the
    # cross-attention, mask_embed's Linear layers sit at 0, 2, 4.
    decoder = model.transformer_decoder
    cross = "attentions.0.attn" if fmt == "mmdet2" else "cross_attn.attn"
    torch.testing.assert_close(
        decoder.layers[1].cross_attn.in_proj_weight,
        tensors[f"module.panoptic_head.transformer_decoder.layers.1.{cross}.in_proj_weight"],
    )
    torch.testing.assert_close(decoder.mask_head.layers[2].weight, tensors["module.panoptic_head.mask_embed.4.weight"])
    q_bias = tensors["module.backbone.blocks.3.attn.q_bias"]
    torch.testing.assert_close(model.backbone.vit.blocks[3].attn.q_bias, q_bias)


def test_wrong_format_is_named(tmp_path: Path) -> None:
    model = build_model(adapter_config(detection=True, table_grid=4))
    shapes = released_beit_adapter(detection=True, pretrain_grid=4)
    shapes |= released_head("panoptic_head", mmcv2=False, in_channels=(D,) * 4)
    with pytest.raises(CheckpointError, match="not a mmsegmentation 0.x Mask2Former checkpoint"):
        MMLAB_CONVERTERS["mmseg0"](random_tensors(shapes), model)
    # mmcv 2.x names given to the mmcv 1.x converter stay unconverted and the strict load names them.
    shapes = released_beit_adapter(detection=True, pretrain_grid=4)
    shapes |= released_head("panoptic_head", mmcv2=True, in_channels=(D,) * 4)
    converted = MMLAB_CONVERTERS["mmdet2"](random_tensors(shapes), model)
    with pytest.raises(CheckpointError, match="unexpected keys"):
        load_state_dict_strict(model, converted, "released.pth")


def _mmcv_swin_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """segscope Swin keys -> mmcv's, reordering patch merging as mmseg's ``swin_converter`` does
    for official weights (``correct_unfold_reduction_order`` / ``correct_unfold_norm_order``)."""
    released = {}
    for key, value in state_dict.items():
        key = re.sub(r"^backbone\.layers\.(\d+)\.", r"backbone.stages.\1.", key)
        key = key.replace("patch_embed.proj.", "patch_embed.projection.")
        key = re.sub(r"\.attn\.(qkv|proj|relative_position_bias_table)", r".attn.w_msa.\1", key)
        key = key.replace(".mlp.fc1.", ".ffn.layers.0.0.").replace(".mlp.fc2.", ".ffn.layers.1.")
        if ".downsample." in key:
            channels = value.shape[-1] // 4
            if value.dim() == 2:  # reduction [2C, 4C]
                value = value.reshape(value.shape[0], 4, channels)[:, [0, 2, 1, 3]].transpose(1, 2).reshape(value.shape)
            else:  # norm [4C]
                value = value.reshape(4, channels)[[0, 2, 1, 3]].transpose(0, 1).reshape(-1)
        released[key] = value
    return released


@pytest.mark.parametrize("fmt", ["mmseg1", "mmdet3"])
def test_swin_backbone_in_mmcv_layout_round_trips(fmt: str) -> None:
    swin = SwinConfig(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), window_size=4)
    model = build_model(head_config(swin))
    original = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    head = "decode_head" if fmt == "mmseg1" else "panoptic_head"
    released = _mmcv_swin_layout({k: v for k, v in original.items() if k.startswith("backbone.")})
    released |= {
        k: v for k, v in random_tensors(released_head(head, True, model.backbone.out_channels)).items()
    }
    converted = MMLAB_CONVERTERS[fmt](released, model)
    load_state_dict_strict(model, converted, "swin.pth")
    for key, value in original.items():
        if key.startswith("backbone."):
            torch.testing.assert_close(converted[key], value, msg=key)


class LogBuffer:
    """A training framework's own class, which segscope does not import."""

    def __init__(self) -> None:
        self.values = np.arange(3.0)


class Payload:
    """Pickles to a call of ``os.system``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_metadata_objects_are_inert_and_code_still_refused(tmp_path: Path) -> None:
    path = tmp_path / "mmengine.pth"
    torch.save({"message_hub": {"log": LogBuffer()}, "state_dict": {"w": torch.ones(2)}}, path)
    assert torch.equal(read_mmlab_checkpoint(path)["w"], torch.ones(2))

    marker = tmp_path / "pwned"
    torch.save({"meta": Payload(marker), "state_dict": {"w": torch.ones(2)}}, path)
    with pytest.raises(CheckpointError):
        read_mmlab_checkpoint(path)
    assert not marker.exists()
