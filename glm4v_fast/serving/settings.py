"""ServeSettings: the server's limits, timeouts and batching knobs. Dependency-free, so that building the CLI parser
does not import the server stack."""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class ServeSettings:
    """Limits, timeouts and batching knobs (the CLI's --max-* and --*-timeout options)."""

    max_batch_tokens: int = 16384       # patch rows per packed forward (a bigger single request runs alone)
    max_wait_ms: float = 5.0            # how long the oldest queued request waits for company
    max_queue: int = 256                # admitted requests (being decoded or waiting for the model) before 503s
    max_image_pixels: int = 40_000_000  # decoded width*height per image before 413
    max_body_mb: float = 32.0           # request body before 413
    drain_timeout_s: float = 60.0       # how long shutdown waits for admitted requests to be encoded
    # per-request budgets, checked before the work is done
    max_images_per_request: int = 64    # images in one request before 413
    max_patches_per_request: int = 65536  # patch rows of one request (from the headers' sizes) before 413
    max_jpeg_scans: int = 100           # scans of one JPEG (a decoding pass each) before 413; = imageio's default
    decode_timeout_s: float = 10.0      # admission to preprocessed: a request over it gets 503 (waited) or 413
    decode_workers: int = 0             # threads decoding and preprocessing requests (0: min(8, CPU count))
    overload_wait_s: float = 1.0        # /health says "overloaded" when a request waits this long for a decoder
    cache_mb: float = 512.0             # embedding cache (LRU, by decoded-pixel hash); 0 disables it
    # connections
    max_connections: int = 1000         # open connections; more are answered 503 and closed at once
    header_timeout_s: float = 10.0      # from connection (or the first byte of a request) to its complete headers
    body_timeout_s: float = 60.0        # to receive a whole request body
    keep_alive_timeout_s: float = 5.0   # an idle keep-alive connection is closed after this

    def validate(self) -> None:
        for name in ("max_batch_tokens", "max_queue", "max_image_pixels", "max_images_per_request",
                     "max_patches_per_request", "max_jpeg_scans", "max_connections"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.decode_workers, bool) or not isinstance(self.decode_workers, int) \
                or self.decode_workers < 0:
            raise ValueError(f"decode_workers must be a non-negative integer, got {self.decode_workers!r}")
        if not (isinstance(self.cache_mb, (int, float)) and self.cache_mb >= 0):
            raise ValueError(f"cache_mb must be >= 0, got {self.cache_mb!r}")
        if not self.max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms!r}")
        for name in ("max_body_mb", "decode_timeout_s", "overload_wait_s", "header_timeout_s", "body_timeout_s",
                     "keep_alive_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"{name} must be > 0, got {value!r}")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def cache_bytes(self) -> int:
        return int(self.cache_mb * 1024 * 1024)

    @property
    def decode_threads(self) -> int:
        return self.decode_workers or min(8, os.cpu_count() or 1)
