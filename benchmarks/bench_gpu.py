"""segscope on one GPU: the deformable-attention op, forward per model and the pipeline, against HF transformers.

Same harness as ``bench_cpu.py`` (one random-initialised transformers Mask2Former per backbone, 133
classes, saved with ``save_pretrained`` and loaded by segscope's converter; both sides run on the
same tensors in one run, taking turns; medians of ``--repeats`` runs after one warm-up). Sections:

- op: multi-scale deformable attention at batch ``--batch`` on the three levels of an 800 x 1216
  input ((100,152), (50,76), (25,38): 19,950 queries, 8 heads x 32 channels, 4 points), sampling
  locations uniform over a margin around each map (some outside it), in float32 and under bfloat16
  autocast (bfloat16 values and weights, float32 locations): forward and forward + backward seconds
  of ``deformable_attention_grid_sample`` and of the fused Triton kernels
  (``triton_deformable_attention``), and the relative error (``||x - ref|| / ||ref||``) of the output
  and of the three gradients against ``grid_sample`` in float64 on the same (cast) inputs. On the CPU
  the Triton path runs only under ``TRITON_INTERPRET=1`` and is reported skipped otherwise.
- forward: the whole network, HF vs segscope on the same weights: Mask2Former-R50 at batch 1 in
  float32 and at batch ``--batch`` under bfloat16 autocast, Mask2Former-Swin-L (embed 192, depths
  2-2-18-2, window 12, 200 queries) at batch ``--batch`` under bfloat16 autocast, per ``--sizes``.
  float32 mask logits must agree (relative difference below 1e-2, TF32 convolutions included).
- pipeline: panoptic segmentation of ``--batch`` 640 x 480 photos per call, end to end (images/s):
  ``segscope.pipeline(..., dtype="bfloat16", batch_size=batch)`` vs HF's image processor + model +
  ``post_process_panoptic_segmentation``, batched, in float32 and under bfloat16 autocast (the
  faster is HF's figure), R50 weights.

Peak GPU memory is ``torch.cuda.max_memory_allocated`` of one extra run after a reset, less what
was allocated before it, plus the side's own weights (both models stay on the GPU while they take
turns): what the run would peak at with only its own model loaded. Ratios are segscope / HF and
Triton / grid_sample (below 1: segscope, Triton faster); ``--json`` writes every figure.

    python benchmarks/bench_gpu.py --json gpu.json                    # the full table, one H100/H200
    python benchmarks/bench_gpu.py --device cpu --smoke --json smoke.json   # tiny sizes and models, CPU
    TRITON_INTERPRET=1 python benchmarks/bench_gpu.py --device cpu --smoke  # ... and Triton, interpreted (7 min)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    Mask2FormerConfig,
    Mask2FormerForUniversalSegmentation,
    Mask2FormerImageProcessor,
    PretrainedConfig,
    ResNetConfig,
    SwinConfig,
)

import segscope
from segscope.loading import load
from segscope.models.ops.ms_deform_attn import deformable_attention_grid_sample
from segscope.models.ops.triton_ms_deform_attn import triton_available, triton_deformable_attention

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu import NUM_CLASSES, STAGES, build_reference, hf_pipeline, photo  # noqa: E402  (sibling scripts)
from bench_ms_deform_attn import SHAPES_800x1216, make_inputs  # noqa: E402
from bench_postprocess import median_seconds  # noqa: E402

SMOKE_SHAPES = [(16, 24), (8, 12), (4, 6)]
PHOTO = (480, 640)
FLOAT32_AGREEMENT = 1e-2  # largest relative mask-logit difference accepted in float32
Run = Callable[[], Any]


# ---------------------------------------------------------------------------- timing and memory


def synchronized(run: Run, device: torch.device) -> Run:
    """``run`` followed by ``torch.cuda.synchronize`` on a CUDA device, so wall time covers its kernels."""
    if device.type != "cuda":
        return run

    def call() -> Any:
        result = run()
        torch.cuda.synchronize(device)
        return result

    return call


def peak_mib(run: Run, device: torch.device, resident_mib: float = 0.0) -> float | None:
    """Peak GPU MiB of one ``run`` above what was allocated before it, plus ``resident_mib``; None off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    run()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20 + resident_mib


def measure(runs: dict[str, Run], repeats: int, device: torch.device,
            resident_mib: dict[str, float] | None = None) -> dict[str, dict[str, float | None]]:
    """``{name: {"seconds": median, "peak_mib": ...}}``, the runs taking turns (``median_seconds``)."""
    seconds = median_seconds({name: synchronized(run, device) for name, run in runs.items()}, repeats)
    resident = resident_mib or {}
    return {
        name: {"seconds": seconds[name], "peak_mib": peak_mib(run, device, resident.get(name, 0.0))}
        for name, run in runs.items()
    }


