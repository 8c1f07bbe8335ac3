"""Failover and replication endpoints: kept-aside copies, replication lag, /metrics.

Routes are wired in routes.py (:func:`meshcloud.web.routes.add_failover_routes`).

- ``GET /api/v1/diverged``: the copies racks kept aside after failovers
  (from the placement map, so any rack answers), each with its size, its
  time span and the generations it holds that the cluster does not;
- ``DELETE /api/v1/diverged/{rack}/{id}``: an operator discards one; the
  owning rack deletes it when it next runs (202: the request is recorded);
- ``GET /api/v1/replication``: this rack's replication engine (shipping,
  fenced, each replica's lag) and the generations the map holds;
- ``GET /metrics``: Prometheus text (public, like ``/api/v1/health``).
"""

from __future__ import annotations

from typing import Any, Protocol

from aiohttp import web

from meshcloud.core.names import validate_name
from meshcloud.core.state import MAX_DIVERGED_ID_LEN


class FailoverView(Protocol):
    def diverged(self) -> list[dict[str, Any]]:
        """Kept-aside copies, from the map."""

    async def discard_diverged(self, rack: str, ident: str) -> dict[str, Any]:
        """Ask ``rack`` to delete one (NotFound if there is no such copy)."""

    def replication_status(self) -> dict[str, Any]:
        """This rack's engine: shipping, fenced, lag per appliance and replica."""

    def metrics_text(self) -> str:
        """Prometheus text lines."""


FAILOVER = web.AppKey("failover", FailoverView)


def _diverged_id(text: str) -> str:
    from meshcloud.core.errors import InvalidInput

    if not 0 < len(text) <= MAX_DIVERGED_ID_LEN or "/" in text or text.startswith("."):
        raise InvalidInput(f"diverged copy id {text[:60]!r} is not valid")
    validate_name("diverged copy", text.replace(".", "-"))
    return text


async def list_diverged(request: web.Request) -> web.Response:
    copies = request.app[FAILOVER].diverged()
    return web.json_response({"diverged": copies})


async def discard_diverged(request: web.Request) -> web.Response:
    rack = validate_name("rack", request.match_info["rack"])
    ident = _diverged_id(request.match_info["id"])
    record = await request.app[FAILOVER].discard_diverged(rack, ident)
    return web.json_response({"discard_requested": record}, status=202)


async def get_replication(request: web.Request) -> web.Response:
    return web.json_response(request.app[FAILOVER].replication_status())


async def metrics(request: web.Request) -> web.Response:
    text = request.app[FAILOVER].metrics_text()
    return web.Response(text=text, content_type="text/plain", charset="utf-8")
