"""Models for deployment outside Python: ONNX (onnxruntime, TensorRT, ...) and TorchScript.

The exported graph is the network alone: a normalized, padded ``[B,3,H,W]`` float32 batch of a
size fixed at export time in, the architecture's raw output tensors out
(``Architecture.export_outputs``, e.g. Mask2Former's ``class_logits [B,Q,C+1]`` and
``mask_logits [B,Q,H/4,W/4]``). Resizing, normalization and post-processing stay with the
caller; what they need (the config, the categories and the preprocessing, as in segscope's own
files) travels inside the exported file: ONNX ``metadata_props``, TorchScript extra file
``segscope.json``. Deformable attention takes its portable ``grid_sample`` path while exporting,
which ONNX has as ``GridSample`` (opset 16 and later).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from segscope.errors import OptionError
from segscope.fileio import atomic_path
from segscope.loading import LoadedModel
from segscope.registry import architecture_of

ExportFormat = Literal["onnx", "torchscript"]
EXPORT_FORMATS: tuple[str, ...] = ("onnx", "torchscript")
INPUT_NAME = "pixel_values"
METADATA_FILE = "segscope.json"  # TorchScript extra file holding the description


@dataclass(frozen=True)
class ExportReport:
    """What ``export_model`` wrote and how closely the exported model reproduces PyTorch."""

    path: Path
    output_names: tuple[str, ...]
    input_shape: tuple[int, int, int, int]
    max_abs_diff: float | None  # None when the check was not run (onnxruntime missing, or skipped)


class _TensorOutputs(nn.Module):
    """The network with its raw outputs flattened into the tensors ``export_outputs`` names."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.flatten = architecture_of(module.config).export_outputs

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, ...]:
        return tuple(self.flatten(self.module(pixel_values)).values())


def export_model(
    loaded: LoadedModel,
    out: str | Path,
    fmt: ExportFormat,
    size: tuple[int, int],
    batch: int = 1,
    *,
    opset: int = 18,
    check: bool = True,
    overwrite: bool = False,
) -> ExportReport:
    """Write ``loaded``'s network as ``fmt`` for inputs ``[batch, 3, *size]`` and check it.

    ``size`` (H, W) must be multiples of 32, the padding the preprocessing applies. With
    ``check``, the exported model runs on a random batch (ONNX: in onnxruntime, when installed;
    TorchScript: reloaded) and the largest difference from PyTorch is reported.

    Raises ``OptionError`` for a format, size or architecture that cannot be exported, or an
    existing ``out`` without ``overwrite``.
    """
    out = Path(out)
    architecture = architecture_of(loaded.module.config)
    if fmt not in EXPORT_FORMATS:
        raise OptionError(f"unknown export format {fmt!r}; expected one of {', '.join(EXPORT_FORMATS)}")
    if architecture.export_outputs is None:
        raise OptionError(f"{architecture.name} models cannot be exported yet (their outputs vary in size per image)")
    if len(size) != 2 or any(side <= 0 or side % 32 for side in size):
        raise OptionError(f"export size must be two positive multiples of 32 (the padded input), got {tuple(size)}")
    if batch < 1:
        raise OptionError(f"export batch must be at least 1, got {batch}")
    if out.exists() and not overwrite:
        raise OptionError(f"{out} exists; pass --overwrite to replace it")

    module = loaded.module.float().eval().cpu()
    example = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        named = architecture.export_outputs(module(example))
    output_names, expected = tuple(named), tuple(named.values())
    wrapper = _TensorOutputs(module)
    metadata = {**loaded.description.to_metadata(), "model_name": loaded.name, "input": INPUT_NAME}
    with atomic_path(out) as temporary:
        if fmt == "onnx":
            _write_onnx(wrapper, example, temporary, output_names, metadata, opset)
        else:
            _write_torchscript(wrapper, example, temporary, metadata)
    difference = _check(out, fmt, example, expected) if check else None
    return ExportReport(out, output_names, tuple(example.shape), difference)


def _write_onnx(
    wrapper: nn.Module, example: Tensor, path: Path, output_names: tuple[str, ...], metadata: dict[str, str], opset: int
) -> None:
    try:
        import onnx
    except ImportError as error:
        raise OptionError("ONNX export needs the onnx and onnxscript packages: pip install 'segscope[export]'") \
            from error
    program = torch.onnx.export(
        wrapper,
        (example,),
        dynamo=True,
        input_names=[INPUT_NAME],
        output_names=list(output_names),
        opset_version=opset,
        external_data=False,
    )
    model = program.model_proto
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def _write_torchscript(wrapper: nn.Module, example: Tensor, path: Path, metadata: dict[str, str]) -> None:
    with torch.no_grad():
        traced = torch.jit.trace(wrapper, (example,), check_trace=False)
    torch.jit.save(traced, str(path), _extra_files={METADATA_FILE: json.dumps(metadata)})


def _check(path: Path, fmt: ExportFormat, example: Tensor, expected: tuple[Tensor, ...]) -> float | None:
    """Largest absolute difference between the exported model's outputs and PyTorch's on ``example``."""
    if fmt == "onnx":
        try:
            import onnxruntime
        except ImportError:
            return None
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        produced = session.run(None, {INPUT_NAME: example.numpy()})
    else:
        with torch.no_grad():
            produced = [t.numpy() for t in torch.jit.load(str(path))(example)]
    return max(float(np.abs(ours - theirs.numpy()).max()) for ours, theirs in zip(produced, expected))
