"""URL wiring only; handlers live in api.py, console.py and static.py."""

from __future__ import annotations

from aiohttp import web

from meshcloud.web import api, console, failover_api, static, users_sync


def add_api_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/api/v1/cluster", api.get_cluster)
    r.add_get("/api/v1/appliances/{name}", api.get_appliance)
    r.add_put("/api/v1/appliances/{name}", api.put_appliance)
    r.add_delete("/api/v1/appliances/{name}", api.delete_appliance)
    r.add_post("/api/v1/appliances/{name}/start", api.start_appliance)
    r.add_post("/api/v1/appliances/{name}/stop", api.stop_appliance)
    r.add_post("/api/v1/appliances/{name}/move", api.move_appliance)
    r.add_post("/api/v1/racks/{name}/drain", api.drain_rack)
    r.add_post("/api/v1/racks/{name}/undrain", api.undrain_rack)
    r.add_get("/api/v1/events", api.get_events)


def add_console_routes(app: web.Application) -> None:
    """The console's pages and its own API (sessions, users, emergency codes)."""
    r = app.router
    r.add_get("/", static.index)
    r.add_get("/static/{path:.+}", static.static_file)
    r.add_post("/api/v1/session", console.login)
    r.add_get("/api/v1/session", console.whoami)
    r.add_delete("/api/v1/session", console.logout)
    r.add_post("/api/v1/session/password", console.change_password)
    r.add_get("/api/v1/users", console.list_users)
    r.add_put("/api/v1/users/{name}", console.put_user)
    r.add_delete("/api/v1/users/{name}", console.delete_user)
    r.add_post("/api/v1/emergency-codes", console.new_emergency_codes)
    if users_sync.SYNC in app:
        r.add_get(users_sync.DOC_PATH, users_sync.get_users_doc)
        r.add_put(users_sync.DOC_PATH, users_sync.put_users_doc)


def add_failover_routes(app: web.Application) -> None:
    """Kept-aside copies, replication lag and Prometheus metrics (failover_api.py)."""
    r = app.router
    r.add_get("/api/v1/diverged", failover_api.list_diverged)
    r.add_delete("/api/v1/diverged/{rack}/{id}", failover_api.discard_diverged)
    r.add_get("/api/v1/replication", failover_api.get_replication)
    r.add_get("/metrics", failover_api.metrics)
    r.add_post("/api/v1/drill", failover_api.start_drill)
    r.add_get("/api/v1/drill", failover_api.get_drill)
    r.add_delete("/api/v1/drill", failover_api.end_drill)
