"""The Starlette app: every request goes to EmbeddingService.dispatch, the route table Ray Serve uses too.

The service's pieces live in rooms of their own: the request protocol (`protocol`), decoding within a request's
budget (`decoding`), the answer formats (`rendering`), the service and its routes (`service`), the client helper
(`client`). Their public names are re-exported here, where they were before the split.
"""
from __future__ import annotations

import contextlib

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.routing import Mount

from .client import embeddings_from_response
from .protocol import (DTYPES, ENCODING_FORMATS, REQUEST_FIELDS, SAFETENSORS_MEDIA_TYPE, ApiError, EmbeddingRequest,
                       parse_request, wants_safetensors)
from .service import ROUTES, EmbeddingService


def create_app(service: EmbeddingService) -> Starlette:
    """The ASGI app for `service`. Its lifespan starts the batcher and, at shutdown, drains it."""

    async def serve(scope, receive, send) -> None:
        response = await service.dispatch(Request(scope, receive))
        await response(scope, receive, send)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.start()
        try:
            yield
        finally:
            # uvicorn has already waited for open requests; this finishes whatever they left in the queue.
            await run_in_threadpool(service.stop)

    # One mount for every path and method: routing (404, 405) is the service's, as on Ray Serve.
    app = Starlette(routes=[Mount("", app=serve)], lifespan=lifespan)
    app.state.service = service
    return app


__all__ = ["create_app", "EmbeddingService", "ROUTES", "embeddings_from_response", "ApiError", "EmbeddingRequest",
           "parse_request", "wants_safetensors", "SAFETENSORS_MEDIA_TYPE", "REQUEST_FIELDS", "ENCODING_FORMATS",
           "DTYPES"]
