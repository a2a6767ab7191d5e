"""Bounded HTTP downloads: a timeout per read, a deadline for the whole transfer, a size cap.

``urllib``'s timeout applies to each socket read, so a server trickling one byte at a time
keeps a plain ``response.read()`` alive forever, and ``torch.hub.download_url_to_file`` has
no timeout at all. Reading with ``read1`` (at most one socket read per call) lets the loop
below check the clock between reads. A body shorter than its Content-Length is an error.
"""

from __future__ import annotations

import hashlib
import http.client
import time
import urllib.error
import urllib.request
from typing import IO

from tqdm.auto import tqdm

from segscope.errors import SegscopeError

_CHUNK = 1 << 20


def is_url(text: str) -> bool:
    """Whether ``text`` is an http(s) URL (the only remote sources segscope reads)."""
    return text.lower().startswith(("http://", "https://"))


def download(
    url: str,
    sink: IO[bytes],
    *,
    error: type[SegscopeError],
    timeout: float,
    deadline: float,
    max_bytes: int,
    progress: bool = False,
) -> str:
    """Stream ``url`` into ``sink``; return the body's sha256 hex digest.

    Args:
        error: the segscope error type every failure is raised as (``ImageLoadError`` for an
            image, ``CheckpointError`` for weights), with a message naming ``url``.
        timeout: seconds one read (and the connection) may wait.
        deadline: seconds the whole download may take.
        max_bytes: a larger body (announced or received) is refused.
    """
    started = time.monotonic()
    request = urllib.request.Request(url, headers={"User-Agent": "segscope"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            expected = _content_length(response)
            if expected is not None and expected > max_bytes:
                raise error(f"{url} is {expected:,} bytes, over the limit of {max_bytes:,}")
            digest = hashlib.sha256()
            received = 0
            with tqdm(total=expected, unit="B", unit_scale=True, disable=not progress, desc=url) as bar:
                while chunk := response.read1(_CHUNK):
                    received += len(chunk)
                    if received > max_bytes:
                        raise error(f"{url} sent more than the limit of {max_bytes:,} bytes")
                    if time.monotonic() - started > deadline:
                        raise error(f"downloading {url} took longer than {deadline:g} s (got {received:,} bytes)")
                    sink.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            if expected is not None and received != expected:
                raise error(f"{url}: the connection closed after {received:,} of {expected:,} bytes")
            return digest.hexdigest()
    except SegscopeError:
        raise
    except urllib.error.HTTPError as failure:
        raise error(f"could not download {url}: HTTP {failure.code} {failure.reason}") from failure
    except urllib.error.URLError as failure:
        raise error(f"could not reach {url}: {failure.reason}") from failure
    except TimeoutError as failure:
        raise error(f"no answer from {url} within {timeout:g} s") from failure
    except (http.client.HTTPException, OSError, ValueError) as failure:
        # HTTPException covers IncompleteRead and malformed responses, OSError a reset connection.
        raise error(f"could not download {url}: {type(failure).__name__}: {failure}") from failure


def _content_length(response: http.client.HTTPResponse) -> int | None:
    value = response.headers.get("Content-Length")
    return int(value) if value is not None and value.isdigit() else None
