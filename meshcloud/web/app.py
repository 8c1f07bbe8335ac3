"""The aiohttp application factory."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from meshcloud import __version__
from meshcloud.web.api import CLUSTER_CACHE, CONTROL, RACK_NAME, ClusterCache
from meshcloud.web.auth import TOKEN_KEY, auth_middleware
from meshcloud.web.console import AUDIT, LIMITER, USERS
from meshcloud.web.control import ClusterControl
from meshcloud.web.csrf import csrf_middleware
from meshcloud.web.errors import error_middleware
from meshcloud.web.failover_api import FAILOVER, FailoverView
from meshcloud.web.headers import add_security_headers
from meshcloud.web.ratelimit import LoginLimiter
from meshcloud.web.roles import roles_middleware
from meshcloud.web.routes import add_api_routes, add_console_routes, add_failover_routes
from meshcloud.web.sessions import SESSIONS, SessionStore, session_middleware
from meshcloud.web.tls import PLAIN, PeerTLS
from meshcloud.web.users import UserStore
from meshcloud.web.users_sync import SYNC, UsersSync, sync_context

MAX_BODY_BYTES = 256 * 1024
DEFAULT_SESSION_IDLE_S = 8 * 3600.0


@dataclass
class WebContext:
    """What the web layer needs from the daemon."""

    rack: str
    site: str
    api_token: str
    control: ClusterControl | None = None
    status: Callable[[], dict[str, Any]] = field(default=lambda: {})
    users: UserStore | None = None  # console logins; without it only the bearer token works
    session_idle_s: float = DEFAULT_SESSION_IDLE_S
    audit: Callable[[str, str], None] | None = None  # (kind, sentence) into the event log
    failover: FailoverView | None = None  # kept-aside copies, replication lag, /metrics
    peer_tls: PeerTLS = PLAIN  # how this rack calls the others (users sync)


CONTEXT = web.AppKey("context", WebContext)


async def health(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    return web.json_response(
        {"rack": ctx.rack, "site": ctx.site, "version": __version__, **ctx.status()}
    )


def create_app(ctx: WebContext) -> web.Application:
    """Build the application.

    Middlewares, outermost first:

    1. errors: every domain error becomes a JSON error document, in one place;
    2. sessions: the console session named by the cookie, if live;
    3. auth: who is asking (bearer token or session), 401 otherwise;
    4. csrf: a change made with a session cookie must carry the session's token;
    5. roles: 403 when the caller's role is below what the request needs.

    Security headers are added to every response as it is prepared (streams too).
    """
    app = web.Application(
        client_max_size=MAX_BODY_BYTES,
        middlewares=[
            error_middleware,
            session_middleware,
            auth_middleware,
            csrf_middleware,
            roles_middleware,
        ],
    )
    app.on_response_prepare.append(add_security_headers)
    app[CONTEXT] = ctx
    app[TOKEN_KEY] = ctx.api_token
    app[RACK_NAME] = ctx.rack
    app.router.add_get("/api/v1/health", health)
    if ctx.control is not None:
        app[CONTROL] = ctx.control
        app[CLUSTER_CACHE] = ClusterCache()
        add_api_routes(app)
    if ctx.failover is not None:
        app[FAILOVER] = ctx.failover
        add_failover_routes(app)
    if ctx.users is not None:
        app[USERS] = ctx.users
        app[SESSIONS] = SessionStore(ctx.session_idle_s)
        app[LIMITER] = LoginLimiter()
        if ctx.audit is not None:
            app[AUDIT] = ctx.audit
        if ctx.control is not None:
            app[SYNC] = UsersSync(ctx.users, ctx.control, ctx.rack, ctx.api_token, tls=ctx.peer_tls)
            app.cleanup_ctx.append(sync_context)
        add_console_routes(app)
    return app
