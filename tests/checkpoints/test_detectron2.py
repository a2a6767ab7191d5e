"""Original Mask2Former (detectron2) checkpoints: safe reading and conversion to segscope keys.

The detectron2 state dicts here are generated from the naming rules of the original code
(facebookresearch/Mask2Former: ``msdeformattn.py``, ``mask2former_transformer_decoder.py``,
``backbone/swin.py``; detectron2: ``backbone/resnet.py``, ``layers/batch_norm.py``), with
each tensor's shape derived from the architecture, not from segscope's model.
"""

from __future__ import annotations

import codecs
import os
import pickle
import re
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from segscope.checkpoints.detectron2 import convert_detectron2_mask2former, read_detectron2_pickle
from segscope.checkpoints.safe_load import load_state_dict_strict
from segscope.config import Mask2FormerConfig, ResNetConfig, SwinConfig
from segscope.errors import CheckpointError
from segscope.models import build_model
from segscope.models.backbones import build_backbone

StateDict = dict[str, Tensor]

# ------------------------------------------------------------ detectron2 state dicts


class _Random:
    """Seeded random tensors: distinct values make a weight loaded under the wrong name visible."""

    def __init__(self) -> None:
        self.generator = torch.Generator().manual_seed(0)

    def __call__(self, *shape: int) -> Tensor:
        return torch.randn(shape, generator=self.generator)


def _conv_frozen_bn(state: StateDict, rand: _Random, name: str, shape: tuple[int, ...]) -> None:
    """detectron2 ``Conv2d(bias=False, norm=FrozenBatchNorm2d)``: the norm is ``<name>.norm``."""
    state[f"{name}.weight"] = rand(*shape)
    for stat in ("weight", "bias", "running_mean"):
        state[f"{name}.norm.{stat}"] = rand(shape[0])
    state[f"{name}.norm.running_var"] = rand(shape[0]).abs() + 0.5


def _linear(state: StateDict, rand: _Random, name: str, out_features: int, in_features: int) -> None:
    state[f"{name}.weight"] = rand(out_features, in_features)
    state[f"{name}.bias"] = rand(out_features)


def _layer_norm(state: StateDict, rand: _Random, name: str, dim: int) -> None:
    state[f"{name}.weight"] = rand(dim)
    state[f"{name}.bias"] = rand(dim)


def _d2_resnet50(state: StateDict, rand: _Random) -> tuple[int, ...]:
    """detectron2 ``build_resnet_backbone`` R50 (``STRIDE_IN_1X1: False``); returns res2..res5 widths."""
    _conv_frozen_bn(state, rand, "backbone.stem.conv1", (64, 3, 7, 7))
    in_channels = 64
    for stage, num_blocks in enumerate((3, 4, 6, 3)):
        bottleneck, out_channels = 64 * 2**stage, 256 * 2**stage
        for block in range(num_blocks):
            prefix = f"backbone.res{stage + 2}.{block}"
            block_in = in_channels if block == 0 else out_channels
            if block == 0:
                _conv_frozen_bn(state, rand, f"{prefix}.shortcut", (out_channels, block_in, 1, 1))
            _conv_frozen_bn(state, rand, f"{prefix}.conv1", (bottleneck, block_in, 1, 1))
            _conv_frozen_bn(state, rand, f"{prefix}.conv2", (bottleneck, bottleneck, 3, 3))
            _conv_frozen_bn(state, rand, f"{prefix}.conv3", (out_channels, bottleneck, 1, 1))
        in_channels = out_channels
    return (256, 512, 1024, 2048)


