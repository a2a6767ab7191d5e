"""``benchmarks/bench_postprocess.py`` at a toy size: both kinds of logits, every task timed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_postprocess  # noqa: E402  (a script beside the package, not part of it)


def test_scene_logits_split_the_image_among_confident_queries() -> None:
    class_logits, mask_logits = bench_postprocess.scene_logits(30, 12, (20, 28), regions=5, seed=1)
    assert class_logits.shape == (30, 13) and mask_logits.shape == (30, 20, 28)
    owners = mask_logits.argmax(0)
    assert set(owners.unique().tolist()) <= set(range(5))  # only the region queries cover pixels
    assert bool((mask_logits[5:] < 0).all())
    probs = class_logits.softmax(-1)
    assert bool((probs[:5, :-1].max(1).values > 0.9).all()) and bool((probs[5:, -1] > 0.9).all())


@pytest.mark.parametrize("kind", sorted(bench_postprocess.LOGITS))
def test_every_task_is_timed_on_both_sides(kind: str) -> None:
    case = bench_postprocess.Case("24x32", (6, 8), (24, 32), (24, 32), (24, 32))
    with torch.inference_mode():
        results = bench_postprocess.time_postprocess(case, num_queries=10, num_classes=5, repeats=1, logits=kind)
    assert set(results) == set(bench_postprocess.TASKS)
    for row in results.values():
        assert row["hf"] > 0 and row["segscope"] > 0
        assert row["ratio"] == pytest.approx(row["segscope"] / row["hf"])
