"""Key names and shapes of OpenMMLab Mask2Former releases, written from the original modules.

The ViT-Adapter project's ``BEiTAdapter`` (``segmentation/`` and ``detection/`` variants) and
mmseg/mmdet's ``Mask2FormerHead`` with its ``MSDeformAttnPixelDecoder``, at reduced depth and
width, so that tests can make a "released" file the way the real ones are laid out.
"""

from __future__ import annotations

import torch

from segscope.config import BeitConfig, Mask2FormerConfig, ViTAdapterConfig

D, HEADS, INPLANE, DEFORM_HEADS, POINTS, CLASSES, QUERIES = 32, 2, 8, 2, 4, 7, 5
HEAD_DIM, HEAD_FFN, PD_LAYERS, DEC_LAYERS = 32, 64, 2, 3


def adapter_config(detection: bool, table_grid: int) -> Mask2FormerConfig:
    vit = BeitConfig(
        embed_dim=D,
        depth=4,
        num_heads=HEADS,
        rel_pos_grid=table_grid,
        cls_token=not detection,
        window_sizes=(2, 2, 2, 4) if detection else (),
    )
    backbone = ViTAdapterConfig(
        vit=vit,
        conv_inplane=INPLANE,
        deform_num_heads=DEFORM_HEADS,
        interaction_indexes=((0, 0), (1, 1), (2, 2), (3, 3)),
        vit_feature_per_interaction=not detection,
    )
    return head_config(backbone)


def head_config(backbone) -> Mask2FormerConfig:
    return Mask2FormerConfig(
        backbone=backbone,
        num_classes=CLASSES,
        pixel_decoder_dim=HEAD_DIM,
        mask_dim=HEAD_DIM,
        pixel_decoder_layers=PD_LAYERS,
        pixel_decoder_ffn_dim=HEAD_FFN,
        pixel_decoder_heads=4,
        hidden_dim=HEAD_DIM,
        num_queries=QUERIES,
        decoder_layers=DEC_LAYERS,
        decoder_heads=4,
        decoder_ffn_dim=HEAD_FFN,
    )


def _bn(prefix: str, channels: int) -> dict[str, tuple[int, ...]]:
    shapes = {f"{prefix}.{n}": (channels,) for n in ("weight", "bias", "running_mean", "running_var")}
    shapes[f"{prefix}.num_batches_tracked"] = ()
    return shapes


def _ln(prefix: str, channels: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (channels,), f"{prefix}.bias": (channels,)}


def _linear(prefix: str, out_features: int, in_features: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (out_features, in_features), f"{prefix}.bias": (out_features,)}


def _deform(prefix: str, dim: int, levels: int, value_dim: int) -> dict[str, tuple[int, ...]]:
    return {
        **_linear(f"{prefix}.sampling_offsets", DEFORM_HEADS * levels * POINTS * 2, dim),
        **_linear(f"{prefix}.attention_weights", DEFORM_HEADS * levels * POINTS, dim),
        **_linear(f"{prefix}.value_proj", value_dim, dim),
        **_linear(f"{prefix}.output_proj", dim, value_dim),
    }


