"""The aiohttp application factory."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from meshcloud import __version__
from meshcloud.web.api import CONTROL, RACK_NAME
from meshcloud.web.auth import TOKEN_KEY, bearer_middleware
from meshcloud.web.control import ClusterControl
from meshcloud.web.errors import error_middleware
from meshcloud.web.routes import add_api_routes

MAX_BODY_BYTES = 256 * 1024


@dataclass
class WebContext:
    """What the web layer needs from the daemon."""

    rack: str
    site: str
    api_token: str
    control: ClusterControl | None = None
    status: Callable[[], dict[str, Any]] = field(default=lambda: {})


CONTEXT = web.AppKey("context", WebContext)


async def health(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    return web.json_response(
        {"rack": ctx.rack, "site": ctx.site, "version": __version__, **ctx.status()}
    )


def create_app(ctx: WebContext) -> web.Application:
    """Build the application.

    Middlewares, outermost first: errors (maps every domain error to a JSON
    error document, in one place), then bearer authentication.
    """
    app = web.Application(
        client_max_size=MAX_BODY_BYTES, middlewares=[error_middleware, bearer_middleware]
    )
    app[CONTEXT] = ctx
    app[TOKEN_KEY] = ctx.api_token
    app[RACK_NAME] = ctx.rack
    app.router.add_get("/api/v1/health", health)
    if ctx.control is not None:
        app[CONTROL] = ctx.control
        add_api_routes(app)
    return app