def _d2_swin(state: StateDict, rand: _Random, cfg: SwinConfig) -> tuple[int, ...]:
    """Mask2Former's ``D2SwinTransformer``; returns the four stage widths."""
    dims = tuple(cfg.embed_dim * 2**i for i in range(len(cfg.depths)))
    state["backbone.patch_embed.proj.weight"] = rand(dims[0], 3, cfg.patch_size, cfg.patch_size)
    state["backbone.patch_embed.proj.bias"] = rand(dims[0])
    _layer_norm(state, rand, "backbone.patch_embed.norm", dims[0])
    window_tokens = cfg.window_size**2
    for stage, (dim, depth, heads) in enumerate(zip(dims, cfg.depths, cfg.num_heads, strict=True)):
        hidden = int(dim * cfg.mlp_ratio)
        for block in range(depth):
            prefix = f"backbone.layers.{stage}.blocks.{block}"
            _layer_norm(state, rand, f"{prefix}.norm1", dim)
            state[f"{prefix}.attn.relative_position_bias_table"] = rand((2 * cfg.window_size - 1) ** 2, heads)
            # A persistent buffer in the original, so it is in every checkpoint.
            state[f"{prefix}.attn.relative_position_index"] = torch.zeros(
                window_tokens, window_tokens, dtype=torch.long
            )
            _linear(state, rand, f"{prefix}.attn.qkv", 3 * dim, dim)
            _linear(state, rand, f"{prefix}.attn.proj", dim, dim)
            _layer_norm(state, rand, f"{prefix}.norm2", dim)
            _linear(state, rand, f"{prefix}.mlp.fc1", hidden, dim)
            _linear(state, rand, f"{prefix}.mlp.fc2", dim, hidden)
        if stage < len(dims) - 1:
            state[f"backbone.layers.{stage}.downsample.reduction.weight"] = rand(2 * dim, 4 * dim)
            _layer_norm(state, rand, f"backbone.layers.{stage}.downsample.norm", 4 * dim)
        _layer_norm(state, rand, f"backbone.norm{stage}", dim)
    return dims


def _d2_head(state: StateDict, rand: _Random, cfg: Mask2FormerConfig, backbone_channels: tuple[int, ...]) -> None:
    """``sem_seg_head`` (MSDeformAttnPixelDecoder + MultiScaleMaskedTransformerDecoder) and criterion."""
    pixel = "sem_seg_head.pixel_decoder"
    dim = cfg.pixel_decoder_dim
    # input_proj runs from low to high resolution: res5, res4, res3.
    for level, channels in enumerate(backbone_channels[:0:-1]):
        state[f"{pixel}.input_proj.{level}.0.weight"] = rand(dim, channels, 1, 1)
        state[f"{pixel}.input_proj.{level}.0.bias"] = rand(dim)
        _layer_norm(state, rand, f"{pixel}.input_proj.{level}.1", dim)  # GroupNorm: same parameters
    state[f"{pixel}.transformer.level_embed"] = rand(3, dim)
    samples = cfg.pixel_decoder_heads * 3 * cfg.deform_num_points
    for layer in range(cfg.pixel_decoder_layers):
        prefix = f"{pixel}.transformer.encoder.layers.{layer}"
        _linear(state, rand, f"{prefix}.self_attn.sampling_offsets", 2 * samples, dim)
        _linear(state, rand, f"{prefix}.self_attn.attention_weights", samples, dim)
        _linear(state, rand, f"{prefix}.self_attn.value_proj", dim, dim)
        _linear(state, rand, f"{prefix}.self_attn.output_proj", dim, dim)
        _layer_norm(state, rand, f"{prefix}.norm1", dim)
        _linear(state, rand, f"{prefix}.linear1", cfg.pixel_decoder_ffn_dim, dim)
        _linear(state, rand, f"{prefix}.linear2", dim, cfg.pixel_decoder_ffn_dim)
        _layer_norm(state, rand, f"{prefix}.norm2", dim)
    # Conv2d(bias=False, norm=GN) for the stride-4 FPN step; mask_features keeps its bias.
    state[f"{pixel}.adapter_1.weight"] = rand(dim, backbone_channels[0], 1, 1)
    _layer_norm(state, rand, f"{pixel}.adapter_1.norm", dim)
    state[f"{pixel}.layer_1.weight"] = rand(dim, dim, 3, 3)
    _layer_norm(state, rand, f"{pixel}.layer_1.norm", dim)
    state[f"{pixel}.mask_features.weight"] = rand(cfg.mask_dim, dim, 1, 1)
    state[f"{pixel}.mask_features.bias"] = rand(cfg.mask_dim)

    predictor = "sem_seg_head.predictor"
    hidden = cfg.hidden_dim
    state[f"{predictor}.query_feat.weight"] = rand(cfg.num_queries, hidden)
    state[f"{predictor}.query_embed.weight"] = rand(cfg.num_queries, hidden)
    state[f"{predictor}.level_embed.weight"] = rand(3, hidden)
    if dim != hidden or cfg.enforce_input_projection:
        for level in range(3):
            state[f"{predictor}.input_proj.{level}.weight"] = rand(hidden, dim, 1, 1)
            state[f"{predictor}.input_proj.{level}.bias"] = rand(hidden)
    for layer in range(cfg.decoder_layers):
        for attention in (
            f"{predictor}.transformer_self_attention_layers.{layer}.self_attn",
            f"{predictor}.transformer_cross_attention_layers.{layer}.multihead_attn",
        ):
            state[f"{attention}.in_proj_weight"] = rand(3 * hidden, hidden)
            state[f"{attention}.in_proj_bias"] = rand(3 * hidden)
            _linear(state, rand, f"{attention}.out_proj", hidden, hidden)
        _layer_norm(state, rand, f"{predictor}.transformer_self_attention_layers.{layer}.norm", hidden)
        _layer_norm(state, rand, f"{predictor}.transformer_cross_attention_layers.{layer}.norm", hidden)
        ffn = f"{predictor}.transformer_ffn_layers.{layer}"
        _linear(state, rand, f"{ffn}.linear1", cfg.decoder_ffn_dim, hidden)
        _linear(state, rand, f"{ffn}.linear2", hidden, cfg.decoder_ffn_dim)
        _layer_norm(state, rand, f"{ffn}.norm", hidden)
    _layer_norm(state, rand, f"{predictor}.decoder_norm", hidden)
    _linear(state, rand, f"{predictor}.class_embed", cfg.num_classes + 1, hidden)
    _linear(state, rand, f"{predictor}.mask_embed.layers.0", hidden, hidden)
    _linear(state, rand, f"{predictor}.mask_embed.layers.1", hidden, hidden)
    _linear(state, rand, f"{predictor}.mask_embed.layers.2", cfg.mask_dim, hidden)
    state["criterion.empty_weight"] = torch.ones(cfg.num_classes + 1)


