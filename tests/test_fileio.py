"""Atomic writes: the final name only ever holds a complete file, and crash leftovers go away."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from segscope.engine.checkpointing import save_atomic
from segscope.fileio import atomic_write, remove_stale_temporaries


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")

    def crash(stream) -> None:
        stream.write(b"half of the new")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, crash)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_data_is_fsynced_before_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    atomic_write(tmp_path / "x.bin", lambda stream: stream.write(b"data"))
    # The file's data, then the rename, then the folder entry.
    assert events == ["fsync", "replace", "fsync"]
    assert (tmp_path / "x.bin").read_bytes() == b"data"


def test_leftover_of_a_killed_checkpoint_save_is_removed_by_the_next_save(tmp_path: Path) -> None:
    target = tmp_path / "epoch_1.pth"
    abandoned = tmp_path / f".epoch_1.pth.{_dead_pid()}.0a1b2c3d.tmp"
    abandoned.write_bytes(b"\0" * 1000)  # what kill -9 during torch.save leaves
    in_progress = tmp_path / f".epoch_1.pth.{os.getppid()}.0a1b2c3d.tmp"  # a live writer's file
    in_progress.write_bytes(b"\0")
    unrelated = tmp_path / ".epoch_10.pth.1.0a1b2c3d.tmp"
    unrelated.write_bytes(b"\0")

    save_atomic({"epoch": 1, "weights": torch.ones(3)}, target)

    assert not abandoned.exists()
    assert in_progress.exists() and unrelated.exists()
    assert torch.load(target, weights_only=True)["epoch"] == 1


def test_remove_stale_temporaries_reports_what_it_removed(tmp_path: Path) -> None:
    leftover = tmp_path / f".a.json.{_dead_pid()}.ff.tmp"
    leftover.write_text("{")
    assert remove_stale_temporaries(tmp_path / "a.json") == [leftover]
    assert remove_stale_temporaries(tmp_path / "a.json") == []
