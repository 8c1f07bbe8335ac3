"""Authorization: what each role may do, in one table.

Runs after auth.py and csrf.py. Reading needs ``viewer``; changing the
cluster needs ``operator``; users and emergency codes need ``admin``. A
session whose password must change may only change it, read itself or log out.
"""

from __future__ import annotations

from aiohttp import web

from meshcloud.web.auth import request_principal
from meshcloud.web.errors import Handler, error_response
from meshcloud.web.sessions import request_session
from meshcloud.web.users import Role

ADMIN_PREFIXES = ("/api/v1/users", "/api/v1/emergency-codes")
SELF_PATHS = frozenset({"/api/v1/session", "/api/v1/session/password"})


def required_role(method: str, path: str) -> Role:
    """The least role that may make this request."""
    if path.startswith(ADMIN_PREFIXES):
        return Role.ADMIN
    if path in SELF_PATHS or method in ("GET", "HEAD", "OPTIONS"):
        return Role.VIEWER
    return Role.OPERATOR


@web.middleware
async def roles_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """403 when the caller's role is below what the request needs."""
    principal = request_principal(request)
    if principal is None:  # a public path (auth.py refused the others)
        return await handler(request)
    session = request_session(request)
    if (
        principal.via == "session"
        and session is not None
        and session.must_change_password
        and request.path not in SELF_PATHS
    ):
        return error_response(403, "change your password first (the console asks for a new one)")
    need = required_role(request.method, request.path)
    if principal.role < need:
        return error_response(
            403,
            f"{principal.name} is a {principal.role.label}: this needs the {need.label} role;"
            " ask an admin",
        )
    return await handler(request)
