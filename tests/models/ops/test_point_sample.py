from __future__ import annotations

import pytest
import torch

from segscope.models.mask2former.criterion import mask_uncertainty
from segscope.models.ops.point_sample import point_sample, uncertainty_point_coords


def _pixel_centres(height: int, width: int) -> torch.Tensor:
    """[1, H*W, 2] normalized (x, y) of every pixel centre, row-major."""
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    coords = torch.stack([(xs + 0.5) / width, (ys + 0.5) / height], dim=-1)
    return coords.reshape(1, -1, 2).float()


def test_point_sample_at_pixel_centres_returns_the_pixels() -> None:
    features = torch.randn(1, 3, 4, 6)
    sampled = point_sample(features, _pixel_centres(4, 6))
    assert sampled.shape == (1, 3, 24)
    torch.testing.assert_close(sampled, features.reshape(1, 3, 24))


def test_point_sample_reads_maps_of_different_strides_at_the_same_image_position() -> None:
    # A coarse map and its 4x nearest upsampling describe the same image; the centre of each
    # coarse cell is also the centre of a 4x4 block of the fine map, so the values agree.
    coarse = torch.randn(1, 1, 5, 7)
    fine = coarse.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)
    coords = _pixel_centres(5, 7)
    torch.testing.assert_close(point_sample(fine, coords), point_sample(coarse, coords))


def test_point_sample_reads_half_precision_maps_at_full_precision_coordinates() -> None:
    torch.manual_seed(0)
    features = torch.randn(2, 3, 64, 64).bfloat16()
    coords = torch.rand(2, 100, 2)
    sampled = point_sample(features, coords)
    assert sampled.dtype == torch.float32
    torch.testing.assert_close(sampled, point_sample(features.float(), coords))


def test_point_sample_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="coords"):
        point_sample(torch.zeros(1, 1, 4, 4), torch.zeros(1, 5, 3))
    with pytest.raises(ValueError, match="batch sizes"):
        point_sample(torch.zeros(2, 1, 4, 4), torch.zeros(1, 5, 2))


def _left_half_uncertain(num_maps: int) -> torch.Tensor:
    """Logits that are 0 (most uncertain) on the left half of the map, 10 on the right."""
    logits = torch.full((num_maps, 1, 16, 16), 10.0)
    logits[..., :8] = 0.0
    return logits


def test_importance_sampling_picks_the_most_uncertain_points_first() -> None:
    torch.manual_seed(0)
    coords = uncertainty_point_coords(
        _left_half_uncertain(3),
        mask_uncertainty,
        num_points=64,
        oversample_ratio=3.0,
        importance_sample_ratio=0.75,
    )
    assert coords.shape == (3, 64, 2)
    # 48 important points out of 192 draws, about 96 of which fall where the logits are 0.
    assert (coords[:, :48, 0] < 0.5).all()


def test_importance_sampling_keeps_the_highest_scores_of_the_oversampled_draw() -> None:
    logits = torch.randn(2, 1, 8, 8)
    torch.manual_seed(1)
    drawn = torch.rand(2, 40, 2)
    torch.manual_seed(1)
    coords = uncertainty_point_coords(logits, mask_uncertainty, 20, 2.0, 0.5)

    scores = mask_uncertainty(point_sample(logits, drawn))[:, 0]
    kept = mask_uncertainty(point_sample(logits, coords[:, :10]))[:, 0]
    expected = scores.topk(10, dim=1).values
    torch.testing.assert_close(kept.sort(dim=1).values, expected.sort(dim=1).values)


@pytest.mark.parametrize("ratio", [0.0, 0.5, 1.0])
def test_remaining_share_of_points_is_uniform(ratio: float) -> None:
    torch.manual_seed(0)
    num_points = 4000
    coords = uncertainty_point_coords(
        _left_half_uncertain(1), mask_uncertainty, num_points, 3.0, importance_sample_ratio=ratio
    )[0]
    assert ((coords >= 0) & (coords <= 1)).all()
    num_important = int(ratio * num_points)
    uniform = coords[num_important:]
    # The uniform share lands on either half in equal measure, regardless of uncertainty.
    if len(uniform):
        assert abs((uniform[:, 0] < 0.5).float().mean().item() - 0.5) < 0.05
    left_fraction = (coords[:, 0] < 0.5).float().mean().item()
    assert left_fraction == pytest.approx(ratio + (1 - ratio) * 0.5, abs=0.05)


def test_uncertainty_point_coords_rejects_bad_ratios() -> None:
    logits = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match="oversample_ratio"):
        uncertainty_point_coords(logits, mask_uncertainty, 10, 0.5, 0.5)
    with pytest.raises(ValueError, match="importance_sample_ratio"):
        uncertainty_point_coords(logits, mask_uncertainty, 10, 3.0, 1.5)
