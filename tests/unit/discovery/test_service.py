"""The Discovery service with static peers over loopback: admission, formation, late joins."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack

import pytest
from aiohttp import web

from meshcloud.core.errors import InvalidInput
from meshcloud.core.formation import AlreadyFormed, Found, Join, Member, Wait
from meshcloud.discovery import Discovery, LocalRack
from meshcloud.discovery.mdns import MdnsUnavailable
from meshcloud.discovery.service import parse_peer

SECRET = "correct horse battery staple, 32+ chars long"
WRONG_SECRET = "another cluster's secret, also 32+ chars long"


def free_port(address: str) -> int:
    with socket.socket() as sock:
        sock.bind((address, 0))
        return int(sock.getsockname()[1])


async def until(condition: Callable[[], bool], timeout_s: float = 15.0) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout_s`` (a safety bound)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


class Lab:
    """Racks on 127.0.0.x, each with its API app serving the hello route."""

    def __init__(self, stack: AsyncExitStack) -> None:
        self.stack = stack
        self.racks: dict[str, Discovery] = {}
        self.found: list[str] = []

    async def add(
        self,
        name: str,
        host: int,
        peers: tuple[str, ...] = (),
        secret: str = SECRET,
        expect: int = 3,
        port: int | None = None,
    ) -> Discovery:
        address = f"127.0.0.{host}"
        rack = LocalRack(name, "north", address, port or free_port(address), 7440)
        discovery = Discovery(
            rack,
            secret,
            bootstrap_expect=expect,
            static_peers=peers,
            mdns=False,
            refresh_s=0.1,
            formed_refresh_s=0.5,
            max_backoff_s=0.3,
        )
        app = web.Application()
        discovery.add_routes(app)
        runner = web.AppRunner(app)
        await runner.setup()
        self.stack.push_async_callback(runner.cleanup)
        await web.TCPSite(runner, address, rack.api_port).start()
        await discovery.start()
        self.stack.push_async_callback(discovery.stop)
        self.racks[name] = discovery
        return discovery

    def step(self) -> None:
        """One formation step on every rack, as the daemon would run it."""
        for name, d in self.racks.items():
            decision = d.decide_formation()
            if isinstance(decision, Found):
                self.found.append(name)
            elif isinstance(decision, Join):
                members = {m.name: m for m in decision.members}
                members[name] = d.rack.member()
                d.update_formation(
                    True, decision.cluster_uuid, leader=decision.leader, members=members.values()
                )

    def all_formed(self) -> bool:
        self.step()
        return all(d.status.formed for d in self.racks.values())


def addr(d: Discovery) -> str:
    return f"{d.rack.address}:{d.rack.api_port}"


@pytest.fixture
async def lab() -> AsyncIterator[Lab]:
    async with AsyncExitStack() as stack:
        yield Lab(stack)


async def test_static_ring_admits_everyone(lab: Lab) -> None:
    """a knows b, b knows c, c knows a: inbound admissions complete the picture."""
    ports = [free_port(f"127.0.0.{host}") for host in (11, 12, 13)]
    a = await lab.add("rack-a", 11, (f"127.0.0.12:{ports[1]}",), port=ports[0])
    b = await lab.add("rack-b", 12, (f"127.0.0.13:{ports[2]}",), port=ports[1])
    c = await lab.add("rack-c", 13, (f"127.0.0.11:{ports[0]}",), port=ports[2])
    await until(lambda: all(len(d.peers) == 2 for d in (a, b, c)))
    assert set(a.peers) == {"rack-b", "rack-c"}
    peer = a.peers["rack-b"]
    assert (peer.address, peer.api_port, peer.raft_port, peer.site) == (
        b.rack.address,
        b.rack.api_port,
        7440,
        "north",
    )


async def test_one_static_address_is_enough(lab: Lab) -> None:
    """b and c know only a, a knows nobody: a's report tells each where the other is."""
    a = await lab.add("rack-a", 14)
    b = await lab.add("rack-b", 15, (addr(a),))
    c = await lab.add("rack-c", 16, (addr(a),))
    await until(lambda: all(len(d.peers) == 2 for d in (a, b, c)))
    # Neither was told the other's address: each heard of it in a's report ("gossip")
    # or from the other's probe, when that arrived first ("inbound"; both can).
    assert {b.peers["rack-c"].via, c.peers["rack-b"].via} <= {"gossip", "inbound"}
    assert [f"{t.address}:{t.api_port}" for t in b.targets if t.via == "static"] == [addr(a)]
    assert [f"{t.address}:{t.api_port}" for t in c.targets if t.via == "static"] == [addr(a)]