def autocast(device: torch.device, dtype: torch.dtype) -> AbstractContextManager[Any]:
    """``torch.autocast`` in ``dtype``, or nothing for float32."""
    return nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """``||value - reference|| / ||reference||`` in float64."""
    reference = reference.double()
    return float((value.double() - reference).norm() / reference.norm())


def weights_mib(module: torch.nn.Module) -> float:
    """MiB of ``module``'s parameters and buffers."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


# ---------------------------------------------------------------------------- op


def op_inputs(shapes: list[tuple[int, int]], batch: int, device: torch.device) -> list[torch.Tensor]:
    """``bench_ms_deform_attn``'s inputs (uniform locations, some off the map), float32, ``batch`` copies,
    each one rolled along the positions so that the batch elements differ."""
    single = make_inputs(shapes, heads=8, head_dim=32, points=4, locations="uniform", dtype=torch.float32)
    return [torch.cat([t.roll(997 * b, dims=1) for b in range(batch)]).to(device) for t in single]


def benchmark_op(shapes: list[tuple[int, int]], batch: int, repeats: int, device: torch.device) -> dict[str, Any]:
    """Times, peak memory and relative errors of grid_sample and Triton, float32 and bfloat16."""
    value, locations, weights = op_inputs(shapes, batch, device)
    triton = triton_available(value)
    implementations: dict[str, Callable[..., torch.Tensor]] = {"grid_sample": deformable_attention_grid_sample}
    if triton:
        implementations["triton"] = lambda v, s, loc, w: triton_deformable_attention(v, s, None, loc, w)
    elif device.type == "cuda":
        raise RuntimeError("the Triton kernels cannot run on this CUDA device (is triton installed?)")
    grad_output = torch.randn(batch, locations.shape[1], value.shape[2] * value.shape[3], device=device)
    result: dict[str, Any] = {
        "shapes": shapes, "batch": batch, "queries": locations.shape[1], "heads": 8, "head_dim": 32, "points": 4,
        "triton": "ran" if triton else "skipped: no CUDA device here and TRITON_INTERPRET=1 was not set",
    }
    for dtype in (torch.float32, torch.bfloat16):
        cast = [value.to(dtype), locations, weights.to(dtype)]
        grad = grad_output.to(dtype)
        leaves = [t.detach().requires_grad_() for t in cast]
        reference = _op_outputs(deformable_attention_grid_sample, shapes, [t.double() for t in cast], grad.double())
        rows: dict[str, Any] = {}
        for name, op in implementations.items():
            with autocast(device, dtype):
                errors = [relative_error(*pair) for pair in zip(_op_outputs(op, shapes, cast, grad), reference)]
            if not all(np.isfinite(errors)):
                raise RuntimeError(f"{name} {dtype}: non-finite relative errors {errors}")

            def forward(op: Callable[..., torch.Tensor] = op) -> torch.Tensor:
                with torch.no_grad(), autocast(device, dtype):
                    return op(cast[0], shapes, cast[1], cast[2])

            def forward_backward(op: Callable[..., torch.Tensor] = op) -> tuple[torch.Tensor, ...]:
                with autocast(device, dtype):
                    output = op(leaves[0], shapes, leaves[1], leaves[2])
                return torch.autograd.grad(output, leaves, grad.to(output.dtype))

            rows[name] = {
                **measure({"forward": forward, "forward_backward": forward_backward}, repeats, device),
                "relative_error": dict(zip(("output", "grad_value", "grad_locations", "grad_weights"), errors)),
            }
        result[str(dtype).removeprefix("torch.")] = rows
    return result


def _op_outputs(op: Callable[..., torch.Tensor], shapes: list[tuple[int, int]], inputs: list[torch.Tensor],
                grad_output: torch.Tensor) -> list[torch.Tensor]:
    """The output of ``op`` and the gradients of its three inputs for ``grad_output``."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    output = op(leaves[0], shapes, leaves[1], leaves[2])
    return [output.detach(), *torch.autograd.grad(output, leaves, grad_output.to(output.dtype))]


# ---------------------------------------------------------------------------- models


