"""ServeSettings: the server's limits and batching knobs. Dependency-free, so that building the CLI parser does not
import the server stack."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServeSettings:
    """Limits and batching knobs (the CLI's --max-* options)."""

    max_batch_tokens: int = 16384       # patch rows per packed forward (a bigger single request runs alone)
    max_wait_ms: float = 5.0            # how long the oldest queued request waits for company
    max_queue: int = 256                # admitted requests waiting for the model before 503s
    max_image_pixels: int = 40_000_000  # decoded width*height per image before 413
    max_body_mb: float = 32.0           # request body before 413
    drain_timeout_s: float = 60.0       # how long shutdown waits for admitted requests to be encoded

    def validate(self) -> None:
        for name in ("max_batch_tokens", "max_queue", "max_image_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms!r}")
        if not self.max_body_mb > 0:
            raise ValueError(f"max_body_mb must be > 0, got {self.max_body_mb!r}")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)
