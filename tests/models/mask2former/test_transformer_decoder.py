from __future__ import annotations

import torch

from segscope.models.mask2former.transformer_decoder import MaskedAttentionDecoder, attention_mask_from_logits


def test_attention_mask_blocks_outside_the_predicted_mask_per_head() -> None:
    logits = torch.full((2, 3, 4, 4), -5.0)
    logits[0, 0, :2, :2] = 5.0  # query 0 of image 0 covers the top-left quarter
    logits[1, 2] = 5.0  # query 2 of image 1 covers everything
    mask = attention_mask_from_logits(logits, (4, 4), num_heads=2)
    assert mask.shape == (2 * 2, 3, 16) and mask.dtype == torch.bool
    top_left = torch.zeros(4, 4, dtype=torch.bool)
    top_left[:2, :2] = True
    for head in range(2):
        assert torch.equal(mask[head, 0], ~top_left.flatten())  # image 0, heads first
        assert not mask[2 + head, 2].any()


def test_query_with_empty_mask_attends_everywhere_instead_of_nowhere() -> None:
    logits = torch.full((1, 2, 8, 8), -3.0)
    logits[0, 1, 2:6, 2:6] = 3.0
    mask = attention_mask_from_logits(logits, (4, 4), num_heads=1)
    assert not mask[0, 0].any()  # empty prediction: no key blocked
    assert mask[0, 1].any() and not mask[0, 1].all()


def test_decoder_predicts_once_from_the_queries_and_once_per_layer() -> None:
    torch.manual_seed(0)
    decoder = MaskedAttentionDecoder(
        in_channels=16, mask_dim=24, num_classes=5, hidden_dim=32, num_queries=7, num_layers=4, num_heads=4, ffn_dim=64
    ).eval()
    features = [torch.randn(2, 16, h, w) for h, w in [(2, 3), (4, 6), (8, 12)]]
    mask_features = torch.randn(2, 24, 16, 24)
    with torch.no_grad():
        predictions = decoder(features, mask_features)
    assert len(predictions) == 4 + 1
    for class_logits, mask_logits in predictions:
        assert class_logits.shape == (2, 7, 5 + 1)
        assert mask_logits.shape == (2, 7, 16, 24)
        assert torch.isfinite(class_logits).all() and torch.isfinite(mask_logits).all()
    # Every layer changes the queries, so consecutive predictions differ.
    assert not torch.allclose(predictions[0][0], predictions[1][0])


def test_input_projection_only_when_widths_differ_or_forced() -> None:
    same = MaskedAttentionDecoder(in_channels=32, mask_dim=32, num_classes=2, hidden_dim=32, num_heads=4)
    forced = MaskedAttentionDecoder(
        in_channels=32, mask_dim=32, num_classes=2, hidden_dim=32, num_heads=4, enforce_input_projection=True
    )
    assert not any(name.startswith("input_proj") for name, _ in same.named_parameters())
    assert sum(name.startswith("input_proj") for name, _ in forced.named_parameters()) == 3 * 2