def detectron2_state_dict(cfg: Mask2FormerConfig) -> StateDict:
    """Random weights of the original Mask2Former ``cfg`` describes, under detectron2's key names."""
    state: StateDict = {}
    rand = _Random()
    if isinstance(cfg.backbone, ResNetConfig):
        assert cfg.backbone.depth == 50, "the generator knows the R50 layout only"
        channels = _d2_resnet50(state, rand)
    else:
        channels = _d2_swin(state, rand, cfg.backbone)
    _d2_head(state, rand, cfg, channels)
    return state


R50 = Mask2FormerConfig(backbone=ResNetConfig(depth=50), num_classes=133)
SWIN_T = Mask2FormerConfig(backbone=SwinConfig(), num_classes=133)


@pytest.fixture(scope="module")
def r50_state() -> StateDict:
    return detectron2_state_dict(R50)


# ------------------------------------------------------------------------ conversion


@pytest.mark.parametrize("cfg", [R50, SWIN_T], ids=["resnet50", "swin-tiny"])
def test_every_detectron2_key_loads_strictly_into_segscope(cfg: Mask2FormerConfig) -> None:
    state = detectron2_state_dict(cfg)
    converted = convert_detectron2_mask2former(state)
    model = build_model(cfg)
    load_state_dict_strict(model, converted, "detectron2 fixture")  # raises on missing/unexpected/shape

    loaded = model.state_dict()
    pairs = {
        "sem_seg_head.predictor.class_embed.weight": "transformer_decoder.class_head.weight",
        "sem_seg_head.pixel_decoder.transformer.encoder.layers.5.norm2.bias": "pixel_decoder.layers.5.ffn_norm.bias",
    }
    for d2_key, segscope_key in pairs.items():
        assert torch.equal(loaded[segscope_key], state[d2_key])


def _d2_resnet50_forward(state: StateDict, images: Tensor) -> list[Tensor]:
    """detectron2's R50 as plain functions: ``BasicStem``, ``BottleneckBlock`` with the stride in
    the 3x3 conv, ``FrozenBatchNorm2d`` (eval-mode batch norm, eps 1e-5); returns res2..res5."""

    def conv_norm(x: Tensor, name: str, stride: int = 1, padding: int = 0) -> Tensor:
        x = F.conv2d(x, state[f"{name}.weight"], stride=stride, padding=padding)
        stats = [state[f"{name}.norm.{stat}"] for stat in ("running_mean", "running_var", "weight", "bias")]
        return F.batch_norm(x, *stats, training=False, eps=1e-5)

    x = F.relu(conv_norm(images, "backbone.stem.conv1", stride=2, padding=3))
    x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
    features = []
    for stage, num_blocks in enumerate((3, 4, 6, 3)):
        for block in range(num_blocks):
            prefix = f"backbone.res{stage + 2}.{block}"
            stride = 2 if block == 0 and stage > 0 else 1
            out = F.relu(conv_norm(x, f"{prefix}.conv1"))
            out = F.relu(conv_norm(out, f"{prefix}.conv2", stride=stride, padding=1))
            out = conv_norm(out, f"{prefix}.conv3")
            shortcut = conv_norm(x, f"{prefix}.shortcut", stride=stride) if block == 0 else x
            x = F.relu(out + shortcut)
        features.append(x)
    return features


