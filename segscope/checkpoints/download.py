"""Fetching weights from the Hugging Face Hub or a URL into a local cache.

Failures (offline machine, unknown repository, HTTP error) become ``CheckpointError`` with
a hint on how to use a local copy instead.
"""

from __future__ import annotations

import hashlib
import os
import urllib.parse
from pathlib import Path
from typing import IO

from segscope.errors import CheckpointError
from segscope.fileio import atomic_write
from segscope.net import download

# Files of a transformers model directory that segscope reads.
HF_FILES = ["config.json", "model.safetensors", "pytorch_model.bin"]

# URL downloads: a silent server is given up after READ_TIMEOUT_S, any download after
# DEADLINE_S (hours: checkpoints reach gigabytes over slow links), any body over MAX_BYTES.
READ_TIMEOUT_S = 60.0
DEADLINE_S = 4 * 3600.0
MAX_BYTES = 8 * 1024**3


def cache_dir() -> Path:
    """segscope's download cache: ``$SEGSCOPE_CACHE`` or ``~/.cache/segscope``."""
    return Path(os.environ.get("SEGSCOPE_CACHE", Path.home() / ".cache" / "segscope"))


def fetch_hub_directory(repo_id: str, revision: str | None = None) -> Path:
    """Download (or find in the HF cache) the files of a transformers checkpoint repository."""
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(repo_id=repo_id, revision=revision, allow_patterns=HF_FILES)
    except Exception as error:  # huggingface_hub raises many types: offline, 404, auth, HTTP
        raise CheckpointError(
            f"cannot fetch {repo_id!r} from the Hugging Face Hub ({type(error).__name__}: {error}). "
            f"If this machine is offline, download the repository elsewhere and pass its local "
            f"directory (config.json + model.safetensors or pytorch_model.bin) as model=..."
        ) from error
    return Path(local)


def url_cache_path(url: str, filename: str | None = None) -> Path:
    """Where ``fetch_url`` keeps ``url``: ``downloads/<hash of the whole URL>/<file name>``."""
    name = filename or Path(urllib.parse.urlparse(url).path).name or "checkpoint"
    return cache_dir() / "downloads" / hashlib.sha256(url.encode()).hexdigest()[:16] / name


def fetch_url(url: str, filename: str | None = None, sha256: str | None = None) -> Path:
    """Download ``url`` into the cache once and return the local path.

    The cache entry is keyed by the whole URL (two URLs ending in the same file name are two
    entries). The body goes to a temporary file and is renamed into the cache only when it
    arrived complete and, if ``sha256`` is given, with that digest, so an interrupted or wrong
    download never poisons later loads. ``sha256`` may be a prefix of the digest of at least 8
    hex digits (torch hub names its files that way).
    """
    if sha256 is not None and len(sha256) < 8:
        raise ValueError(f"a sha256 prefix needs at least 8 hex digits, got {sha256!r}")
    target = url_cache_path(url, filename)
    if target.is_file():
        return target

    def write(stream: IO[bytes]) -> None:
        digest = download(
            url,
            stream,
            error=CheckpointError,
            timeout=READ_TIMEOUT_S,
            deadline=DEADLINE_S,
            max_bytes=MAX_BYTES,
            progress=True,
        )
        if sha256 is not None and not digest.startswith(sha256.lower()):
            raise CheckpointError(f"{url} has sha256 {digest}, expected {sha256}: a different or damaged file")

    try:
        atomic_write(target, write)
    except CheckpointError as error:
        raise CheckpointError(
            f"{error}. If this machine is offline, download the file elsewhere and pass its local "
            f"path as model=... (or put it at {target})"
        ) from error
    return target
