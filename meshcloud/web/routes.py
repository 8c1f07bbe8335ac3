"""URL wiring only; handlers live in api.py and beside their domain."""

from __future__ import annotations

from aiohttp import web

from meshcloud.web import api


def add_api_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/api/v1/cluster", api.get_cluster)
    r.add_get("/api/v1/appliances/{name}", api.get_appliance)
    r.add_put("/api/v1/appliances/{name}", api.put_appliance)
    r.add_delete("/api/v1/appliances/{name}", api.delete_appliance)
    r.add_post("/api/v1/racks/{name}/drain", api.drain_rack)
    r.add_post("/api/v1/racks/{name}/undrain", api.undrain_rack)
    r.add_get("/api/v1/events", api.get_events)
