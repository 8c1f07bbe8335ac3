"""Server-sent events: one broadcaster, many clients, slow clients dropped."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)

CLIENT_QUEUE = 256
HEARTBEAT_S = 5.0
COALESCE_S = 1.0
RECONNECT_MS = 1500


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
    *,
    coalesce: frozenset[str] = frozenset({"cluster"}),
    min_interval_s: float = COALESCE_S,
    heartbeat_s: float = HEARTBEAT_S,
) -> web.StreamResponse:
    """Send ``initial`` messages, then ``updates`` until the client goes away.

    Messages of a kind in ``coalesce`` (whole documents, such as the cluster)
    go out at most once per ``min_interval_s``, the newest winning, so that a
    slow link is not filled with documents nobody has time to read; other
    messages go out at once. After ``heartbeat_s`` of silence a ``ping``
    message is sent, so that a browser can tell a quiet stream from a dead one.
    """
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await resp.prepare(request)
    await resp.write(f"retry: {RECONNECT_MS}\n\n".encode())  # browsers reconnect this soon
    for kind, doc in initial:
        await resp.write(sse_frame(kind, doc))
    loop = asyncio.get_running_loop()
    iterator = updates.__aiter__()
    next_item: asyncio.Future[tuple[str, dict[str, Any]]] = asyncio.ensure_future(
        iterator.__anext__()
    )
    pending: dict[str, dict[str, Any]] = {}
    last_sent: dict[str, float] = {}
    last_write = loop.time()
    try:
        while True:
            now = loop.time()
            for kind in list(pending):
                if now - last_sent.get(kind, -math.inf) >= min_interval_s:
                    await resp.write(sse_frame(kind, pending.pop(kind)))
                    last_sent[kind] = last_write = now
            deadlines = [last_sent[k] + min_interval_s for k in pending]
            deadlines.append(last_write + heartbeat_s)
            done, _ = await asyncio.wait({next_item}, timeout=max(0.0, min(deadlines) - now))
            if not done:
                if loop.time() - last_write >= heartbeat_s:
                    await resp.write(b"event: ping\ndata: {}\n\n")
                    last_write = loop.time()
                continue
            try:
                kind, doc = next_item.result()
            except StopAsyncIteration:
                break
            next_item = asyncio.ensure_future(iterator.__anext__())
            if kind in coalesce:
                pending[kind] = doc
            else:
                await resp.write(sse_frame(kind, doc))
                last_write = loop.time()
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        next_item.cancel()
        with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration, Exception):
            await next_item
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()
    return resp
