"""segscope's Mask2Former against HF transformers' ``Mask2FormerForUniversalSegmentation``.

A randomly initialized HF model is saved with ``save_pretrained`` and read back through
segscope's converter, the way a Hub checkpoint is; both then see the same padded inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from segscope.checkpoints.hf import convert_hf_mask2former, mask2former_config_from_hf
from segscope.models import build_model
from segscope.models.mask2former.pixel_decoder import MSDeformAttnPixelDecoder
from segscope.models.mask2former.transformer_decoder import MaskedAttentionDecoder

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-4
NUM_LABELS = 10


def _hf_backbone_config(kind: str) -> transformers.PretrainedConfig:
    stages = ["stage1", "stage2", "stage3", "stage4"]
    if kind == "swin":
        return transformers.SwinConfig(
            embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7, out_features=stages
        )
    return transformers.ResNetConfig(out_features=stages)


def _save_random_hf_model(
    directory: Path, backbone: transformers.PretrainedConfig, **kwargs: object
) -> torch.nn.Module:
    config = transformers.Mask2FormerConfig(
        backbone_config=backbone,
        num_labels=NUM_LABELS,
        id2label={i: f"class_{i}" for i in range(NUM_LABELS)},
        **kwargs,
    )
    torch.manual_seed(0)
    model = transformers.Mask2FormerForUniversalSegmentation(config).eval()
    model.save_pretrained(directory)
    return model


def _load_with_segscope(directory: Path) -> torch.nn.Module:
    config, class_names = mask2former_config_from_hf(json.loads((directory / "config.json").read_text()))
    assert class_names == [f"class_{i}" for i in range(NUM_LABELS)]
    model = build_model(config).eval()
    model.load_state_dict(convert_hf_mask2former(load_file(directory / "model.safetensors")), strict=True)
    return model


@pytest.fixture(scope="module", params=["swin", "resnet"])
def model_pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp(f"hf-mask2former-{request.param}")
    hf_model = _save_random_hf_model(directory, _hf_backbone_config(request.param))
    return request.param, hf_model, _load_with_segscope(directory)


def _padded_batch(sizes: list[tuple[int, int]]) -> torch.Tensor:
    """Normalized random images padded with zeros at the bottom/right to a common /32 size."""
    generator = torch.Generator().manual_seed(1)
    height = -(-max(h for h, _ in sizes) // 32) * 32
    width = -(-max(w for _, w in sizes) // 32) * 32
    images = [torch.randn(3, h, w, generator=generator) for h, w in sizes]
    return torch.stack([F.pad(image, (0, width - image.shape[2], 0, height - image.shape[1])) for image in images])


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


# Originals that are not multiples of 32: 250x330 (with a smaller one beside it) pads to
# 256x352, 300x420 to 320x448. HF's Swin shrinks its window on maps smaller than it, so every
# stride-32 map stays above 7 pixels.
@pytest.mark.parametrize("sizes", [[(250, 330), (230, 300)], [(300, 420)]], ids=["256x352-batch2", "320x448"])
def test_outputs_match_hf_transformers(model_pair, sizes: list[tuple[int, int]]) -> None:
    backbone, hf_model, model = model_pair
    images = _padded_batch(sizes)
    with torch.no_grad():
        expected = hf_model(pixel_values=images, output_auxiliary_logits=True)
        output = model(images)

    class_diff = _max_diff(output.class_logits, expected.class_queries_logits)
    mask_diff = _max_diff(output.mask_logits, expected.masks_queries_logits)
    assert len(output.aux_outputs) == len(expected.auxiliary_logits) == 9
    aux_diff = max(
        max(_max_diff(c, e["class_queries_logits"]), _max_diff(m, e["masks_queries_logits"]))
        for (c, m), e in zip(output.aux_outputs, expected.auxiliary_logits)
    )
    print(
        f"\n{backbone} {tuple(images.shape)}: max |diff| class {class_diff:.2e}, mask {mask_diff:.2e}, "
        f"aux {aux_diff:.2e} (mask logits up to {expected.masks_queries_logits.abs().max():.2f})"
    )
    assert max(class_diff, mask_diff, aux_diff) <= TOLERANCE


@pytest.mark.parametrize("pre_norm", [False, True], ids=["post-norm", "pre-norm"])
def test_heads_match_hf_on_given_features_with_narrow_non_default_widths(tmp_path: Path, pre_norm: bool) -> None:
    # Widths that differ from each other exercise the decoder's input projections and a mask
    # embedding narrower than the queries; the backbone is bypassed.
    backbone = transformers.SwinConfig(
        embed_dim=32, depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8], out_features=["stage1", "stage2", "stage3", "stage4"]
    )
    hf_model = _save_random_hf_model(
        tmp_path,
        backbone,
        feature_size=64,
        mask_feature_size=32,
        hidden_dim=96,
        encoder_layers=2,
        encoder_feedforward_dim=128,
        decoder_layers=4,
        num_attention_heads=4,
        dim_feedforward=128,
        num_queries=12,
        pre_norm=pre_norm,
    )
    config, _ = mask2former_config_from_hf(json.loads((tmp_path / "config.json").read_text()))
    pixel_decoder = MSDeformAttnPixelDecoder(
        (32, 64, 128, 256),
        dim=config.pixel_decoder_dim,
        mask_dim=config.mask_dim,
        num_layers=config.pixel_decoder_layers,
        ffn_dim=config.pixel_decoder_ffn_dim,
        num_heads=config.pixel_decoder_heads,
    ).eval()
    decoder = MaskedAttentionDecoder(
        in_channels=config.pixel_decoder_dim,
        mask_dim=config.mask_dim,
        num_classes=config.num_classes,
        hidden_dim=config.hidden_dim,
        num_queries=config.num_queries,
        num_layers=config.decoder_layers,
        num_heads=config.decoder_heads,
        ffn_dim=config.decoder_ffn_dim,
        pre_norm=config.pre_norm,
    ).eval()
    weights = convert_hf_mask2former(load_file(tmp_path / "model.safetensors"))
    for name, module in [("pixel_decoder", pixel_decoder), ("transformer_decoder", decoder)]:
        module.load_state_dict({k[len(name) + 1 :]: v for k, v in weights.items() if k.startswith(name + ".")})

    generator = torch.Generator().manual_seed(2)
    features = [
        torch.randn(2, channels, 96 // stride, 128 // stride, generator=generator)
        for channels, stride in zip((32, 64, 128, 256), (4, 8, 16, 32))
    ]
    with torch.no_grad():
        hf_pixels = hf_model.model.pixel_level_module.decoder(features)
        hf_queries = hf_model.model.transformer_module(list(hf_pixels.multi_scale_features), hf_pixels.mask_features)
        mask_features, multi_scale = pixel_decoder(features)
        predictions = decoder(multi_scale, mask_features)

    assert len(predictions) == len(hf_queries.masks_queries_logits) == config.decoder_layers + 1
    for (class_logits, mask_logits), hidden, hf_masks in zip(
        predictions, hf_queries.intermediate_hidden_states, hf_queries.masks_queries_logits
    ):
        assert _max_diff(class_logits, hf_model.class_predictor(hidden.transpose(0, 1))) <= TOLERANCE
        assert _max_diff(mask_logits, hf_masks) <= TOLERANCE
