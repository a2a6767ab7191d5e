"""ViT-Adapter backbone: shapes, gradients, its deformable attention and the BEiT inside it."""

from __future__ import annotations

import pytest
import torch

from segscope.config import BeitConfig, ViTAdapterConfig
from segscope.models.backbones.beit import Beit, resize_position_table
from segscope.models.backbones.vit_adapter import ViTAdapter
from segscope.models.ops.ms_deform_attn import MultiScaleDeformableAttention, multi_scale_deformable_attention


def tiny_adapter(
    per_interaction: bool = True, windows: tuple[int, ...] = (), layer_scale: float = 1e-6
) -> ViTAdapterConfig:
    vit = BeitConfig(
        embed_dim=32, depth=4, num_heads=2, rel_pos_grid=4, drop_path_rate=0.1, layer_scale_init=layer_scale,
        cls_token=not windows, window_sizes=windows,
    )
    return ViTAdapterConfig(
        vit=vit, conv_inplane=8, deform_num_heads=2, interaction_indexes=((0, 0), (1, 1), (2, 2), (3, 3)),
        vit_feature_per_interaction=per_interaction,
    )


@pytest.mark.parametrize("size", [(64, 64), (96, 160), (160, 32)])
@pytest.mark.parametrize("variant", ["segmentation", "detection-windowed"])
def test_four_maps_at_strides_4_to_32(size: tuple[int, int], variant: str) -> None:
    cfg = tiny_adapter() if variant == "segmentation" else tiny_adapter(False, windows=(2, 0, 2, 3))
    torch.manual_seed(0)
    backbone = ViTAdapter(cfg).eval()
    with torch.no_grad():
        maps = backbone(torch.randn(2, 3, *size))
    height, width = size
    assert [tuple(m.shape) for m in maps] == [(2, 32, height // s, width // s) for s in (4, 8, 16, 32)]
    assert all(torch.isfinite(m).all() for m in maps)
    assert backbone.out_channels == (32, 32, 32, 32)


def test_backward_reaches_every_parameter() -> None:
    torch.manual_seed(0)
    backbone = ViTAdapter(tiny_adapter()).train()
    # At initialization the deformable attentions ignore their queries (zero offset and weight
    # matrices, Deformable DETR's start); randomize so every path carries gradient.
    with torch.no_grad():
        for parameter in backbone.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    maps = backbone(torch.randn(2, 3, 64, 96))
    sum((m * torch.randn_like(m)).sum() for m in maps).backward()
    no_grad = [n for n, p in backbone.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_vit_features_per_interaction_or_last_change_the_maps() -> None:
    torch.manual_seed(0)
    # A large layer scale, so that the tokens change visibly from one interaction to the next.
    per_interaction = ViTAdapter(tiny_adapter(True, layer_scale=0.5)).eval()
    last_only = ViTAdapter(tiny_adapter(False, layer_scale=0.5)).eval()
    last_only.load_state_dict(per_interaction.state_dict())
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = per_interaction(images), last_only(images)
    # The stride-32 map holds the last interaction's tokens either way; the stride-4 map holds
    # the first interaction's in the segmentation release.
    torch.testing.assert_close(a[3], b[3])
    assert (a[0] - b[0]).abs().max() > 0.1


def test_refuses_sides_not_divisible_by_32() -> None:
    with pytest.raises(ValueError, match="divisible by 32"):
        ViTAdapter(tiny_adapter())(torch.randn(1, 3, 64, 80))


def test_narrow_value_deformable_attention_is_the_shared_op_between_projections() -> None:
    """ViT-Adapter's deform_ratio: values projected to half width, sampled by the portable op."""
    torch.manual_seed(0)
    layer = MultiScaleDeformableAttention(16, num_heads=2, num_levels=2, num_points=3, value_dim=8)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.normal_(0.0, 0.3)
    shapes = [(4, 6), (2, 3)]
    query, value = torch.randn(2, 5, 16), torch.randn(2, 30, 16)
    reference_points = torch.rand(2, 5, 2, 2)
    with torch.no_grad():
        actual = layer(query, reference_points, value, shapes)
        offsets = layer.sampling_offsets(query).view(2, 5, 2, 2, 3, 2)
        weights = layer.attention_weights(query).view(2, 5, 2, 6).softmax(-1).view(2, 5, 2, 2, 3)
        extent = torch.tensor([[6.0, 4.0], [3.0, 2.0]])
        locations = reference_points[:, :, None, :, None] + offsets / extent[None, None, None, :, None]
        sampled = multi_scale_deformable_attention(
            layer.value_proj(value).view(2, 30, 2, 4), shapes, None, locations, weights
        )
        expected = layer.output_proj(sampled)
    assert layer.value_proj.weight.shape == (8, 16) and layer.output_proj.weight.shape == (16, 8)
    torch.testing.assert_close(actual, expected)


def test_bias_table_resize_keeps_class_rows_and_is_differentiable() -> None:
    table = torch.randn(7 * 7 + 3, 2, requires_grad=True)
    resized = resize_position_table(table, (4, 4), (6, 3), extra_rows=3)
    assert resized.shape == (11 * 5 + 3, 2)
    torch.testing.assert_close(resized[-3:], table[-3:])
    # The centre (zero offset) stays where it was: offset 0 is a sample point of both grids.
    torch.testing.assert_close(resized[5 * 5 + 2], table[3 * 7 + 3])
    resized.sum().backward()
    assert table.grad is not None and table.grad[:-3].abs().sum() > 0
    assert resize_position_table(table, (4, 4), (4, 4), extra_rows=3) is table


def test_beit_refuses_sizes_off_the_patch_grid() -> None:
    with pytest.raises(ValueError, match="divisible by 16"):
        Beit(BeitConfig(embed_dim=32, depth=1, num_heads=2))(torch.randn(1, 3, 40, 48))


def test_resized_bias_table_is_reused_only_while_the_table_is_unchanged() -> None:
    torch.manual_seed(0)
    beit = Beit(BeitConfig(embed_dim=32, depth=1, num_heads=2, rel_pos_grid=4)).eval()
    attention = beit.blocks[0].attn
    images = torch.randn(1, 3, 96, 64)  # a 6x4 grid: the 4x4 table is resized
    with torch.no_grad():
        first = beit(images)
        assert beit(images).equal(first)
        attention.relative_position_bias_table.add_(torch.randn_like(attention.relative_position_bias_table))
        changed = beit(images)
    assert not changed.equal(first)
    # With gradients on, the resize is part of the graph: the table learns.
    beit(images).sum().backward()
    assert attention.relative_position_bias_table.grad.abs().sum() > 0
