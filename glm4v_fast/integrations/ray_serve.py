"""Online serving on Ray Serve: the embedding server's HTTP API on Ray Serve replicas.

    import ray
    from ray import serve
    from glm4v_fast.integrations.ray_serve import encoder_app

    ray.init()
    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    serve.run(encoder_app(checkpoint="ckpt/"), route_prefix="/")
    # POST http://127.0.0.1:8000/v1/embeddings, GET /health, GET /metrics: as `glm4v-fast serve`

Each replica holds one model and runs the server's own request path (glm4v_fast.serving.EmbeddingService):
the same request parsing and limits, the same response formats (JSON float/base64 with dtypes, safetensors by
Accept), the embedding cache, videos, and the same DynamicBatcher, which packs the requests a replica has in
flight into one varlen forward. `encoder_app` gives every replica one GPU where the Ray cluster has GPUs (one
replica per GPU by default), else one CPU replica. Needs `pip install 'ray[serve]'` and the `serve` extra; this
module imports neither until `encoder_app` is called.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

from ..serving.settings import ServeSettings, api_key_from_env


class GLM4VEncoderReplica:
    """One Ray Serve replica: a model and an EmbeddingService answering the server's routes.

    Args are those of glm4v_fast.pipeline.create_glm4v_vision_encoder, the model name reported in answers, and
    the server's settings (a ServeSettings or a dict of its fields; the connection options do not apply here:
    Ray's HTTP proxy owns the connections).
    """

    def __init__(self, checkpoint: str | os.PathLike | None = None, config: Any = None, device: Any = None,
                 dtype: Any = "auto", attn_backend: str = "auto", kernels: str = "auto", seed: int = 0,
                 model_name: str = "glm4v-vision", settings: ServeSettings | dict | None = None, compile: str = "auto"):
        from ..pipeline import create_glm4v_vision_encoder
        from ..serving.service import EmbeddingService

        if isinstance(settings, dict):
            settings = ServeSettings(**settings)
        settings = settings or ServeSettings()
        settings.validate()
        _, model, processor = create_glm4v_vision_encoder(
            config=config, checkpoint=checkpoint, device=device, dtype=dtype, attn_backend=attn_backend,
            kernels=kernels, seed=seed, max_image_pixels=settings.max_image_pixels, compile=compile)
        self.service = EmbeddingService(model, processor, settings, model_name=model_name)
        self.service.start()

    async def __call__(self, request):
        # The server's own route table, error rendering and request metrics (Ray hands over a Starlette request,
        # with the route prefix as root_path).
        return await self.service.dispatch(request)

    def check_health(self) -> None:
        """Ray Serve's replica health check: a replica whose batching thread has died is restarted."""
        if not self.service.running:
            raise RuntimeError("the batcher thread is not running")

    def __del__(self):
        # Ray Serve calls this when it stops the replica: finish the admitted requests (up to --drain-timeout).
        service = getattr(self, "service", None)
        if service is not None:
            service.stop()


def encoder_app(checkpoint: str | os.PathLike | None = None, *, num_replicas: int | None = None,
                num_gpus: float | None = None, num_cpus: float = 1.0, name: str = "glm4v-encoder",
                settings: ServeSettings | dict | None = None, api_key: str | None = None, **model_kwargs: Any):
    """A Ray Serve application (`serve.run(encoder_app(...))`) of GLM4VEncoderReplica.

    num_gpus: GPUs per replica; default 1 where the cluster has GPUs (ray.init() first), else 0 (CPU).
    num_replicas: default one per GPU with GPUs, else 1.
    settings: the server's ServeSettings (limits, batching, cache); its max_queue is also the replica's
        max_ongoing_requests, so that the requests the batcher could pack together reach it.
    api_key: the replicas require `Authorization: Bearer <api_key>` on /v1/embeddings, as `glm4v-fast serve
        --api-key` does; default: settings' api_key, else the GLM4V_FAST_API_KEY environment variable of the
        process calling this (the replicas get the key with their settings).
    model_kwargs: config, device, dtype, attn_backend, kernels, compile, seed, model_name (see GLM4VEncoderReplica).
    """
    import ray
    from ray import serve

    if isinstance(settings, dict):
        settings = ServeSettings(**settings)
    settings = settings or ServeSettings()
    settings = dataclasses.replace(settings, api_key=api_key or settings.api_key or api_key_from_env())
    settings.validate()
    gpus = ray.cluster_resources().get("GPU", 0.0) if ray.is_initialized() else 0.0
    if num_gpus is None:
        num_gpus = 1.0 if gpus >= 1 else 0.0
    if num_replicas is None:
        num_replicas = max(1, int(gpus // num_gpus)) if num_gpus else 1
    deployment = serve.deployment(
        GLM4VEncoderReplica, name=name, num_replicas=num_replicas, max_ongoing_requests=settings.max_queue,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus})
    return deployment.bind(checkpoint=None if checkpoint is None else os.fspath(checkpoint),
                           settings=dataclasses.asdict(settings), **model_kwargs)
