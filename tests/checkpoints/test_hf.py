from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from segscope.checkpoints.hf import convert_hf_mask2former, mask2former_config_from_hf
from segscope.errors import CheckpointError

# config.json of a Swin-T Mask2Former as transformers' save_pretrained writes it, trimmed to
# the fields the converter reads.
HF_CONFIG: dict[str, Any] = {
    "model_type": "mask2former",
    "backbone_config": {
        "model_type": "swin",
        "embed_dim": 96,
        "depths": [2, 2, 6, 2],
        "num_heads": [3, 6, 12, 24],
        "window_size": 7,
        "patch_size": 4,
        "mlp_ratio": 4.0,
        "qkv_bias": True,
        "drop_path_rate": 0.3,
        "image_size": 224,
        "hidden_act": "gelu",
        "use_absolute_embeddings": False,
        "out_features": ["stage1", "stage2", "stage3", "stage4"],
    },
    "activation_function": "relu",
    "common_stride": 4,
    "feature_strides": [4, 8, 16, 32],
    "decoder_layers": 10,
    "dim_feedforward": 2048,
    "encoder_feedforward_dim": 1024,
    "encoder_layers": 6,
    "feature_size": 256,
    "mask_feature_size": 256,
    "hidden_dim": 256,
    "num_attention_heads": 8,
    "num_queries": 100,
    "pre_norm": False,
    "enforce_input_projection": False,
    "id2label": {"1": "sky", "0": "person", "2": "road"},
}


def test_config_counts_decoder_layers_without_the_initial_prediction() -> None:
    config, class_names = mask2former_config_from_hf(json.loads(json.dumps(HF_CONFIG)))
    assert config.decoder_layers == 9
    assert config.num_classes == 3
    assert class_names == ["person", "sky", "road"]
    assert (config.hidden_dim, config.num_queries, config.pixel_decoder_layers) == (256, 100, 6)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "maskformer"}, "model_type"),
        ({"common_stride": 8}, "common_stride"),
        ({"feature_strides": [8, 16, 32, 64]}, "feature_strides"),
        ({"activation_function": "gelu"}, "activation_function"),
        ({"id2label": {"0": "a", "2": "c"}}, "id2label"),
        ({"backbone_config": None}, "backbone_config"),
    ],
)
def test_config_rejects_what_segscope_does_not_implement(change: dict[str, Any], message: str) -> None:
    with pytest.raises(CheckpointError, match=message):
        mask2former_config_from_hf({**HF_CONFIG, **change})


def test_decoder_self_attention_projections_are_packed_query_key_value() -> None:
    prefix = "model.transformer_module.decoder.layers.3.self_attn."
    state = {}
    for i, projection in enumerate("qkv"):
        state[f"{prefix}{projection}_proj.weight"] = torch.full((4, 4), float(i))
        state[f"{prefix}{projection}_proj.bias"] = torch.full((4,), float(i))
    converted = convert_hf_mask2former(state)
    assert set(converted) == {
        "transformer_decoder.layers.3.self_attn.in_proj_weight",
        "transformer_decoder.layers.3.self_attn.in_proj_bias",
    }
    packed = converted["transformer_decoder.layers.3.self_attn.in_proj_weight"]
    assert packed.shape == (12, 4)
    expected = torch.tensor([0.0] * 4 + [1.0] * 4 + [2.0] * 4)
    assert torch.equal(packed[:, 0], expected)
    assert torch.equal(converted["transformer_decoder.layers.3.self_attn.in_proj_bias"], expected)


def test_converter_renames_drops_criterion_buffer_and_passes_unknown_keys_through() -> None:
    tensor = torch.zeros(1)
    state = {
        "model.pixel_level_module.decoder.adapter_1.0.weight": tensor,
        "model.pixel_level_module.decoder.encoder.layers.5.fc2.bias": tensor,
        "model.pixel_level_module.decoder.encoder.layers.0.self_attn.sampling_offsets.weight": tensor,
        "model.transformer_module.decoder.mask_predictor.mask_embedder.2.0.weight": tensor,
        "model.transformer_module.decoder.layers.8.cross_attn.out_proj.bias": tensor,
        "model.transformer_module.decoder.layers.8.cross_attn_layer_norm.weight": tensor,
        "model.transformer_module.queries_embedder.weight": tensor,
        "class_predictor.weight": tensor,
        "criterion.empty_weight": tensor,
        "model.something_new.weight": tensor,
    }
    assert set(convert_hf_mask2former(state)) == {
        "pixel_decoder.lateral_conv.0.weight",
        "pixel_decoder.layers.5.linear2.bias",
        "pixel_decoder.layers.0.self_attn.sampling_offsets.weight",
        "transformer_decoder.mask_head.layers.2.weight",
        "transformer_decoder.layers.8.cross_attn.out_proj.bias",
        "transformer_decoder.layers.8.cross_attn_norm.weight",
        "transformer_decoder.query_pos.weight",
        "transformer_decoder.class_head.weight",
        "model.something_new.weight",
    }


def test_missing_value_projection_is_reported() -> None:
    prefix = "model.transformer_module.decoder.layers.0.self_attn."
    state = {f"{prefix}q_proj.weight": torch.zeros(2, 2), f"{prefix}k_proj.weight": torch.zeros(2, 2)}
    with pytest.raises(CheckpointError, match="layer 0"):
        convert_hf_mask2former(state)
