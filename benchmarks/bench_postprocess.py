"""Mask2Former post-processing: HF transformers' ``post_process_*`` vs segscope's architecture.

Both sides read the same logits of one image, ``class_logits [Q,C+1]`` and ``mask_logits [Q,h,w]``
at stride 4 of the padded input, and bring their result to the original size. Two kinds of
logits: ``noise`` (white-noise masks, ten queries confident of a class: the worst case for
segscope's semantic tiles, whose every tile may hold every class) and ``scene`` (a trained
model's kind: twenty queries each confident of one class and sure of one smooth region, the
rest "no object"). HF is called with ``target_sizes``
(it resizes mask logits to 384 x 384 first, then its results to the target size); segscope
with ``get_architecture("mask2former").postprocess`` (detectron2's rules). The table reports
median seconds after a warm-up and the ratio segscope / HF (below 1: segscope is faster).
Semantic: HF scores the classes on 384 x 384 masks and resizes the ``[C,H,W]`` scores; segscope
follows detectron2 (resize the ``[Q,h,w]`` mask logits, then score every pixel of the original
size), so it does up to ``Q x C`` multiply-adds per original pixel (fewer where it proves that
a class cannot win there), and returns labels and confidence.

    python benchmarks/bench_postprocess.py --repeats 5 [--logits noise scene] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

from segscope.models.mask2former.model import Mask2FormerOutput
from segscope.predictions import ImageSizes
from segscope.registry import get_architecture

TASKS = ("panoptic", "semantic", "instance")
NUM_THINGS = 80  # COCO panoptic: classes 0-79 are things, the rest stuff


@dataclass(frozen=True)
class Case:
    """One image: ``logit_size`` (stride-4 of ``padded``), ``resized`` and ``original`` sizes."""

    name: str
    logit_size: tuple[int, int]
    padded: tuple[int, int]
    resized: tuple[int, int]
    original: tuple[int, int]


CASES = (
    Case("800x1216", (200, 304), (800, 1216), (800, 1216), (800, 1216)),
    Case("512x512", (128, 128), (512, 512), (512, 512), (512, 512)),
)


def random_logits(
    num_queries: int, num_classes: int, logit_size: tuple[int, int], confident: int = 10, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``class_logits [Q,C+1]`` with ``confident`` queries sure of one class, ``mask_logits [Q,h,w]``."""
    generator = torch.Generator().manual_seed(seed)
    class_logits = torch.randn(num_queries, num_classes + 1, generator=generator)
    sure = torch.randperm(num_queries, generator=generator)[:confident]
    class_logits[sure, torch.randint(num_classes, (confident,), generator=generator)] += 10.0
    mask_logits = 3 * torch.randn(num_queries, *logit_size, generator=generator)
    return class_logits, mask_logits


def scene_logits(
    num_queries: int, num_classes: int, logit_size: tuple[int, int], regions: int = 20, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits shaped like a trained model's: the image split into ``regions`` (nearest of random
    centres), each the mask of one query confident of one class (logit +6 inside, -6 outside,
    edges softened over a few pixels; at most one region per query); the other queries say "no
    object" and cover nothing."""
    generator = torch.Generator().manual_seed(seed)
    height, width = logit_size
    regions = min(regions, num_queries)
    centres = torch.rand(regions, 2, generator=generator) * torch.tensor([height, width])
    ys, xs = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    region = ((ys - centres[:, :1, None]) ** 2 + (xs - centres[:, 1:, None]) ** 2).argmin(0)  # [h,w]
    mask_logits = torch.full((num_queries, height, width), -6.0)
    mask_logits[:regions] = torch.where(region == torch.arange(regions)[:, None, None], 6.0, -6.0)
    mask_logits = F.avg_pool2d(mask_logits[None], 5, stride=1, padding=2, count_include_pad=False)[0]
    mask_logits += 0.5 * torch.randn(mask_logits.shape, generator=generator)
    class_logits = torch.randn(num_queries, num_classes + 1, generator=generator)
    class_logits[torch.arange(regions), torch.randint(num_classes, (regions,), generator=generator)] += 10.0
    class_logits[regions:, num_classes] += 10.0
    return class_logits, mask_logits


LOGITS = {"noise": random_logits, "scene": scene_logits}


def median_seconds(runs: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median wall time of each of ``runs`` over ``repeats`` calls, after one warm-up call each.

    The runs take turns (a, b, a, b, ...) so that on a shared machine a burst of load from
    elsewhere slows both sides alike rather than one of them.
    """
    times: dict[str, list[float]] = {name: [] for name in runs}
    for name, run in runs.items():
        run()
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(seconds) for name, seconds in times.items()}


def time_postprocess(
    case: Case = CASES[0],
    num_queries: int = 100,
    num_classes: int = 133,
    repeats: int = 5,
    seed: int = 0,
    logits: str = "noise",
) -> dict[str, dict[str, float]]:
    """Median seconds per task: ``{task: {"hf": s, "segscope": s, "ratio": segscope / hf}}``."""
    from transformers import Mask2FormerImageProcessor

    class_logits, mask_logits = LOGITS[logits](num_queries, num_classes, case.logit_size, seed=seed)
    is_thing = torch.arange(num_classes) < NUM_THINGS
    stuff = set(range(NUM_THINGS, num_classes))
    processor = Mask2FormerImageProcessor()
    hf_outputs = SimpleNamespace(class_queries_logits=class_logits[None], masks_queries_logits=mask_logits[None])
    targets = [case.original]
    hf_runs = {
        "panoptic": lambda: processor.post_process_panoptic_segmentation(
            hf_outputs, threshold=0.8, overlap_mask_area_threshold=0.8, label_ids_to_fuse=stuff, target_sizes=targets
        ),
        "semantic": lambda: processor.post_process_semantic_segmentation(hf_outputs, target_sizes=targets),
        "instance": lambda: processor.post_process_instance_segmentation(
            hf_outputs, threshold=0.5, target_sizes=targets
        ),
    }

    architecture = get_architecture("mask2former")
    config = architecture.example_config(num_classes)
    outputs = Mask2FormerOutput(class_logits=class_logits[None], mask_logits=mask_logits[None])
    sizes = ImageSizes(case.padded, case.resized, case.original)

    def ours(task: str) -> Callable[[], Any]:
        threshold = architecture.default_threshold(config, task)
        return lambda: architecture.postprocess(config, outputs, [sizes], task, threshold, is_thing)

    results = {}
    with torch.inference_mode():
        for task in TASKS:
            seconds = median_seconds({"hf": hf_runs[task], "segscope": ours(task)}, repeats)
            results[task] = {**seconds, "ratio": seconds["segscope"] / seconds["hf"]}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--classes", type=int, default=133)
    parser.add_argument("--logits", nargs="+", choices=tuple(LOGITS), default=tuple(LOGITS))
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    table: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, {args.queries} queries, {args.classes} classes")
    print("| input | logits | task | HF transformers (s) | segscope (s) | segscope / HF |")
    print("| --- | --- | --- | --- | --- | --- |")
    for case in CASES:
        for kind in args.logits:
            rows = time_postprocess(case, args.queries, args.classes, args.repeats, logits=kind)
            table.setdefault(case.name, {})[kind] = rows
            for task, row in rows.items():
                seconds = f"{row['hf']:.3f} | {row['segscope']:.3f} | {row['ratio']:.2f}"
                print(f"| {case.name} | {kind} | {task} | {seconds} |")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(table, file, indent=2)


if __name__ == "__main__":
    main()
