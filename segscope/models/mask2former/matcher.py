"""Bipartite matching of Mask2Former's queries to ground-truth segments.

The matching cost of a (query, segment) pair is a weighted sum of a class cost (minus the
predicted probability of the segment's class), a sigmoid cross-entropy cost and a dice cost,
the two mask costs measured on the same random points of both masks rather than on every
pixel (Mask2Former, Cheng et al. 2022, section 3.2).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from segscope.models.ops.point_sample import point_sample


class Target(TypedDict):
    """One image's ground truth: ``labels [N]`` (int64, 0..C-1) and ``masks [N,H,W]``.

    Masks are binary (bool or float) and cover the same image extent as the predicted mask
    logits, typically the padded input image at full resolution.
    """

    labels: Tensor
    masks: Tensor


class HungarianMatcher:
    """One-to-one assignment of queries to target segments minimising the matching cost."""

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_mask: float = 5.0,
        cost_dice: float = 5.0,
        num_points: int = 12544,
    ) -> None:
        if min(cost_class, cost_mask, cost_dice) < 0:
            raise ValueError("matching cost weights must be non-negative")
        if cost_class == cost_mask == cost_dice == 0:
            raise ValueError("at least one matching cost weight must be positive")
        if num_points < 1:
            raise ValueError(f"num_points must be positive, got {num_points}")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points

    @torch.no_grad()
    def __call__(
        self, class_logits: Tensor, mask_logits: Tensor, targets: Sequence[Target]
    ) -> list[tuple[Tensor, Tensor]]:
        """Match ``class_logits [B,Q,C+1]`` and ``mask_logits [B,Q,h,w]`` to ``targets``.

        Returns, per image, ``(query_indices, target_indices)``: two int64 tensors of length
        ``min(Q, N)`` on the logits' device, the query indices in increasing order.
        """
        if class_logits.dim() != 3 or mask_logits.dim() != 4:
            raise ValueError(
                "expected class_logits [B,Q,C+1] and mask_logits [B,Q,h,w], got "
                f"{tuple(class_logits.shape)} and {tuple(mask_logits.shape)}"
            )
        if class_logits.shape[:2] != mask_logits.shape[:2]:
            raise ValueError(
                f"class_logits {tuple(class_logits.shape)} and mask_logits "
                f"{tuple(mask_logits.shape)} disagree on batch size or number of queries"
            )
        check_targets(targets, batch_size=class_logits.shape[0])
        return [
            self._match_image(classes, masks, target["labels"], target["masks"])
            for classes, masks, target in zip(class_logits, mask_logits, targets)
        ]

    def _match_image(
        self, class_logits: Tensor, mask_logits: Tensor, labels: Tensor, target_masks: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Assignment of one image's queries to its segments.

        Takes ``class_logits [Q,C+1]``, ``mask_logits [Q,h,w]``, ``labels [N]`` and
        ``target_masks [N,H,W]``; returns ``(query_indices, target_indices)``.
        """
        # Costs in float32 whatever the training precision: fp16 sums over thousands of points
        # lose the small differences the assignment depends on.
        class_logits = class_logits.float()
        mask_logits = mask_logits.float()
        cost_class = -class_logits.softmax(-1)[:, labels]

        coords = torch.rand(1, self.num_points, 2, device=mask_logits.device)
        pred = point_sample(mask_logits[:, None], coords.expand(len(mask_logits), -1, -1))[:, 0]
        target = target_masks[:, None].to(pred)
        target = point_sample(target, coords.expand(len(target), -1, -1))[:, 0]

        cost = (
            self.cost_mask * pairwise_sigmoid_ce(pred, target)
            + self.cost_class * cost_class
            + self.cost_dice * pairwise_dice(pred, target)
        )
        # A diverged or overflowing prediction must not kill the run inside scipy: its pairs
        # get the largest finite cost, so they are matched only when nothing else is left.
        largest = torch.finfo(cost.dtype).max
        cost = torch.nan_to_num(cost, nan=largest, posinf=largest, neginf=largest)
        rows, cols = linear_sum_assignment(cost.cpu().numpy())
        device = class_logits.device
        return (
            torch.as_tensor(rows, dtype=torch.int64, device=device),
            torch.as_tensor(cols, dtype=torch.int64, device=device),
        )


def pairwise_sigmoid_ce(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean sigmoid cross-entropy of each ``logits [Q,P]`` row against each ``targets [N,P]`` row.

    Returns ``[Q,N]``. Uses BCE(x, t) = t * BCE(x, 1) + (1 - t) * BCE(x, 0), which turns the
    Q x N x P evaluation into two matrix products.
    """
    num_points = logits.shape[1]
    pos = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    return (pos / num_points) @ targets.T + (neg / num_points) @ (1 - targets).T


def pairwise_dice(logits: Tensor, targets: Tensor) -> Tensor:
    """Dice loss (+1 smoothed) of each ``logits [Q,P]`` row against each ``targets [N,P]`` row.

    Returns ``[Q,N]``.
    """
    probs = logits.sigmoid()
    numerator = 2 * (probs @ targets.T)
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def check_targets(targets: Sequence[Target], batch_size: int) -> None:
    """Raise ``ValueError`` unless ``targets`` holds one well-formed ``Target`` per image.

    Checks structure and shapes only (no device synchronisation).
    """
    if len(targets) != batch_size:
        raise ValueError(f"got {len(targets)} targets for a batch of {batch_size} images")
    for i, target in enumerate(targets):
        missing = {"labels", "masks"} - set(target)
        if missing:
            raise ValueError(f"target {i} lacks {sorted(missing)}")
        labels, masks = target["labels"], target["masks"]
        if labels.dim() != 1 or labels.dtype != torch.int64:
            raise ValueError(
                f"target {i}: labels must be a 1-d int64 tensor, got {labels.dtype} "
                f"of shape {tuple(labels.shape)}"
            )
        if masks.dim() != 3 or masks.shape[0] != labels.shape[0]:
            raise ValueError(
                f"target {i}: masks must be [N,H,W] with N = {labels.shape[0]} labels, got "
                f"{tuple(masks.shape)}"
            )
