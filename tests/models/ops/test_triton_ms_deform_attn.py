"""Triton deformable-attention kernels, run on CPU by Triton's interpreter, against the float64 portable path.

Triton chooses interpreter or compiler when ``@triton.jit`` runs, reading ``TRITON_INTERPRET``
then, and that includes its own ``triton.language`` helpers decorated when triton is first
imported. So the interpreted runs happen in one child process started with the variable set
(this file run as a script prints what it measured as JSON); this process, and every other
test, never sees the variable. Tests of the compiled kernels and of the guarded import run here.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from segscope.models.ops.ms_deform_attn import multi_scale_deformable_attention

MODULE_NAME = "segscope.models.ops.triton_ms_deform_attn"
REPO_ROOT = Path(__file__).resolve().parents[3]

# Levels of different shapes; (4, 2) has power-of-two sides so that pixel centres and cell
# boundaries are exact in every float precision (the floor() of the kernel and of the float64
# reference then agree, and so do their one-sided gradients).
SHAPES = [(3, 5), (4, 2), (1, 3)]
EXACT_LEVEL = 1
# (x, y) on the outer edges, on corners, far outside, and huge (exercises the clamp); any level.
EDGE_POINTS = [(0.0, 0.0), (1.0, 1.0), (0.0, 1.0), (1.0, 0.5), (-0.7, 0.5), (0.5, 1.8), (1e6, -1e6)]
# On the (H=4, W=2) level, pixel coordinates (px, py) = (x * 2 - 0.5, y * 4 - 0.5): a centre,
# the last centre (its right and bottom neighbours are outside), one pixel outside on the left
# (reads zero, but its gradient points at column 0), one above, and fully outside.
EXACT_POINTS = [(0.25, 0.625), (0.75, 0.875), (-0.25, 0.125), (0.5, -0.125), (1.25, 0.5)]


def _load_private_copy(name: str) -> ModuleType:
    """A fresh copy of the module under another name, not registered in ``sys.modules``."""
    origin = importlib.util.find_spec(MODULE_NAME).origin
    spec = importlib.util.spec_from_file_location(name, origin)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _inputs(
    batch: int = 2, queries: int = 9, heads: int = 2, dim: int = 3, points: int = 2, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float32 ``value [B,S,M,D]``, ``locations [B,Q,M,L,P,2]``, ``weights [B,Q,M,L,P]``."""
    generator = torch.Generator().manual_seed(seed)
    num_values = sum(h * w for h, w in SHAPES)
    value = torch.randn(batch, num_values, heads, dim, generator=generator)
    locations = torch.rand(batch, queries, heads, len(SHAPES), points, 2, generator=generator) * 1.5 - 0.25
    for query, point in enumerate(EDGE_POINTS[:queries]):
        locations[:, query, :, :, 0] = torch.tensor(point)
    for query, point in enumerate(EXACT_POINTS[:queries]):
        locations[:, query, :, EXACT_LEVEL, points - 1] = torch.tensor(point)
    weights = torch.rand(batch, queries, heads, len(SHAPES), points, generator=generator)
    return value, locations, weights


def _relative_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest absolute difference over the reference's largest magnitude."""
    return ((result.double() - reference).abs().max() / reference.abs().max()).item()


NAMES = ("output", "grad_value", "grad_sampling_locations", "grad_attention_weights")


def _compare(
    module: ModuleType, value: torch.Tensor, locations: torch.Tensor, weights: torch.Tensor
) -> dict[str, dict[str, Any]]:
    """Output and the three gradients of the kernels against the float64 portable path.

    Returns per name the relative error, the result's dtype and its count of nonzeros.
    """
    grad_output = torch.randn(
        value.shape[0], locations.shape[1], value.shape[2] * value.shape[3], generator=torch.Generator().manual_seed(1)
    ).to(value.dtype)

    leaves = [tensor.detach().clone().requires_grad_() for tensor in (value, locations, weights)]
    output = module.triton_deformable_attention(leaves[0], torch.tensor(SHAPES), None, leaves[1], leaves[2])
    output.backward(grad_output)

    references = [tensor.detach().double().requires_grad_() for tensor in (value, locations, weights)]
    expected = multi_scale_deformable_attention(references[0], SHAPES, None, references[1], references[2])
    expected.backward(grad_output.double())
    assert output.shape == expected.shape
    results = [output] + [leaf.grad for leaf in leaves]
    expectations = [expected] + [reference.grad for reference in references]
    return {
        name: {
            "error": _relative_error(result, reference) if reference.abs().max() > 0 else 0.0,
            "dtype": str(result.dtype),
            "nonzero": int(torch.count_nonzero(result)),
        }
        for name, result, reference in zip(NAMES, results, expectations)
    }


