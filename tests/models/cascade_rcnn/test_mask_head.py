"""FCNMaskHead, mask targets, mask loss and pasting: mmdet's rules by hand; torchvision pasting parity."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import paste_masks_in_image

from segscope.models.cascade_rcnn.mask_head import FCNMaskHead, mask_loss, mask_targets, paste_masks


def test_head_shapes_and_mmdet_layer_names() -> None:
    head = FCNMaskHead(num_classes=3, in_channels=8, conv_out_channels=6)
    assert head(torch.randn(5, 8, 14, 14)).shape == (5, 3, 28, 28)
    keys = set(head.state_dict())
    assert {"convs.3.conv.weight", "convs.3.conv.bias", "upsample.weight", "conv_logits.bias"} <= keys
    assert not any("bn" in k for k in keys)


def test_targets_sample_pixel_centres_clip_boxes_and_threshold_at_half() -> None:
    gt = torch.zeros(2, 20, 20)
    gt[0, :, :10] = 1  # left half
    gt[1, :, :9] = 1  # 9 of 20 columns
    boxes = torch.tensor([[0.0, 0.0, 20.0, 20.0], [-10.0, 0.0, 10.0, 20.0], [0.0, 0.0, 20.0, 20.0]])
    # Bins of 5 px, 5 samples each at the pixel centres: two full and two empty columns of bins.
    quarter = mask_targets(boxes[:1], gt, torch.tensor([0]), mask_size=4)
    torch.testing.assert_close(quarter[0], torch.tensor([[1.0, 1.0, 0.0, 0.0]]).expand(4, 4))
    # The second box is clipped to x in [0, 10]: all inside the left half.
    assert mask_targets(boxes[1:2], gt, torch.tensor([0]), mask_size=4).eq(1).all()
    # One bin averaging 20 columns: 10/20 = 0.5 -> 1; 9/20 = 0.45 -> 0.
    single = mask_targets(boxes[[0, 2]], gt, torch.tensor([0, 1]), mask_size=1)
    assert single.flatten().tolist() == [1.0, 0.0]
    assert mask_targets(torch.zeros(0, 4), gt, torch.zeros(0, dtype=torch.long)).shape == (0, 28, 28)


def test_loss_is_the_mean_bce_of_the_gt_class_channel() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, 5, 5, generator=generator, requires_grad=True)
    targets = (torch.rand(4, 5, 5, generator=generator) > 0.5).float()
    labels = torch.tensor([2, 0, 1, 2])
    probs = logits[torch.arange(4), labels].sigmoid()
    expected = -(targets * probs.log() + (1 - targets) * (1 - probs).log()).mean()
    loss = mask_loss(logits, targets, labels)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert logits.grad[0, :2].abs().sum() == 0 and logits.grad[0, 2].abs().sum() > 0
    empty = mask_loss(logits[:0], targets[:0], labels[:0])
    assert empty.item() == 0 and empty.requires_grad


def test_paste_fills_exactly_the_pixels_whose_centres_lie_in_the_box() -> None:
    # A full mask: bilinear sampling with zero padding is >= 0.5 up to the box edge and < 0.5 beyond it.
    pasted = paste_masks(torch.ones(2, 28, 28), torch.tensor([[2.0, 3.0, 6.0, 9.0], [4.2, 0.0, 7.7, 2.5]]), (12, 10))
    expected = torch.zeros(2, 12, 10, dtype=torch.bool)
    expected[0, 3:9, 2:6] = True
    expected[1, 0:3, 4:8] = True  # centres 4.5 .. 7.5 and 0.5 .. 2.5 (on the edge: exactly 0.5, kept)
    assert torch.equal(pasted, expected)
    assert paste_masks(torch.zeros(0, 28, 28), torch.zeros(0, 4), (5, 6)).shape == (0, 5, 6)


def test_paste_matches_torchvision_up_to_a_border_band() -> None:
    # torchvision truncates boxes to integers, widens them by 2/28 with a 1-px zero pad and resizes to
    # (x1 - x0 + 1) pixels; mmdet samples the exact box at every pixel centre. The two differ only on
    # the contour: here on at most 15% of a mask's pixels, all within 2 px of the contour.
    generator = torch.Generator().manual_seed(0)
    num = 20
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 28), torch.linspace(-1, 1, 28), indexing="ij")
    centres = torch.rand(num, 2, generator=generator) * 0.6 - 0.3
    radii = torch.rand(num, generator=generator) * 0.4 + 0.5
    dist = ((xx - centres[:, 0, None, None]) ** 2 + (yy - centres[:, 1, None, None]) ** 2).sqrt()
    probs = torch.sigmoid((radii[:, None, None] - dist) * 20)
    corner = torch.rand(num, 2, generator=generator) * 100
    boxes = torch.cat([corner, corner + 20 + torch.rand(num, 2, generator=generator) * 80], dim=1)
    ours = paste_masks(probs, boxes, (200, 220))
    theirs = paste_masks_in_image(probs[:, None], boxes, (200, 220))[:, 0] >= 0.5
    differ = ours != theirs
    assert differ.any()
    assert (differ.sum((1, 2)) <= 0.15 * ours.sum((1, 2))).all()
    grown = F.max_pool2d(ours[:, None].float(), 5, 1, 2)[:, 0] > 0
    shrunk = -F.max_pool2d(-ours[:, None].float(), 5, 1, 2)[:, 0] > 0
    assert not (differ & ~(grown & ~shrunk)).any()


def test_pasting_a_uniform_probability_keeps_it_threshold_side() -> None:
    masks = torch.full((2, 28, 28), 0.4)
    masks[1] = 0.6
    pasted = paste_masks(masks, torch.tensor([[0.0, 0.0, 8.0, 8.0]] * 2), (8, 8))
    assert not pasted[0].any() and pasted[1].all()
