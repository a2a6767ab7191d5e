"""Running a model over an annotated dataset and scoring it with the standard metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from segscope.data.coco import CocoInstanceDataset, CocoPanopticDataset
from segscope.data.semantic import SemanticSegDataset
from segscope.engine.distributed import DistributedContext
from segscope.evaluation import CocoEvaluator, PanopticEvaluator, SemanticEvaluator
from segscope.loading import LoadedModel
from segscope.pipeline import SegmentationPipeline

_SINGLE = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _shard(length: int, context: DistributedContext) -> range:
    """This process's share of ``length`` items: every image exactly once over the job."""
    return range(context.rank, length, context.world_size)


def _check_categories(loaded: LoadedModel, dataset_ids: tuple[int, ...], source: str) -> None:
    model_ids = set(loaded.description.categories.ids)
    unknown = sorted(model_ids - set(dataset_ids))
    if unknown:
        raise ValueError(f"the model predicts category ids {unknown[:10]} that {source} does not define")


def evaluate_panoptic(
    loaded: LoadedModel,
    dataset: CocoPanopticDataset,
    device: torch.device | str | None = None,
    context: DistributedContext = _SINGLE,
) -> dict[str, Any]:
    """PQ, SQ, RQ (All, Things, Stuff, per class) of ``loaded`` on ``dataset``."""
    _check_categories(loaded, dataset.categories.ids, str(dataset.annotation_file))
    segment = SegmentationPipeline(loaded, task="panoptic", device=device)
    evaluator = PanopticEvaluator(dataset.categories)
    for index in tqdm(_shard(len(dataset), context), desc="PQ", disable=not context.is_main, unit="img"):
        item = dataset[index]
        result = segment(item["image"])
        predicted = [{"id": s["id"], "category_id": s["category_id"]} for s in result.segments_info]
        evaluator.update(result.panoptic_seg, predicted, item["pan_seg"], item["segments_info"])
    evaluator.sync()
    results = evaluator.compute()
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
    num_classes = len(loaded.description.categories)
    segment = SegmentationPipeline(loaded, task="semantic", device=device)
    evaluator = SemanticEvaluator(num_classes, ignore_index=dataset.ignore_index)
    for index in tqdm(_shard(len(dataset), context), desc="mIoU", disable=not context.is_main, unit="img"):
        item = dataset[index]
        evaluator.update(segment(item["image"]).semantic_seg, item["sem_seg"])
    evaluator.sync()
    results = evaluator.compute()
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
    _check_categories(loaded, dataset.categories.ids, str(dataset.annotation_file))
    # Every detection counts towards AP, low scores included (COCO protocol).
    segment = SegmentationPipeline(loaded, task="instance", device=device, threshold=0.0)
    evaluator = CocoEvaluator(dataset.annotation_file)
    for index in tqdm(_shard(len(dataset), context), desc="AP", disable=not context.is_main, unit="img"):
        item = dataset[index]
        result = segment(item["image"])
        category_ids = [loaded.description.categories[i].id for i in result.label_ids]
        evaluator.update(item["image_id"], result.boxes, result.scores, category_ids, result.masks)
    evaluator.sync()
    results = evaluator.compute()
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
        return evaluate_semantic(loaded, SemanticSegDataset(root / split, root / f"semantic_{split}"), device, context)
    raise ValueError(f"unknown task {task!r}; expected panoptic, semantic or instance")