async def test_three_racks_form_one_cluster_and_a_late_rack_joins(lab: Lab) -> None:
    a = await lab.add("rack-a", 21)
    b = await lab.add("rack-b", 22, (addr(a),))
    c = await lab.add("rack-c", 23, (addr(a), addr(b)))
    await until(lab.all_formed)
    assert lab.found == ["rack-a"]
    uuids = {d.status.cluster_uuid for d in (a, b, c)}
    assert len(uuids) == 1
    # the founder named the three founding racks as the first voters, with their addresses
    assert a.status.founding == (a.rack.member(), b.rack.member(), c.rack.member())
    # the late rack knows only rack-c; it joins the same cluster and asks rack-a
    d = await lab.add("rack-d", 24, (addr(c),))
    await until(lambda: bool(d.peers) and d.peers["rack-c"].report.status.formed)
    decision = d.decide_formation()
    assert isinstance(decision, Join), decision
    assert decision.cluster_uuid in uuids
    assert decision.leader == "rack-a"
    await until(lab.all_formed)
    assert lab.found == ["rack-a"]
    assert {x.status.cluster_uuid for x in lab.racks.values()} == uuids


async def test_wrong_secret_is_never_admitted(lab: Lab) -> None:
    bad_port = free_port("127.0.0.32")
    a = await lab.add("rack-a", 31, (f"127.0.0.32:{bad_port}",), expect=2)
    bad = await lab.add("rack-z", 32, (addr(a),), secret=WRONG_SECRET, expect=2, port=bad_port)
    await until(lambda: all(t.failures >= 3 for t in a.targets + bad.targets))
    assert a.peers == {} and bad.peers == {}
    assert "another cluster" in a.targets[0].last_problem
    assert "another cluster" in bad.targets[0].last_problem
    assert isinstance(a.decide_formation(), Wait)
    assert not a.status.formed


async def test_updates_stream_new_and_changed_peers(lab: Lab) -> None:
    a = await lab.add("rack-a", 41, expect=2)
    seen: list[tuple[str, bool]] = []

    async def watch() -> None:
        async for peer in a.updates():
            seen.append((peer.name, peer.report.status.formed))

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        await lab.add("rack-b", 42, (addr(a),), expect=2)
        await until(lab.all_formed)
        await until(lambda: ("rack-b", True) in seen)
        assert seen[0] == ("rack-b", False)
    finally:
        watcher.cancel()


async def test_a_formed_rack_stays_formed(lab: Lab) -> None:
    a = await lab.add("rack-a", 51, expect=1)
    decision = a.decide_formation()
    assert isinstance(decision, Found)
    assert a.status.formed and a.status.cluster_uuid == decision.cluster_uuid
    assert a.status.leader == "rack-a"
    assert isinstance(a.decide_formation(), AlreadyFormed)
    with pytest.raises(InvalidInput, match="cannot become unformed"):
        a.update_formation(False, None)
    with pytest.raises(InvalidInput, match="cannot move"):
        a.update_formation(True, "0f8e6a3c-1d2b-4c5d-8e9f-a0b1c2d3e4f5")
    member = Member("rack-a", a.rack.address, 7440, a.rack.api_port)
    a.update_formation(True, decision.cluster_uuid, leader="rack-b", members=[member])
    assert a.status.leader == "rack-b"


def test_parse_peer() -> None:
    assert parse_peer("10.0.0.1:8440") == ("10.0.0.1", 8440)
    assert parse_peer("[fd00::1]:8440") == ("fd00::1", 8440)
    for bad in ("10.0.0.1", "host:80", "10.0.0.1:0", "10.0.0.1:x"):
        with pytest.raises(InvalidInput):
            parse_peer(bad)


async def test_mdns_on_a_foreign_address_fails_clearly() -> None:
    rack = LocalRack("rack-a", "north", "192.0.2.77", 8440, 7440)  # TEST-NET-1, not ours
    discovery = Discovery(rack, SECRET, bootstrap_expect=1, mdns=True)
    with pytest.raises(MdnsUnavailable, match=r"cluster\.mdns: false"):
        await discovery.start()
    await discovery.stop()  # idempotent after a failed start