def test_converted_resnet_computes_what_detectron2_resnet_computes(r50_state: StateDict) -> None:
    # Conv weights scaled by 1/sqrt(fan-in) keep random activations finite through 50 layers.
    state = {
        key: value / value[0].numel() ** 0.5 if value.dim() == 4 else value
        for key, value in r50_state.items()
        if key.startswith("backbone.")
    }
    converted = convert_detectron2_mask2former(state)
    backbone = build_backbone(ResNetConfig(depth=50)).eval()
    backbone.load_state_dict({key.removeprefix("backbone."): value for key, value in converted.items()})
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = _d2_resnet50_forward(state, images)
        features = backbone(images)
    for feature, reference in zip(features, expected, strict=True):
        torch.testing.assert_close(feature, reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())


@pytest.mark.parametrize(
    "d2_key, segscope_key",
    [
        ("backbone.stem.conv1.weight", "backbone.conv1.weight"),
        ("backbone.stem.conv1.norm.running_var", "backbone.bn1.running_var"),
        ("backbone.res2.0.shortcut.weight", "backbone.layer1.0.downsample.0.weight"),
        ("backbone.res2.0.shortcut.norm.bias", "backbone.layer1.0.downsample.1.bias"),
        ("backbone.res3.1.conv2.weight", "backbone.layer2.1.conv2.weight"),
        ("backbone.res5.2.conv3.norm.weight", "backbone.layer4.2.bn3.weight"),
        ("backbone.layers.2.blocks.5.attn.qkv.weight", "backbone.layers.2.blocks.5.attn.qkv.weight"),
        ("backbone.layers.1.downsample.reduction.weight", "backbone.layers.1.downsample.reduction.weight"),
        ("backbone.norm3.bias", "backbone.norm3.bias"),
        ("sem_seg_head.pixel_decoder.input_proj.0.1.weight", "pixel_decoder.input_proj.0.1.weight"),
        ("sem_seg_head.pixel_decoder.transformer.level_embed", "pixel_decoder.level_embed"),
        (
            "sem_seg_head.pixel_decoder.transformer.encoder.layers.3.self_attn.sampling_offsets.bias",
            "pixel_decoder.layers.3.self_attn.sampling_offsets.bias",
        ),
        (
            "sem_seg_head.pixel_decoder.transformer.encoder.layers.0.norm1.weight",
            "pixel_decoder.layers.0.self_attn_norm.weight",
        ),
        ("sem_seg_head.pixel_decoder.adapter_1.weight", "pixel_decoder.lateral_conv.0.weight"),
        ("sem_seg_head.pixel_decoder.adapter_1.norm.weight", "pixel_decoder.lateral_conv.1.weight"),
        ("sem_seg_head.pixel_decoder.layer_1.norm.bias", "pixel_decoder.output_conv.1.bias"),
        ("sem_seg_head.pixel_decoder.mask_features.bias", "pixel_decoder.mask_features.bias"),
        ("sem_seg_head.predictor.query_embed.weight", "transformer_decoder.query_pos.weight"),
        ("sem_seg_head.predictor.input_proj.2.weight", "transformer_decoder.input_proj.2.weight"),
        (
            "sem_seg_head.predictor.transformer_self_attention_layers.4.self_attn.in_proj_bias",
            "transformer_decoder.layers.4.self_attn.in_proj_bias",
        ),
        (
            "sem_seg_head.predictor.transformer_cross_attention_layers.8.multihead_attn.out_proj.weight",
            "transformer_decoder.layers.8.cross_attn.out_proj.weight",
        ),
        (
            "sem_seg_head.predictor.transformer_cross_attention_layers.1.norm.weight",
            "transformer_decoder.layers.1.cross_attn_norm.weight",
        ),
        ("sem_seg_head.predictor.transformer_ffn_layers.0.norm.bias", "transformer_decoder.layers.0.ffn_norm.bias"),
        ("sem_seg_head.predictor.mask_embed.layers.2.bias", "transformer_decoder.mask_head.layers.2.bias"),
        # Version-1 layouts that detectron2 still renames on load.
        ("sem_seg_head.predictor.static_query.weight", "transformer_decoder.query_feat.weight"),
        ("sem_seg_head.adapter_1.weight", "pixel_decoder.lateral_conv.0.weight"),
        ("sem_seg_head.transformer.encoder.layers.2.linear1.weight", "pixel_decoder.layers.2.linear1.weight"),
    ],
)
def test_key_is_renamed_to_the_segscope_module_holding_the_same_weight(d2_key: str, segscope_key: str) -> None:
    value = torch.zeros(1)
    assert convert_detectron2_mask2former({d2_key: value}) == {segscope_key: value}


