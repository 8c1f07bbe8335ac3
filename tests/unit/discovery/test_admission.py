"""Admission over real HTTP on loopback: the handler and the client together."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web

from meshcloud.discovery import proof
from meshcloud.discovery.admission import (
    HELLO_PATH,
    MAX_BODY_BYTES,
    AdmissionRefused,
    AdmissionServer,
    AdmittedPeer,
    add_routes,
    hello,
)
from meshcloud.discovery.proof import ClusterKeys
from meshcloud.discovery.records import RackReport

SECRET = "correct horse battery staple, 32+ chars long"
KEYS = ClusterKeys.from_secret(SECRET)
WRONG = ClusterKeys.from_secret("another cluster's secret, also 32+ chars long")
IMPOSTOR = ClusterKeys(cluster_id=KEYS.cluster_id, admission_key=WRONG.admission_key)
ADDRESS = "127.0.0.1"


def report(name: str, *peers: str) -> RackReport:
    return RackReport(
        name=name,
        site="north",
        address=ADDRESS,
        api_port=8440,
        raft_port=7440,
        version="0.1.0",
        bootstrap_expect=3,
        candidates=frozenset({name, *peers}),
    )


@dataclass
class Rack:
    name: str
    keys: ClusterKeys
    port: int = 0
    admitted: list[AdmittedPeer] = field(default_factory=list)

    def report(self) -> RackReport:
        return report(self.name, *(p.name for p in self.admitted))


@pytest.fixture
async def server_rack() -> AsyncIterator[Rack]:
    rack = Rack("rack-b", KEYS)
    app = web.Application()
    add_routes(app, AdmissionServer(KEYS, rack.name, rack.report, rack.admitted.append))
    runner = web.AppRunner(app)
    await runner.setup()
    with socket.socket() as sock:
        sock.bind((ADDRESS, 0))
        rack.port = sock.getsockname()[1]
    site = web.TCPSite(runner, ADDRESS, rack.port)
    await site.start()
    yield rack
    await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
        yield s


async def test_hello_admits_both_sides(server_rack: Rack, session: aiohttp.ClientSession) -> None:
    peer = await hello(session, KEYS, "rack-a", lambda: report("rack-a"), ADDRESS, server_rack.port)
    assert peer.name == "rack-b"
    assert peer.report.candidates == {"rack-a", "rack-b"}
    assert peer.observed_address == ADDRESS
    assert [p.name for p in server_rack.admitted] == ["rack-a"]
    assert server_rack.admitted[0].observed_address == ADDRESS


async def test_wrong_secret_is_refused_both_ways(
    server_rack: Rack, session: aiohttp.ClientSession
) -> None:
    for keys, text in ((WRONG, "another cluster"), (IMPOSTOR, "does not prove")):
        with pytest.raises(AdmissionRefused, match=text):
            await hello(
                session, keys, "rack-x", lambda: report("rack-x"), ADDRESS, server_rack.port
            )
    assert server_rack.admitted == []


async def test_impostor_server_is_not_admitted(session: aiohttp.ClientSession) -> None:
    """A server that knows the cluster id but not the secret cannot pass step 1."""
    impostor = Rack("rack-z", IMPOSTOR)
    app = web.Application()
    add_routes(app, AdmissionServer(IMPOSTOR, "rack-z", impostor.report, impostor.admitted.append))
    runner = web.AppRunner(app)
    await runner.setup()
    with socket.socket() as sock:
        sock.bind((ADDRESS, 0))
        port = sock.getsockname()[1]
    await web.TCPSite(runner, ADDRESS, port).start()
    try:
        with pytest.raises(AdmissionRefused):
            await hello(session, KEYS, "rack-a", lambda: report("rack-a"), ADDRESS, port)
    finally:
        await runner.cleanup()
    assert impostor.admitted == []


async def test_own_name_gets_409(server_rack: Rack, session: aiohttp.ClientSession) -> None:
    with pytest.raises(AdmissionRefused, match="own name"):
        await hello(session, KEYS, "rack-b", lambda: report("rack-b"), ADDRESS, server_rack.port)


@pytest.mark.parametrize(
    ("body", "status", "text"),
    [
        (b"{not json", 400, "malformed hello: body is not valid JSON"),
        (b"[1, 2]", 400, "body must be a JSON object"),
        (b'{"protocol": 1}', 400, "missing field 'cluster_id'"),
        (b"x" * (MAX_BODY_BYTES + 1), 413, "exceeds"),
        (b"[" * 50_000 + b"]" * 50_000, 413, "exceeds"),
        (b"[" * 30_000 + b"]" * 30_000, 400, "not valid JSON|must be a JSON object"),
    ],
)
async def test_malformed_bodies(
    server_rack: Rack, session: aiohttp.ClientSession, body: bytes, status: int, text: str
) -> None:
    url = f"http://{ADDRESS}:{server_rack.port}{HELLO_PATH}"
    async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == status
        doc = json.loads(await resp.read())
    assert doc["error"]["status"] == status

    assert re.search(text, doc["error"]["message"]), doc


async def test_step_two_replay_over_http(server_rack: Rack, session: aiohttp.ClientSession) -> None:
    """Record a whole successful exchange; replaying its second message is refused."""
    url = f"http://{ADDRESS}:{server_rack.port}{HELLO_PATH}"
    nonce = proof.new_nonce()
    first = {
        "protocol": 1,
        "step": "challenge",
        "cluster_id": KEYS.cluster_id,
        "client": "rack-a",
        "client_nonce": nonce,
        "mac": proof.challenge_mac(KEYS, "rack-a", nonce),
    }
    async with session.post(url, json=first) as resp:
        answer = await resp.json()
    text = json.dumps(report("rack-a").to_dict(), sort_keys=True, separators=(",", ":"))
    second = {
        "protocol": 1,
        "step": "prove",
        "cluster_id": KEYS.cluster_id,
        "client": "rack-a",
        "server": "rack-b",
        "client_nonce": nonce,
        "server_nonce": answer["server_nonce"],
        "report": text,
        "proof": proof.client_proof(KEYS, "rack-a", "rack-b", nonce, answer["server_nonce"], text),
    }
    async with session.post(url, json=second) as resp:
        assert resp.status == 200
    async with session.post(url, json=second) as resp:
        assert resp.status == 403
        assert "already used" in (await resp.json())["error"]["message"]
    assert len(server_rack.admitted) == 1
