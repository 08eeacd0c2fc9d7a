"""Prometheus metrics of the embedding server, on a registry of its own.

A private `CollectorRegistry` (instead of prometheus-client's global one) lets several apps live in one process
(tests, embedding the app in another service) without "duplicated timeseries" errors.
"""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_TOKEN_BUCKETS = (64, 256, 1024, 4096, 16384, 65536, 262144)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("glm4v_requests", "HTTP requests by route and status code",
                                ["route", "status"], registry=r)
        self.images = Counter("glm4v_images", "Images encoded", registry=r)
        self.abandoned = Counter("glm4v_abandoned_requests", "Requests dropped before their response because the "
                                 "client disconnected", registry=r)
        self.request_seconds = Histogram("glm4v_request_latency_seconds",
                                         "Time from receiving a /v1/embeddings request to its response",
                                         buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_seconds = Histogram("glm4v_queue_wait_seconds", "Time a request waited for its batch to start",
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.forward_seconds = Histogram("glm4v_batch_latency_seconds", "Model forward time per batch",
                                         buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_images = Histogram("glm4v_batch_size_images", "Images per batched forward",
                                      buckets=_COUNT_BUCKETS, registry=r)
        self.batch_requests = Histogram("glm4v_batch_size_requests", "Requests per batched forward",
                                        buckets=_COUNT_BUCKETS, registry=r)
        self.batch_tokens = Histogram("glm4v_batch_size_tokens", "Patch tokens per batched forward",
                                      buckets=_TOKEN_BUCKETS, registry=r)
        self.queue_depth = Gauge("glm4v_queue_depth", "Admitted requests waiting for the model", registry=r)
        self.in_flight = Gauge("glm4v_requests_in_flight", "Embedding requests being handled", registry=r)
        self.videos = Counter("glm4v_videos", "Videos encoded", registry=r)
        self.cache_hits = Counter("glm4v_cache_hits", "Images answered from the embedding cache", registry=r)
        self.cache_misses = Counter("glm4v_cache_misses", "Images looked up in the embedding cache and not found "
                                    "(encoded)", registry=r)
        self.cache_evictions = Counter("glm4v_cache_evictions", "Embeddings evicted from the cache to stay within "
                                       "--cache-mb", registry=r)
        self.cache_bytes = Gauge("glm4v_cache_bytes", "Bytes of embeddings held by the cache", registry=r)
        self.cache_entries = Gauge("glm4v_cache_entries", "Embeddings held by the cache", registry=r)

    #: Content-Type of render()'s output (Prometheus text exposition format).
    content_type = CONTENT_TYPE_LATEST

    def render(self) -> bytes:
        return generate_latest(self.registry)