def test_non_weights_are_dropped() -> None:
    state = {
        "criterion.empty_weight": torch.ones(134),
        "pixel_mean": torch.zeros(3, 1, 1),
        "pixel_std": torch.ones(3, 1, 1),
        "backbone.layers.0.blocks.1.attn.relative_position_index": torch.zeros(49, 49, dtype=torch.long),
    }
    assert convert_detectron2_mask2former(state) == {}


def test_frozen_batch_norm_gains_a_zero_batch_count_and_a_trained_count_is_kept() -> None:
    frozen = {
        f"backbone.res4.3.conv2.norm.{stat}": torch.ones(8)
        for stat in ("weight", "bias", "running_mean", "running_var")
    }
    converted = convert_detectron2_mask2former(frozen)
    count = converted.pop("backbone.layer3.3.bn2.num_batches_tracked")
    assert count.dtype == torch.long and count.shape == () and count.item() == 0
    assert set(converted) == {
        f"backbone.layer3.3.bn2.{stat}" for stat in ("weight", "bias", "running_mean", "running_var")
    }

    trained = {
        "backbone.stem.conv1.norm.running_mean": torch.zeros(4),
        "backbone.stem.conv1.norm.num_batches_tracked": torch.tensor(7),
    }
    assert convert_detectron2_mask2former(trained)["backbone.bn1.num_batches_tracked"].item() == 7


def test_unrecognised_keys_pass_through_for_the_strict_load_to_name() -> None:
    state = {"backbone.absolute_pos_embed": torch.zeros(1), "sem_seg_head.predictor.new_head.weight": torch.zeros(1)}
    assert set(convert_detectron2_mask2former(state)) == set(state)


# --------------------------------------------- cross-check against the HF converter

# HF (Hub layout, as save_pretrained writes it) -> original names, as transformers'
# convert_mask2former_original_pytorch_checkpoint_to_pytorch.py pairs them, inverted.
_HF_ENCODER = r"model\.pixel_level_module\.encoder\."
_HF_BLOCK = _HF_ENCODER + r"encoder\.layers\.(\d+)\.blocks\.(\d+)\."
_HF_PIXEL = r"model\.pixel_level_module\.decoder\."
_HF_TRANSFORMER = r"model\.transformer_module\."
_HF_LAYER = _HF_TRANSFORMER + r"decoder\.layers\.(\d+)\."
_D2_PIXEL = "sem_seg_head.pixel_decoder."
_D2_ENCODER_LAYER = _D2_PIXEL + r"transformer.encoder.layers.\1."
_D2_PREDICTOR = "sem_seg_head.predictor."

