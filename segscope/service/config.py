"""The service's settings: batching, limits and timeouts, checked once when the server starts."""

from __future__ import annotations

from dataclasses import dataclass

from segscope.errors import OptionError
from segscope.io import DEFAULT_MAX_PIXELS


@dataclass(frozen=True)
class ServiceConfig:
    """How ``segscope serve`` batches requests and what it refuses.

    Attributes:
        task: the task of a request that names none (None: the model's own task).
        device: "cpu", "cuda", ... (None: CUDA when available).
        batch_size: most images run in one forward pass; 1 switches batching off.
        max_wait_ms: longest a request waits for others to fill its batch.
        queue_size: most requests admitted beyond the running batch; more get 503.
        max_upload_bytes: largest image upload (413 above it).
        max_pixels: largest image, in pixels, read from its header before decoding (413 above it).
        timeout_s: longest a request may wait for its result, queue included (504 after it).
    """

    task: str | None = None
    device: str | None = None
    batch_size: int = 8
    max_wait_ms: float = 10.0
    queue_size: int = 64
    max_upload_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        checks = {
            "batch_size": self.batch_size >= 1,
            "max_wait_ms": self.max_wait_ms >= 0,
            "queue_size": self.queue_size >= 1,
            "max_upload_bytes": self.max_upload_bytes >= 1,
            "max_pixels": 1 <= self.max_pixels <= DEFAULT_MAX_PIXELS,
            "timeout_s": self.timeout_s > 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            values = ", ".join(f"{name}={getattr(self, name)!r}" for name in bad)
            raise OptionError(
                f"invalid service setting(s): {values} (batch_size and queue_size >= 1, max_wait_ms >= 0, "
                f"timeout_s > 0, max_upload_bytes >= 1, max_pixels in [1, {DEFAULT_MAX_PIXELS:,}])"
            )

    @property
    def capacity(self) -> int:
        """Requests admitted at once: the running batch plus the queue."""
        return self.batch_size + self.queue_size
