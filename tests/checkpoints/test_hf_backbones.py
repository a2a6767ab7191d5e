from __future__ import annotations

from typing import Any

import pytest
import torch

from segscope.checkpoints.hf_backbones import backbone_config_from_hf, convert_hf_resnet, convert_hf_swin
from segscope.config import ResNetConfig, SwinConfig
from segscope.errors import CheckpointError

BLOCK = "encoder.layers.1.blocks.0."


def _swin_block(layout: str) -> dict[str, torch.Tensor]:
    """One block's attention keys as the Hub files ("saved") or transformers 5 in memory name them."""
    if layout == "saved":
        names = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value"}
        extra = {BLOCK + "attention.self.relative_position_index": torch.zeros(49, 49, dtype=torch.long)}
        prefix = ""
    else:
        names = {"q": "attention.q_proj", "k": "attention.k_proj", "v": "attention.v_proj"}
        extra = {}
        prefix = "swin."
    weights = {
        prefix + BLOCK + f"{names[part]}.{kind}": torch.full((2,), float(i))
        for i, part in enumerate("qkv")
        for kind in ("weight", "bias")
    }
    return {**weights, **extra}


@pytest.mark.parametrize("layout", ["saved", "in_memory"])
def test_swin_q_k_v_are_packed_in_that_order_and_the_position_index_dropped(layout: str) -> None:
    converted = convert_hf_swin(_swin_block(layout))
    assert set(converted) == {"layers.1.blocks.0.attn.qkv.weight", "layers.1.blocks.0.attn.qkv.bias"}
    assert converted["layers.1.blocks.0.attn.qkv.bias"].tolist() == [0, 0, 1, 1, 2, 2]


def test_swin_block_missing_a_projection_is_an_error_naming_the_block() -> None:
    state = {k: v for k, v in _swin_block("saved").items() if "value" not in k}
    with pytest.raises(CheckpointError, match="stage 1 block 0"):
        convert_hf_swin(state)


@pytest.mark.parametrize(
    "hf_key, ours",
    [
        ("embeddings.patch_embeddings.projection.weight", "patch_embed.proj.weight"),
        ("swin.embeddings.norm.bias", "patch_embed.norm.bias"),
        (BLOCK + "attention.self.relative_position_bias_table", "layers.1.blocks.0.attn.relative_position_bias_table"),
        (
            "swin." + BLOCK + "attention.relative_position_bias.relative_position_bias_table",
            "layers.1.blocks.0.attn.relative_position_bias_table",
        ),
        (BLOCK + "attention.output.dense.weight", "layers.1.blocks.0.attn.proj.weight"),
        (BLOCK + "intermediate.dense.bias", "layers.1.blocks.0.mlp.fc1.bias"),
        (BLOCK + "output.dense.weight", "layers.1.blocks.0.mlp.fc2.weight"),
        ("swin." + BLOCK + "mlp.fc2.weight", "layers.1.blocks.0.mlp.fc2.weight"),
        (BLOCK + "layernorm_after.weight", "layers.1.blocks.0.norm2.weight"),
        ("encoder.layers.2.downsample.reduction.weight", "layers.2.downsample.reduction.weight"),
        ("hidden_states_norms.stage1.weight", "norm0.weight"),
        ("hidden_states_norms.stage4.bias", "norm3.bias"),
    ],
)
def test_swin_keys_are_renamed_to_the_original_swin_names(hf_key: str, ours: str) -> None:
    assert list(convert_hf_swin({hf_key: torch.zeros(1)})) == [ours]


def test_swin_unused_final_layernorm_is_dropped_and_unknown_keys_pass_through() -> None:
    converted = convert_hf_swin(
        {"swin.layernorm.weight": torch.zeros(1), "swin.pooler.weight": torch.zeros(1), "mystery": torch.zeros(1)}
    )
    assert set(converted) == {"swin.pooler.weight", "mystery"}


