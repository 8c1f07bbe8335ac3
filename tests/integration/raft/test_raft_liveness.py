"""Defects (b), (c) and (f), and the cost of a heal: leaders, elections and rejoins.

Each scenario runs against stock pysyncobj 0.3.17 (the ``stock`` tests
assert that it misbehaves; they fail only if upstream changed) and against
the hardened library. Both use the same fast timers (raftconfig FAST_TIMERS).

Where a test waits a fixed time, the wait is the stimulus under test (a
connection left idle, a partition that lasts), never synchronisation.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Callable

import pytest
from raftcluster import LoopbackFirewall, RaftCluster, RaftNode, wait_until

pytestmark = pytest.mark.root

IDLE_S = 2.5  # longer than connectionTimeout (1.5 s)


async def _terms(cluster: RaftCluster) -> dict[str, int]:
    return {n.name: (await n.status())["term"] for n in cluster.nodes if n.running()}


# --- (b) idle follower-follower connections ------------------------------------------


async def _probe_between_followers(cluster: RaftCluster) -> bool:
    await cluster.start_all()
    leader = await cluster.leader()
    a, b = cluster.others(leader)
    await wait_until(lambda: _connected(a, b.id), 10.0, f"{a.name} to be connected to {b.name}")
    await asyncio.sleep(IDLE_S)  # the stimulus: followers have nothing to say to each other
    answer = await a.request({"op": "probe", "address": b.id})
    return bool(answer["sent"])


async def _connected(node: RaftNode, peer: str) -> bool:
    return peer in (await node.status()).get("connected", [])


async def test_stock_idle_follower_connection_drops_the_next_message(
    clusters: Callable[..., RaftCluster],
) -> None:
    """Stock: the first message after an idle spell trips the read timeout and is not sent."""
    assert await _probe_between_followers(clusters("stock", 3)) is False


async def test_hardened_idle_follower_connection_still_delivers(
    clusters: Callable[..., RaftCluster],
) -> None:
    assert await _probe_between_followers(clusters("hardened", 3)) is True


async def _election_rounds(cluster: RaftCluster, trials: int) -> list[int]:
    """Kill the leader ``trials`` times; return the number of rounds each election took."""
    await cluster.start_all()
    rounds = []
    for _ in range(trials):
        leader = await cluster.leader()
        await wait_until(lambda: _all_caught_up(cluster), 10.0, "every node to follow the leader")
        term = (await leader.status())["term"]
        await asyncio.sleep(IDLE_S)  # the stimulus: idle connections between followers
        cluster.kill(leader)
        survivors = cluster.others(leader)
        new = await cluster.leader([*survivors, leader])
        rounds.append((await new.status())["term"] - term)
        cluster.start(leader)
        await cluster.wait_ready(leader)
    return rounds


async def _all_caught_up(cluster: RaftCluster) -> bool:
    statuses = [await n.status() for n in cluster.nodes]
    leaders = {s.get("leader") for s in statuses}
    return len(leaders) == 1 and None not in leaders


@pytest.mark.slow
async def test_stock_elections_after_idle_need_more_than_one_round(
    clusters: Callable[..., RaftCluster],
) -> None:
    rounds = await _election_rounds(clusters("stock", 3), trials=3)
    assert all(r > 1 for r in rounds), f"rounds per election: {rounds}"


@pytest.mark.slow
async def test_hardened_elections_after_idle_take_one_round(
    clusters: Callable[..., RaftCluster],
) -> None:
    rounds = await _election_rounds(clusters("hardened", 3), trials=3)
    assert sum(r > 1 for r in rounds) <= 1, f"rounds per election: {rounds}"
    assert min(rounds) == 1


# --- (c) no connect timeout ---------------------------------------------------------------


def _syn_sent(addresses: set[str]) -> set[str]:
    """SYN-SENT sockets between the given addresses, as 'local->remote' keys."""
    out = subprocess.run(
        ["ss", "-Htn", "state", "syn-sent"], capture_output=True, text=True, check=True
    ).stdout
    keys = set()
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 4:
            local, remote = fields[-2], fields[-1]
            if local.rsplit(":", 1)[0] in addresses and remote.rsplit(":", 1)[0] in addresses:
                keys.add(f"{local}->{remote}")
    return keys


async def _cut_and_rejoin(cluster: RaftCluster, firewall: LoopbackFirewall) -> tuple[float, float]:
    """Cut a follower off for 11 s (silently), heal.

    Returns (the age of the oldest connection attempt seen during the cut, in
    seconds; seconds from the heal until every pair is connected again). An
    attempt to a silent peer waits in SYN-SENT while the kernel retries the SYN
    at 1, 3, 7, 15, 31 s; stock pysyncobj never abandons one itself.
    """
    await cluster.start_all()
    leader = await cluster.leader()
    follower = cluster.others(leader)[0]
    addresses = {n.address for n in cluster.nodes}
    firewall.partition([follower], cluster.others(follower))
    first_seen: dict[str, float] = {}
    oldest = 0.0
    cut = time.monotonic()
    while time.monotonic() - cut < 11.0:  # the stimulus: a long, silent cut
        now = time.monotonic()
        for key in _syn_sent(addresses):
            first_seen.setdefault(key, now)
            oldest = max(oldest, now - first_seen[key])
        await asyncio.sleep(0.25)
    firewall.heal()
    healed = time.monotonic()

    async def full_mesh() -> bool:
        for node in cluster.nodes:
            connected = set((await node.status()).get("connected", []))
            if connected != {n.id for n in cluster.others(node)}:
                return False
        return True

    await wait_until(full_mesh, 40.0, "every node to reconnect", interval_s=0.05)
    seconds = time.monotonic() - healed
    assert (await (await cluster.leader()).append("h", "after"))["ok"]
    return oldest, seconds


@pytest.mark.slow
async def test_stock_never_abandons_a_connection_attempt(
    clusters: Callable[..., RaftCluster], firewall: LoopbackFirewall
) -> None:
    oldest, rejoin = await _cut_and_rejoin(clusters("stock", 3), firewall)
    print(f"stock: oldest attempt {oldest:.1f} s, full mesh {rejoin:.1f} s after the heal")
    assert oldest > 7.0, f"stock kept a connection attempt only {oldest:.1f} s"


@pytest.mark.slow
async def test_hardened_abandons_attempts_and_rejoins_fast(
    clusters: Callable[..., RaftCluster], firewall: LoopbackFirewall
) -> None:
    oldest, rejoin = await _cut_and_rejoin(clusters("hardened", 3), firewall)
    print(f"hardened: oldest attempt {oldest:.1f} s, full mesh {rejoin:.1f} s after the heal")
    assert oldest < 2.0, f"a connection attempt lived {oldest:.1f} s"
    assert rejoin < 3.0, f"hardened reconnected {rejoin:.1f} s after the heal"


# --- (f) two leaders ------------------------------------------------------------------------


async def _leaders_after_cut(cluster: RaftCluster, firewall: LoopbackFirewall) -> list[str]:
    """Cut the leader off; 3 s later, which nodes believe they lead?"""
    await cluster.start_all()
    old = await cluster.leader()
    majority = cluster.others(old)
    firewall.partition([old], majority)
    await cluster.leader(majority)
    await asyncio.sleep(3.0)  # the stimulus: 3 s of partition (a lease is about that long)
    leaders = [n.name for n in cluster.nodes if (await n.status())["is_leader"]]
    firewall.heal()
    return leaders


@pytest.mark.slow
async def test_stock_cut_off_leader_keeps_leading(
    clusters: Callable[..., RaftCluster], firewall: LoopbackFirewall
) -> None:
    """Stock default leaderFallbackTimeout (30 s): two nodes believe they lead."""
    leaders = await _leaders_after_cut(clusters("stock", 3), firewall)
    assert len(leaders) == 2, f"leaders 3 s after the cut: {leaders}"


@pytest.mark.slow
async def test_hardened_cut_off_leader_steps_down(
    clusters: Callable[..., RaftCluster], firewall: LoopbackFirewall
) -> None:
    leaders = await _leaders_after_cut(clusters("hardened", 3), firewall)
    assert len(leaders) == 1, f"leaders 3 s after the cut: {leaders}"


# --- pre-vote: a heal costs no election -------------------------------------------------------


async def _elections_caused_by_a_heal(
    cluster: RaftCluster, firewall: LoopbackFirewall
) -> tuple[int, bool]:
    """Cut a follower off for 2 s, heal; return (term increase seen by the leader, same leader)."""
    await cluster.start_all()
    leader = await cluster.leader()
    term = (await leader.status())["term"]
    follower = cluster.others(leader)[0]
    firewall.partition([follower], cluster.others(follower))
    await asyncio.sleep(2.0)  # the stimulus: a short cut, as a wireless link has
    firewall.heal()

    async def written() -> bool:
        return bool((await (await cluster.leader()).append("h", "after"))["ok"])

    async def back() -> bool:
        return "after" in await follower.values("h")

    await wait_until(written, 30.0, "a write after the heal")
    await wait_until(back, 40.0, f"{follower.name} to be back")
    now = await cluster.leader()
    return (await now.status())["term"] - term, now is leader


@pytest.mark.slow
async def test_stock_heal_deposes_the_leader(
    clusters: Callable[..., RaftCluster], firewall: LoopbackFirewall
) -> None:
    increase, _same = await _elections_caused_by_a_heal(clusters("stock", 3), firewall)
    assert increase > 0, "stock: the heal caused no election"


@pytest.mark.slow
async def test_hardened_heal_keeps_the_leader(
    clusters: Callable[..., RaftCluster], firewall: LoopbackFirewall
) -> None:
    increase, same = await _elections_caused_by_a_heal(clusters("hardened", 3), firewall)
    assert (increase, same) == (0, True)
