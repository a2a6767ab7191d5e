"""``benchmarks/bench_gpu.py --smoke`` on the CPU: every section runs and writes sane figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"


def test_smoke_run_writes_every_section(tmp_path: Path) -> None:
    output = tmp_path / "gpu.json"
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--smoke", "--json", str(output)],
        capture_output=True, text=True, env=environment, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "| float32 | forward |" in completed.stdout and "segscope / HF best" in completed.stdout
    results = json.loads(output.read_text())

    op = results["op"]
    assert op["triton"].startswith("skipped")  # no CUDA and no interpreter: said so, not silently
    for dtype, bound in (("float32", 1e-5), ("bfloat16", 0.1)):
        row = op[dtype]["grid_sample"]
        assert row["forward"]["seconds"] > 0 and row["forward_backward"]["seconds"] > 0
        errors = row["relative_error"]
        assert set(errors) == {"output", "grad_value", "grad_locations", "grad_weights"}
        assert errors["output"] < bound and errors["grad_value"] < bound and errors["grad_weights"] < bound
    assert max(op["float32"]["grid_sample"]["relative_error"].values()) < 1e-5

    cases = [(row["model"], row["batch"], row["dtype"]) for row in results["forward"]]
    assert cases == [("ResNet-18", 1, "float32"), ("ResNet-18", 2, "bfloat16"), ("tiny Swin", 2, "bfloat16")]
    for row in results["forward"]:
        assert row["hf"]["seconds"] > 0 and row["segscope"]["seconds"] > 0
        assert row["mask_logits_relative_diff"] < (1e-4 if row["dtype"] == "float32" else 0.1)

    pipeline = results["pipeline"]
    assert set(pipeline["runs"]) == {"hf float32", "hf bfloat16", "segscope bfloat16"}
    assert all(run["images_per_s"] > 0 for run in pipeline["runs"].values())
    assert pipeline["hf_best"] in ("hf float32", "hf bfloat16") and pipeline["ratio"] > 0
