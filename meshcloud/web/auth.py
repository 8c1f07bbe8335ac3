"""Bearer-token authentication for the API (the console adds user logins)."""

from __future__ import annotations

import hashlib
import hmac

from aiohttp import web

from meshcloud.web.errors import Handler, error_response

TOKEN_KEY = web.AppKey("api_token", str)
PUBLIC_PATHS = frozenset({"/api/v1/health", "/api/v1/peer/hello"})


def api_token(secret: str) -> str:
    """The API bearer token derived from the cluster secret."""
    return hmac.new(secret.encode(), b"meshcloud api token v1", hashlib.sha256).hexdigest()


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or not path.startswith("/api/")


@web.middleware
async def bearer_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse API requests without the right bearer token (401, constant-time compare)."""
    if is_public(request.path):
        return await handler(request)
    expected = request.app[TOKEN_KEY]
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode(), expected.encode()
    ):
        return error_response(
            401,
            "missing or wrong bearer token: pass `Authorization: Bearer TOKEN` (`meshcloud token`)",
        )
    return await handler(request)