_HF_TO_D2: list[tuple[str, str | Callable[[re.Match[str]], str]]] = [
    (_HF_ENCODER + r"embeddings\.patch_embeddings\.projection\.(\w+)", r"backbone.patch_embed.proj.\1"),
    (_HF_ENCODER + r"embeddings\.norm\.(\w+)", r"backbone.patch_embed.norm.\1"),
    (_HF_BLOCK + r"layernorm_before\.(\w+)", r"backbone.layers.\1.blocks.\2.norm1.\3"),
    (
        _HF_BLOCK + r"attention\.self\.relative_position_bias_table",
        r"backbone.layers.\1.blocks.\2.attn.relative_position_bias_table",
    ),
    (_HF_BLOCK + r"attention\.output\.dense\.(\w+)", r"backbone.layers.\1.blocks.\2.attn.proj.\3"),
    (_HF_BLOCK + r"layernorm_after\.(\w+)", r"backbone.layers.\1.blocks.\2.norm2.\3"),
    (_HF_BLOCK + r"intermediate\.dense\.(\w+)", r"backbone.layers.\1.blocks.\2.mlp.fc1.\3"),
    (_HF_BLOCK + r"output\.dense\.(\w+)", r"backbone.layers.\1.blocks.\2.mlp.fc2.\3"),
    (_HF_ENCODER + r"encoder\.layers\.(\d+)\.downsample\.(\w+)\.(\w+)", r"backbone.layers.\1.downsample.\2.\3"),
    (_HF_ENCODER + r"hidden_states_norms\.stage(\d)\.(\w+)", lambda m: f"backbone.norm{int(m[1]) - 1}.{m[2]}"),
    (_HF_PIXEL + r"adapter_1\.0\.weight", _D2_PIXEL + "adapter_1.weight"),
    (_HF_PIXEL + r"adapter_1\.1\.(\w+)", _D2_PIXEL + r"adapter_1.norm.\1"),
    (_HF_PIXEL + r"layer_1\.0\.weight", _D2_PIXEL + "layer_1.weight"),
    (_HF_PIXEL + r"layer_1\.1\.(\w+)", _D2_PIXEL + r"layer_1.norm.\1"),
    (_HF_PIXEL + r"input_projections\.(\d)\.(\d)\.(\w+)", _D2_PIXEL + r"input_proj.\1.\2.\3"),
    (_HF_PIXEL + r"level_embed", _D2_PIXEL + "transformer.level_embed"),
    (_HF_PIXEL + r"encoder\.layers\.(\d+)\.fc([12])\.(\w+)", _D2_ENCODER_LAYER + r"linear\2.\3"),
    (_HF_PIXEL + r"encoder\.layers\.(\d+)\.self_attn_layer_norm\.(\w+)", _D2_ENCODER_LAYER + r"norm1.\2"),
    (_HF_PIXEL + r"encoder\.layers\.(\d+)\.final_layer_norm\.(\w+)", _D2_ENCODER_LAYER + r"norm2.\2"),
    (_HF_PIXEL + r"encoder\.layers\.(\d+)\.self_attn\.(\w+)\.(\w+)", _D2_ENCODER_LAYER + r"self_attn.\2.\3"),
    (_HF_PIXEL + r"mask_projection\.(\w+)", _D2_PIXEL + r"mask_features.\1"),
    (
        _HF_LAYER + r"self_attn\.out_proj\.(\w+)",
        _D2_PREDICTOR + r"transformer_self_attention_layers.\1.self_attn.out_proj.\2",
    ),
    (_HF_LAYER + r"self_attn_layer_norm\.(\w+)", _D2_PREDICTOR + r"transformer_self_attention_layers.\1.norm.\2"),
    (
        _HF_LAYER + r"cross_attn\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)",
        _D2_PREDICTOR + r"transformer_cross_attention_layers.\1.multihead_attn.\2",
    ),
    (_HF_LAYER + r"cross_attn_layer_norm\.(\w+)", _D2_PREDICTOR + r"transformer_cross_attention_layers.\1.norm.\2"),
    (_HF_LAYER + r"fc([12])\.(\w+)", _D2_PREDICTOR + r"transformer_ffn_layers.\1.linear\2.\3"),
    (_HF_LAYER + r"final_layer_norm\.(\w+)", _D2_PREDICTOR + r"transformer_ffn_layers.\1.norm.\2"),
    (_HF_TRANSFORMER + r"decoder\.layernorm\.(\w+)", _D2_PREDICTOR + r"decoder_norm.\1"),
    (
        _HF_TRANSFORMER + r"decoder\.mask_predictor\.mask_embedder\.(\d)\.0\.(\w+)",
        _D2_PREDICTOR + r"mask_embed.layers.\1.\2",
    ),
    (_HF_TRANSFORMER + r"queries_embedder\.weight", _D2_PREDICTOR + "query_embed.weight"),
    (_HF_TRANSFORMER + r"queries_features\.weight", _D2_PREDICTOR + "query_feat.weight"),
    (_HF_TRANSFORMER + r"level_embed\.weight", _D2_PREDICTOR + "level_embed.weight"),
    (r"class_predictor\.(\w+)", _D2_PREDICTOR + r"class_embed.\1"),
    (r"criterion\.empty_weight", "criterion.empty_weight"),
]
# Separate HF projections that the original packs, q, k, v in order.
_HF_SWIN_QKV = re.compile(_HF_BLOCK + r"attention\.self\.(query|key|value)\.(\w+)")
_HF_DECODER_QKV = re.compile(_HF_LAYER + r"self_attn\.([qkv])_proj\.(\w+)")
# HF SwinModel's final LayerNorm, which D2SwinTransformer does not have.
_HF_ONLY = re.compile(_HF_ENCODER + r"swin\.layernorm\.\w+")


