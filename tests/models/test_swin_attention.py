"""Swin window attention: the broadcast bias/mask layout against the original formulation.

The original repeats ``bias + mask`` over the batch and attends over ``[B*nW,heads,N,d]``; the
module attends with masks that broadcast over the batch instead. The reference below is the
original's arithmetic, so the two must agree to float rounding, forward and backward.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from segscope.config import SwinConfig
from segscope.models.backbones import swin
from segscope.models.backbones.swin import Swin, WindowAttention

# Window 7 with a three-window stage 1 at 84 px; 97x130 also pads every stage to the window.
SIZES = [(84, 84), (97, 130)]


def _reference_forward(self: WindowAttention, windows: Tensor, mask: Tensor | None) -> Tensor:
    """The original attention: ``[B*nW,heads,N,N]`` bias, the mask repeated over the batch."""
    batch, num_windows, tokens, channels = windows.shape
    flat = windows.flatten(0, 1)
    q, k, v = self.qkv(flat).view(-1, tokens, 3, self.num_heads, channels // self.num_heads).permute(2, 0, 3, 1, 4)
    bias = self.relative_position_bias_table[self.relative_position_index].permute(2, 0, 1)
    if mask is not None:
        bias = (bias + mask.unsqueeze(1)).repeat(batch, 1, 1, 1)
    weights = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5 + bias).softmax(-1)
    out = (weights @ v).transpose(1, 2).reshape(batch, num_windows, tokens, channels)
    return self.proj(out)


def _images(batch: int, height: int, width: int) -> Tensor:
    """``[batch,3,height,width]`` random images from their own seeded generator."""
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(1))


def _model(window_size: int = 7) -> Swin:
    torch.manual_seed(0)
    cfg = SwinConfig(
        embed_dim=16, depths=(2, 2, 4, 2), num_heads=(1, 2, 4, 4), window_size=window_size, drop_path_rate=0.0
    )
    model = Swin(cfg).eval()
    with torch.no_grad():
        # Large biases so that a bias or mask applied to the wrong window or head shows.
        for module in model.modules():
            if isinstance(module, WindowAttention):
                module.relative_position_bias_table.normal_()
    return model


@pytest.mark.parametrize("window_size, size", [(7, SIZES[0]), (7, SIZES[1]), (12, (100, 150))])
def test_swin_matches_the_original_attention(
    window_size: int, size: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model(window_size)
    images = _images(3, *size)
    with torch.no_grad():
        features = model(images)
        monkeypatch.setattr(WindowAttention, "forward", _reference_forward)
        expected = model(images)
    for got, want in zip(features, expected, strict=True):
        assert (got - want).abs().max() <= 1e-5


@pytest.mark.parametrize("size", SIZES)
def test_swin_images_do_not_depend_on_the_rest_of_the_batch(size: tuple[int, int]) -> None:
    model = _model()
    images = _images(3, *size)
    with torch.no_grad():
        batched = model(images)
        alone = model(images[1:2])
    for together, single in zip(batched, alone, strict=True):
        assert (together[1:2] - single).abs().max() <= 1e-5


def test_swin_attention_masks_broadcast_over_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """No mask the size of the batch: each is ``[1,heads,N,N]`` or ``[1,nW*heads,N,N]``."""
    shapes = []
    sdpa = F.scaled_dot_product_attention  # swin.F is torch.nn.functional itself

    def recording_sdpa(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor) -> Tensor:
        shapes.append((tuple(q.shape), tuple(attn_mask.shape)))
        return sdpa(q, k, v, attn_mask=attn_mask)

    monkeypatch.setattr(swin.F, "scaled_dot_product_attention", recording_sdpa)
    model = _model()
    with torch.no_grad():
        model(_images(4, 97, 130))
    assert len(shapes) == 10
    for q_shape, mask_shape in shapes:
        assert mask_shape == (1, q_shape[1], q_shape[2], q_shape[2])


def test_swin_gradients_match_the_original_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model().train()
    images = _images(2, 97, 130)

    def table_grads() -> list[Tensor]:
        model.zero_grad()
        sum(f.square().mean() for f in model(images)).backward()
        return [m.relative_position_bias_table.grad.clone() for m in model.modules() if isinstance(m, WindowAttention)]

    grads = table_grads()
    monkeypatch.setattr(WindowAttention, "forward", _reference_forward)
    expected = table_grads()
    assert len(grads) == 10 and all(g.abs().sum() > 0 for g in grads)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_swin_runs_under_bf16_autocast() -> None:
    model = _model()
    images = _images(2, 97, 130)
    with torch.no_grad():
        full = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(images)
    for low, high in zip(half, full, strict=True):
        assert torch.isfinite(low).all()
        # bf16 keeps ~3 significant digits; features are LayerNorm outputs of unit scale.
        assert (low.float() - high).abs().mean() < 0.05
