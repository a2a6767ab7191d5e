"""Pipeline options: dtype (autocast), compile (shape buckets), num_threads, and the background loader."""

from __future__ import annotations

import gc
import importlib
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import segscope
from segscope.cli import main
from segscope.errors import ImageLoadError, OptionError
from segscope.evaluation.panoptic import PanopticEvaluator
from segscope.loading import load
from segscope.pipeline import LOADER_THREAD_NAME, SegmentationPipeline, compile_problem
from segscope.results import SegmentationResult

# The module, not the ``segscope.pipeline`` function that shadows it as an attribute of the package.
pipeline_module = importlib.import_module("segscope.pipeline")
SHAPES = Path(__file__).resolve().parents[1] / "examples" / "shapes.png"


def _loader_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith(LOADER_THREAD_NAME)]


def _segments(result: SegmentationResult) -> list[dict[str, int]]:
    return [{"id": info["id"], "category_id": info["category_id"]} for info in result["segments_info"]]


# dtype --------------------------------------------------------------------------------------------


def test_bfloat16_on_cpu_segments_the_demo_image_like_float32() -> None:
    reference = segscope.pipeline(model="demo", device="cpu")(SHAPES)
    result = segscope.pipeline(model="demo", device="cpu", dtype="bfloat16")(SHAPES)
    assert result["labels"] == reference["labels"]
    # Measured: 99.96% of the pixels agree and PQ(bfloat16 vs float32) = 99.9; the bounds
    # leave room for other CPUs' bfloat16 kernels, not for a different segmentation.
    assert (result["panoptic_seg"] == reference["panoptic_seg"]).mean() > 0.995
    evaluator = PanopticEvaluator(segscope.pipeline(model="demo", device="cpu").categories)
    evaluator.update(result["panoptic_seg"], _segments(result), reference["panoptic_seg"], _segments(reference))
    assert evaluator.compute()["All"]["PQ"] > 97.0


def test_post_processing_gets_float32_outputs_under_bfloat16(tiny_checkpoint: Path) -> None:
    segment = segscope.pipeline(model=tiny_checkpoint, device="cpu", dtype="bfloat16")
    with torch.inference_mode():
        outputs = segment._forward(torch.zeros(1, 3, 64, 96))
    assert outputs.class_logits.dtype == outputs.mask_logits.dtype == torch.float32


def test_float16_on_cpu_is_refused_with_the_alternative_named(tiny_checkpoint: Path) -> None:
    with pytest.raises(OptionError, match="float16 runs on CUDA devices only.*bfloat16"):
        segscope.pipeline(model=tiny_checkpoint, device="cpu", dtype="float16")


@pytest.mark.parametrize("dtype", ["int8", "half", "fp32"])
def test_unknown_dtype_is_refused(tiny_checkpoint: Path, dtype: str) -> None:
    with pytest.raises(OptionError, match="unknown dtype.*float32, bfloat16, float16"):
        segscope.pipeline(model=tiny_checkpoint, device="cpu", dtype=dtype)