def build_models(smoke: bool) -> dict[str, Callable[[], Mask2FormerForUniversalSegmentation]]:
    """Builders of the random transformers models by name: R50 and Swin-L (tiny stand-ins with ``smoke``)."""
    if smoke:
        tiny = {"hidden_dim": 32, "feature_size": 32, "mask_feature_size": 32, "dim_feedforward": 32,
                "encoder_feedforward_dim": 32, "encoder_layers": 1, "decoder_layers": 2, "num_queries": 10}
        resnet = ResNetConfig(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512],
                              out_features=STAGES)  # ResNet-18, the smallest layout segscope converts
        swin = SwinConfig(embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4], window_size=4,
                          out_features=STAGES)
        return {"ResNet-18": lambda: _random_model(resnet, tiny), "tiny Swin": lambda: _random_model(swin, tiny)}
    swin_large = SwinConfig(embed_dim=192, depths=[2, 2, 18, 2], num_heads=[6, 12, 24, 48], window_size=12,
                            out_features=STAGES)
    return {"R50": lambda: build_reference("resnet"), "Swin-L": lambda: _random_model(swin_large, {"num_queries": 200})}


def _random_model(backbone: PretrainedConfig, options: dict[str, int]) -> Mask2FormerForUniversalSegmentation:
    torch.manual_seed(0)
    config = Mask2FormerConfig(backbone_config=backbone, num_labels=NUM_CLASSES, **options)
    return Mask2FormerForUniversalSegmentation(config).eval()


def forward_cases(names: list[str], batch: int) -> list[tuple[str, int, torch.dtype]]:
    """(model, batch, dtype) of the forward section: R50 at batch 1 float32 and ``batch`` bfloat16, Swin-L bf16."""
    resnet, swin = names
    return [(resnet, 1, torch.float32), (resnet, batch, torch.bfloat16), (swin, batch, torch.bfloat16)]


def benchmark_forward(reference: Mask2FormerForUniversalSegmentation, ours: torch.nn.Module,
                      size: tuple[int, int], batch: int, dtype: torch.dtype, repeats: int,
                      device: torch.device) -> dict[str, Any]:
    """Whole-network forward of both sides on the same images; fails if float32 logits disagree."""
    images = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(0)).to(device)

    def hf() -> Any:
        with torch.inference_mode(), autocast(device, dtype):
            return reference(pixel_values=images).masks_queries_logits

    def segscope_forward() -> Any:
        with torch.inference_mode(), autocast(device, dtype):
            return ours(images).mask_logits

    difference = relative_error(segscope_forward(), hf())
    if not np.isfinite(difference) or (dtype == torch.float32 and difference > FLOAT32_AGREEMENT):
        raise RuntimeError(f"segscope and HF mask logits differ: relative difference {difference:.2e}")
    resident = {"hf": weights_mib(reference), "segscope": weights_mib(ours)}
    return {
        "size": list(size), "batch": batch, "dtype": str(dtype).removeprefix("torch."),
        **measure({"hf": hf, "segscope": segscope_forward}, repeats, device, resident),
        "mask_logits_relative_diff": difference,
    }


# ---------------------------------------------------------------------------- pipeline


def benchmark_pipeline(reference: Mask2FormerForUniversalSegmentation, directory: str, batch: int, repeats: int,
                       device: torch.device, resize: tuple[int, int] | None) -> dict[str, Any]:
    """Images/s of both pipelines on ``batch`` photos; ``resize`` (short, long side) overrides 800/1333."""
    pictures = [np.roll(photo(*PHOTO), 37 * index, axis=1) for index in range(batch)]
    loaded = load(directory)
    processor = Mask2FormerImageProcessor()
    if resize is not None:
        short, long = resize
        preprocess = dataclasses.replace(loaded.description.preprocess, short_side=short, max_size=long)
        loaded = dataclasses.replace(loaded, description=dataclasses.replace(loaded.description, preprocess=preprocess))
        processor = Mask2FormerImageProcessor(size={"shortest_edge": short, "longest_edge": long})
    ours = segscope.pipeline("image-segmentation", model=loaded, task="panoptic", device=str(device),
                             dtype="bfloat16", batch_size=batch)
    if len(ours(pictures)) != batch:
        raise RuntimeError("segscope's pipeline did not return one result per photo")
    runs: dict[str, Run] = {
        f"hf {name}": partial(hf_pipeline(reference, processor, device, dtype), pictures)
        for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16))
    }
    runs["segscope bfloat16"] = partial(ours, pictures)
    measured = measure(runs, repeats, device, {name: weights_mib(reference) for name in runs})
    for row in measured.values():
        row["images_per_s"] = batch / row["seconds"]
    best = min(("hf float32", "hf bfloat16"), key=lambda name: measured[name]["seconds"])
    return {"photo": list(PHOTO), "batch": batch, "runs": measured, "hf_best": best,
            "ratio": measured["segscope bfloat16"]["seconds"] / measured[best]["seconds"]}


# ---------------------------------------------------------------------------- report