def released_beit_adapter(detection: bool, pretrain_grid: int) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the ViT-Adapter project's ``BEiTAdapter`` (segmentation or detection variant)."""
    shapes: dict[str, tuple[int, ...]] = {}
    if not detection:
        shapes["backbone.cls_token"] = (1, 1, D)
    shapes |= {"backbone.patch_embed.proj.weight": (D, 3, 16, 16), "backbone.patch_embed.proj.bias": (D,)}
    windows = (2, 2, 2, 4) if detection else (pretrain_grid,) * 4
    for i, window in enumerate(windows):
        b = f"backbone.blocks.{i}"
        extra = 0 if detection else 3
        tokens = window * window + (0 if detection else 1)
        shapes |= {f"{b}.gamma_1": (D,), f"{b}.gamma_2": (D,), **_ln(f"{b}.norm1", D), **_ln(f"{b}.norm2", D)}
        shapes |= {f"{b}.attn.q_bias": (D,), f"{b}.attn.v_bias": (D,), f"{b}.attn.qkv.weight": (3 * D, D)}
        shapes |= {f"{b}.attn.relative_position_bias_table": ((2 * window - 1) ** 2 + extra, HEADS)}
        shapes |= {f"{b}.attn.relative_position_index": (tokens, tokens)}
        shapes |= {**_linear(f"{b}.attn.proj", D, D), **_linear(f"{b}.mlp.fc1", 4 * D, D)}
        shapes |= _linear(f"{b}.mlp.fc2", D, 4 * D)
    shapes["backbone.level_embed"] = (3, D)
    p = INPLANE
    shapes |= {"backbone.spm.stem.0.weight": (p, 3, 3, 3), "backbone.spm.stem.3.weight": (p, p, 3, 3)}
    shapes |= {"backbone.spm.stem.6.weight": (p, p, 3, 3)}
    for index in (1, 4, 7):
        shapes |= _bn(f"backbone.spm.stem.{index}", p)
    for name, (out_c, in_c) in {"conv2": (2 * p, p), "conv3": (4 * p, 2 * p), "conv4": (4 * p, 4 * p)}.items():
        shapes |= {f"backbone.spm.{name}.0.weight": (out_c, in_c, 3, 3), **_bn(f"backbone.spm.{name}.1", out_c)}
    for name, in_c in {"fc1": p, "fc2": 2 * p, "fc3": 4 * p, "fc4": 4 * p}.items():
        shapes |= {f"backbone.spm.{name}.weight": (D, in_c, 1, 1), f"backbone.spm.{name}.bias": (D,)}
    hidden = D // 4
    for i in range(4):
        inter = f"backbone.interactions.{i}"
        shapes |= {f"{inter}.injector.gamma": (D,), **_ln(f"{inter}.injector.query_norm", D)}
        shapes |= {**_ln(f"{inter}.injector.feat_norm", D), **_deform(f"{inter}.injector.attn", D, 3, D // 2)}
        extractors = [f"{inter}.extractor"] + ([f"{inter}.extra_extractors.{j}" for j in (0, 1)] if i == 3 else [])
        for e in extractors:
            shapes |= {**_ln(f"{e}.query_norm", D), **_ln(f"{e}.feat_norm", D), **_ln(f"{e}.ffn_norm", D)}
            shapes |= {**_deform(f"{e}.attn", D, 1, D // 2), **_linear(f"{e}.ffn.fc1", hidden, D)}
            shapes |= {f"{e}.ffn.dwconv.dwconv.weight": (hidden, 1, 3, 3), f"{e}.ffn.dwconv.dwconv.bias": (hidden,)}
            shapes |= _linear(f"{e}.ffn.fc2", D, hidden)
    shapes |= {"backbone.up.weight": (D, D, 2, 2), "backbone.up.bias": (D,)}
    for i in range(1, 5):
        shapes |= _bn(f"backbone.norm{i}", D)
    return shapes


def released_head(
    head: str, mmcv2: bool, in_channels: tuple[int, ...], classes: int = CLASSES
) -> dict[str, tuple[int, ...]]:
    """Key -> shape of mmseg/mmdet's ``Mask2FormerHead`` (``MSDeformAttnPixelDecoder`` inside)."""
    c, shapes = HEAD_DIM, {}
    pd = f"{head}.pixel_decoder"
    for i, channels in enumerate(in_channels[:0:-1]):  # coarsest first
        shapes |= _linear(f"{pd}.input_convs.{i}.conv", c, channels)
        shapes[f"{pd}.input_convs.{i}.conv.weight"] = (c, channels, 1, 1)
        shapes |= _ln(f"{pd}.input_convs.{i}.gn", c)
    for i in range(PD_LAYERS):
        layer = f"{pd}.encoder.layers.{i}"
        attn, ffn = (f"{layer}.self_attn", f"{layer}.ffn") if mmcv2 else (f"{layer}.attentions.0", f"{layer}.ffns.0")
        shapes |= {
            **_linear(f"{attn}.sampling_offsets", 4 * 3 * 4 * 2, c),
            **_linear(f"{attn}.attention_weights", 4 * 3 * 4, c),
            **_linear(f"{attn}.value_proj", c, c),
            **_linear(f"{attn}.output_proj", c, c),
            **_linear(f"{ffn}.layers.0.0", HEAD_FFN, c),
            **_linear(f"{ffn}.layers.1", c, HEAD_FFN),
            **_ln(f"{layer}.norms.0", c),
            **_ln(f"{layer}.norms.1", c),
        }
    shapes |= {f"{pd}.level_encoding.weight": (3, c), f"{pd}.lateral_convs.0.conv.weight": (c, in_channels[0], 1, 1)}
    shapes |= {**_ln(f"{pd}.lateral_convs.0.gn", c), f"{pd}.output_convs.0.conv.weight": (c, c, 3, 3)}
    shapes |= {**_ln(f"{pd}.output_convs.0.gn", c), f"{pd}.mask_feature.weight": (c, c, 1, 1)}
    shapes[f"{pd}.mask_feature.bias"] = (c,)
    for i in range(DEC_LAYERS):
        layer = f"{head}.transformer_decoder.layers.{i}"
        if mmcv2:
            cross, self_, ffn = f"{layer}.cross_attn.attn", f"{layer}.self_attn.attn", f"{layer}.ffn"
        else:
            cross, self_, ffn = f"{layer}.attentions.0.attn", f"{layer}.attentions.1.attn", f"{layer}.ffns.0"
        for attn in (cross, self_):
            shapes |= {f"{attn}.in_proj_weight": (3 * c, c), f"{attn}.in_proj_bias": (3 * c,)}
            shapes |= _linear(f"{attn}.out_proj", c, c)
        shapes |= {**_linear(f"{ffn}.layers.0.0", HEAD_FFN, c), **_linear(f"{ffn}.layers.1", c, HEAD_FFN)}
        for n in range(3):
            shapes |= _ln(f"{layer}.norms.{n}", c)
    shapes |= _ln(f"{head}.transformer_decoder.post_norm", c)
    shapes |= {f"{head}.query_embed.weight": (QUERIES, c), f"{head}.query_feat.weight": (QUERIES, c)}
    shapes |= {f"{head}.level_embed.weight": (3, c), **_linear(f"{head}.cls_embed", classes + 1, c)}
    for index in (0, 2, 4):
        shapes |= _linear(f"{head}.mask_embed.{index}", c, c)
    return shapes


def random_tensors(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Seeded random values of ``shapes``: positive BatchNorm variances, integer buffers zero."""
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for key, shape in shapes.items():
        if key.endswith(("relative_position_index", "num_batches_tracked")):
            tensors[key] = torch.zeros(shape, dtype=torch.long)
        elif key.endswith("running_var"):
            tensors[key] = torch.rand(shape, generator=generator) + 0.5
        else:
            tensors[key] = 0.2 * torch.randn(shape, generator=generator)
    return tensors
