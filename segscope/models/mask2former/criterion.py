"""Mask2Former's training loss: match queries to segments, then supervise matched pairs.

For the last decoder layer and every auxiliary one, queries are matched to ground-truth
segments (``HungarianMatcher``); matched queries learn their segment's class and mask,
unmatched ones learn the extra "no object" class. Mask losses (sigmoid cross-entropy and
dice) are measured on points sampled where the prediction is most uncertain, not on every
pixel (Mask2Former, Cheng et al. 2022, section 3.2 and 4.1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from segscope.config import Mask2FormerConfig
from segscope.models.mask2former.matcher import HungarianMatcher, Target, check_targets
from segscope.models.ops.point_sample import point_sample, uncertainty_point_coords


class MaskPredictions(Protocol):
    """What the criterion reads from the model's output (``Mask2FormerOutput`` fits).

    ``class_logits [B,Q,C+1]`` and ``mask_logits [B,Q,h,w]`` of the last decoder layer;
    ``aux_outputs``: ``(class_logits, mask_logits)`` of the earlier layers, same shapes.
    """

    class_logits: Tensor
    mask_logits: Tensor
    aux_outputs: list[tuple[Tensor, Tensor]]


class SetCriterion(nn.Module):
    """Weighted class, mask and dice losses of every decoder layer's predictions."""

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        no_object_weight: float = 0.1,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if num_points < 1:
            raise ValueError(f"num_points must be positive, got {num_points}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.class_weight = class_weight
        self.mask_weight = mask_weight
        self.dice_weight = dice_weight
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        # The no-object class outnumbers the real ones (Q queries, a few segments), so it is
        # down-weighted in the cross-entropy. Not persistent: it is derived from the config.
        class_loss_weight = torch.ones(num_classes + 1)
        class_loss_weight[-1] = no_object_weight
        self.register_buffer("class_loss_weight", class_loss_weight, persistent=False)

    @classmethod
    def from_config(cls, cfg: Mask2FormerConfig) -> SetCriterion:
        """The criterion (and matcher) with the weights and point counts of ``cfg``."""
        matcher = HungarianMatcher(
            cost_class=cfg.class_weight,
            cost_mask=cfg.mask_weight,
            cost_dice=cfg.dice_weight,
            num_points=cfg.train_num_points,
        )
        return cls(
            num_classes=cfg.num_classes,
            matcher=matcher,
            class_weight=cfg.class_weight,
            mask_weight=cfg.mask_weight,
            dice_weight=cfg.dice_weight,
            no_object_weight=cfg.no_object_weight,
            num_points=cfg.train_num_points,
            oversample_ratio=cfg.oversample_ratio,
            importance_sample_ratio=cfg.importance_sample_ratio,
        )

    def forward(self, outputs: MaskPredictions, targets: Sequence[Target]) -> dict[str, Tensor]:
        """Weighted losses of ``outputs`` against one ``Target`` per image.

        Target masks must cover the padded input batch (bottom/right padding): masks of
        different sizes are zero-padded to the largest, and points are read from them at full
        resolution at the same relative positions as from the stride-4 predictions.

        Returns ``loss_ce``, ``loss_mask`` and ``loss_dice`` of the last layer and the same
        names suffixed ``_0``, ``_1``, ... for each auxiliary layer, each already multiplied
        by its weight (sum them with ``total_loss``).
        """
        check_targets(targets, batch_size=outputs.class_logits.shape[0])
        device = outputs.mask_logits.device
        targets = _prepare_targets(targets, tuple(outputs.mask_logits.shape[-2:]), device)
        self._check_labels(targets)
        num_masks = _average_num_masks(targets, device)

        layers = [(outputs.class_logits, outputs.mask_logits, "")]
        layers += [(c, m, f"_{i}") for i, (c, m) in enumerate(outputs.aux_outputs)]
        losses: dict[str, Tensor] = {}
        for class_logits, mask_logits, suffix in layers:
            layer = self._layer_losses(class_logits, mask_logits, targets, num_masks)
            losses.update({name + suffix: value for name, value in layer.items()})
        return losses

    def _layer_losses(
        self,
        class_logits: Tensor,
        mask_logits: Tensor,
        targets: Sequence[Target],
        num_masks: Tensor,
    ) -> dict[str, Tensor]:
        """Weighted ``loss_ce``, ``loss_mask`` and ``loss_dice`` of one decoder layer."""
        if class_logits.dim() != 3 or class_logits.shape[-1] != self.num_classes + 1:
            raise ValueError(
                f"class_logits must be [B,Q,{self.num_classes + 1}] ({self.num_classes} classes "
                f"+ no object), got {tuple(class_logits.shape)}"
            )
        indices = self.matcher(class_logits, mask_logits, targets)
        loss_mask, loss_dice = self._mask_losses(mask_logits, targets, indices, num_masks)
        return {
            "loss_ce": self.class_weight * self._class_loss(class_logits, targets, indices),
            "loss_mask": self.mask_weight * loss_mask,
            "loss_dice": self.dice_weight * loss_dice,
        }

    def _class_loss(
        self, class_logits: Tensor, targets: Sequence[Target], indices: list[tuple[Tensor, Tensor]]
    ) -> Tensor:
        """Cross-entropy of ``class_logits [B,Q,C+1]``.

        Matched queries are supervised with their segment's class, the others with the
        no-object class ``C``.
        """
        target_classes = torch.full(
            class_logits.shape[:2], self.num_classes, dtype=torch.int64, device=class_logits.device
        )
        for b, (target, (queries, segments)) in enumerate(zip(targets, indices)):
            target_classes[b, queries] = target["labels"][segments]
        # float32 (as autocast would choose) whatever precision the model ran in.
        weight = self.class_loss_weight.to(class_logits.device)
        return F.cross_entropy(class_logits.float().transpose(1, 2), target_classes, weight=weight)

    def _mask_losses(
        self,
        mask_logits: Tensor,
        targets: Sequence[Target],
        indices: list[tuple[Tensor, Tensor]],
        num_masks: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """Sigmoid cross-entropy and dice of the matched ``mask_logits [B,Q,h,w]``.

        Each is summed over matched segments and divided by ``num_masks``.
        """
        pred = torch.cat([masks[q] for masks, (q, _) in zip(mask_logits, indices)])[:, None]
        gt = torch.cat([t["masks"][s] for t, (_, s) in zip(targets, indices)])[:, None]
        with torch.no_grad():
            coords = uncertainty_point_coords(
                pred,
                mask_uncertainty,
                self.num_points,
                self.oversample_ratio,
                self.importance_sample_ratio,
            )
            point_labels = point_sample(gt, coords)[:, 0]
        # Losses in float32 (as autocast would choose) whatever precision the model ran in.
        point_logits = point_sample(pred, coords)[:, 0].float()

        bce = F.binary_cross_entropy_with_logits(point_logits, point_labels, reduction="none")
        loss_mask = bce.mean(1).sum() / num_masks
        loss_dice = dice_loss(point_logits, point_labels).sum() / num_masks
        return loss_mask, loss_dice

    def _check_labels(self, targets: Sequence[Target]) -> None:
        labels = torch.cat([t["labels"] for t in targets])
        # One device synchronisation per step; a bad label would otherwise surface as an
        # opaque indexing error (or a CUDA device-side assert) deep in the loss.
        if labels.numel() and ((labels < 0) | (labels >= self.num_classes)).any():
            raise ValueError(
                f"target labels must lie in [0, {self.num_classes}), got values from "
                f"{labels.min().item()} to {labels.max().item()}"
            )


def mask_uncertainty(logits: Tensor) -> Tensor:
    """Uncertainty of mask ``logits``: ``-|logit|``, highest on the decision boundary."""
    return -logits.abs()


def dice_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Dice loss (+1 smoothed) of each ``logits [M,P]`` row against its ``targets [M,P]`` row.

    Returns ``[M]``.
    """
    probs = logits.sigmoid()
    numerator = 2 * (probs * targets).sum(-1)
    denominator = probs.sum(-1) + targets.sum(-1)
    return 1 - (numerator + 1) / (denominator + 1)


def total_loss(losses: Mapping[str, Tensor]) -> Tensor:
    """The sum of a ``SetCriterion`` loss dict (the weights are already applied)."""
    if not losses:
        raise ValueError("no losses to sum")
    return torch.stack(list(losses.values())).sum()


def _prepare_targets(
    targets: Sequence[Target], pred_size: tuple[int, int], device: torch.device
) -> list[Target]:
    """Targets on ``device``, masks as float zero-padded bottom/right to the batch's largest.

    Raises ``ValueError`` when the padded masks cannot cover the same extent as predictions of
    ``pred_size`` at an integer stride (e.g. masks at the unpadded image size).
    """
    height = max(t["masks"].shape[-2] for t in targets)
    width = max(t["masks"].shape[-1] for t in targets)
    # The model's feature maps round sizes up, so H = ceil(H_in / stride) for the true stride.
    stride = max(1, round(height / pred_size[0]))
    if (math.ceil(height / stride), math.ceil(width / stride)) != pred_size:
        raise ValueError(
            f"target masks of size {height}x{width} do not cover the same image extent as mask "
            f"logits of size {pred_size[0]}x{pred_size[1]}; give masks at the size of the padded "
            "input batch"
        )
    return [
        Target(
            labels=t["labels"].to(device),
            masks=F.pad(
                t["masks"].to(device, torch.float32),
                (0, width - t["masks"].shape[-1], 0, height - t["masks"].shape[-2]),
            ),
        )
        for t in targets
    ]


def _average_num_masks(targets: Sequence[Target], device: torch.device) -> Tensor:
    """Number of target segments per process (averaged over DDP ranks), at least 1.

    Every rank divides by the same count, so the gradient does not depend on how segments
    happen to be spread over the ranks.
    """
    num_masks = torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(num_masks)
        num_masks = num_masks / dist.get_world_size()
    return num_masks.clamp(min=1)