def print_tables(results: dict[str, Any]) -> None:
    """The markdown tables of every section."""
    environment = results["environment"]
    print(f"torch {environment['torch']}, {environment['device']}, repeats {environment['repeats']}")
    op = results["op"]
    print(f"\nop: levels {op['shapes']}, batch {op['batch']}, {op['queries']} queries, 8 heads x 32, 4 points; "
          f"Triton {op['triton']}")
    print("| dtype | pass | grid_sample (s) | Triton (s) | Triton / grid_sample | peak MiB grid_sample "
          "| peak MiB Triton |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for dtype in ("float32", "bfloat16"):
        rows = op[dtype]
        for label in ("forward", "forward_backward"):
            ref, fused = rows["grid_sample"][label], rows.get("triton", {}).get(label)
            ratio = _number(fused and fused["seconds"] / ref["seconds"], ".2f")
            print(f"| {dtype} | {label.replace('_', ' + ')} | {ref['seconds']:.4f} | "
                  f"{_number(fused and fused['seconds'], '.4f')} | {ratio} | {_number(ref['peak_mib'], '.0f')} | "
                  f"{_number(fused and fused['peak_mib'], '.0f')} |")
    print("\n| dtype | implementation | rel. error output | grad value | grad locations | grad weights |")
    print("| --- | --- | --- | --- | --- | --- |")
    for dtype in ("float32", "bfloat16"):
        for name, row in op[dtype].items():
            errors = " | ".join(f"{e:.1e}" for e in row["relative_error"].values())
            print(f"| {dtype} | {name} | {errors} |")

    print("\n| model | input | batch | dtype | HF (s) | segscope (s) | segscope / HF | peak MiB HF | peak MiB segscope "
          "| rel. mask logit diff |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in results["forward"]:
        hf, ours = row["hf"], row["segscope"]
        print(f"| {row['model']} | {row['size'][0]}x{row['size'][1]} | {row['batch']} | {row['dtype']} | "
              f"{hf['seconds']:.4f} | {ours['seconds']:.4f} | {ours['seconds'] / hf['seconds']:.2f} | "
              f"{_number(hf['peak_mib'], '.0f')} | {_number(ours['peak_mib'], '.0f')} | "
              f"{row['mask_logits_relative_diff']:.1e} |")

    pipeline = results["pipeline"]
    print(f"\npipeline: {pipeline['model']}, panoptic, {pipeline['batch']} photos of "
          f"{pipeline['photo'][1]}x{pipeline['photo'][0]} per call")
    print("| side | s per call | images/s | peak MiB |")
    print("| --- | --- | --- | --- |")
    for name, row in pipeline["runs"].items():
        print(f"| {name} | {row['seconds']:.4f} | {row['images_per_s']:.2f} | {_number(row['peak_mib'], '.0f')} |")
    print(f"segscope / HF best ({pipeline['hf_best']}): {pipeline['ratio']:.2f}")


def _number(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _size(text: str) -> tuple[int, int]:
    height, _, width = text.partition("x")
    return int(height), int(width)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sizes", nargs="+", type=_size, metavar="HxW",
                        help="forward inputs (default 800x1216; --smoke 64x96)")
    parser.add_argument("--batch", type=int, help="batch of the op, the bf16 forwards and the pipeline (8; smoke 2)")
    parser.add_argument("--repeats", type=int, help="timed runs after one warm-up (default 10; --smoke 2)")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and models, to check the script on a CPU")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --device cpu --smoke to check the script")
    sizes = args.sizes or ([(64, 96)] if args.smoke else [(800, 1216)])
    batch = args.batch or (2 if args.smoke else 8)
    repeats = args.repeats or (2 if args.smoke else 10)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results: dict[str, Any] = {
        "environment": {"torch": torch.__version__, "device": name, "smoke": args.smoke, "repeats": repeats},
        "op": benchmark_op(SMOKE_SHAPES if args.smoke else SHAPES_800x1216, batch, repeats, device),
        "forward": [],
    }
    builders = build_models(args.smoke)
    with tempfile.TemporaryDirectory(prefix="segscope-bench-gpu-") as root:
        for model_name, build in builders.items():
            reference = build().to(device)
            directory = str(Path(root) / model_name.replace(" ", "-"))
            reference.save_pretrained(directory)
            ours = segscope.load_model(directory).to(device).eval()
            for case_model, case_batch, dtype in forward_cases(list(builders), batch):
                if case_model == model_name:
                    results["forward"] += [
                        {"model": model_name, **benchmark_forward(reference, ours, size, case_batch, dtype, repeats,
                                                                  device)}
                        for size in sizes
                    ]
            if model_name == next(iter(builders)):  # the pipeline runs the R50 weights
                del ours
                pipeline = benchmark_pipeline(reference, directory, batch, repeats, device,
                                              (64, 128) if args.smoke else None)
                results["pipeline"] = {"model": model_name, **pipeline}
            del reference
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print_tables(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
