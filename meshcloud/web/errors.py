"""Domain errors mapped to HTTP errors, in exactly one place."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from meshcloud.core.errors import (
    ConfigError,
    Conflict,
    InvalidInput,
    MeshcloudError,
    NotFound,
    Unavailable,
)

log = logging.getLogger(__name__)


class LoginFailed(MeshcloudError):
    """Wrong user name, password or emergency code (401)."""


class TooManyAttempts(MeshcloudError):
    """Login attempts are rate-limited for now (429 with Retry-After)."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


STATUS_FOR: tuple[tuple[type[MeshcloudError], int], ...] = (
    (LoginFailed, 401),
    (TooManyAttempts, 429),
    (InvalidInput, 400),
    (ConfigError, 400),
    (NotFound, 404),
    (Conflict, 409),
    (Unavailable, 503),
    (MeshcloudError, 500),
)


def error_response(status: int, message: str) -> web.Response:
    """A JSON error document: {"error": {"status": N, "message": "..."}}."""
    body = {"error": {"status": status, "message": message}}
    return web.Response(status=status, text=json.dumps(body), content_type="application/json")


def status_for(exc: MeshcloudError) -> int:
    for kind, status in STATUS_FOR:
        if isinstance(exc, kind):
            return status
    return 500


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn MeshcloudError and aiohttp's HTTP errors into JSON error documents."""
    try:
        return await handler(request)
    except MeshcloudError as exc:
        status = status_for(exc)
        if status == 500:  # a bug or an unexpected failure; 503 is an expected state
            log.exception("request failed: %s %s", request.method, request.path)
        response = error_response(status, str(exc))
        if isinstance(exc, TooManyAttempts):
            response.headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = exc.text if exc.text and not exc.text.startswith(str(exc.status)) else exc.reason
        return error_response(exc.status, message or exc.reason)
