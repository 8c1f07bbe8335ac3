"""CSRF protection for the console: every change made with a session cookie
must carry the session's token in the ``X-CSRF-Token`` header.

A page on another site can make the browser send the cookie (SameSite=Strict
already stops that in current browsers) but cannot read the token, so it
cannot set the header. Requests authenticated with the bearer token (the CLI)
carry no cookie and need no token. Logging in needs no token (there is no
session yet) but must be JSON from this origin: other sites cannot send that
without a CORS preflight, which the rack never grants.
"""

from __future__ import annotations

import hmac
from urllib.parse import urlsplit

from aiohttp import web

from meshcloud.web.auth import LOGIN_PATH, request_principal
from meshcloud.web.errors import Handler, error_response
from meshcloud.web.sessions import request_session

HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _foreign_origin(request: web.Request) -> bool:
    """True when the browser says the request comes from another origin."""
    origin = request.headers.get("Origin")
    if origin is None:  # not a browser, or a same-origin GET-like request
        return False
    if origin == "null":  # sandboxed frames, file:// pages
        return True
    return urlsplit(origin).netloc != request.host


@web.middleware
async def csrf_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """403 for a cookie-authenticated change without the session's CSRF token."""
    if request.method in SAFE_METHODS:
        return await handler(request)
    principal = request_principal(request)
    if principal is not None and principal.via == "token":
        return await handler(request)
    if _foreign_origin(request):
        return error_response(403, "refused: the request comes from another site")
    session = request_session(request)
    if session is not None and not (request.path == LOGIN_PATH and request.method == "POST"):
        given = request.headers.get(HEADER, "")
        if not hmac.compare_digest(given.encode(), session.csrf.encode()):
            return error_response(
                403,
                f"refused: missing or wrong {HEADER} header; reload the console and try again",
            )
    return await handler(request)
