"""segscope against HF transformers on CPU, stage by stage, on the same weights and inputs in one run.

For each backbone (ResNet-50, Swin-T) and input size, one random-initialised transformers
Mask2Former (133 classes, 100 queries) is saved with ``save_pretrained`` and loaded by segscope's
converter; both then run, one after the other on the same tensors:

- backbone, pixel decoder and transformer decoder, each fed the same inputs (its own model's
  outputs of the stage before), and the whole network forward;
- post-processing of the same logits to the input size for the three tasks (HF's
  ``post_process_*_segmentation`` against segscope's architecture post-processing);
- the whole pipeline on a photo of that size (HF: image processor + model +
  ``post_process_panoptic_segmentation``; segscope: ``segscope.pipeline``), both resizing to short
  side 800;
- peak resident memory of that pipeline, each side in a fresh process (Linux high-water mark,
  reset after the model is loaded).

Times are medians of ``--repeats`` runs after one warm-up, the two sides taking turns. The table
shows seconds and the ratio segscope / HF (below 1: segscope is faster); ``--json`` writes every figure.

    python benchmarks/bench_cpu.py                                   # the full table (about 15 min here)
    python benchmarks/bench_cpu.py --backbones resnet --sizes 512x512 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import (
    Mask2FormerConfig,
    Mask2FormerForUniversalSegmentation,
    Mask2FormerImageProcessor,
    ResNetConfig,
    SwinConfig,
)

import segscope

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_postprocess import LOGITS, Case, median_seconds, time_postprocess  # noqa: E402  (a sibling script)

STAGES = ["stage1", "stage2", "stage3", "stage4"]
NUM_CLASSES = 133


def build_reference(backbone: str) -> Mask2FormerForUniversalSegmentation:
    """A random transformers Mask2Former (seed 0) with a ResNet-50 or Swin-T backbone."""
    if backbone == "swin":
        backbone_config = SwinConfig(
            embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7, out_features=STAGES
        )
    else:
        backbone_config = ResNetConfig(out_features=STAGES)
    torch.manual_seed(0)
    return Mask2FormerForUniversalSegmentation(
        Mask2FormerConfig(backbone_config=backbone_config, num_labels=NUM_CLASSES)
    ).eval()


def photo(height: int, width: int) -> np.ndarray:
    """A deterministic ``[H,W,3]`` uint8 test picture (smooth gradients and blocks, not noise)."""
    y, x = np.mgrid[0:height, 0:width]
    blocks = ((x // 64 + y // 64) % 2) * 200
    picture = np.stack([(x * 255) // max(width - 1, 1), (y * 255) // max(height - 1, 1), blocks])
    return picture.transpose(1, 2, 0).astype(np.uint8)


def stage_times(reference: Mask2FormerForUniversalSegmentation, ours: torch.nn.Module, images: torch.Tensor,
                repeats: int) -> dict[str, dict[str, float]]:
    """``{stage: {"hf": s, "segscope": s}}`` for the three stages and the whole forward."""
    hf_pixel = reference.model.pixel_level_module
    hf_transformer = reference.model.transformer_module
    hf_features = hf_pixel.encoder(images).feature_maps
    hf_decoded = hf_pixel.decoder(hf_features)
    our_features = ours.backbone(images)
    our_mask_features, our_multi_scale = ours.pixel_decoder(our_features)
    runs = {
        "backbone": (lambda: hf_pixel.encoder(images), lambda: ours.backbone(images)),
        "pixel decoder": (lambda: hf_pixel.decoder(hf_features), lambda: ours.pixel_decoder(our_features)),
        "transformer decoder": (
            lambda: hf_transformer(hf_decoded.multi_scale_features, hf_decoded.mask_features),
            lambda: ours.transformer_decoder(our_multi_scale, our_mask_features),
        ),
        "whole forward": (lambda: reference(pixel_values=images), lambda: ours(images)),
    }
    return {
        stage: median_seconds({"hf": hf_run, "segscope": our_run}, repeats) for stage, (hf_run, our_run) in runs.items()
    }


def pipeline_times(reference: Mask2FormerForUniversalSegmentation, directory: str, picture: np.ndarray,
                   repeats: int) -> dict[str, float]:
    """End-to-end panoptic segmentation of ``picture`` by each library's own pipeline."""
    run_hf = hf_pipeline(reference)
    ours = segscope.pipeline("image-segmentation", model=directory, task="panoptic", device="cpu")
    return median_seconds({"hf": lambda: run_hf([picture]), "segscope": lambda: ours(picture)}, repeats)


