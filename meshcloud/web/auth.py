"""Authentication: who is asking. The CLI's bearer token, or a console session.

A request to ``/api/`` (other than the public paths) must carry either
``Authorization: Bearer TOKEN`` (the token derived from the cluster secret,
for the CLI; it may do everything an admin may) or a live console session
cookie (see sessions.py). Who it is lands in ``request[PRINCIPAL_KEY]``;
csrf.py and roles.py run after this middleware.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from aiohttp import web

from meshcloud.web.errors import Handler, error_response
from meshcloud.web.sessions import request_session
from meshcloud.web.users import Role

TOKEN_KEY = web.AppKey("api_token", str)
LOGIN_PATH = "/api/v1/session"
PUBLIC_PATHS = frozenset({"/api/v1/health", "/api/v1/peer/hello"})


@dataclass(frozen=True)
class Principal:
    """Who made a request: ``via`` is "token" (the CLI) or "session" (the console)."""

    name: str
    role: Role
    via: str


PRINCIPAL_KEY = web.RequestKey("principal", Principal)


def api_token(secret: str) -> str:
    """The API bearer token derived from the cluster secret."""
    return hmac.new(secret.encode(), b"meshcloud api token v1", hashlib.sha256).hexdigest()


def is_public(path: str, method: str = "GET") -> bool:
    """Paths anyone may reach: health, peer admission, the console's files, logging in."""
    if path == LOGIN_PATH and method == "POST":
        return True
    return path in PUBLIC_PATHS or not path.startswith("/api/")


def request_principal(request: web.Request) -> Principal | None:
    return request.get(PRINCIPAL_KEY)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """401 for API requests with neither the right bearer token nor a live session."""
    header = request.headers.get("Authorization")
    if header is not None:
        scheme, _, given = header.partition(" ")
        expected = request.app[TOKEN_KEY]
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), expected.encode()
        ):
            return error_response(
                401,
                "wrong bearer token: pass `Authorization: Bearer TOKEN` (`meshcloud token`)",
            )
        request[PRINCIPAL_KEY] = Principal("api-token", Role.ADMIN, "token")
    elif (session := request_session(request)) is not None:
        request[PRINCIPAL_KEY] = Principal(session.user, session.role, "session")
    elif not is_public(request.path, request.method):
        return error_response(
            401,
            "not logged in: log in to the console, or pass the API bearer token"
            " (`Authorization: Bearer TOKEN`; `meshcloud token` prints it)",
        )
    return await handler(request)


bearer_middleware = auth_middleware  # the name before console sessions existed
