"""An LRU cache of image embeddings, bounded in bytes, keyed by a hash of the decoded pixels.

Multi-turn chats resend the same images with every turn; a VLM server's encoder cache answers those from memory
instead of running the tower again. The key is a BLAKE2b digest of the decoded RGB pixels (after EXIF rotation,
so the same picture re-encoded as PNG or JPEG-with-another-orientation tag is the same entry only when its pixels
are) plus everything that changes the embedding for the same pixels: the processor's settings and a fingerprint
of the model (name, dtype). One cache belongs to one service, so the weights are fixed for its lifetime.
"""
from __future__ import annotations

import collections
import hashlib
import json
import threading

import torch


def settings_fingerprint(*parts) -> bytes:
    """Stable bytes for the JSON-serialisable settings `parts` (processor dict, model name, dtype, ...)."""
    return json.dumps(parts, sort_keys=True, default=str).encode()


def image_key(fingerprint: bytes, image) -> bytes:
    """The cache key of a decoded RGB PIL image: BLAKE2b-128 over the settings, the size and the pixels."""
    h = hashlib.blake2b(fingerprint, digest_size=16)
    h.update(f"|{image.mode}|{image.width}x{image.height}|".encode())
    h.update(image.tobytes())
    return h.digest()


class EmbeddingCache:
    """Thread-safe LRU of `(embedding, grid_thw row)` by key, holding at most `max_bytes` of embeddings.

    An entry larger than the whole budget is not stored. `max_bytes == 0` disables the cache (every lookup is a
    miss, nothing is stored). Counters (hits, misses, evictions) and the current size are kept for /metrics.
    """

    def __init__(self, max_bytes: int, metrics=None):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.metrics = metrics
        self._entries: collections.OrderedDict[bytes, tuple[torch.Tensor, tuple[int, int, int]]] = \
            collections.OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes):
        """(embedding, grid) for `key`, marked most recently used; None on a miss."""
        with self._lock:
            entry = self._entries.get(key) if self.enabled else None
            if entry is None:
                self.misses += 1
                if self.metrics is not None:
                    self.metrics.cache_misses.inc()
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            if self.metrics is not None:
                self.metrics.cache_hits.inc()
            return entry

    def put(self, key: bytes, embedding: torch.Tensor, grid) -> None:
        """Store a (tokens, D) CPU embedding (kept as is: callers must not modify it afterwards)."""
        size = embedding.numel() * embedding.element_size()
        if not self.enabled or size > self.max_bytes:
            return
        grid = tuple(int(x) for x in grid)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= old[0].numel() * old[0].element_size()
            self._entries[key] = (embedding, grid)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (evicted, _) = self._entries.popitem(last=False)
                self.bytes -= evicted.numel() * evicted.element_size()
                self.evictions += 1
                if self.metrics is not None:
                    self.metrics.cache_evictions.inc()
            if self.metrics is not None:
                self.metrics.cache_bytes.set(self.bytes)
                self.metrics.cache_entries.set(len(self._entries))
