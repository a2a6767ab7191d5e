"""segscope's BEiT against timm's on the same weights, at several input sizes, global and windowed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from segscope.config import BeitConfig
from segscope.models.backbones.beit import Beit

timm_beit = pytest.importorskip("timm.models.beit")

DIM, HEADS, GRID = 64, 4, 8  # the "pretraining" grid: 128-pixel images of 16-pixel patches


def _randomized(cfg: BeitConfig) -> Beit:
    torch.manual_seed(0)
    model = Beit(cfg).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.2)
    return model


def _timm_beit(grid: tuple[int, int], depth: int) -> torch.nn.Module:
    return timm_beit.Beit(
        img_size=(grid[0] * 16, grid[1] * 16),
        patch_size=16,
        num_classes=0,
        embed_dim=DIM,
        depth=depth,
        num_heads=HEADS,
        qkv_bias=True,
        use_abs_pos_emb=False,
        use_rel_pos_bias=True,
        init_values=0.1,
    ).eval()


def _load_into_timm(reference: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    # timm's own checkpoint filter resizes the bias tables for the size it was built at.
    filtered = timm_beit.checkpoint_filter_fn(dict(state_dict), reference)
    result = reference.load_state_dict(filtered, strict=False)
    # timm's model has a classifier-side norm segscope's dense trunk does not; nothing else may differ.
    assert set(result.missing_keys) <= {"fc_norm.weight", "fc_norm.bias"}, result.missing_keys
    assert not result.unexpected_keys


def _timm_tokens(reference: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    x = reference.patch_embed(images)
    x = torch.cat((reference.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    for block in reference.blocks:
        x = block(x)
    return x


@pytest.mark.parametrize("grid", [(GRID, GRID), (6, 10), (12, 8)], ids=["pretraining", "smaller-wide", "larger-tall"])
def test_global_attention_matches_timm(grid: tuple[int, int]) -> None:
    ours = _randomized(BeitConfig(embed_dim=DIM, depth=2, num_heads=HEADS, rel_pos_grid=GRID, layer_scale_init=0.1))
    reference = _timm_beit(grid, depth=2)
    _load_into_timm(reference, ours.state_dict())
    images = torch.randn(2, 3, grid[0] * 16, grid[1] * 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = _timm_tokens(reference, images), ours(images)
    assert actual.shape == expected.shape == (2, 1 + grid[0] * grid[1], DIM)
    assert (actual - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("grid", [(8, 12), (7, 10)], ids=["whole-windows", "padded-windows"])
def test_windowed_attention_matches_timm_attention_per_window(grid: tuple[int, int]) -> None:
    """A windowed block is timm's block run inside each zero-padded 4x4 window (the original's rule)."""
    window = 4
    cfg = BeitConfig(
        embed_dim=DIM, depth=1, num_heads=HEADS, cls_token=False, layer_scale_init=0.1, window_sizes=(window,)
    )
    ours = _randomized(cfg)
    # timm's attention always has a class token; give it one that no patch can attend to (its
    # three bias rows at -1e9), so that its patches see exactly the window's patches.
    timm_block = timm_beit.Block(DIM, HEADS, qkv_bias=True, init_values=0.1, window_size=(window, window)).eval()
    weights = {k.removeprefix("blocks.0."): v for k, v in ours.state_dict().items() if k.startswith("blocks.0.")}
    table = weights["attn.relative_position_bias_table"]
    weights["attn.relative_position_bias_table"] = torch.cat((table, torch.full((3, HEADS), -1e9)))
    result = timm_block.load_state_dict(weights, strict=False)
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "relative_position_index" not in k]

    block = ours.blocks[0]
    tokens = torch.randn(2, grid[0] * grid[1], DIM, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        # The original pads the normalized tokens with zeros, attends per window, crops back.
        normed = timm_block.norm1(tokens).view(2, *grid, DIM)
        pad_h, pad_w = -grid[0] % window, -grid[1] % window
        padded = F.pad(normed, (0, 0, 0, pad_w, 0, pad_h))
        height, width = grid[0] + pad_h, grid[1] + pad_w
        windows = padded.view(2, height // window, window, width // window, window, DIM).transpose(2, 3)
        windows = windows.reshape(-1, window * window, DIM)
        with_cls = torch.cat((torch.zeros(windows.shape[0], 1, DIM), windows), dim=1)
        attended = timm_block.attn(with_cls)[:, 1:]
        attended = attended.view(2, height // window, width // window, window, window, DIM).transpose(2, 3)
        attended = attended.reshape(2, height, width, DIM)[:, : grid[0], : grid[1]].reshape(2, -1, DIM)
        x = tokens + timm_block.gamma_1 * attended
        expected = x + timm_block.gamma_2 * timm_block.mlp(timm_block.norm2(x))
        actual = block(tokens, grid)
    assert (actual - expected).abs().max() <= 1e-4
