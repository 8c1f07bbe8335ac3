"""Handlers of the console's own API: logging in and out, passwords, users, emergency codes.

Routes are wired in routes.py; who may call what is decided in roles.py.
"""

from __future__ import annotations

import logging

from aiohttp import web

from meshcloud.core.errors import InvalidInput
from meshcloud.core.names import validate_name
from meshcloud.web.auth import request_principal
from meshcloud.web.errors import LoginFailed, TooManyAttempts
from meshcloud.web.ratelimit import LoginLimiter
from meshcloud.web.sessions import (
    COOKIE,
    SESSIONS,
    clear_cookie,
    request_session,
    set_cookie,
)
from meshcloud.web.users import Role, UserStore
from meshcloud.web.validation import read_json

log = logging.getLogger(__name__)

USERS = web.AppKey("users", UserStore)
LIMITER = web.AppKey("login_limiter", LoginLimiter)
AUDIT = web.AppKey("audit", object)  # a callable (kind, message) -> None, when the daemon has one
EMERGENCY_KEY = "(emergency code)"


def _audit(request: web.Request, message: str) -> None:
    """Log a security-relevant action; the daemon also puts it in the event log."""
    log.warning("console: %s", message)
    audit = request.app.get(AUDIT)
    if callable(audit):
        audit("console", message)


def _address(request: web.Request) -> str:
    return request.remote or "unknown"


async def login(request: web.Request) -> web.Response:
    """POST /api/v1/session: {"user", "password"} or {"code"} (an emergency code)."""
    try:
        body = await read_json(request, "Login")
    except InvalidInput:  # never echo a password back in an error message
        raise InvalidInput(
            'send {"user": NAME, "password": PASSWORD} or {"code": EMERGENCY_CODE} as JSON'
        ) from None
    users, limiter, sessions = request.app[USERS], request.app[LIMITER], request.app[SESSIONS]
    address = _address(request)
    code = body.get("code")
    name = EMERGENCY_KEY if code is not None else str(body.get("user", ""))
    wait = limiter.retry_after(name, address)
    if wait > 0:
        raise TooManyAttempts(
            f"too many failed logins: wait {max(1, round(wait))} s and try again", wait
        )
    if code is not None:
        code_id = await users.use_emergency_code(code)
        if code_id is None:
            limiter.failed(name, address)
            raise LoginFailed("that emergency code is wrong or was used already")
        _audit(request, f"emergency code {code_id} used from {address}: admin session opened")
        token, session = sessions.create(f"emergency-{code_id}", Role.ADMIN, emergency=True)
    else:
        if (await users.doc()).users == ():
            raise LoginFailed(
                "this rack has no console users yet: install users.json from the deployment kit"
                " (see docs/console.md), or log in with an emergency code"
            )
        user = await users.authenticate(name, str(body.get("password", "")))
        if user is None:
            limiter.failed(name, address)
            raise LoginFailed("wrong user name or password")
        limiter.succeeded(name)
        log.info("console: %s logged in from %s", user.name, address)
        token, session = sessions.create(
            user.name, user.role, must_change_password=user.must_change_password
        )
    response = web.json_response(session.public())
    set_cookie(request, response, token)
    return response


async def whoami(request: web.Request) -> web.Response:
    """GET /api/v1/session: the caller, with the CSRF token the console sends on changes."""
    session = request_session(request)
    if session is not None:
        return web.json_response(session.public())
    principal = request_principal(request)
    assert principal is not None  # auth.py refused anonymous callers
    return web.json_response(
        {
            "user": principal.name,
            "role": principal.role.label,
            "csrf": None,
            "must_change_password": False,
            "emergency": False,
        }
    )


async def logout(request: web.Request) -> web.Response:
    token = request.cookies.get(COOKIE)
    if token:
        request.app[SESSIONS].drop(token)
    response = web.json_response({"logged_out": True})
    clear_cookie(request, response)
    return response


async def change_password(request: web.Request) -> web.Response:
    """POST /api/v1/session/password: {"current_password", "new_password"}."""
    body = await read_json(request, "PasswordChange")
    session = request_session(request)
    if session is None or session.emergency:
        raise InvalidInput(
            "only a logged-in user can change their own password; an emergency session"
            " sets passwords under Users"
        )
    users = request.app[USERS]
    if not session.must_change_password:
        current = str(body.get("current_password", ""))
        if await users.authenticate(session.user, current) is None:
            raise LoginFailed("the current password is wrong")
    await users.change_password(session.user, body["new_password"])
    request.app[SESSIONS].drop_user(session.user, keep=session)
    session.must_change_password = False
    _audit(request, f"{session.user} changed their password")
    return web.json_response(session.public())


async def list_users(request: web.Request) -> web.Response:
    doc = await request.app[USERS].doc()
    return web.json_response(
        {
            "users": [u.public() for u in doc.users],
            "emergency_codes": {
                "total": len(doc.codes),
                "unused": sum(1 for c in doc.codes if not c.used),
            },
        }
    )


async def put_user(request: web.Request) -> web.Response:
    """PUT /api/v1/users/{name}: {"role", "password"?}; a new user needs a password."""
    name = validate_name("user", request.match_info["name"])
    body = await read_json(request, "UserChange")
    role = Role.parse(body["role"])
    password = body.get("password")
    user = await request.app[USERS].put_user(name, role, password)
    sessions = request.app[SESSIONS]
    if password is not None:
        sessions.drop_user(name)
    sessions.set_role(name, role)
    _audit(request, f"{_who(request)} set user {name} to {role.label}"
                    + (" with a new password" if password is not None else ""))  # fmt: skip
    return web.json_response(user.public())


async def delete_user(request: web.Request) -> web.Response:
    name = validate_name("user", request.match_info["name"])
    await request.app[USERS].delete_user(name)
    request.app[SESSIONS].drop_user(name)
    _audit(request, f"{_who(request)} deleted user {name}")
    return web.json_response({"deleted": name})


async def new_emergency_codes(request: web.Request) -> web.Response:
    """POST /api/v1/emergency-codes: replace every code; the new ones are shown only now."""
    codes = await request.app[USERS].new_codes()
    _audit(request, f"{_who(request)} printed {len(codes)} new emergency codes; old ones void")
    return web.json_response({"codes": codes})


def _who(request: web.Request) -> str:
    principal = request_principal(request)
    return principal.name if principal is not None else "someone"
