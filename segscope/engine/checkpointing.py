"""Per-epoch training checkpoints: written atomically, read back without unpickling code.

A checkpoint holds the model (with its segscope description, so ``segscope predict`` and
``segscope eval`` take it as a model), the optimizer, the scheduler, the finished epoch and
the global iteration. Randomness needs no saved state: every epoch reseeds from
``(seed, epoch)`` (see ``Trainer``), so a resumed run replays exactly.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import torch

from segscope.checkpoints.safe_load import read_torch_file
from segscope.errors import CheckpointError
from segscope.fileio import atomic_path

_EPOCH_FILE = re.compile(r"^epoch_(\d+)\.pth$")


def epoch_path(work_dir: Path, epoch: int) -> Path:
    """``work_dir/epoch_N.pth`` for the checkpoint written after ``epoch`` epochs."""
    return work_dir / f"epoch_{epoch}.pth"


def save_atomic(payload: dict[str, Any], path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename over it.

    A crash mid-write leaves the previous checkpoint intact, never a truncated one; the
    abandoned temporary file is removed by the next save of that path.
    """
    with atomic_path(path) as temporary:
        torch.save(payload, temporary)


def copy_atomic(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` so that ``target`` is always whole (old or new)."""
    with atomic_path(target) as temporary:
        shutil.copyfile(source, temporary)


def prune_checkpoints(work_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` ``epoch_N.pth`` in ``work_dir`` (``keep`` 0: none);
    return what was deleted. Other files (``best.pth``) are never touched."""
    if keep <= 0 or not work_dir.is_dir():
        return []
    found = sorted((int(m.group(1)), p) for p in work_dir.iterdir() if (m := _EPOCH_FILE.match(p.name)))
    stale = [path for _, path in found[:-keep]]
    for path in stale:
        path.unlink()
    return stale


def latest_checkpoint(work_dir: Path) -> Path | None:
    """The ``epoch_N.pth`` with the largest N in ``work_dir``, or None."""
    if not work_dir.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in work_dir.iterdir() if (m := _EPOCH_FILE.match(p.name))]
    return max(found)[1] if found else None


def read_training_state(path: Path) -> dict[str, Any]:
    """A checkpoint written by the trainer, checked for the fields resuming needs."""
    payload = read_torch_file(path)
    missing = [k for k in ("model", "optimizer", "scheduler", "epoch", "iteration", "segscope") if k not in payload]
    if missing:
        raise CheckpointError(f"{path} cannot resume training: it lacks {missing}")
    return payload
