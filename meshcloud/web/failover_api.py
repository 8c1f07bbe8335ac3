"""Failover and replication endpoints: kept-aside copies, replication lag, /metrics.

Routes are wired in routes.py (:func:`meshcloud.web.routes.add_failover_routes`).

- ``GET /api/v1/diverged``: the copies racks kept aside after failovers
  (from the placement map, so any rack answers), each with its size, its
  time span and the generations it holds that the cluster does not;
- ``DELETE /api/v1/diverged/{rack}/{id}``: an operator discards one; the
  owning rack deletes it when it next runs (202: the request is recorded);
- ``GET /api/v1/replication``: this rack's replication engine (shipping,
  fenced, each replica's lag) and the generations the map holds;
- ``GET /metrics``: Prometheus text (public, like ``/api/v1/health``);
- ``POST /api/v1/drill``: begin a fire drill (docs/drill.md) run by this
  rack, ``{"appliance": NAME or null, "restore": true}`` (202 with the
  report so far); ``GET /api/v1/drill[?id=ID]``: the map's drill and this
  rack's run with its report; ``DELETE /api/v1/drill``: end the map's drill.
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

    async def start_drill(self, appliance: str | None, restore: bool) -> dict[str, Any]:
        """Check (Conflict/NotFound when unsafe) and begin a drill; its report so far."""

    def drill_status(self, ident: str | None) -> dict[str, Any]:
        """``{"current": the map's drill, "report": this rack's run}``."""

    async def end_drill(self) -> dict[str, Any]:
        """End the map's drill (Conflict when none)."""


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


async def start_drill(request: web.Request) -> web.Response:
    from meshcloud.core.errors import InvalidInput
    from meshcloud.web.validation import read_json

    appliance, restore = None, True
    if request.can_read_body:
        body = await read_json(request, "DrillRequest")
        unknown = set(body) - {"appliance", "restore"}
        if unknown:
            raise InvalidInput(f"drill: unknown field(s) {', '.join(sorted(unknown))[:80]}")
        if body.get("appliance") is not None:
            appliance = validate_name("appliance", body["appliance"])
        restore = body.get("restore", True)
        if not isinstance(restore, bool):
            raise InvalidInput("drill: restore must be true or false")
    report = await request.app[FAILOVER].start_drill(appliance, restore)
    return web.json_response({"drill": report}, status=202)


async def get_drill(request: web.Request) -> web.Response:
    ident = request.query.get("id")
    if ident is not None:
        validate_name("drill", ident)
    return web.json_response(request.app[FAILOVER].drill_status(ident))


async def end_drill(request: web.Request) -> web.Response:
    return web.json_response({"ended": await request.app[FAILOVER].end_drill()})
