"""Multi-scale deformable attention at the pixel decoder's real sizes: CPU gather path vs grid_sample.

The op as Mask2Former's pixel decoder calls it on an 800 x 1216 image: the stride 8, 16 and 32
levels ((100, 152), (50, 76), (25, 38)), every one of the 19,950 positions a query, 8 heads of
32 channels, 4 points per level, batch 1. Both implementations run on the same inputs in one
run; reported: median seconds of the repeats after one warm-up, the ratio (grid_sample time /
gather time; above 1 means the gather path is faster) and the largest absolute differences of
the output and of the three gradients.

Sampling locations are the queries' own positions plus offsets of a few pixels (``local``,
what a trained decoder predicts, some of them off the map) or uniform over a margin around
each map (``uniform``, no locality: the slow end for both).

    python benchmarks/bench_ms_deform_attn.py --repeats 5
    python benchmarks/bench_ms_deform_attn.py --locations uniform --json results.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from segscope.models.ops.ms_deform_attn import (
    deformable_attention_gather,
    deformable_attention_grid_sample,
    level_reference_points,
)

SHAPES_800x1216 = [(100, 152), (50, 76), (25, 38)]
IMPLEMENTATIONS = {"grid_sample": deformable_attention_grid_sample, "gather": deformable_attention_gather}


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up: allocator, caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_inputs(
    shapes: list[tuple[int, int]], heads: int, head_dim: int, points: int, locations: str, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``value [1,S,M,D]``, ``locations [1,S,M,L,P,2]``, ``weights [1,S,M,L,P]``; every position a query."""
    generator = torch.Generator().manual_seed(0)
    levels = len(shapes)
    num_values = sum(h * w for h, w in shapes)
    value = torch.randn(1, num_values, heads, head_dim, generator=generator, dtype=dtype)
    shape = (1, num_values, heads, levels, points, 2)
    if locations == "local":
        centres = level_reference_points(shapes, 1, torch.device("cpu"))[:, :, :, None, None, :].to(dtype)
        extent = torch.tensor([(w, h) for h, w in shapes], dtype=dtype)[:, None, :]
        sampled = centres + 2.0 * torch.randn(shape, generator=generator, dtype=dtype) / extent
    else:
        sampled = torch.rand(shape, generator=generator, dtype=dtype) * 1.2 - 0.1
    logits = torch.randn(1, num_values, heads, levels * points, generator=generator, dtype=dtype)
    weights = logits.softmax(-1).view(1, num_values, heads, levels, points)
    return value, sampled.contiguous(), weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--points", type=int, default=4)
    parser.add_argument("--locations", choices=("local", "uniform"), default="local")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", default=None, help="also write the results to this path")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    value, locations, weights = make_inputs(
        SHAPES_800x1216, args.heads, args.head_dim, args.points, args.locations, dtype
    )
    grad_output = torch.randn(value.shape[0], locations.shape[1], args.heads * args.head_dim, dtype=dtype)

    def forward(name: str) -> torch.Tensor:
        with torch.no_grad():
            return IMPLEMENTATIONS[name](value, SHAPES_800x1216, locations, weights)

    def forward_backward(name: str) -> tuple[torch.Tensor, ...]:
        inputs = [t.detach().requires_grad_() for t in (value, locations, weights)]
        output = IMPLEMENTATIONS[name](inputs[0], SHAPES_800x1216, inputs[1], inputs[2])
        return torch.autograd.grad(output, inputs, grad_output)

    output_diff = (forward("gather") - forward("grid_sample")).abs().max().item()
    grad_diffs = [
        (ours - ref).abs().max().item()
        for ours, ref in zip(forward_backward("gather"), forward_backward("grid_sample"))
    ]
    results: dict[str, object] = {
        "config": {
            "shapes": SHAPES_800x1216,
            "queries": locations.shape[1],
            "heads": args.heads,
            "head_dim": args.head_dim,
            "points": args.points,
            "locations": args.locations,
            "dtype": args.dtype,
            "threads": torch.get_num_threads(),
            "repeats": args.repeats,
            "torch": torch.__version__,
        },
        "max_abs_diff": {
            "output": output_diff,
            "grad_value": grad_diffs[0],
            "grad_locations": grad_diffs[1],
            "grad_weights": grad_diffs[2],
        },
        "seconds": {},
    }
    print(
        f"queries {locations.shape[1]}, levels {SHAPES_800x1216}, {args.heads} heads x {args.head_dim}, "
        f"{args.points} points, {args.locations} locations, {args.dtype}, {torch.get_num_threads()} threads"
    )
    print("| pass | grid_sample (s) | gather (s) | ratio |")
    print("| --- | --- | --- | --- |")
    for label, run in (("forward", forward), ("forward + backward", forward_backward)):
        reference = median_seconds(lambda: run("grid_sample"), args.repeats)
        gather = median_seconds(lambda: run("gather"), args.repeats)
        results["seconds"][label] = {"grid_sample": reference, "gather": gather, "ratio": reference / gather}
        print(f"| {label} | {reference:.3f} | {gather:.3f} | {reference / gather:.2f} |")
    print(
        f"max |diff|: output {output_diff:.2e}, grad value {grad_diffs[0]:.2e}, "
        f"grad locations {grad_diffs[1]:.2e}, grad weights {grad_diffs[2]:.2e}"
    )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
