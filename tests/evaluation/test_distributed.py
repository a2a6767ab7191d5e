"""``sync()`` over two gloo processes gives every rank the single-process result."""

from __future__ import annotations

import numpy as np
import torch.distributed as dist
import torch.multiprocessing as mp

from segscope.evaluation import CocoEvaluator, PanopticEvaluator, SemanticEvaluator

WORLD_SIZE = 2
CATEGORIES = [(1, True), (2, False)]
GT_COCO = {
    "images": [{"id": i, "height": 8, "width": 8} for i in (1, 2)],
    "annotations": [
        {"id": i, "image_id": i, "category_id": 1, "bbox": [0, 0, 4, 4], "area": 16, "iscrowd": 0}
        for i in (1, 2)
    ],
    "categories": [{"id": 1, "name": "thing"}],
}


def feed(rank: int, panoptic: PanopticEvaluator, semantic: SemanticEvaluator, coco: CocoEvaluator) -> None:
    """Rank ``rank``'s share of a two-image dataset: image ``rank`` + 1."""
    rng = np.random.default_rng(rank)
    semantic.update(rng.integers(0, 3, size=(6, 6)), rng.integers(0, 3, size=(6, 6)))
    gt = np.repeat(np.array([1, 1, 2, 2, 2, 2]), 6).reshape(6, 6)
    pred = np.roll(gt, 2 * rank, axis=0)  # exact on rank 0; on rank 1 the person is missed
    segments = [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 2}]
    panoptic.update(pred, segments, gt, [{**s, "iscrowd": 0} for s in segments])
    box = [0, 0, 4, 4] if rank == 0 else [4, 4, 8, 8]  # rank 1's detection misses
    coco.update(rank + 1, np.array([box]), np.array([0.9]), np.array([1]))


def evaluators() -> tuple[PanopticEvaluator, SemanticEvaluator, CocoEvaluator]:
    return PanopticEvaluator(CATEGORIES), SemanticEvaluator(3), CocoEvaluator(GT_COCO, iou_types=("bbox",))


def worker(rank: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        synced = evaluators()
        feed(rank, *synced)
        for ev in synced:
            ev.sync()
        whole = evaluators()
        for r in range(WORLD_SIZE):
            feed(r, *whole)
        for a, b in zip(synced, whole):
            assert repr(a.compute()) == repr(b.compute()), (type(a).__name__, a.compute(), b.compute())
    finally:
        dist.destroy_process_group()


def test_sync_over_two_processes_equals_one_process(tmp_path) -> None:
    mp.spawn(worker, args=(str(tmp_path / "init"),), nprocs=WORLD_SIZE, join=True)


def test_sync_is_a_no_op_outside_distributed_runs() -> None:
    single = evaluators()
    feed(0, *single)
    before = [ev.compute() for ev in single]
    for ev in single:
        ev.sync()
    assert repr([ev.compute() for ev in single]) == repr(before)
