"""The v1 API against an in-memory cluster (the lab tests cover the real store)."""

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from meshcloud.core.errors import NotFound
from meshcloud.core.events import Event
from meshcloud.core.models import ApplianceSpec, Capacity, ClusterSnapshot, Rack
from meshcloud.web.app import WebContext, create_app
from meshcloud.web.auth import api_token
from meshcloud.web.sse import Broadcaster

SECRET = "x" * 40
TOKEN = api_token(SECRET)
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class MemoryControl:
    def __init__(self) -> None:
        cap = Capacity(8, 8192, 100)
        self.racks = {"rack-1": Rack("rack-1", "a", cap), "rack-2": Rack("rack-2", "b", cap)}
        self.appliances: dict[str, ApplianceSpec] = {}
        self.events: list[Event] = []
        self.bus = Broadcaster()

    def snapshot(self) -> ClusterSnapshot:
        return ClusterSnapshot("c1", dict(self.racks), dict(self.appliances), {}, len(self.events))

    def health(self) -> dict[str, Any]:
        return {"racks": {}}

    def leader(self) -> str | None:
        return "rack-1"

    def recent_events(self, limit: int) -> list[Event]:
        return self.events[-limit:]

    def _event(self, message: str) -> None:
        event = Event(len(self.events) + 1, 0.0, "rack-1", "api", message)
        self.events.append(event)
        self.bus.publish("event", event.to_dict())

    async def put_appliance(self, spec: ApplianceSpec) -> None:
        self.appliances[spec.name] = spec
        self._event(f"appliance {spec.name} stored")

    async def delete_appliance(self, name: str) -> None:
        if name not in self.appliances:
            raise NotFound(f"appliance {name} does not exist")
        del self.appliances[name]
        self._event(f"appliance {name} removed")

    async def set_drained(self, rack: str, drained: bool) -> None:
        if rack not in self.racks:
            raise NotFound(f"rack {rack} does not exist")
        old = self.racks[rack]
        self.racks[rack] = Rack(old.name, old.site, old.capacity, drained=drained)

    def subscribe(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        return self.bus.subscribe()


@pytest.fixture
async def client() -> AsyncIterator[TestClient]:
    control = MemoryControl()
    app = create_app(WebContext("rack-1", "a", TOKEN, control=control))
    async with TestClient(TestServer(app)) as c:
        yield c


def spec(**kw: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": "voip",
        "image": "demo",
        "disks": [{"name": "data", "size_gib": 1}],
    }
    doc.update(kw)
    return doc


async def test_health_is_public(client: TestClient) -> None:
    resp = await client.get("/api/v1/health")
    assert resp.status == 200
    assert (await resp.json())["rack"] == "rack-1"


@pytest.mark.parametrize("header", [None, "Bearer wrong", "Basic abc", f"bearer{TOKEN}"])
async def test_api_needs_the_token(client: TestClient, header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    resp = await client.get("/api/v1/cluster", headers=headers)
    assert resp.status == 401
    assert "bearer token" in (await resp.json())["error"]["message"]


async def test_put_get_delete_appliance(client: TestClient) -> None:
    resp = await client.put("/api/v1/appliances/voip", json=spec(), headers=AUTH)
    assert resp.status == 200, await resp.text()
    doc = await (await client.get("/api/v1/appliances/voip", headers=AUTH)).json()
    assert doc["spec"]["disks"] == [{"name": "data", "size_gib": 1}]
    cluster = await (await client.get("/api/v1/cluster", headers=AUTH)).json()
    assert "voip" in cluster["appliances"]
    assert cluster["events"][-1]["message"] == "appliance voip stored"
    resp = await client.delete("/api/v1/appliances/voip", headers=AUTH)
    assert resp.status == 200
    resp = await client.get("/api/v1/appliances/voip", headers=AUTH)
    assert resp.status == 404


@pytest.mark.parametrize(
    ("url", "body", "status", "expected"),
    [
        ("/api/v1/appliances/voip", spec(vcpus=-1), 400, "vcpus"),
        ("/api/v1/appliances/voip", spec(vcpus="2"), 400, "vcpus"),
        ("/api/v1/appliances/voip", spec(memory_mib=10**15), 400, "memory_mib"),
        ("/api/v1/appliances/voip", spec(colour="red"), 400, "colour"),
        ("/api/v1/appliances/voip", spec(name="other"), 400, "must match the URL"),
        (
            "/api/v1/appliances/voip",
            spec(disks=[{"name": "../etc", "size_gib": 1}]),
            400,
            "disks.0.name",
        ),
        ("/api/v1/appliances/voip", spec(image="a'b"), 400, "image"),
        ("/api/v1/appliances/voip", [1, 2], 400, "body"),
        ("/api/v1/appliances/a%3Cb", spec(name="a<b"), 400, "appliance name"),
        ("/api/v1/appliances/a..b", spec(name="a..b"), 400, "appliance name"),
    ],
)
async def test_hostile_specs_get_a_clear_4xx(
    client: TestClient, url: str, body: Any, status: int, expected: str
) -> None:
    resp = await client.put(url, json=body, headers=AUTH)
    assert resp.status == status
    message = (await resp.json())["error"]["message"]
    assert expected in message
    assert (await (await client.get("/api/v1/cluster", headers=AUTH)).json())["appliances"] == {}


async def test_malformed_json_and_wrong_type(client: TestClient) -> None:
    resp = await client.put(
        "/api/v1/appliances/voip",
        data=b"{not json",
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert resp.status == 400
    assert "not valid JSON" in (await resp.json())["error"]["message"]
    resp = await client.put("/api/v1/appliances/voip", data=b"name=voip", headers=AUTH)
    assert resp.status == 400


async def test_huge_body_is_refused(client: TestClient) -> None:
    huge = json.dumps(spec(boot_args="a" * (1024 * 1024)))
    resp = await client.put(
        "/api/v1/appliances/voip", data=huge, headers={**AUTH, "Content-Type": "application/json"}
    )
    assert resp.status == 413
    assert "error" in await resp.json()


async def test_drain_unknown_rack_is_404(client: TestClient) -> None:
    resp = await client.post("/api/v1/racks/rack-9/drain", headers=AUTH)
    assert resp.status == 404
    resp = await client.post("/api/v1/racks/rack-2/drain", headers=AUTH)
    assert (await resp.json()) == {"rack": "rack-2", "drained": True}


async def test_event_stream_sends_history_then_live_events(client: TestClient) -> None:
    await client.put("/api/v1/appliances/voip", json=spec(), headers=AUTH)
    resp = await client.get("/api/v1/events", headers=AUTH)
    assert resp.headers["Content-Type"] == "text/event-stream"

    async def next_event() -> tuple[str, dict[str, Any]]:
        kind = ""
        while True:
            line = (await resp.content.readline()).decode().rstrip("\n")
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                return kind, json.loads(line[6:])

    kind, doc = await asyncio.wait_for(next_event(), 10)
    assert (kind, doc["message"]) == ("event", "appliance voip stored")
    kind, doc = await asyncio.wait_for(next_event(), 10)
    assert kind == "cluster" and "voip" in doc["appliances"]
    await client.delete("/api/v1/appliances/voip", headers=AUTH)
    kind, doc = await asyncio.wait_for(next_event(), 10)
    assert (kind, doc["message"]) == ("event", "appliance voip removed")
    resp.close()