def hf_pipeline(
    reference: Mask2FormerForUniversalSegmentation,
    processor: Mask2FormerImageProcessor | None = None,
    device: torch.device = torch.device("cpu"),
    dtype: torch.dtype = torch.float32,
) -> Callable[[list[np.ndarray]], Any]:
    """HF end to end on a list of pictures: image processor (by default short side 800, long side at
    most 1333, as segscope's default), model on ``device`` (under autocast unless ``dtype`` is
    float32) and ``post_process_panoptic_segmentation`` to each picture's size."""
    processor = processor or Mask2FormerImageProcessor()
    precision = nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)

    def run(pictures: list[np.ndarray]) -> Any:
        with torch.inference_mode():
            inputs = processor(images=[Image.fromarray(picture) for picture in pictures], return_tensors="pt")
            with precision:
                outputs = reference(
                    pixel_values=inputs["pixel_values"].to(device), pixel_mask=inputs["pixel_mask"].to(device)
                )
            return processor.post_process_panoptic_segmentation(
                outputs, target_sizes=[picture.shape[:2] for picture in pictures]
            )

    return run


def peak_memory(side: str, backbone: str, directory: str, size: tuple[int, int]) -> dict[str, float]:
    """Peak resident memory of ``side``'s pipeline on one photo, measured in a fresh process."""
    command = [sys.executable, __file__, "--memory-child", side, "--backbones", backbone,
               "--sizes", f"{size[0]}x{size[1]}", "--directory", directory]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _memory_child(side: str, directory: str, size: tuple[int, int]) -> None:
    """Load one side's model, reset the high-water mark, run its pipeline once, print the peak (MiB)."""
    picture = photo(*size)
    if side == "hf":
        run_hf = hf_pipeline(Mask2FormerForUniversalSegmentation.from_pretrained(directory).eval())

        def run(picture: np.ndarray) -> Any:
            return run_hf([picture])
    else:
        pipe = segscope.pipeline("image-segmentation", model=directory, task="panoptic", device="cpu")

        def run(picture: np.ndarray) -> Any:
            return pipe(picture)

    loaded = _status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM to the current RSS
    run(picture)
    peak = _status_mib("VmHWM")
    print(json.dumps({"loaded_mib": loaded, "peak_mib": peak, "increase_mib": peak - loaded}))


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def benchmark(backbone: str, size: tuple[int, int], repeats: int) -> dict[str, Any]:
    """Every figure for one backbone and input size."""
    reference = build_reference(backbone)
    with tempfile.TemporaryDirectory(prefix="segscope-bench-") as directory:
        reference.save_pretrained(directory)
        ours = segscope.load_model(directory).eval()
        images = torch.randn(1, 3, *size)
        with torch.inference_mode():
            logits_diff = (ours(images).mask_logits - reference(pixel_values=images).masks_queries_logits).abs().max()
            stages = stage_times(reference, ours, images, repeats)
        # Random weights keep no query above the panoptic threshold: post-processing is timed on
        # bench_postprocess.py's logits instead (white noise and a scene), at this size.
        case = Case(f"{size[0]}x{size[1]}", (size[0] // 4, size[1] // 4), size, size, size)
        post = {kind: time_postprocess(case, repeats=repeats, logits=kind) for kind in LOGITS}
        pipeline = pipeline_times(reference, directory, photo(*size), repeats)
        memory = {side: peak_memory(side, backbone, directory, size) for side in ("hf", "segscope")}
    return {
        "backbone": backbone,
        "size": list(size),
        "max_abs_mask_logit_diff": float(logits_diff),
        "seconds": {
            **stages,
            **{
                f"post-processing {task} ({kind})": {side: t[side] for side in ("hf", "segscope")}
                for kind, tasks in post.items()
                for task, t in tasks.items()
            },
            "pipeline": pipeline,
        },
        "peak_memory_mib": memory,
    }


def print_table(results: list[dict[str, Any]]) -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    for result in results:
        height, width = result["size"]
        diff = result["max_abs_mask_logit_diff"]
        print(f"\n{result['backbone']} {height}x{width} (max |mask logit diff| {diff:.1e})")
        print(f"{'':<36}{'HF (s)':>10}{'segscope (s)':>14}{'segscope/HF':>13}")
        for name, pair in result["seconds"].items():
            print(f"{name:<36}{pair['hf']:>10.3f}{pair['segscope']:>14.3f}{pair['segscope'] / pair['hf']:>13.2f}")
        memory = result["peak_memory_mib"]
        print(f"{'pipeline peak RSS (MiB)':<36}{memory['hf']['peak_mib']:>10.0f}{memory['segscope']['peak_mib']:>14.0f}"
              f"{memory['segscope']['peak_mib'] / memory['hf']['peak_mib']:>13.2f}")


def _size(text: str) -> tuple[int, int]:
    height, _, width = text.partition("x")
    return int(height), int(width)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", choices=("resnet", "swin"), default=("resnet", "swin"))
    parser.add_argument("--sizes", nargs="+", type=_size, default=((512, 512), (800, 1216)), metavar="HxW")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--memory-child", choices=("hf", "segscope"), help=argparse.SUPPRESS)
    parser.add_argument("--directory", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        _memory_child(args.memory_child, args.directory, args.sizes[0])
        return

    results = [benchmark(backbone, size, args.repeats) for backbone in args.backbones for size in args.sizes]
    print_table(results)
    if args.json:
        environment = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count()}
        args.json.write_text(json.dumps({"environment": environment, "results": results}, indent=2))


if __name__ == "__main__":
    main()