@pytest.mark.parametrize(
    "hf_key, ours",
    [
        ("embedder.embedder.convolution.weight", "conv1.weight"),
        ("embedder.embedder.normalization.running_var", "bn1.running_var"),
        ("encoder.stages.0.layers.0.shortcut.convolution.weight", "layer1.0.downsample.0.weight"),
        ("encoder.stages.3.layers.0.shortcut.normalization.bias", "layer4.0.downsample.1.bias"),
        ("encoder.stages.2.layers.5.layer.2.convolution.weight", "layer3.5.conv3.weight"),
        ("encoder.stages.1.layers.1.layer.0.normalization.num_batches_tracked", "layer2.1.bn1.num_batches_tracked"),
    ],
)
def test_resnet_keys_are_renamed_to_torchvision_names(hf_key: str, ours: str) -> None:
    assert list(convert_hf_resnet({hf_key: torch.zeros(1)})) == [ours]


def test_resnet_unknown_keys_pass_through() -> None:
    assert list(convert_hf_resnet({"pooler.weight": torch.zeros(1)})) == ["pooler.weight"]


SWIN_L: dict[str, Any] = {
    "model_type": "swin",
    "embed_dim": 192,
    "depths": [2, 2, 18, 2],
    "num_heads": [6, 12, 24, 48],
    "window_size": 12,
    "image_size": 384,
    "drop_path_rate": 0.3,
    "mlp_ratio": 4.0,
    "qkv_bias": True,
    "patch_size": 4,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "use_absolute_embeddings": False,
    "out_features": ["stage1", "stage2", "stage3", "stage4"],
}


def test_swin_config_carries_the_architecture() -> None:
    assert backbone_config_from_hf(SWIN_L) == SwinConfig(
        embed_dim=192,
        depths=(2, 2, 18, 2),
        num_heads=(6, 12, 24, 48),
        window_size=12,
        drop_path_rate=0.3,
        pretrain_img_size=384,
    )


@pytest.mark.parametrize(
    "layer_type, depths, depth",
    [
        ("basic", [2, 2, 2, 2], 18),
        ("basic", [3, 4, 6, 3], 34),
        ("bottleneck", [3, 4, 6, 3], 50),
        ("bottleneck", [3, 4, 23, 3], 101),
    ],
)
def test_resnet_config_maps_blocks_per_stage_to_depth(layer_type: str, depths: list[int], depth: int) -> None:
    widths = [64, 128, 256, 512] if layer_type == "basic" else [256, 512, 1024, 2048]
    hf = {"model_type": "resnet", "layer_type": layer_type, "depths": depths, "hidden_sizes": widths}
    assert backbone_config_from_hf(hf) == ResNetConfig(depth=depth)


@pytest.mark.parametrize(
    "hf, message",
    [
        ({"model_type": "convnext"}, "model_type 'convnext'"),
        ({"model_type": "resnet", "depths": [1, 1, 1, 1]}, "depths"),
        ({"model_type": "resnet", "layer_type": "basic", "depths": [3, 4, 23, 3]}, "layer_type='basic'"),
        ({"model_type": "resnet", "downsample_in_bottleneck": True}, "downsample_in_bottleneck=True"),
        ({"model_type": "resnet", "downsample_in_first_stage": True}, "downsample_in_first_stage"),
        ({"model_type": "resnet", "hidden_sizes": [64, 128, 256, 512]}, "hidden_sizes"),
        ({"model_type": "resnet", "out_features": ["stage2", "stage3", "stage4"]}, "out_features"),
        ({**SWIN_L, "use_absolute_embeddings": True}, "use_absolute_embeddings"),
        ({**SWIN_L, "patch_size": 2, "hidden_act": "relu"}, "patch_size=2.*hidden_act='relu'"),
        ({**SWIN_L, "image_size": [384, 512]}, "not square"),
    ],
)
def test_unsupported_hf_backbone_settings_are_rejected_by_name(hf: dict[str, Any], message: str) -> None:
    with pytest.raises(CheckpointError, match=message):
        backbone_config_from_hf(hf)
