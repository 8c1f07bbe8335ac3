"""Racks that do not lead show the leader's judgement of which racks are alive."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from aiohttp import web

from meshcloud.agent.control import LEADER_VIEW_TTL_S, StoreControl
from meshcloud.core.models import Capacity, Rack
from meshcloud.replication.testbed import free_port

from .fakes import MemoryStore

pytestmark = pytest.mark.asyncio


def store_with(racks: dict[str, int], leader: str = "r1") -> MemoryStore:
    store = MemoryStore(leader=leader)
    store.apply_now({"op": "cluster_init", "cluster_id": "c", "max_voters": 3, "voters": ["r1"]})
    for name, port in racks.items():
        rack = Rack(name, "a", Capacity(4, 4096, 100), address="127.0.0.1", api_port=port)
        store.apply_now({"op": "rack_join", "rack": rack.to_dict()})
    return store


def follower(store: MemoryStore) -> StoreControl:
    control = StoreControl("r2", lambda: "formed")
    control.store = store  # no lease keeper: this rack does not judge liveness
    return control


LEADER_HEALTH = {
    "judged_by": "r1",
    "racks": {
        "r1": {"state": "alive", "voter": True, "lease_age_s": 0.2},
        "r2": {"state": "lost", "voter": False, "lease_age_s": 7.5},
    },
}


async def test_without_the_leaders_view_racks_are_plain_members() -> None:
    health = follower(store_with({"r1": 8440, "r2": 8440})).health()
    assert {r["state"] for r in health["racks"].values()} == {"member"}
    assert health["judged_by"] is None


async def test_the_leaders_view_is_shown_while_fresh_then_dropped() -> None:
    control = follower(store_with({"r1": 8440, "r2": 8440}))
    assert control.note_leader_view("r1", LEADER_HEALTH, now=100.0)
    assert control.leader_view(now=100.0 + LEADER_VIEW_TTL_S / 2) is not None
    assert control.leader_view(now=100.0 + LEADER_VIEW_TTL_S + 0.1) is None
    control.note_leader_view("r1", LEADER_HEALTH)
    health = control.health()
    assert health["judged_by"] == "r1"
    assert health["racks"]["r1"]["state"] == "alive"
    assert health["racks"]["r2"] == {"state": "lost", "voter": False, "lease_age_s": 7.5}


@pytest.mark.parametrize(
    "doc",
    [
        None,
        "alive",
        {"judged_by": "r3", "racks": LEADER_HEALTH["racks"]},  # not the leader's own judgement
        {"judged_by": "r1", "racks": []},
        {"judged_by": "r1", "racks": {"r2": {"state": "<script>"}}},
        {"judged_by": "r1", "racks": {"r2": "lost"}},
    ],
)
async def test_a_malformed_answer_is_not_shown(doc: Any) -> None:
    control = follower(store_with({"r1": 8440, "r2": 8440}))
    assert not control.note_leader_view("r1", doc)
    assert control.leader_view() is None


async def test_a_follower_fetches_the_view_from_the_leaders_api() -> None:
    seen: list[str] = []

    async def cluster(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        return web.json_response({"health": LEADER_HEALTH})

    app = web.Application()
    app.router.add_get("/api/v1/cluster", cluster)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        control = follower(store_with({"r1": port, "r2": 8440}))
        async with aiohttp.ClientSession(headers={"Authorization": "Bearer tok"}) as session:
            await control._fetch_leader_view(session)
        assert seen == ["Bearer tok"]
        assert control.health()["racks"]["r2"]["state"] == "lost"
    finally:
        await runner.cleanup()
