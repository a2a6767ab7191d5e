"""segscope's ResNet and Swin against HF transformers' ``ResNetBackbone`` and ``SwinBackbone``.

Each HF backbone is randomly initialized (with random BatchNorm statistics and relative
position tables, which HF initializes to constants), converted with ``convert_hf_*``, loaded
strictly into segscope's backbone, and both are compared in eval mode, float32, on input
sizes that are not multiples of 32 (so every padding path runs).

HF's ``SwinLayer`` shrinks the window and drops the shift when a stage's map is no larger than
the window, unless called with ``always_partition=True``; the original detection Swin (and
segscope) never does. The main Swin comparisons therefore use inputs where every stage
exceeds the window: >= 7*32 px per side for window 7, >= 13*32 = 416 px for window 12. A
separate test compares small inputs, skipped for HF versions whose backbone does clamp.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

from segscope.checkpoints.hf_backbones import (  # noqa: E402
    backbone_config_from_hf,
    convert_hf_resnet,
    convert_hf_swin,
)
from segscope.models.backbones import build_backbone  # noqa: E402

STAGES = ["stage1", "stage2", "stage3", "stage4"]
TOLERANCE = 1e-5  # largest |difference| relative to the largest |value| of each map
HF_PREFIX = "model.pixel_level_module.encoder."


def _randomize(model: nn.Module) -> None:
    """Random weights everywhere, with BatchNorm kept near unit gain so activations stay O(1)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif "normalization.weight" in name:
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * 0.5 + 0.25)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)


def _pair(hf_model: nn.Module, convert) -> tuple[nn.Module, nn.Module]:
    _randomize(hf_model)
    ours = build_backbone(backbone_config_from_hf(hf_model.config.to_dict()))
    ours.load_state_dict(convert(hf_model.state_dict()), strict=True)
    return hf_model.eval(), ours.eval()


def _max_diffs(hf_model: nn.Module, ours: nn.Module, size: tuple[int, int]) -> list[float]:
    images = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf_model(images).feature_maps
        actual = ours(images)
    assert len(actual) == len(expected) == 4
    for ref, out in zip(expected, actual, strict=True):
        assert out.shape == ref.shape
    # Relative to each map's largest value: random weights grow activations with depth (res5 of a
    # random ResNet-50 reaches the thousands), where float32 convolutions summing in another order
    # (segscope's run channels-last) differ in the last bits.
    diffs = [((ref - out).abs().max() / ref.abs().max()).item() for ref, out in zip(expected, actual, strict=True)]
    stages = ", ".join(f"{d:.2e}" for d in diffs)
    print(f"\n{type(hf_model).__name__} {size}: max |diff| / max |ref| per stage {stages}")
    return diffs


@pytest.fixture(scope="module")
def resnet50() -> tuple[nn.Module, nn.Module]:
    return _pair(transformers.ResNetBackbone(transformers.ResNetConfig(out_features=STAGES)), convert_hf_resnet)


@pytest.fixture(scope="module")
def swin_tiny() -> tuple[nn.Module, nn.Module]:
    config = transformers.SwinConfig(
        embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7, out_features=STAGES
    )
    return _pair(transformers.SwinBackbone(config), convert_hf_swin)


@pytest.mark.parametrize("size", [(257, 321), (300, 229)])
def test_resnet50_features_match_hf_resnet_backbone(resnet50, size: tuple[int, int]) -> None:
    assert max(_max_diffs(*resnet50, size)) <= TOLERANCE


def test_resnet18_basic_blocks_match_hf_resnet_backbone() -> None:
    config = transformers.ResNetConfig(
        layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512], out_features=STAGES
    )
    pair = _pair(transformers.ResNetBackbone(config), convert_hf_resnet)
    assert max(_max_diffs(*pair, (257, 321))) <= TOLERANCE


@pytest.mark.parametrize("size", [(257, 321), (300, 229)])
def test_swin_tiny_features_match_hf_swin_backbone(swin_tiny, size: tuple[int, int]) -> None:
    """Every stage map exceeds the 7-token window at these sizes (see module docstring)."""
    assert max(_max_diffs(*swin_tiny, size)) <= TOLERANCE


def test_swin_window12_features_match_hf_swin_backbone() -> None:
    """Window 12 (Swin-L's): stage 4 must exceed 12 tokens, hence inputs of 416+ px per side."""
    config = transformers.SwinConfig(
        embed_dim=32, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8], window_size=12, out_features=STAGES
    )
    pair = _pair(transformers.SwinBackbone(config), convert_hf_swin)
    for size in [(420, 450), (449, 417)]:
        assert max(_max_diffs(*pair, size)) <= TOLERANCE


def test_swin_small_inputs_match_hf_when_hf_always_partitions(swin_tiny) -> None:
    """Stage maps of 7x6 and 4x3 tokens, smaller than the window: padded windows, not clamped."""
    if "always_partition=True" not in inspect.getsource(transformers.SwinBackbone.forward):
        pytest.skip("this transformers version clamps the window on small maps (see module docstring)")
    assert max(_max_diffs(*swin_tiny, (100, 90))) <= TOLERANCE


@pytest.mark.parametrize("kind", ["swin", "resnet"])
def test_saved_mask2former_backbone_keys_convert_and_load_strictly(kind: str, tmp_path: Path) -> None:
    """The exact keys ``Mask2FormerForUniversalSegmentation.save_pretrained`` writes, and its
    ``config.json``, give a segscope backbone computing the same features as HF's encoder."""
    if kind == "swin":
        backbone = transformers.SwinConfig(
            embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window_size=7, out_features=STAGES
        )
        convert = convert_hf_swin
    else:
        backbone = transformers.ResNetConfig(
            layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512], out_features=STAGES
        )
        convert = convert_hf_resnet
    config = transformers.Mask2FormerConfig(
        backbone_config=backbone,
        num_labels=3,
        num_queries=4,
        hidden_dim=32,
        feature_size=32,
        mask_feature_size=32,
        dim_feedforward=32,
        encoder_feedforward_dim=32,
        encoder_layers=1,
        decoder_layers=2,
    )
    hf_model = transformers.Mask2FormerForUniversalSegmentation(config)
    _randomize(hf_model.model.pixel_level_module.encoder)
    hf_model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    hf_config = json.loads((tmp_path / "config.json").read_text())["backbone_config"]

    ours = build_backbone(backbone_config_from_hf(hf_config)).eval()
    backbone_weights = {k[len(HF_PREFIX) :]: v for k, v in saved.items() if k.startswith(HF_PREFIX)}
    ours.load_state_dict(convert(backbone_weights), strict=True)
    assert max(_max_diffs(hf_model.model.pixel_level_module.encoder.eval(), ours, (257, 229))) <= TOLERANCE
