"""Hugging Face transformers Mask2Former checkpoints -> segscope config and state dict.

Pure functions over a ``config.json`` dict and a ``model.safetensors`` state dict of
``Mask2FormerForUniversalSegmentation``, key names exactly as ``save_pretrained`` writes them.
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor, cat

from segscope.checkpoints.hf_backbones import backbone_config_from_hf, convert_hf_resnet, convert_hf_swin
from segscope.checkpoints.renaming import compile_rules, rename_key
from segscope.config import Mask2FormerConfig
from segscope.errors import CheckpointError

StateDict = dict[str, Tensor]

_BACKBONE_PREFIX = "model.pixel_level_module.encoder."

# Not weights: the criterion's class weights, rebuilt from the config by segscope's criterion.
_DROPPED_KEYS = frozenset({"criterion.empty_weight"})

_PIXEL = r"model\.pixel_level_module\.decoder\."
_TRANSFORMER = r"model\.transformer_module\."
_DECODER_LAYER = _TRANSFORMER + r"decoder\.layers\.(\d+)\."

# (HF key pattern, segscope key template), tried in order; the first full match wins.
_RENAMES = compile_rules(
    [
        (_PIXEL + r"input_projections\.(\d+)\.([01])\.(\w+)", r"pixel_decoder.input_proj.\1.\2.\3"),
        (_PIXEL + r"level_embed", r"pixel_decoder.level_embed"),
        (_PIXEL + r"encoder\.layers\.(\d+)\.self_attn\.(\w+)\.(\w+)", r"pixel_decoder.layers.\1.self_attn.\2.\3"),
        (_PIXEL + r"encoder\.layers\.(\d+)\.self_attn_layer_norm\.(\w+)", r"pixel_decoder.layers.\1.self_attn_norm.\2"),
        (_PIXEL + r"encoder\.layers\.(\d+)\.fc([12])\.(\w+)", r"pixel_decoder.layers.\1.linear\2.\3"),
        (_PIXEL + r"encoder\.layers\.(\d+)\.final_layer_norm\.(\w+)", r"pixel_decoder.layers.\1.ffn_norm.\2"),
        (_PIXEL + r"adapter_1\.([01])\.(\w+)", r"pixel_decoder.lateral_conv.\1.\2"),
        (_PIXEL + r"layer_1\.([01])\.(\w+)", r"pixel_decoder.output_conv.\1.\2"),
        (_PIXEL + r"mask_projection\.(\w+)", r"pixel_decoder.mask_features.\1"),
        (_TRANSFORMER + r"queries_features\.weight", r"transformer_decoder.query_feat.weight"),
        (_TRANSFORMER + r"queries_embedder\.weight", r"transformer_decoder.query_pos.weight"),
        (_TRANSFORMER + r"level_embed\.weight", r"transformer_decoder.level_embed.weight"),
        (_TRANSFORMER + r"input_projections\.(\d+)\.(\w+)", r"transformer_decoder.input_proj.\1.\2"),
        (_DECODER_LAYER + r"cross_attn\.(in_proj_\w+|out_proj\.\w+)", r"transformer_decoder.layers.\1.cross_attn.\2"),
        (_DECODER_LAYER + r"self_attn\.out_proj\.(\w+)", r"transformer_decoder.layers.\1.self_attn.out_proj.\2"),
        (_DECODER_LAYER + r"(cross|self)_attn_layer_norm\.(\w+)", r"transformer_decoder.layers.\1.\2_attn_norm.\3"),
        (_DECODER_LAYER + r"fc([12])\.(\w+)", r"transformer_decoder.layers.\1.linear\2.\3"),
        (_DECODER_LAYER + r"final_layer_norm\.(\w+)", r"transformer_decoder.layers.\1.ffn_norm.\2"),
        (_TRANSFORMER + r"decoder\.layernorm\.(\w+)", r"transformer_decoder.decoder_norm.\1"),
        (
            _TRANSFORMER + r"decoder\.mask_predictor\.mask_embedder\.(\d+)\.0\.(\w+)",
            r"transformer_decoder.mask_head.layers.\1.\2",
        ),
        (r"class_predictor\.(\w+)", r"transformer_decoder.class_head.\1"),
    ]
)

# HF's decoder self-attention keeps separate q/k/v projections; segscope's (like the original
# detectron2 model) uses nn.MultiheadAttention, whose packed in_proj stacks q, k, v in order.
_SELF_ATTN_QKV = re.compile(_DECODER_LAYER + r"self_attn\.([qkv])_proj\.(weight|bias)")


def convert_hf_mask2former(state_dict: StateDict) -> StateDict:
    """HF ``Mask2FormerForUniversalSegmentation`` weights -> ``segscope`` ``Mask2Former`` keys.

    Backbone keys go through the backbone's converter and gain the ``backbone.`` prefix;
    known non-weights are dropped; keys no rule recognises pass through unchanged, so a
    strict ``load_state_dict`` names them.
    """
    converted: StateDict = {}
    backbone: StateDict = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, value in state_dict.items():
        if key in _DROPPED_KEYS:
            continue
        if key.startswith(_BACKBONE_PREFIX):
            backbone[key[len(_BACKBONE_PREFIX) :]] = value
            continue
        fused = _SELF_ATTN_QKV.fullmatch(key)
        if fused:
            layer, projection, kind = fused.groups()
            qkv.setdefault((layer, kind), {})[projection] = value
            continue
        converted[rename_key(key, _RENAMES) or key] = value

    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(
                f"decoder layer {layer} self-attention has only the {sorted(parts)} projections' {kind}"
            )
        converted[f"transformer_decoder.layers.{layer}.self_attn.in_proj_{kind}"] = cat(
            [parts["q"], parts["k"], parts["v"]]
        )

    if backbone:
        convert_backbone = convert_hf_swin if _is_swin(backbone) else convert_hf_resnet
        converted.update({f"backbone.{k}": v for k, v in convert_backbone(backbone).items()})
    return converted


def _is_swin(backbone: StateDict) -> bool:
    """Swin checkpoints start with a patch embedding (under ``swin.`` in memory); ResNet ones
    with an ``embedder``."""
    return any(key.removeprefix("swin.").startswith("embeddings.patch_embeddings.") for key in backbone)


def mask2former_config_from_hf(hf_config: dict[str, Any]) -> tuple[Mask2FormerConfig, list[str]]:
    """An HF ``config.json`` (as a dict) -> segscope config and the class names in index order.

    Raises ``CheckpointError`` for settings segscope's Mask2Former does not implement.
    """
    if hf_config.get("model_type") != "mask2former":
        raise CheckpointError(f"not a Mask2Former config: model_type is {hf_config.get('model_type')!r}")
    if not isinstance(hf_config.get("backbone_config"), dict):
        raise CheckpointError("the Mask2Former config has no backbone_config; timm/named backbones are not supported")
    unsupported = {
        "feature_strides": ([4, 8, 16, 32], list(hf_config.get("feature_strides", [4, 8, 16, 32]))),
        "common_stride": (4, hf_config.get("common_stride", 4)),
        "activation_function": ("relu", hf_config.get("activation_function", "relu")),
    }
    for name, (supported, value) in unsupported.items():
        if value != supported:
            raise CheckpointError(f"Mask2Former {name}={value!r} is not supported (only {supported!r})")

    raw_labels = hf_config.get("id2label") or {}
    if not isinstance(raw_labels, dict):
        raise CheckpointError(f"id2label must map class indices to names, got a {type(raw_labels).__name__}")
    id2label = {int(index): str(name) for index, name in raw_labels.items()}
    if not id2label or sorted(id2label) != list(range(len(id2label))):
        raise CheckpointError(f"id2label must name classes 0..C-1, got indices {sorted(id2label)}")
    class_names = [id2label[index] for index in range(len(id2label))]

    heads = hf_config.get("num_attention_heads", 8)
    config = Mask2FormerConfig(
        backbone=backbone_config_from_hf(hf_config["backbone_config"]),
        num_classes=len(class_names),
        pixel_decoder_dim=hf_config.get("feature_size", 256),
        mask_dim=hf_config.get("mask_feature_size", 256),
        pixel_decoder_layers=hf_config.get("encoder_layers", 6),
        pixel_decoder_ffn_dim=hf_config.get("encoder_feedforward_dim", 1024),
        pixel_decoder_heads=heads,
        hidden_dim=hf_config.get("hidden_dim", 256),
        num_queries=hf_config.get("num_queries", 100),
        # HF counts the prediction from the initial queries as a layer.
        decoder_layers=hf_config.get("decoder_layers", 10) - 1,
        decoder_heads=heads,
        decoder_ffn_dim=hf_config.get("dim_feedforward", 2048),
        pre_norm=hf_config.get("pre_norm", False),
        enforce_input_projection=hf_config.get("enforce_input_projection", False),
        no_object_weight=hf_config.get("no_object_weight", 0.1),
        class_weight=hf_config.get("class_weight", 2.0),
        mask_weight=hf_config.get("mask_weight", 5.0),
        dice_weight=hf_config.get("dice_weight", 5.0),
        train_num_points=hf_config.get("train_num_points", 12544),
        oversample_ratio=hf_config.get("oversample_ratio", 3.0),
        importance_sample_ratio=hf_config.get("importance_sample_ratio", 0.75),
    )
    return config, class_names
