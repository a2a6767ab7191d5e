"""Standard segmentation metrics as accumulators fed one image at a time.

Each evaluator has ``update(...)`` per image, ``compute() -> dict``, ``reset()``,
``state_dict()`` / ``load_state_dict()`` / ``merge()`` for combining shards, ``sync()`` for
``torch.distributed`` runs and a static ``format_table(results) -> str``.
"""

from segscope.evaluation.coco import CocoEvaluator
from segscope.evaluation.panoptic import PanopticEvaluator
from segscope.evaluation.rle import masks_to_rle, rle_to_masks
from segscope.evaluation.semantic import SemanticEvaluator

__all__ = [
    "CocoEvaluator",
    "PanopticEvaluator",
    "SemanticEvaluator",
    "masks_to_rle",
    "rle_to_masks",
]
