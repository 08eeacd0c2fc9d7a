"""The API key: `Authorization: Bearer <key>` on the embedding route, compared in constant time.

`/health` stays open for load balancers, and `/metrics` too (as vLLM does): it carries counts and latencies, no
request content, and a Prometheus scraper then needs no secret. Set the key with `--api-key` or, to keep it out
of process lists, the environment variable GLM4V_FAST_API_KEY.
"""
from __future__ import annotations

import hmac

from .protocol import ApiError

_CHALLENGE = 'Bearer realm="glm4v-fast"'


class ApiKeyCheck:
    """Refuses (401) a request without `Authorization: Bearer <key>`; lets every request through without a key."""

    def __init__(self, key: str | None):
        self._key = key.encode() if key else None

    @property
    def required(self) -> bool:
        return self._key is not None

    def check(self, authorization: str | None) -> None:
        """`authorization`: the request's Authorization header (None when absent)."""
        if self._key is None:
            return
        if not authorization:
            raise ApiError(401, "missing Authorization header: this server needs 'Authorization: Bearer <API key>'",
                           "authentication_error", {"WWW-Authenticate": _CHALLENGE})
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "the Authorization header must be 'Bearer <API key>'", "authentication_error",
                           {"WWW-Authenticate": _CHALLENGE})
        # Constant time: how long the comparison takes must not tell how much of a guess was right.
        if not hmac.compare_digest(token.strip().encode(), self._key):
            raise ApiError(401, "invalid API key in the Authorization header", "authentication_error",
                           {"WWW-Authenticate": _CHALLENGE + ', error="invalid_token"'})