def _hf_to_detectron2(hf_state: StateDict) -> StateDict:
    d2_state: StateDict = {}
    packed: dict[str, dict[str, Tensor]] = {}
    for key, value in hf_state.items():
        if _HF_ONLY.fullmatch(key):
            continue
        if match := _HF_SWIN_QKV.fullmatch(key):
            name = f"backbone.layers.{match[1]}.blocks.{match[2]}.attn.qkv.{match[4]}"
            packed.setdefault(name, {})[match[3][0]] = value  # query, key, value -> q, k, v
            continue
        if match := _HF_DECODER_QKV.fullmatch(key):
            name = f"{_D2_PREDICTOR}transformer_self_attention_layers.{match[1]}.self_attn.in_proj_{match[3]}"
            packed.setdefault(name, {})[match[2]] = value
            continue
        for pattern, template in _HF_TO_D2:
            if match := re.fullmatch(pattern, key):
                d2_state[template(match) if callable(template) else match.expand(template)] = value
                break
        else:
            raise AssertionError(f"no detectron2 name for HF key {key}")
    for name, parts in packed.items():
        d2_state[name] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return d2_state


def test_detectron2_and_hf_converters_agree_on_a_swin_model(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    from segscope.checkpoints.hf import convert_hf_mask2former

    # Narrow Swin, fewer layers: the names do not depend on the sizes, the run time does.
    backbone = transformers.SwinConfig(
        embed_dim=32, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8], out_features=["stage1", "stage2", "stage3", "stage4"]
    )
    config = transformers.Mask2FormerConfig(
        backbone_config=backbone,
        num_labels=5,
        id2label={i: str(i) for i in range(5)},
        encoder_layers=2,
        decoder_layers=4,
    )
    model = transformers.Mask2FormerForUniversalSegmentation(config)
    # Fresh LayerNorms (ones, zeros) and zero biases would hide swapped names; make every value distinct.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator))
    model.save_pretrained(tmp_path)
    hf_state = load_file(tmp_path / "model.safetensors")

    from_detectron2 = convert_detectron2_mask2former(_hf_to_detectron2(hf_state))
    from_hf = convert_hf_mask2former(hf_state)
    assert sorted(from_detectron2) == sorted(from_hf)
    unequal = [key for key, value in from_hf.items() if not torch.equal(from_detectron2[key], value)]
    assert not unequal, f"{len(unequal)} tensors differ, e.g. {unequal[:5]}"


# ---------------------------------------------------------------------------- reading


def _write_pickle(path: Path, payload: object, protocol: int = 4) -> Path:
    path.write_bytes(pickle.dumps(payload, protocol=protocol))
    return path


def _zoo_payload(arrays: dict[str, np.ndarray]) -> dict[str, object]:
    """The layout of a detectron2 model-zoo file; ``model`` an OrderedDict with module versions."""
    model = OrderedDict(arrays)
    model._metadata = OrderedDict({"sem_seg_head": {"version": 2}})  # type: ignore[attr-defined]
    return {"model": model, "__author__": "Mask2Former", "matching_heuristics": True}


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_model_zoo_pickle_round_trips_to_tensors(tmp_path: Path, protocol: int) -> None:
    arrays = {
        "backbone.stem.conv1.weight": np.random.default_rng(0).standard_normal((4, 3, 7, 7)).astype(np.float32),
        "backbone.layers.0.blocks.0.attn.relative_position_index": np.arange(16, dtype=np.int64).reshape(4, 4),
        "scalar": np.array(2.5, dtype=np.float64),
    }
    path = _write_pickle(tmp_path / "model_final.pkl", _zoo_payload(arrays), protocol)
    state = read_detectron2_pickle(path)
    assert set(state) == set(arrays)
    for key, array in arrays.items():
        assert state[key].dtype == torch.from_numpy(array).dtype
        assert torch.equal(state[key], torch.from_numpy(array))


