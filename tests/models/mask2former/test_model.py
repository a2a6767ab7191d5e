from __future__ import annotations

import pytest
import torch

from segscope.config import Mask2FormerConfig, ResNetConfig
from segscope.models import build_model
from segscope.models.mask2former.model import Mask2Former

TINY = Mask2FormerConfig(
    backbone=ResNetConfig(depth=18),
    num_classes=4,
    pixel_decoder_dim=64,
    mask_dim=32,
    pixel_decoder_layers=1,
    pixel_decoder_ffn_dim=128,
    pixel_decoder_heads=4,
    hidden_dim=64,
    num_queries=6,
    decoder_layers=3,
    decoder_heads=4,
    decoder_ffn_dim=128,
)


def test_forward_returns_last_prediction_and_one_aux_per_earlier_step() -> None:
    torch.manual_seed(0)
    model = build_model(TINY).eval()
    assert isinstance(model, Mask2Former)
    with torch.no_grad():
        output = model(torch.randn(2, 3, 64, 96))
    assert output.class_logits.shape == (2, 6, 4 + 1)
    assert output.mask_logits.shape == (2, 6, 16, 24)
    assert len(output.aux_outputs) == TINY.decoder_layers
    for class_logits, mask_logits in output.aux_outputs:
        assert class_logits.shape == output.class_logits.shape
        assert mask_logits.shape == output.mask_logits.shape


def test_gradients_reach_backbone_and_queries() -> None:
    torch.manual_seed(0)
    model = build_model(TINY).train()
    output = model(torch.randn(1, 3, 64, 64))
    loss = output.class_logits.sum() + output.mask_logits.sum()
    loss = loss + sum(c.sum() + m.sum() for c, m in output.aux_outputs)
    loss.backward()
    assert model.backbone.conv1.weight.grad.abs().sum() > 0
    assert model.transformer_decoder.query_feat.weight.grad.abs().sum() > 0


def test_rejects_images_that_are_not_batched_rgb() -> None:
    model = build_model(TINY).eval()
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"):
        model(torch.randn(3, 64, 64))


def test_build_model_rejects_unknown_config_types() -> None:
    with pytest.raises(ValueError, match="ResNetConfig"):
        build_model(ResNetConfig())


def test_runs_in_bfloat16_and_under_autocast() -> None:
    torch.manual_seed(0)
    model = build_model(TINY).eval()
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        reference = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = model(images)
        half = model.to(torch.bfloat16)(images.bfloat16())
    assert half.mask_logits.dtype == torch.bfloat16
    for output in (autocast, half):
        assert torch.isfinite(output.mask_logits).all() and torch.isfinite(output.class_logits).all()
        # The first prediction precedes any masked attention, so rounding cannot flip which
        # pixels a query attends to: bfloat16 keeps it within a few percent.
        first, expected_first = output.aux_outputs[0][1].float(), reference.aux_outputs[0][1]
        assert (first - expected_first).abs().max() < 0.05 * expected_first.abs().max()
        # Later layers may attend to different border pixels; they stay close on average.
        error = (output.mask_logits.float() - reference.mask_logits).abs().mean()
        assert error < 0.1 * reference.mask_logits.abs().mean()
