"""``torchrun -m segscope.cli predict / eval`` over two gloo processes equals one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segscope.cli import main
from segscope.data.synthetic import write_synthetic_dataset
from segscope.engine.distributed import DistributedContext
from segscope.engine.sharding import shard_indices

ROOT = Path(__file__).resolve().parents[1]


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run(
        [*command, "-m", "segscope.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    # torchrun's closing summary names only the signal; the ranks' own messages come first.
    assert done.returncode == 0, f"{done.stderr[:3000]}\n[...]\n{done.stderr[-1500:]}"
    return done


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sharded") / "data"
    return write_synthetic_dataset(root, num_train=0, num_val=5, image_size=(64, 64), seed=3)


def _files(folder: Path) -> dict[str, Path]:
    return {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*")) if p.is_file()}


def test_every_input_falls_to_exactly_one_rank() -> None:
    for world in (1, 2, 3, 4):
        shares = [
            list(shard_indices(7, DistributedContext(rank, world, rank, torch.device("cpu")))) for rank in range(world)
        ]
        assert sorted(i for share in shares for i in share) == list(range(7))


def test_predict_over_two_processes_writes_what_one_process_writes(data: Path, tmp_path: Path) -> None:
    args = ["predict", str(data / "val"), "-m", "demo", "--device", "cpu", "-f", "overlay,json,coco-panoptic"]
    done = _torchrun(*args, "-o", str(tmp_path / "two"))
    assert done.stdout.count("wrote 5 result(s)") == 1  # printed by rank 0 only
    assert main([*args, "-o", str(tmp_path / "one")]) == 0
    one, two = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert list(two) == list(one) and len(one) == 5 * 3 + 1  # no stray or temporary files
    for name, path in one.items():
        if name.endswith(".png"):
            assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(two[name]))), name
        else:
            assert json.loads(path.read_text()) == json.loads(two[name].read_text()), name
    assert len(json.loads(one["panoptic.json"].read_text())["annotations"]) == 5


@pytest.mark.parametrize("task", ["panoptic", "semantic", "instance"])
def test_eval_over_two_processes_gives_the_one_process_figures(data: Path, tmp_path: Path, task: str) -> None:
    args = ["eval", "-m", "demo", "-d", str(data), "-t", task, "--device", "cpu"]
    _torchrun(*args, "-o", str(tmp_path / "two.json"))
    assert main([*args, "-o", str(tmp_path / "one.json")]) == 0
    one, two = (json.loads((tmp_path / name).read_text()) for name in ("one.json", "two.json"))
    assert _close(one, two), (one, two)


def _close(a: object, b: object) -> bool:
    """Equal structures, floats equal to 1e-9 (sums over ranks may add in another order)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return a == pytest.approx(b, rel=1e-9, abs=1e-9, nan_ok=True)
    return a == b