def test_cli_predict_runs_in_bfloat16(tiny_checkpoint: Path, picture: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["predict", str(picture), "--model", str(tiny_checkpoint), "--out", str(out), "--device", "cpu"]
    assert main([*args, "--dtype", "bfloat16"]) == 0
    record = json.loads((out / f"{picture.stem}.json").read_text())
    assert (record["height"], record["width"]) == (75, 110)


def test_cli_predict_refuses_float16_on_cpu(
    tiny_checkpoint: Path, picture: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["predict", str(picture), "--model", str(tiny_checkpoint), "--out", str(tmp_path), "--device", "cpu"]
    assert main([*args, "--dtype", "float16"]) != 0
    assert "float16 runs on CUDA devices only" in capsys.readouterr().err


# num_threads --------------------------------------------------------------------------------------


def test_thread_count_is_set_only_when_asked(tiny_checkpoint: Path) -> None:
    before = torch.get_num_threads()
    try:
        segscope.pipeline(model=tiny_checkpoint, device="cpu")
        assert torch.get_num_threads() == before
        segscope.pipeline(model=tiny_checkpoint, device="cpu", num_threads=1)
        assert torch.get_num_threads() == 1
        with pytest.raises(OptionError, match="num_threads"):
            segscope.pipeline(model=tiny_checkpoint, device="cpu", num_threads=0)
    finally:
        torch.set_num_threads(before)


# compile ------------------------------------------------------------------------------------------


def test_compile_without_a_cpp_compiler_is_refused_with_the_cause(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch._inductor import cpp_builder

    def no_compiler() -> str:
        raise RuntimeError("no working C++ compiler found in ('g++',)")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    with pytest.raises(OptionError, match="compile=True needs a C\\+\\+ compiler.*g\\+\\+"):
        segscope.pipeline(model=tiny_checkpoint, device="cpu", compile=True)


def test_a_failure_to_compile_is_an_option_error_naming_its_cause(tiny_checkpoint: Path) -> None:
    from torch._dynamo.exc import TorchRuntimeError

    def failing_network(images: torch.Tensor) -> Any:
        raise TorchRuntimeError(
            "RuntimeError when making fake tensor call\n  Explanation: Dynamo failed to run FX node: view\n"
            "  Hint: pages of it\nfrom user code:\n   File \"ops.py\", line 164, in gather\n    index.view(n, -1)"
        )

    segment = segscope.pipeline(model=tiny_checkpoint, device="cpu")
    segment.compile, segment._network = True, failing_network  # compile=True whose tracing fails
    with pytest.raises(OptionError, match=r"could not compile .*fake tensor call.*Dynamo failed.*ops.py\", line 164"):
        segment(np.zeros((40, 60, 3), dtype=np.uint8))


@pytest.mark.slow  # about a minute of inductor compilation on a cold cache
@pytest.mark.skipif(compile_problem(torch.device("cpu")) is not None, reason="no C++ compiler for inductor")
def test_compiled_pipeline_matches_eager_and_compiles_once_per_bucket(tiny_checkpoint: Path, picture: Path) -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    eager = segscope.pipeline(model=tiny_checkpoint, device="cpu", batch_size=2)
    compiled = segscope.pipeline(model=tiny_checkpoint, device="cpu", batch_size=2, compile=True)
    full = np.asarray(Image.open(picture).convert("RGB"))
    # Resized to 64x94 and 64x82, both in the 64x96 bucket; alone, each is padded to a batch of two.
    images = [full, full[:, :96]]
    first = compiled(images[0])
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    second = compiled(images[1])
    batched = compiled(images)  # two images: the batch dimension is already batch_size
    assert counters["stats"]["unique_graphs"] == graphs, "an image of the same bucket was compiled again"
    for image, result in zip(images, (first, second)):
        reference = eager(image)
        assert result["labels"] == reference["labels"]
        assert np.array_equal(result["panoptic_seg"], reference["panoptic_seg"])
    assert np.array_equal(batched[1]["panoptic_seg"], second["panoptic_seg"])


def test_compiled_batches_are_padded_to_the_bucket_and_batch_size(tiny_checkpoint: Path) -> None:
    # Short side 64, max size 128, divisibility 32: bucket sides 64 +- k * 32, at most 128.
    segment = segscope.pipeline(model=tiny_checkpoint, device="cpu", batch_size=3)
    images = torch.randn(2, 3, 32, 96)
    assert segment._network_input(images) is images  # eager: the batch as preprocessed
    segment._buckets = True  # what compile=True does to the input, without compiling
    padded = segment._network_input(images)
    assert padded.shape == (3, 3, 32, 96)
    assert torch.equal(padded[:2], images) and not padded[2].any()
    assert segment._network_input(torch.randn(3, 3, 64, 128)).shape == (3, 3, 64, 128)


@pytest.mark.parametrize(
    ("side", "bucket"),
    [(800, 800), (832, 1024), (1024, 1024), (1056, 1248), (1344, 1344), (768, 800), (576, 576), (544, 576)],
)
def test_bucket_sides_step_from_the_short_side(side: int, bucket: int) -> None:
    # COCO's test resize: short side 800, long side at most 1333 (1344 padded), steps of 224.
    assert pipeline_module._bucket_side(side, 800, 224, 1344) == bucket


def test_padding_to_a_bucket_keeps_the_demo_segmentation() -> None:
    """A picture resized to the usual short side gets no extra rows: only its long side and the
    batch are padded, and the segmentation stays."""
    eager = segscope.pipeline(model="demo", device="cpu")
    bucketed = segscope.pipeline(model="demo", device="cpu", batch_size=2)
    bucketed._buckets = True
    full = np.asarray(Image.open(SHAPES).convert("RGB"))
    for image in (full, full[:, :150], full[:100]):
        reference, result = eager(image), bucketed(image)
        assert result["labels"] == reference["labels"]
        assert (result["panoptic_seg"] == reference["panoptic_seg"]).mean() > 0.999


# background loader --------------------------------------------------------------------------------


@pytest.fixture
def recorded_loads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, str]]:
    """Every ``load_image`` call of the pipeline, with the thread it ran in."""
    calls: list[tuple[Any, str]] = []
    load_image: Callable[[Any], np.ndarray] = pipeline_module.load_image

    def recording_load_image(source: Any) -> np.ndarray:
        calls.append((source, threading.current_thread().name))
        return load_image(source)

    monkeypatch.setattr(pipeline_module, "load_image", recording_load_image)
    return calls


def test_loader_keeps_the_order_and_the_unreadable_images(
    tiny_checkpoint: Path, picture: Path, recorded_loads: list[tuple[Any, str]]
) -> None:
    segment = SegmentationPipeline(load(tiny_checkpoint), device="cpu", batch_size=2)
    small = np.asarray(Image.open(picture).convert("RGB"))[:50, :60]
    inputs = [picture, b"not an image", small, b"nor this", picture]
    outcomes = list(segment.iter_outcomes(inputs, progress=False))
    assert [index for index, _ in outcomes] == [1, 0, 3, 2, 4]  # per batch: its load errors, then results
    assert [type(outcome) for _, outcome in outcomes] == [ImageLoadError, SegmentationResult] * 2 + [
        SegmentationResult
    ]
    by_index = dict(outcomes)
    for index in (0, 2, 4):  # each batch holds one readable image: as if alone
        assert np.array_equal(by_index[index]["panoptic_seg"], segment(inputs[index])["panoptic_seg"])
    # Batches after the first are read in the loader thread, which is gone when the run ends.
    assert {thread for _, thread in recorded_loads[:5]} == {LOADER_THREAD_NAME + "_0"}
    assert not _loader_threads()
    with pytest.raises(ImageLoadError):
        list(segment.iter_results(inputs))


def test_loader_thread_ends_when_the_iterator_is_closed_or_dropped(tiny_checkpoint: Path, picture: Path) -> None:
    segment = segscope.pipeline(model=tiny_checkpoint, device="cpu", batch_size=1)
    outcomes = segment.iter_outcomes([picture] * 4, progress=False)
    next(outcomes)
    assert _loader_threads()  # preparing the next batch meanwhile
    outcomes.close()
    assert not _loader_threads()
    outcomes = segment.iter_outcomes([picture] * 4, progress=False)
    next(outcomes)
    del outcomes
    gc.collect()
    assert not _loader_threads()


def test_a_loader_failure_surfaces_in_the_caller_after_the_earlier_results(
    tiny_checkpoint: Path, picture: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    load_image = pipeline_module.load_image

    def failing_load_image(source: Any) -> np.ndarray:
        if source == "explode":
            raise RuntimeError("disk on fire")
        return load_image(source)

    monkeypatch.setattr(pipeline_module, "load_image", failing_load_image)
    segment = segscope.pipeline(model=tiny_checkpoint, device="cpu", batch_size=1)
    seen = []
    with pytest.raises(RuntimeError, match="disk on fire"):
        for index, _ in segment.iter_outcomes([picture, picture, "explode", picture], progress=False):
            seen.append(index)
    assert seen == [0, 1]
    assert not _loader_threads()


def test_one_batch_is_read_without_a_thread(tiny_checkpoint: Path, picture: Path, recorded_loads: list) -> None:
    segment = segscope.pipeline(model=tiny_checkpoint, device="cpu", batch_size=4)
    assert len(segment([picture, picture])) == 2
    assert {thread for _, thread in recorded_loads} == {threading.current_thread().name}
