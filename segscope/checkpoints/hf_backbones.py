"""HF transformers backbones (``ResNetBackbone``, ``SwinBackbone``) -> segscope backbones.

Pure functions over state dicts whose keys are already stripped of the Mask2Former prefix
``model.pixel_level_module.encoder.``, and over the ``backbone_config`` dict of an HF
``config.json``. Keys no rule recognises are returned unchanged so that a strict load names
them; only keys known to carry nothing segscope needs are dropped.

Two Swin key layouts exist and both are accepted: the one on the Hub and written by
``save_pretrained`` (``encoder.layers...attention.self.query``), and the in-memory one of
transformers >= 5 (``swin.encoder.layers...attention.q_proj``).
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor, cat

from segscope.checkpoints.renaming import compile_rules, rename_key
from segscope.config import BackboneConfig, ResNetConfig, SwinConfig
from segscope.errors import CheckpointError

StateDict = dict[str, Tensor]

_STAGES = ["stage1", "stage2", "stage3", "stage4"]

# ---------------------------------------------------------------------------------- ResNet

# HF counts stages and convolutions from 0, torchvision from 1.
_RESNET_RULES = compile_rules(
    [
        (r"embedder\.embedder\.convolution\.(\w+)", r"conv1.\1"),
        (r"embedder\.embedder\.normalization\.(\w+)", r"bn1.\1"),
        (
            r"encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.(convolution|normalization)\.(\w+)",
            lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.{0 if m[3] == 'convolution' else 1}.{m[4]}",
        ),
        (
            r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d)\.(convolution|normalization)\.(\w+)",
            lambda m: f"layer{int(m[1]) + 1}.{m[2]}.{'conv' if m[4] == 'convolution' else 'bn'}{int(m[3]) + 1}.{m[5]}",
        ),
    ]
)


def convert_hf_resnet(state_dict: StateDict) -> StateDict:
    """HF ``ResNetBackbone`` keys -> segscope ``ResNet`` (torchvision) keys."""
    return {rename_key(key, _RESNET_RULES) or key: value for key, value in state_dict.items()}


# ------------------------------------------------------------------------------------ Swin

_BLOCK = r"encoder\.layers\.(\d+)\.blocks\.(\d+)\."
_SWIN_RULES = compile_rules(
    [
        (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
        (r"embeddings\.norm\.(weight|bias)", r"patch_embed.norm.\1"),
        (_BLOCK + r"layernorm_before\.(weight|bias)", r"layers.\1.blocks.\2.norm1.\3"),
        (_BLOCK + r"layernorm_after\.(weight|bias)", r"layers.\1.blocks.\2.norm2.\3"),
        (
            _BLOCK + r"attention\.(?:self|relative_position_bias)\.relative_position_bias_table",
            r"layers.\1.blocks.\2.attn.relative_position_bias_table",
        ),
        (_BLOCK + r"attention\.(?:output\.dense|o_proj)\.(weight|bias)", r"layers.\1.blocks.\2.attn.proj.\3"),
        (_BLOCK + r"(?:intermediate\.dense|mlp\.fc1)\.(weight|bias)", r"layers.\1.blocks.\2.mlp.fc1.\3"),
        (_BLOCK + r"(?:output\.dense|mlp\.fc2)\.(weight|bias)", r"layers.\1.blocks.\2.mlp.fc2.\3"),
        (r"encoder\.layers\.(\d+)\.downsample\.(reduction|norm)\.(weight|bias)", r"layers.\1.downsample.\2.\3"),
        # HF names the output norms after stages 1-4, the original Swin norm0-norm3.
        (r"hidden_states_norms\.stage([1-4])\.(weight|bias)", lambda m: f"norm{int(m[1]) - 1}.{m[2]}"),
    ]
)
# HF keeps separate q, k, v projections; segscope (like the original Swin) one packed ``qkv``.
_SWIN_QKV = re.compile(_BLOCK + r"attention\.(?:self\.(query|key|value)|([qkv])_proj)\.(weight|bias)")
_QKV_ORDER = ("q", "k", "v")
_SWIN_DROPPED = [
    # Derived from the window size; segscope rebuilds it.
    re.compile(_BLOCK + r"attention\.(?:self|relative_position_bias)\.relative_position_index"),
    # The final LayerNorm of HF's SwinModel, which SwinBackbone computes but never returns.
    re.compile(r"layernorm\.(weight|bias)"),
]


def convert_hf_swin(state_dict: StateDict) -> StateDict:
    """HF ``SwinBackbone`` keys (Hub or in-memory layout) -> segscope ``Swin`` keys.

    Per-block q, k, v projections are concatenated into ``attn.qkv``; the per-stage output
    norms ``hidden_states_norms.stageN`` become ``norm{N-1}``.
    """
    converted: StateDict = {}
    qkv: dict[tuple[str, str, str], dict[str, Tensor]] = {}
    for key, value in state_dict.items():
        # transformers >= 5 nests the model under ``swin.`` in memory, not in saved files.
        name = key.removeprefix("swin.")
        if any(pattern.fullmatch(name) for pattern in _SWIN_DROPPED):
            continue
        projection = _SWIN_QKV.fullmatch(name)
        if projection:
            stage, block, long_name, short_name, kind = projection.groups()
            qkv.setdefault((stage, block, kind), {})[short_name or long_name[0]] = value
            continue
        converted[rename_key(name, _SWIN_RULES) or key] = value
    for (stage, block, kind), parts in qkv.items():
        if set(parts) != set(_QKV_ORDER):
            raise CheckpointError(
                f"Swin stage {stage} block {block} has only the {sorted(parts)} attention projections' {kind}"
            )
        converted[f"layers.{stage}.blocks.{block}.attn.qkv.{kind}"] = cat([parts[name] for name in _QKV_ORDER])
    return converted


# ---------------------------------------------------------------------------------- Config

# (layer type, blocks per stage) -> torchvision depth; widths must be torchvision's too.
_RESNET_DEPTHS: dict[tuple[str, tuple[int, ...]], int] = {
    ("basic", (2, 2, 2, 2)): 18,
    ("basic", (3, 4, 6, 3)): 34,
    ("bottleneck", (3, 4, 6, 3)): 50,
    ("bottleneck", (3, 4, 23, 3)): 101,
    ("bottleneck", (3, 8, 36, 3)): 152,
}
_RESNET_WIDTHS = {"basic": [64, 128, 256, 512], "bottleneck": [256, 512, 1024, 2048]}


def backbone_config_from_hf(backbone_config: dict[str, Any]) -> BackboneConfig:
    """An HF ``backbone_config`` dict (model_type ``resnet`` or ``swin``) -> segscope config.

    Raises ``CheckpointError`` (a ValueError) naming any setting segscope does not implement.
    """
    model_type = backbone_config.get("model_type")
    if model_type == "resnet":
        return _resnet_config(backbone_config)
    if model_type == "swin":
        return _swin_config(backbone_config)
    raise CheckpointError(f"HF backbone model_type {model_type!r} is not supported (only 'resnet' and 'swin')")


def _resnet_config(hf: dict[str, Any]) -> ResNetConfig:
    layer_type = hf.get("layer_type", "bottleneck")
    depths = tuple(hf.get("depths", (3, 4, 6, 3)))
    depth = _RESNET_DEPTHS.get((layer_type, depths))
    if depth is None:
        known = ", ".join(f"{kind} {list(blocks)}" for kind, blocks in _RESNET_DEPTHS)
        raise CheckpointError(f"HF ResNet layer_type={layer_type!r} depths={list(depths)} is not one of: {known}")
    _require(
        "ResNet",
        hf,
        {
            "hidden_sizes": _RESNET_WIDTHS[layer_type],
            "embedding_size": 64,
            "num_channels": 3,
            "hidden_act": "relu",
            "downsample_in_first_stage": False,
            "downsample_in_bottleneck": False,
            "out_features": _STAGES,
        },
    )
    return ResNetConfig(depth=depth)


def _swin_config(hf: dict[str, Any]) -> SwinConfig:
    _require(
        "Swin",
        hf,
        {
            "num_channels": 3,
            "patch_size": 4,
            "hidden_act": "gelu",
            "use_absolute_embeddings": False,
            "layer_norm_eps": 1e-5,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
            "out_features": _STAGES,
        },
    )
    image_size = hf.get("image_size", 224)
    if isinstance(image_size, (list, tuple)):
        if len(set(image_size)) != 1:
            raise CheckpointError(f"HF Swin image_size={image_size} is not square")
        image_size = image_size[0]
    defaults = SwinConfig()
    return SwinConfig(
        embed_dim=hf.get("embed_dim", defaults.embed_dim),
        depths=tuple(hf.get("depths", defaults.depths)),
        num_heads=tuple(hf.get("num_heads", defaults.num_heads)),
        window_size=hf.get("window_size", defaults.window_size),
        patch_size=hf.get("patch_size", defaults.patch_size),
        mlp_ratio=hf.get("mlp_ratio", defaults.mlp_ratio),
        qkv_bias=hf.get("qkv_bias", defaults.qkv_bias),
        drop_path_rate=hf.get("drop_path_rate", defaults.drop_path_rate),
        pretrain_img_size=image_size,
    )


def _require(family: str, hf: dict[str, Any], supported: dict[str, Any]) -> None:
    """Raise naming every key of ``hf`` whose value differs from the one segscope implements."""
    wrong = {
        name: hf[name]
        for name, value in supported.items()
        if name in hf and (list(hf[name]) if isinstance(hf[name], (list, tuple)) else hf[name]) != value
    }
    if wrong:
        details = ", ".join(f"{name}={value!r} (supported: {supported[name]!r})" for name, value in wrong.items())
        raise CheckpointError(f"HF {family} backbone settings not supported by segscope: {details}")
