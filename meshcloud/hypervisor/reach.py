"""Reach an appliance on a rack segment that lives in a network namespace.

A socket belongs to the namespace of the thread that created it, and keeps
it: :func:`connect_in_netns` creates and connects the socket on a short-lived
thread inside the namespace and hands it back, so the caller (an asyncio
loop, for instance) can use it from the root namespace.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import socket
import threading
from dataclasses import dataclass
from typing import Any

from meshcloud.core.errors import HypervisorError
from meshcloud.lab.netns import thread_in_netns

log = logging.getLogger(__name__)


def connect_in_netns(netns: str | None, host: str, port: int, timeout_s: float) -> socket.socket:
    """A TCP socket connected to ``host:port`` from inside ``netns`` (None: here)."""
    if netns is None:
        return socket.create_connection((host, port), timeout=timeout_s)
    result: list[socket.socket] = []
    error: list[BaseException] = []

    def work() -> None:
        try:
            with thread_in_netns(netns):
                result.append(socket.create_connection((host, port), timeout=timeout_s))
        except BaseException as exc:  # handed to the caller below
            error.append(exc)

    worker = threading.Thread(target=work, name=f"connect-{netns}", daemon=True)
    worker.start()
    worker.join()
    if error:
        raise error[0]
    return result[0]


@dataclass(frozen=True)
class HttpReply:
    status: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class _NetnsHTTPConnection(http.client.HTTPConnection):
    def __init__(self, netns: str | None, host: str, port: int, timeout_s: float) -> None:
        super().__init__(host, port, timeout=timeout_s)
        self._netns = netns
        self._timeout_s = timeout_s

    def connect(self) -> None:
        self.sock = connect_in_netns(self._netns, self.host, self.port, self._timeout_s)


def http_get(
    netns: str | None, host: str, port: int, path: str = "/", timeout_s: float = 3.0
) -> HttpReply:
    """GET ``path`` from ``host:port`` inside ``netns`` (blocking; use a thread from async code).

    Raises OSError (including timeouts) when the appliance does not answer.
    """
    if not path.startswith("/"):
        raise HypervisorError(f"HTTP path {path!r} must start with '/'")
    conn = _NetnsHTTPConnection(netns, host, port, timeout_s)
    try:
        conn.request("GET", path)
        reply = conn.getresponse()
        return HttpReply(reply.status, reply.read())
    except http.client.HTTPException as exc:
        raise OSError(f"bad HTTP reply from {host}:{port}: {exc}") from exc
    finally:
        conn.close()


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy ``reader`` into ``writer`` until EOF, then half-close ``writer``."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        pass


async def async_serve_forward(
    listen_host: str, listen_port: int, netns: str | None, host: str, port: int
) -> asyncio.Server:
    """A TCP server on ``listen_host:listen_port`` relaying each connection to ``host:port``
    inside ``netns`` (the upstream socket is made from a thread in the namespace)."""

    async def relay(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            sock = await asyncio.to_thread(connect_in_netns, netns, host, port, 5.0)
        except OSError as exc:
            log.info("forward to %s:%d in %s failed: %s", host, port, netns, exc)
            client_w.close()
            return
        up_r, up_w = await asyncio.open_connection(sock=sock)
        try:
            await asyncio.gather(pipe(client_r, up_w), pipe(up_r, client_w))
        finally:
            for w in (up_w, client_w):
                w.close()

    return await asyncio.start_server(relay, listen_host, listen_port)
