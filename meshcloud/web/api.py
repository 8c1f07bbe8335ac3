"""Handlers of the v1 JSON API. Routes are wired in routes.py."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from meshcloud.core.errors import InvalidInput, NotFound
from meshcloud.core.models import ApplianceSpec
from meshcloud.core.names import validate_name
from meshcloud.core.power import must_evacuate
from meshcloud.web.control import ClusterControl
from meshcloud.web.sse import stream
from meshcloud.web.validation import read_json

CONTROL = web.AppKey("control", ClusterControl)
RACK_NAME = web.AppKey("rack_name", str)
RECENT_EVENTS = 50


def cluster_document(control: ClusterControl, answered_by: str) -> dict[str, Any]:
    snap = control.snapshot()
    doc = snap.to_dict()
    # Each rack carries its power state (null until it reports; docs/power.md).
    doc.pop("power", None)
    for name, rack_doc in doc["racks"].items():
        power = snap.power.get(name)
        rack_doc["power"] = (
            None if power is None else power.to_dict() | {"evacuating": must_evacuate(power)}
        )
    doc["leader"] = control.leader()
    doc["answered_by"] = answered_by
    doc["health"] = control.health()
    doc["events"] = [e.to_dict() for e in control.recent_events(RECENT_EVENTS)]
    return doc


@dataclass
class ClusterCache:
    """The last serialised cluster document, reused for a short while under load."""

    revision: int = -1
    at: float = -1.0
    body: bytes = b""


CLUSTER_CACHE = web.AppKey("cluster_cache", ClusterCache)
CLUSTER_CACHE_S = 0.2  # health and lease ages may be this stale; the map never is


async def get_cluster(request: web.Request) -> web.Response:
    control = request.app[CONTROL]
    cache = request.app.get(CLUSTER_CACHE)
    now = time.monotonic()
    revision = control.snapshot().revision
    if cache is not None and cache.revision == revision and now - cache.at < CLUSTER_CACHE_S:
        body = cache.body
    else:
        doc = cluster_document(control, request.app[RACK_NAME])
        body = json.dumps(doc, separators=(",", ":")).encode()
        if cache is not None:
            cache.revision, cache.at, cache.body = revision, now, body
    return web.Response(body=body, content_type="application/json")


def _appliance_status(control: ClusterControl, name: str) -> dict[str, Any]:
    snap = control.snapshot()
    spec = snap.appliances.get(name)
    if spec is None:
        raise NotFound(f"appliance {name} does not exist")
    asg = snap.assignments.get(name)
    return {
        "spec": spec.to_dict(),
        "assignment": asg.to_dict() if asg else None,
        "desired": "stopped" if name in snap.stopped else "running",
    }


async def get_appliance(request: web.Request) -> web.Response:
    name = validate_name("appliance", request.match_info["name"])
    return web.json_response(_appliance_status(request.app[CONTROL], name))


async def put_appliance(request: web.Request) -> web.Response:
    name = validate_name("appliance", request.match_info["name"])
    body = await read_json(request, "ApplianceSpec")
    if body.get("name") != name:
        raise InvalidInput(f"name in the body ({body.get('name')!r}) must match the URL ({name})")
    spec = ApplianceSpec.from_dict(body)
    control = request.app[CONTROL]
    await control.put_appliance(spec)
    return web.json_response(_appliance_status(control, name))


async def delete_appliance(request: web.Request) -> web.Response:
    name = validate_name("appliance", request.match_info["name"])
    await request.app[CONTROL].delete_appliance(name)
    return web.json_response({"deleted": name})


async def _set_desired(request: web.Request, state: str) -> web.Response:
    name = validate_name("appliance", request.match_info["name"])
    control = request.app[CONTROL]
    await control.set_desired(name, state)
    return web.json_response(_appliance_status(control, name))


async def start_appliance(request: web.Request) -> web.Response:
    return await _set_desired(request, "running")


async def stop_appliance(request: web.Request) -> web.Response:
    return await _set_desired(request, "stopped")


async def move_appliance(request: web.Request) -> web.Response:
    """A planned move; the body ``{"to": RACK}`` is optional (placement's best holder)."""
    name = validate_name("appliance", request.match_info["name"])
    to = None
    if request.can_read_body:
        body = await read_json(request, "MoveRequest")
        to = body.get("to")
    move = await request.app[CONTROL].move_appliance(name, to)
    return web.json_response({"appliance": name, "move": move}, status=202)


async def _set_drained(request: web.Request, drained: bool) -> web.Response:
    rack = validate_name("rack", request.match_info["name"])
    await request.app[CONTROL].set_drained(rack, drained)
    return web.json_response({"rack": rack, "drained": drained})


async def drain_rack(request: web.Request) -> web.Response:
    return await _set_drained(request, True)


async def undrain_rack(request: web.Request) -> web.Response:
    return await _set_drained(request, False)


def _without_events(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k != "events"}


async def _stream_updates(
    updates: AsyncIterator[tuple[str, dict[str, Any]]],
) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """Cluster documents on the stream leave out their events: those come one by one."""
    try:
        async for kind, doc in updates:
            yield kind, (_without_events(doc) if kind == "cluster" else doc)
    finally:
        aclose = getattr(updates, "aclose", None)
        if aclose is not None:
            await aclose()


async def get_events(request: web.Request) -> web.StreamResponse:
    control = request.app[CONTROL]
    initial = [("event", e.to_dict()) for e in control.recent_events(RECENT_EVENTS)]
    cluster = cluster_document(control, request.app[RACK_NAME])
    initial.append(("cluster", _without_events(cluster)))
    return await stream(request, initial, _stream_updates(control.subscribe()))
