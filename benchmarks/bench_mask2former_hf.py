"""segscope's Mask2Former against HF transformers' on the same weights and inputs.

Both models are built from one random-initialised transformers checkpoint (saved with
``save_pretrained`` and loaded by segscope's converter), run in eval mode on the same
normalized batch, and timed one after the other; the table reports median seconds per forward pass
and the ratio HF / segscope (above 1: segscope is faster).

    python benchmarks/bench_mask2former_hf.py --backbone swin --size 512 704 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, ResNetConfig, SwinConfig

import segscope

STAGES = ["stage1", "stage2", "stage3", "stage4"]


def build_reference(backbone: str) -> Mask2FormerForUniversalSegmentation:
    if backbone == "swin":
        backbone_config = SwinConfig(
            embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7, out_features=STAGES
        )
    else:
        backbone_config = ResNetConfig(out_features=STAGES)
    torch.manual_seed(0)
    config = Mask2FormerConfig(backbone_config=backbone_config, num_labels=133)
    return Mask2FormerForUniversalSegmentation(config).eval()


def median_seconds(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", choices=("swin", "resnet"), default="swin")
    parser.add_argument("--size", type=int, nargs=2, default=(512, 704), metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    reference = build_reference(args.backbone)
    with tempfile.TemporaryDirectory() as directory:
        reference.save_pretrained(directory)
        ours = segscope.load_model(directory)
    reference, ours = reference.to(args.device), ours.to(args.device)
    images = torch.randn(args.batch, 3, *args.size, device=args.device)

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def run_reference() -> None:
        reference(pixel_values=images)
        sync()

    def run_ours() -> None:
        ours(images)
        sync()

    with torch.inference_mode():
        run_reference(), run_ours()  # warm-up
        diff = (ours(images).mask_logits - reference(pixel_values=images).masks_queries_logits).abs().max().item()
        reference_s = median_seconds(run_reference, args.repeats)
        ours_s = median_seconds(run_ours, args.repeats)
    print(f"device {args.device}, threads {torch.get_num_threads()}, backbone {args.backbone}, "
          f"batch {args.batch} x {args.size[0]}x{args.size[1]}, max |mask logit diff| {diff:.1e}")
    print(f"{'implementation':<24}{'s / forward':>12}")
    print(f"{'HF transformers':<24}{reference_s:>12.3f}")
    print(f"{'segscope':<24}{ours_s:>12.3f}")
    print(f"ratio HF / segscope: {reference_s / ours_s:.2f}")


if __name__ == "__main__":
    main()
