"""Start, stop and move through the API: roles, CSRF, bodies, the answers (in-memory cluster)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from meshcloud.core.models import ApplianceSpec, DiskSpec
from meshcloud.web.app import WebContext, create_app
from meshcloud.web.auth import api_token
from meshcloud.web.users import UserStore
from tests.unit.web.fake_cluster import FAST_HASHER, PASSWORDS, MemoryControl, write_users

TOKEN = api_token("s" * 40)
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def control() -> MemoryControl:
    c = MemoryControl()
    await c.put_appliance(ApplianceSpec("tiles", "demo", disks=(DiskSpec("data", 1),), replicas=2))
    return c


@pytest.fixture
async def client(tmp_path: Path, control: MemoryControl) -> AsyncIterator[TestClient]:
    path = tmp_path / "console" / "users.json"
    write_users(path)
    users = UserStore(path, hasher=FAST_HASHER)
    app = create_app(WebContext("rack-1", "north", TOKEN, control=control, users=users))
    async with TestClient(TestServer(app)) as c:
        yield c


async def login(client: TestClient, user: str) -> dict[str, str]:
    resp = await client.post("/api/v1/session", json={"user": user, "password": PASSWORDS[user]})
    assert resp.status == 200, await resp.text()
    return {"X-CSRF-Token": (await resp.json())["csrf"]}


async def test_stop_and_start_keep_the_desired_state(client: TestClient) -> None:
    resp = await client.post("/api/v1/appliances/tiles/stop", headers=AUTH)
    assert resp.status == 200
    doc = await resp.json()
    assert doc["desired"] == "stopped" and doc["assignment"]["state"] == "stopped"
    cluster = await (await client.get("/api/v1/cluster", headers=AUTH)).json()
    assert cluster["stopped"] == ["tiles"]
    resp = await client.post("/api/v1/appliances/tiles/start", headers=AUTH)
    doc = await resp.json()
    assert resp.status == 200 and doc["desired"] == "running"
    resp = await client.post("/api/v1/appliances/nope/stop", headers=AUTH)
    assert resp.status == 404


async def test_move_goes_to_a_replica_holder_and_says_why_not(
    client: TestClient, control: MemoryControl
) -> None:
    source = control.assignments["tiles"].primary
    resp = await client.post("/api/v1/appliances/tiles/move", headers=AUTH)  # no body: best holder
    assert resp.status == 202, await resp.text()
    doc = await resp.json()
    assert doc["move"]["source"] == source and doc["move"]["downtime_s"] == 1.2
    target = doc["move"]["to"]
    assert control.assignments["tiles"].primary == target
    resp = await client.post("/api/v1/appliances/tiles/move", json={"to": target}, headers=AUTH)
    assert resp.status == 409 and "already runs on" in (await resp.json())["error"]["message"]
    resp = await client.post("/api/v1/appliances/tiles/move", json={"to": "Bad!"}, headers=AUTH)
    assert resp.status == 400
    resp = await client.post("/api/v1/appliances/tiles/move", json={"too": "x"}, headers=AUTH)
    assert resp.status == 400
    resp = await client.post("/api/v1/appliances/tiles/move", json={"to": "rack-9"}, headers=AUTH)
    assert resp.status == 404


async def test_a_viewer_cannot_and_an_operator_needs_the_csrf_token(client: TestClient) -> None:
    view = await login(client, "view")
    for action in ("start", "stop", "move"):
        resp = await client.post(f"/api/v1/appliances/tiles/{action}", headers=view)
        assert resp.status == 403 and "viewer" in (await resp.json())["error"]["message"]
    client.session.cookie_jar.clear()
    oper = await login(client, "oper")
    resp = await client.post("/api/v1/appliances/tiles/stop")
    assert resp.status == 403 and "X-CSRF-Token" in (await resp.json())["error"]["message"]
    resp = await client.post("/api/v1/appliances/tiles/stop", headers=oper)
    assert resp.status == 200
