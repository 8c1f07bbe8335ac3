"""The aiohttp application factory."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from meshcloud import __version__
from meshcloud.web.errors import error_middleware

MAX_BODY_BYTES = 256 * 1024


@dataclass
class WebContext:
    """What the web layer needs from the daemon; filled in as parts start."""

    rack: str
    site: str
    status: Callable[[], dict[str, Any]] = field(default=lambda: {})


CONTEXT = web.AppKey("context", WebContext)


async def health(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    return web.json_response(
        {"rack": ctx.rack, "site": ctx.site, "version": __version__, **ctx.status()}
    )


def create_app(ctx: WebContext) -> web.Application:
    """Build the application; routes are wired here, handlers live beside their domain."""
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[error_middleware])
    app[CONTEXT] = ctx
    app.router.add_get("/api/v1/health", health)
    return app
