"""``segscope.engine.distributed`` over two real Gloo processes (``torchrun``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Joins the group, then imports the models (which import torch._dynamo, as the CLI does after
# setup), leaves, and checks that nothing kept the group alive: a group that outlives
# destroy_process_group is torn down at interpreter exit, where Gloo aborted the process.
_WORKER = """
import gc, sys, weakref
import torch.distributed as dist
from segscope.engine import distributed

distributed.setup("cpu")
import segscope.models.mask2former.architecture  # noqa: F401, E402
group = weakref.ref(dist.group.WORLD)
distributed.teardown()
gc.collect()
sys.exit(1 if group() is not None else 0)
"""


def test_the_process_group_dies_at_teardown_even_when_models_load_after_setup(tmp_path: Path) -> None:
    worker = tmp_path / "worker.py"
    worker.write_text(_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{done.stderr[:3000]}\n[...]\n{done.stderr[-1500:]}"
