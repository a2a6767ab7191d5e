"""Writing files so that a crash never leaves a truncated file under the final name.

Every file segscope writes (models, training checkpoints, downloads, prediction outputs) goes
through ``atomic_write``: bytes go to a hidden temporary file beside the target, are flushed
and fsynced, and only then renamed over the target, after which the folder entry is fsynced
too. A process killed mid-write leaves the old file (or none) and a temporary file, which the
next write of the same target removes.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

# ".{target name}.{writer pid}.{random}.tmp": the pid tells abandoned files from live ones.
_TEMP_SUFFIX = ".tmp"


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None], mode: int = 0o644) -> Path:
    """Call ``write(stream)`` on a temporary file and rename it to ``path`` once it is on disk.

    If ``write`` raises, ``path`` is left as it was and the temporary file is removed.
    """
    with atomic_path(path, mode) as temporary, open(temporary, "wb") as stream:
        write(stream)
    return Path(path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, mode: int = 0o644) -> Iterator[Path]:
    """For writers that need a file name, not a stream (``torch.save``, safetensors'
    ``save_file``): yields a temporary path, renamed to ``path`` when the block ends cleanly
    (and deleted when it raises)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    temporary = _temporary_name(path)
    try:
        yield temporary
        with open(temporary, "rb+") as stream:
            os.fsync(stream.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    _fsync_folder(path.parent)


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete temporary files of ``path`` left by writers that no longer run; returns them.

    A temporary file names its writer's process id; one whose process is gone was abandoned by
    a crash. (Only the writing machine's processes are seen: segscope writes each file from
    one process, rank 0 under DDP.)
    """
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(\d+)\.[0-9a-f]+{re.escape(_TEMP_SUFFIX)}$")
    removed = []
    if not path.parent.is_dir():
        return removed
    for candidate in path.parent.iterdir():
        match = pattern.match(candidate.name)
        if match and not _process_alive(int(match.group(1))):
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


def _temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{_TEMP_SUFFIX}")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); folders cannot be opened this way on Windows."""
    if os.name != "posix":
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
