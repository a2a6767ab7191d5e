"""Fetching weights from the Hugging Face Hub or a URL into a local cache.

Failures (offline machine, unknown repository, HTTP error) become ``CheckpointError`` with
a hint on how to use a local copy instead.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.parse
from pathlib import Path

from segscope.errors import CheckpointError

# Files of a transformers model directory that segscope reads.
HF_FILES = ["config.json", "model.safetensors", "pytorch_model.bin"]


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


def fetch_url(url: str, filename: str | None = None) -> Path:
    """Download ``url`` into the cache once and return the local path."""
    import torch.hub

    name = filename or Path(urllib.parse.urlparse(url).path).name or "checkpoint"
    target = cache_dir() / "downloads" / name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        # Writes to a temporary file and renames, so an interrupted download leaves no partial file.
        torch.hub.download_url_to_file(url, str(target), progress=True)
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise CheckpointError(
            f"cannot download {url} ({error}). If this machine is offline, download the file "
            f"elsewhere and pass its local path as model=... (or put it at {target})"
        ) from error
    return target