def _custom_op_checks(module: ModuleType) -> dict[str, dict[str, str]]:
    """``torch.library.opcheck`` of the forward and backward custom ops (schema, fake tensors, autograd)."""
    value, locations, weights = _inputs()
    shapes, starts = torch.tensor(SHAPES), torch.tensor([0, 15, 23])
    grad_output = torch.randn(value.shape[0], locations.shape[1], value.shape[2] * value.shape[3])
    leaves = [tensor.clone().requires_grad_() for tensor in (value, locations, weights)]
    return {
        "forward": torch.library.opcheck(
            torch.ops.segscope.deformable_attention.default, (leaves[0], shapes, starts, leaves[1], leaves[2])
        ),
        "backward": torch.library.opcheck(
            torch.ops.segscope.deformable_attention_backward.default,
            (grad_output, value, shapes, starts, locations, weights),
        ),
    }


def _compiled_against_eager(module: ModuleType) -> dict[str, float | int]:
    """``torch.compile(fullgraph=True)`` of a function calling the kernels: graphs compiled and its
    output and gradients' largest difference from eager (the op is opaque, so none)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    def run(value: torch.Tensor, locations: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return module.triton_deformable_attention(value, SHAPES, None, locations, weights) * 2

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(run, backend=counter, fullgraph=True)
    results = []
    for function in (compiled, run):
        leaves = [tensor.requires_grad_() for tensor in _inputs()]
        output = function(*leaves)
        output.sum().backward()
        results.append([output, *(leaf.grad for leaf in leaves)])
    differences = [(a - b).abs().max().item() for a, b in zip(*results)]
    return {"graphs": counter.frame_count, "output": differences[0], "gradients": max(differences[1:])}


def _measure_interpreted() -> dict[str, Any]:
    """Every interpreted case; run only in the child process with ``TRITON_INTERPRET=1``."""
    module = importlib.import_module(MODULE_NAME)
    value, locations, weights = _inputs(queries=1, points=1)
    locations[:] = torch.tensor([-0.7, 1e6])  # every level and head: nothing to read
    half_cases = {}
    for dtype in (torch.bfloat16, torch.float16):
        half_value, half_locations, half_weights = _inputs()
        # float32 locations; the reference sees the same rounded values and weights
        half_cases[str(dtype)] = _compare(module, half_value.to(dtype), half_locations, half_weights.to(dtype))

    partial_value, partial_locations, partial_weights = _inputs(queries=3)
    partial_value.requires_grad_()
    partial = module.triton_deformable_attention(
        partial_value, torch.tensor(SHAPES), torch.tensor([0, 15, 23]), partial_locations, partial_weights
    )
    partial.sum().backward()
    partial_expected = multi_scale_deformable_attention(
        partial_value.double(), SHAPES, None, partial_locations.double(), partial_weights.double()
    )
    return {
        "opcheck": _custom_op_checks(module),
        "compiled": _compiled_against_eager(module),
        "interpreted": module._INTERPRETED,
        "available_on_cpu": module.triton_available(torch.zeros(1)),
        "float32_dim3": _compare(module, *_inputs(dim=3)),
        "float32_dim8": _compare(module, *_inputs(dim=8)),
        # D = 32 tiles 64 queries per program: 70 queries take two blocks, the second mostly masked.
        "float32_dim32_two_query_blocks": _compare(module, *_inputs(batch=1, queries=70, heads=1, dim=32, points=1)),
        "all_outside": _compare(module, value, locations, weights),
        **half_cases,
        "explicit_starts_value_grad_only": {
            "error": _relative_error(partial, partial_expected),
            "value_grad_shape": list(partial_value.grad.shape),
        },
    }


@pytest.fixture(scope="module")
def interpreted() -> dict[str, Any]:
    """What ``_measure_interpreted`` returned in a child process run with ``TRITON_INTERPRET=1``."""
    pytest.importorskip("triton", reason="triton is not installed; the fused kernels cannot be built")
    environment = {**os.environ, "TRITON_INTERPRET": "1"}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), environment.get("PYTHONPATH")]))
    child = subprocess.run(
        [sys.executable, __file__], env=environment, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert child.returncode == 0, f"interpreted run failed:\n{child.stdout[-4000:]}\n{child.stderr[-8000:]}"
    return json.loads(child.stdout.strip().splitlines()[-1])


def test_child_process_ran_the_interpreter(interpreted: dict[str, Any]) -> None:
    assert interpreted["interpreted"]
    assert interpreted["available_on_cpu"]


@pytest.mark.parametrize("case", ["float32_dim3", "float32_dim8", "float32_dim32_two_query_blocks"])
def test_float32_forward_and_gradients_match_float64_reference(interpreted: dict[str, Any], case: str) -> None:
    for name, measured in interpreted[case].items():
        assert measured["dtype"] == "torch.float32", name
        assert measured["error"] <= 1e-5, (name, measured)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.bfloat16, 1e-2), (torch.float16, 1e-3)])
def test_half_values_with_float32_locations_match_float64_reference(
    interpreted: dict[str, Any], dtype: torch.dtype, tolerance: float
) -> None:
    expected_dtypes = dict(zip(NAMES, (dtype, dtype, torch.float32, dtype)))
    for name, measured in interpreted[str(dtype)].items():
        assert measured["dtype"] == str(expected_dtypes[name]), name
        assert measured["error"] <= tolerance, (name, measured)


def test_points_outside_every_map_read_zero_and_get_zero_gradients(interpreted: dict[str, Any]) -> None:
    for name, measured in interpreted["all_outside"].items():
        assert measured["nonzero"] == 0, name


def test_explicit_level_start_index_and_gradient_for_value_only(interpreted: dict[str, Any]) -> None:
    measured = interpreted["explicit_starts_value_grad_only"]
    assert measured["error"] <= 1e-5
    assert measured["value_grad_shape"] == [2, sum(h * w for h, w in SHAPES), 2, 3]


def test_custom_ops_pass_opcheck(interpreted: dict[str, Any]) -> None:
    """Schema, fake (shape-only) implementations and autograd registration, as torch.compile needs them."""
    for op, results in interpreted["opcheck"].items():
        assert results and set(results.values()) == {"SUCCESS"}, (op, results)


def test_compiled_graph_keeps_the_kernels_in_one_graph_and_matches_eager(interpreted: dict[str, Any]) -> None:
    compiled = interpreted["compiled"]
    assert compiled["graphs"] == 1  # fullgraph=True: no break around the op or its shape checks
    assert compiled["output"] == 0.0 and compiled["gradients"] == 0.0


def test_rejects_shapes_that_do_not_match_value() -> None:
    pytest.importorskip("triton", reason="triton is not installed")
    module = importlib.import_module(MODULE_NAME)  # shapes are checked before the device
    value, locations, weights = _inputs(queries=2)
    wrong_shapes = torch.tensor([(3, 5), (4, 2), (1, 2)])
    with pytest.raises(ValueError, match="do not add up"):
        module.triton_deformable_attention(value, wrong_shapes, None, locations, weights)
    with pytest.raises(ValueError, match="do not agree"):
        module.triton_deformable_attention(value, torch.tensor(SHAPES), None, locations, weights[:, :1])
    with pytest.raises(ValueError, match="level_start_index"):
        module.triton_deformable_attention(value, torch.tensor(SHAPES), torch.tensor([0, 15]), locations, weights)


def test_compiled_kernels_refuse_cpu_tensors() -> None:
    pytest.importorskip("triton", reason="triton is not installed")
    module = importlib.import_module(MODULE_NAME)
    if module._INTERPRETED:
        pytest.skip("TRITON_INTERPRET was set when the module was first imported")
    value, locations, weights = _inputs(queries=1)
    assert not module.triton_available(value)
    with pytest.raises(RuntimeError, match="cannot run on cpu"):
        module.triton_deformable_attention(value, torch.tensor(SHAPES), None, locations, weights)


def test_module_imports_without_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    module = _load_private_copy("_segscope_triton_ms_deform_attn_without_triton")
    assert module.triton is None
    assert not module.triton_available(torch.zeros(1))
    with pytest.raises(RuntimeError, match="needs the triton package"):
        module.triton_deformable_attention(*(torch.zeros(1),) * 5)


@pytest.mark.parametrize("value_type", ["fp32", "bf16"])
def test_kernels_compile_to_cubin_for_sm90_without_a_gpu(
    value_type: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The interpreter is looser than the compiler (types, loop-carried values); this builds
    # both kernels through Triton's real pipeline for an H100-class target, no device needed.
    triton = pytest.importorskip("triton", reason="triton is not installed")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module = importlib.import_module(MODULE_NAME)
    if module._INTERPRETED:
        pytest.skip("TRITON_INTERPRET was set when the module was first imported")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    sizes = {name: "i32" for name in ("num_queries", "num_values", "num_heads", "head_dim", "num_levels", "num_points")}
    blocks = {"BLOCK_Q": "constexpr", "BLOCK_D": "constexpr"}
    shapes = {"shapes_ptr": "*i64", "starts_ptr": "*i64"}
    value = {"value_ptr": f"*{value_type}"}
    forward = {**value, **shapes, "loc_ptr": "*fp32", "attn_ptr": f"*{value_type}", "out_ptr": f"*{value_type}"}
    backward = {
        **value,
        **shapes,
        "loc_ptr": "*fp32",
        "attn_ptr": f"*{value_type}",
        "grad_out_ptr": f"*{value_type}",
        "grad_value_ptr": "*fp32",
        "grad_loc_ptr": "*fp32",
        "grad_attn_ptr": f"*{value_type}",
    }
    for kernel, pointers in ((module._forward_kernel, forward), (module._backward_kernel, backward)):
        source = ASTSource(kernel, {**pointers, **sizes, **blocks}, constexprs={"BLOCK_Q": 64, "BLOCK_D": 32})
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
        assert compiled.asm["cubin"], kernel


if __name__ == "__main__":
    print(json.dumps(_measure_interpreted()))
