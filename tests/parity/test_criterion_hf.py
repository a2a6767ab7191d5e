"""Matcher and criterion against HF transformers' ``Mask2FormerHungarianMatcher`` and
``Mask2FormerLoss`` (a port of the reference detectron2 code), at the real point counts.

Both draw random points with ``torch.rand`` in the same order and shapes (matcher per
image, then the uncertainty sampling of the mask loss, last layer first, then each auxiliary
layer), so seeding torch identically before each call makes them sample the same points.

Deliberate differences, neither exercised here:
- HF returns unweighted losses (``loss_cross_entropy``, ``loss_mask``, ``loss_dice``) and
  weights them in the model; segscope returns them weighted, the first named ``loss_ce``.
- HF's matcher samples each image's masks at their own size while its loss pads them to the
  largest in the batch; segscope pads once and matches on padded masks, as detectron2 does
  (its targets are padded to the image batch before matching). The two agree when every
  image's masks share a size, the case compared here.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

transformers = pytest.importorskip("transformers")
hf_modeling = pytest.importorskip("transformers.models.mask2former.modeling_mask2former")

from segscope.config import Mask2FormerConfig  # noqa: E402
from segscope.models.mask2former.criterion import SetCriterion, total_loss  # noqa: E402
from segscope.models.mask2former.matcher import HungarianMatcher, Target  # noqa: E402

NUM_CLASSES = 7
NUM_QUERIES = 12
HF_NAMES = {"loss_cross_entropy": "loss_ce", "loss_mask": "loss_mask", "loss_dice": "loss_dice"}


@dataclass
class Outputs:
    class_logits: torch.Tensor
    mask_logits: torch.Tensor
    aux_outputs: list[tuple[torch.Tensor, torch.Tensor]]


def _targets(counts: list[int], size: int = 64) -> list[Target]:
    return [
        Target(
            labels=torch.randint(0, NUM_CLASSES, (n,)),
            masks=torch.rand(n, size, size) > torch.rand(n, 1, 1),
        )
        for n in counts
    ]


def _layer(batch_size: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.randn(batch_size, NUM_QUERIES, NUM_CLASSES + 1, requires_grad=True),
        (3 * torch.randn(batch_size, NUM_QUERIES, size, size)).requires_grad_(),
    )


@pytest.mark.parametrize("counts", [[3, 5], [12, 1], [0, 4], [15]])
def test_matcher_indices_equal_hf(counts: list[int]) -> None:
    torch.manual_seed(sum(counts))
    targets = _targets(counts)
    class_logits, mask_logits = _layer(len(counts))
    ours = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=12544)
    theirs = hf_modeling.Mask2FormerHungarianMatcher(
        cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=12544
    )

    torch.manual_seed(0)
    our_indices = ours(class_logits, mask_logits, targets)
    torch.manual_seed(0)
    hf_indices = theirs(
        mask_logits,
        class_logits,
        [t["masks"].float() for t in targets],
        [t["labels"] for t in targets],
    )

    for (our_q, our_t), (hf_q, hf_t) in zip(our_indices, hf_indices):
        assert torch.equal(our_q, hf_q)
        assert torch.equal(our_t, hf_t)


@pytest.mark.parametrize("counts", [[3, 5], [0, 2]])
def test_losses_and_gradients_equal_hf(counts: list[int]) -> None:
    torch.manual_seed(len(counts) + sum(counts))
    targets = _targets(counts)
    layers = [_layer(len(counts)) for _ in range(3)]
    cfg = Mask2FormerConfig(num_classes=NUM_CLASSES)
    ours = SetCriterion.from_config(cfg)
    hf_config = transformers.Mask2FormerConfig(num_labels=NUM_CLASSES)
    theirs = hf_modeling.Mask2FormerLoss(hf_config, weight_dict={})
    weights = {
        "loss_ce": cfg.class_weight,
        "loss_mask": cfg.mask_weight,
        "loss_dice": cfg.dice_weight,
    }

    torch.manual_seed(0)
    our_losses = ours(Outputs(*layers[-1], aux_outputs=layers[:-1]), targets)
    our_grads = torch.autograd.grad(total_loss(our_losses), [t for layer in layers for t in layer])

    torch.manual_seed(0)
    hf_losses = theirs(
        layers[-1][1],
        layers[-1][0],
        [t["masks"].float() for t in targets],
        [t["labels"] for t in targets],
        [{"class_queries_logits": c, "masks_queries_logits": m} for c, m in layers[:-1]],
    )
    hf_weighted = {}
    for hf_name, value in hf_losses.items():
        base = next(name for name in HF_NAMES if hf_name.startswith(name))
        name = hf_name.replace(base, HF_NAMES[base])
        hf_weighted[name] = weights[HF_NAMES[base]] * value
    hf_total = torch.stack(list(hf_weighted.values())).sum()
    hf_grads = torch.autograd.grad(hf_total, [t for layer in layers for t in layer])

    assert set(our_losses) == set(hf_weighted)
    for name, value in our_losses.items():
        torch.testing.assert_close(value, hf_weighted[name], rtol=0, atol=1e-5)
    for our_grad, hf_grad in zip(our_grads, hf_grads):
        torch.testing.assert_close(our_grad, hf_grad, rtol=0, atol=1e-6)
