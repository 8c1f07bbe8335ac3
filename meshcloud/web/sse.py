"""Server-sent events: one broadcaster, many clients, slow clients dropped."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)

CLIENT_QUEUE = 256
HEARTBEAT_S = 15.0


class Broadcaster:
    """Fans (type, document) messages out to every subscribed client queue."""

    def __init__(self, max_clients: int = 1000) -> None:
        self._queues: set[asyncio.Queue[tuple[str, dict[str, Any]] | None]] = set()
        self.max_clients = max_clients

    @property
    def clients(self) -> int:
        return len(self._queues)

    def publish(self, kind: str, doc: dict[str, Any]) -> None:
        """Queue a message for every client; a client whose queue is full is dropped."""
        for queue in list(self._queues):
            try:
                queue.put_nowait((kind, doc))
            except asyncio.QueueFull:
                self._queues.discard(queue)

    async def subscribe(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        if len(self._queues) >= self.max_clients:
            raise web.HTTPServiceUnavailable(reason="too many event-stream clients")
        queue: asyncio.Queue[tuple[str, dict[str, Any]] | None] = asyncio.Queue(CLIENT_QUEUE)
        self._queues.add(queue)
        try:
            while queue in self._queues or not queue.empty():
                item = await queue.get()
                if item is None:
                    return
                yield item
        finally:
            self._queues.discard(queue)

    def close(self) -> None:
        for queue in list(self._queues):
            self._queues.discard(queue)
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)


def sse_frame(kind: str, doc: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(doc, separators=(',', ':'))}\n\n".encode()


async def stream(
    request: web.Request,
    initial: list[tuple[str, dict[str, Any]]],
    updates: AsyncIterator[tuple[str, dict[str, Any]]],
) -> web.StreamResponse:
    """Send ``initial`` messages, then ``updates`` until the client goes away."""
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await resp.prepare(request)
    for kind, doc in initial:
        await resp.write(sse_frame(kind, doc))
    iterator = updates.__aiter__()
    try:
        while True:
            try:
                kind, doc = await asyncio.wait_for(iterator.__anext__(), HEARTBEAT_S)
            except TimeoutError:
                await resp.write(b": keep-alive\n\n")
                continue
            except StopAsyncIteration:
                break
            await resp.write(sse_frame(kind, doc))
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()
    return resp
