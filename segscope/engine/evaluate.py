"""Running a model over an annotated dataset and scoring it with the standard metrics."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from segscope.data.coco import CocoInstanceDataset, CocoPanopticDataset
from segscope.data.semantic import SemanticSegDataset
from segscope.engine.distributed import DistributedContext
from segscope.engine.sharding import shard_indices
from segscope.errors import OptionError
from segscope.evaluation import CocoEvaluator, PanopticEvaluator, SemanticEvaluator
from segscope.loading import LoadedModel
from segscope.pipeline import SegmentationPipeline
from segscope.results import SegmentationResult

_SINGLE = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _check_categories(
    loaded: LoadedModel, dataset_ids: tuple[int, ...], source: str, things_only: bool = False
) -> None:
    """Refuse a model whose categories (or thing categories) the dataset does not define."""
    categories = loaded.description.categories
    model_ids = {c.id for c in categories if c.isthing or not things_only}
    unknown = sorted(model_ids - set(dataset_ids))
    if unknown:
        raise OptionError(f"the model predicts category ids {unknown[:10]} that {source} does not define")


def _run(
    loaded: LoadedModel,
    dataset: Dataset,
    task: str,
    evaluator: Any,
    update: Callable[[dict[str, Any], SegmentationResult], None],
    device: torch.device | str | None,
    context: DistributedContext,
    **pipeline_options: Any,
) -> dict[str, Any]:
    """Segment this process's share of ``dataset``, feed ``update``, combine, compute."""
    segment = SegmentationPipeline(loaded, task=task, device=device, **pipeline_options)
    for index in tqdm(shard_indices(len(dataset), context), desc=task, disable=not context.is_main, unit="img"):
        item = dataset[index]
        update(item, segment(item["image"]))
    evaluator.sync()
    return evaluator.compute()


def evaluate_panoptic(
    loaded: LoadedModel,
    dataset: CocoPanopticDataset,
    device: torch.device | str | None = None,
    context: DistributedContext = _SINGLE,
) -> dict[str, Any]:
    """PQ, SQ, RQ (All, Things, Stuff, per class) of ``loaded`` on ``dataset``."""
    _check_categories(loaded, dataset.categories.ids, str(dataset.annotation_file))
    evaluator = PanopticEvaluator(dataset.categories)

    def update(item: dict[str, Any], result: SegmentationResult) -> None:
        predicted = [{"id": s["id"], "category_id": s["category_id"]} for s in result.segments_info]
        evaluator.update(result.panoptic_seg, predicted, item["pan_seg"], item["segments_info"])

    results = _run(loaded, dataset, "panoptic", evaluator, update, device, context)
    if context.is_main:
        print(PanopticEvaluator.format_table(results))
    return results


def evaluate_semantic(
    loaded: LoadedModel,
    dataset: SemanticSegDataset,
    device: torch.device | str | None = None,
    context: DistributedContext = _SINGLE,
) -> dict[str, Any]:
    """mIoU, aAcc, mAcc of ``loaded`` on a semantic label-map dataset."""
    evaluator = SemanticEvaluator(len(loaded.description.categories), ignore_index=dataset.ignore_index)

    def update(item: dict[str, Any], result: SegmentationResult) -> None:
        evaluator.update(result.semantic_seg, item["sem_seg"])

    results = _run(loaded, dataset, "semantic", evaluator, update, device, context)
    if context.is_main:
        print(SemanticEvaluator.format_table(results, loaded.description.categories.names))
    return results


def evaluate_instances(
    loaded: LoadedModel,
    dataset: CocoInstanceDataset,
    device: torch.device | str | None = None,
    context: DistributedContext = _SINGLE,
) -> dict[str, Any]:
    """COCO box and mask AP of ``loaded`` on an instances dataset (pycocotools)."""
    # A panoptic model's instances are its thing classes: only those must be in the dataset.
    _check_categories(loaded, dataset.categories.ids, str(dataset.annotation_file), things_only=True)
    evaluator = CocoEvaluator(dataset.annotation_file)
    categories = loaded.description.categories

    def update(item: dict[str, Any], result: SegmentationResult) -> None:
        category_ids = [categories[i].id for i in result.label_ids]
        evaluator.update(item["image_id"], result.boxes, result.scores, category_ids, result.masks)

    # Every detection counts towards AP, low scores included (COCO protocol).
    results = _run(loaded, dataset, "instance", evaluator, update, device, context, threshold=0.0)
    if context.is_main:
        print(CocoEvaluator.format_table(results))
    return results


def evaluate(
    loaded: LoadedModel,
    data_root: str | Path,
    task: str,
    split: str,
    device: torch.device | str | None = None,
    context: DistributedContext = _SINGLE,
) -> dict[str, Any]:
    """Evaluate on ``data_root`` in the COCO layout for ``task`` (panoptic, semantic, instance).

    Layout: images in ``{split}/``; panoptic ``annotations/panoptic_{split}.json`` with PNGs in
    ``panoptic_{split}/``; instances ``annotations/instances_{split}.json``; semantic label
    PNGs (class index, 255 unlabeled) in ``semantic_{split}/``.
    """
    if task == "panoptic":
        return evaluate_panoptic(loaded, CocoPanopticDataset(data_root, split), device, context)
    if task == "instance":
        return evaluate_instances(loaded, CocoInstanceDataset(data_root, split), device, context)
    if task == "semantic":
        root = Path(data_root)
        # With the model's classes, a label outside them is refused as its file is read.
        dataset = SemanticSegDataset(root / split, root / f"semantic_{split}", categories=loaded.description.categories)
        return evaluate_semantic(loaded, dataset, device, context)
    raise OptionError(f"unknown task {task!r}; expected panoptic, semantic or instance")
