"""The fire drill's API: roles, bodies validated, refusals mapped to HTTP (in-memory view)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from meshcloud.core.errors import Conflict
from meshcloud.web.app import WebContext, create_app
from meshcloud.web.auth import api_token
from meshcloud.web.users import UserStore
from tests.unit.web.fake_cluster import FAST_HASHER, PASSWORDS, MemoryControl, write_users

TOKEN = api_token("s" * 40)
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Drills:
    """The failover view's drill part: records what it was asked."""

    def __init__(self) -> None:
        self.asked: list[tuple[str | None, bool]] = []
        self.running = False

    def diverged(self) -> list[dict[str, Any]]:
        return []

    async def discard_diverged(self, rack: str, ident: str) -> dict[str, Any]:
        raise Conflict("none")

    def replication_status(self) -> dict[str, Any]:
        return {}

    def metrics_text(self) -> str:
        return ""

    async def start_drill(self, appliance: str | None, restore: bool) -> dict[str, Any]:
        if self.running:
            raise Conflict("drill drill-1 is under way")
        self.asked.append((appliance, restore))
        self.running = True
        return {"id": "drill-1", "appliance": appliance or "tiles", "rack": "r1", "steps": []}

    def drill_status(self, ident: str | None) -> dict[str, Any]:
        return {"current": None, "report": None}

    async def end_drill(self) -> dict[str, Any]:
        raise Conflict("no drill is under way")


@pytest.fixture
def drills() -> Drills:
    return Drills()


@pytest.fixture
async def client(tmp_path: Path, drills: Drills) -> AsyncIterator[TestClient]:
    path = tmp_path / "users.json"
    write_users(path)
    users = UserStore(path, hasher=FAST_HASHER)
    ctx = WebContext(
        "rack-1", "north", TOKEN, control=MemoryControl(), users=users, failover=drills
    )
    async with TestClient(TestServer(create_app(ctx))) as c:
        yield c


async def test_a_drill_starts_once_and_its_body_is_checked(
    client: TestClient, drills: Drills
) -> None:
    for body in ({"appliance": "Bad/Name"}, {"appliance": "tiles", "x": 1}, {"restore": "yes"}):
        resp = await client.post("/api/v1/drill", json=body, headers=AUTH)
        assert resp.status == 400, body
    assert drills.asked == []
    resp = await client.post("/api/v1/drill", json={"restore": False}, headers=AUTH)
    assert resp.status == 202 and (await resp.json())["drill"]["id"] == "drill-1"
    assert drills.asked == [(None, False)]
    resp = await client.post("/api/v1/drill", json={"appliance": "tiles"}, headers=AUTH)
    assert resp.status == 409 and "under way" in (await resp.json())["error"]["message"]
    resp = await client.delete("/api/v1/drill", headers=AUTH)
    assert resp.status == 409
    resp = await client.get("/api/v1/drill?id=Bad/Id", headers=AUTH)
    assert resp.status == 400


async def test_a_viewer_reads_but_cannot_start_or_end_a_drill(
    client: TestClient, drills: Drills
) -> None:
    resp = await client.post(
        "/api/v1/session", json={"user": "view", "password": PASSWORDS["view"]}
    )
    view = {"X-CSRF-Token": (await resp.json())["csrf"]}
    for method in ("POST", "DELETE"):
        resp = await client.request(method, "/api/v1/drill", headers=view)
        assert resp.status == 403 and "viewer" in (await resp.json())["error"]["message"]
    resp = await client.get("/api/v1/drill")
    assert resp.status == 200 and (await resp.json()) == {"current": None, "report": None}
    assert drills.asked == []