def test_pickles_written_by_numpy_1_load(tmp_path: Path) -> None:
    # numpy 1.x names the reconstruction function numpy.core.multiarray._reconstruct.
    data = pickle.dumps({"model": {"w": np.ones((2, 2), dtype=np.float32)}}, protocol=2)
    data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in data
    path = tmp_path / "old.pkl"
    path.write_bytes(data)
    assert torch.equal(read_detectron2_pickle(path)["w"], torch.ones(2, 2))


class _RunsShellCommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., int], tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def test_pickle_referencing_other_code_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    path = _write_pickle(tmp_path / "evil.pkl", {"model": {"w": _RunsShellCommand(marker)}})
    with pytest.raises(CheckpointError, match=r"refusing to load .*evil\.pkl.*system"):
        read_detectron2_pickle(path)
    assert not marker.exists()


class _DecodesWithRot13:
    def __reduce__(self) -> tuple[Callable[..., bytes], tuple[str, str]]:
        return codecs.encode, ("text", "rot13")


def test_bytes_codec_other_than_latin1_is_refused(tmp_path: Path) -> None:
    path = _write_pickle(tmp_path / "codec.pkl", {"model": {"w": _DecodesWithRot13()}}, protocol=2)
    with pytest.raises(CheckpointError, match="codec 'rot13'"):
        read_detectron2_pickle(path)


def test_truncated_pickle_is_reported_with_its_path(tmp_path: Path) -> None:
    data = pickle.dumps(_zoo_payload({"w": np.ones((64, 64), dtype=np.float32)}), protocol=4)
    path = tmp_path / "model_final_94dc52.pkl"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model_final_94dc52\.pkl"):
        read_detectron2_pickle(path)


@pytest.mark.parametrize(
    "payload, message",
    [
        ([1, 2, 3], "not a detectron2 checkpoint"),
        ({"blobs": {}}, "not a detectron2 checkpoint"),
        ({"model": {"w": [1.0, 2.0]}}, "'w' is a list"),
        ({"model": {"w": np.array([1, "a"], dtype=object)}}, "'w' has dtype object"),
    ],
)
def test_pickle_without_a_model_dict_of_numeric_arrays_is_rejected(
    tmp_path: Path, payload: object, message: str
) -> None:
    path = _write_pickle(tmp_path / "model.pkl", payload)
    with pytest.raises(CheckpointError, match=message):
        read_detectron2_pickle(path)


def test_detectron2_training_checkpoint_pth_is_read(tmp_path: Path) -> None:
    weights = {"backbone.stem.conv1.weight": torch.randn(4, 3, 7, 7)}
    path = tmp_path / "model_final.pth"
    torch.save({"model": weights, "iteration": 368749, "optimizer": {"state": {}, "param_groups": []}}, path)
    state = read_detectron2_pickle(path)
    assert set(state) == set(weights) and torch.equal(
        state["backbone.stem.conv1.weight"], weights["backbone.stem.conv1.weight"]
    )


def test_missing_file_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pkl"):
        read_detectron2_pickle(tmp_path / "nowhere.pkl")


# ------------------------------------------------------------------------- end to end


def test_r50_zoo_model_loads_offline_from_the_download_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, r50_state: StateDict
) -> None:
    from segscope.checkpoints.download import url_cache_path
    from segscope.loading import load
    from segscope.zoo import get_entry

    monkeypatch.setenv("SEGSCOPE_CACHE", str(tmp_path))
    cached = url_cache_path(get_entry("mask2former-r50-coco-panoptic").source.url)
    cached.parent.mkdir(parents=True)
    arrays = {key: value.numpy() for key, value in r50_state.items()}
    _write_pickle(cached, _zoo_payload(arrays))

    loaded = load("mask2former-r50-coco-panoptic")

    weights = loaded.module.state_dict()
    assert not loaded.module.training
    assert loaded.description.config.num_classes == 133
    assert torch.equal(
        weights["backbone.layer4.2.bn3.running_var"], r50_state["backbone.res5.2.conv3.norm.running_var"]
    )
    assert torch.equal(
        weights["transformer_decoder.layers.8.self_attn.in_proj_weight"],
        r50_state["sem_seg_head.predictor.transformer_self_attention_layers.8.self_attn.in_proj_weight"],
    )
