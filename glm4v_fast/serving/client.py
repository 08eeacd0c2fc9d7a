"""Client side of the embedding server: a small HTTP client and the reader of its answers.

    from glm4v_fast.serving.client import EmbeddingClient

    client = EmbeddingClient("https://encoder:8000", api_key="...")   # or GLM4V_FAST_API_KEY in the environment
    embeddings = client.embed(["cat.jpg", open("dog.png", "rb").read()])   # one (tokens, D) float32 array each

Dependency-free (the standard library and numpy), so that any process can call a server.
"""
from __future__ import annotations

import base64
import json
import os
import ssl
import urllib.error
import urllib.request
from collections.abc import Sequence

import numpy as np

from .settings import api_key_from_env


def embeddings_from_response(item: dict) -> np.ndarray:
    """One `data` (or `videos`) entry of a JSON response as a (tokens, D) float32 array, any encoding and dtype."""
    value = item["embedding"]
    if isinstance(value, str):
        raw = base64.b64decode(value)
        dtype = item.get("dtype", "float32")
        if dtype == "bfloat16":  # the upper half of a float32
            array = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            array = np.frombuffer(raw, dtype={"float32": "<f4", "float16": "<f2"}[dtype]).astype(np.float32)
        return array.reshape(item["shape"])
    return np.asarray(value, dtype=np.float32).reshape(item["shape"])


class ServerError(RuntimeError):
    """The server answered with an error: its HTTP status, error type and message."""

    def __init__(self, status: int, type: str, message: str):
        super().__init__(f"{status} {type}: {message}")
        self.status, self.type, self.message = status, type, message


class EmbeddingClient:
    """Calls a glm4v-fast server (`glm4v-fast serve`, or the Ray Serve deployment).

    Args:
        url: the server's root, e.g. "http://127.0.0.1:8000" (HTTPS when the server has a certificate).
        api_key: sent as `Authorization: Bearer <key>`; default: the GLM4V_FAST_API_KEY environment variable.
        timeout: seconds per request.
        ssl_context: for HTTPS with a private CA or a self-signed certificate (default: the system's CAs).
    """

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 60.0,
                 ssl_context: ssl.SSLContext | None = None):
        self.url = url.rstrip("/")
        self.api_key = api_key if api_key is not None else api_key_from_env()
        self.timeout, self.ssl_context = timeout, ssl_context

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def embed(self, images: Sequence[str | os.PathLike | bytes], dtype: str = "float32") -> list[np.ndarray]:
        """One (tokens, D) float32 array per image (a file path or encoded bytes), in order; `dtype` is what
        crosses the network (bfloat16/float16 halve it)."""
        encoded = []
        for image in images:
            if isinstance(image, (str, os.PathLike)):
                with open(image, "rb") as f:
                    image = f.read()
            encoded.append(base64.b64encode(bytes(image)).decode("ascii"))
        answer = self._call("POST", "/v1/embeddings",
                            {"images": encoded, "encoding_format": "base64", "dtype": dtype})
        return [embeddings_from_response(item) for item in answer["data"]]

    def health(self) -> dict:
        """The /health answer: "status" is "ok", "draining" or "overloaded" (those two come with a 503)."""
        return self._call("GET", "/health")

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=self.headers())
        try:
            with urllib.request.urlopen(request, timeout=self.timeout, context=self.ssl_context) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            status, reason, text = exc.code, str(exc.reason), exc.read().decode(errors="replace")
        try:
            payload = json.loads(text)
        except ValueError:
            raise ServerError(status, "http_error", text or reason) from None
        if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
            raise ServerError(status, payload["error"].get("type", ""), payload["error"].get("message", ""))
        return payload  # an answer with an error status that is not an error (/health while draining)
