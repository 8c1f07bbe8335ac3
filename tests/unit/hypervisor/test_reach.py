"""The loopback forwarder and the HTTP helper, against a local server (no namespace)."""

import asyncio
import json

import pytest

from meshcloud.hypervisor.reach import async_serve_forward, http_get


async def _start_counter_server() -> tuple[asyncio.Server, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        body = json.dumps({"seq": 42}).encode()
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_forwarder_relays_http() -> None:
    upstream, up_port = await _start_counter_server()
    forward = await async_serve_forward("127.0.0.1", 0, None, "127.0.0.1", up_port)
    port = forward.sockets[0].getsockname()[1]
    async with upstream, forward:
        for _ in range(3):  # several connections in a row
            reply = await asyncio.to_thread(http_get, None, "127.0.0.1", port, "/counter", 5.0)
            assert reply.status == 200 and reply.json() == {"seq": 42}


async def test_forwarder_closes_the_client_when_upstream_is_down() -> None:
    upstream, up_port = await _start_counter_server()
    upstream.close()
    await upstream.wait_closed()
    forward = await async_serve_forward("127.0.0.1", 0, None, "127.0.0.1", up_port)
    port = forward.sockets[0].getsockname()[1]
    async with forward:
        with pytest.raises(OSError):
            await asyncio.to_thread(http_get, None, "127.0.0.1", port, "/counter", 5.0)


def test_http_get_refuses_relative_paths() -> None:
    from meshcloud.core.errors import HypervisorError

    with pytest.raises(HypervisorError):
        http_get(None, "127.0.0.1", 1, "counter")
