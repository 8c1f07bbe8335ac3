"""The event stream: cluster documents coalesced, events at once, pings when quiet."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from meshcloud.web.sse import Broadcaster, stream


async def read_frames(resp: Any, count: int, timeout_s: float) -> list[tuple[str, Any]]:
    frames: list[tuple[str, Any]] = []
    buf = b""
    deadline = time.monotonic() + timeout_s
    while len(frames) < count:
        chunk = await asyncio.wait_for(resp.content.readany(), deadline - time.monotonic())
        buf += chunk
        while b"\n\n" in buf:
            raw, buf = buf.split(b"\n\n", 1)
            lines = dict(line.split(": ", 1) for line in raw.decode().splitlines())
            if "event" not in lines:  # the retry hint
                assert lines == {"retry": "1500"}
                continue
            frames.append((lines["event"], json.loads(lines["data"])))
    return frames


async def test_cluster_documents_are_coalesced_and_events_are_not() -> None:
    bus = Broadcaster()

    async def handler(request: web.Request) -> web.StreamResponse:
        return await stream(request, [("cluster", {"revision": 0})], bus.subscribe(),
                            min_interval_s=0.5, heartbeat_s=1.0)  # fmt: skip

    app = web.Application()
    app.router.add_get("/events", handler)
    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/events")
        assert await read_frames(resp, 1, 5) == [("cluster", {"revision": 0})]
        while bus.clients == 0:
            await asyncio.sleep(0.01)
        for revision in range(1, 21):
            bus.publish("cluster", {"revision": revision})
        bus.publish("event", {"seq": 1})
        frames = await read_frames(resp, 3, 5)
        # the event goes out at once; of 20 cluster documents only the first and the newest
        assert ("event", {"seq": 1}) in frames
        assert [doc for kind, doc in frames if kind == "cluster"] == [
            {"revision": 1},
            {"revision": 20},
        ]


async def test_a_quiet_stream_sends_pings() -> None:
    bus = Broadcaster()

    async def handler(request: web.Request) -> web.StreamResponse:
        return await stream(request, [], bus.subscribe(), heartbeat_s=0.2)

    app = web.Application()
    app.router.add_get("/events", handler)
    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/events")
        assert await read_frames(resp, 2, 5) == [("ping", {}), ("ping", {})]
