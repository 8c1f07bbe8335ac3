"""Defect (e): a write queued on a cut-off rack is committed long after its client gave up.

With ``commandsWaitLeader=True`` (the stock default), a rack that knows no
leader keeps proposals in a queue and sends them once it finds one again,
whenever that is. meshcloud runs with False: a proposal that cannot reach a
leader fails at once (Unavailable), and nothing is sent later.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from raftcluster import LoopbackFirewall, RaftCluster, wait_until

pytestmark = [pytest.mark.root, pytest.mark.slow]

CUT_S = 4.0


async def _write_while_cut_off(
    cluster: RaftCluster, firewall: LoopbackFirewall
) -> tuple[dict, float, list[str]]:
    """Return (the cut-off rack's answer, seconds it took, the history after the heal)."""
    await cluster.start_all()
    leader = await cluster.leader()
    rack = cluster.others(leader)[0]
    firewall.partition([rack], cluster.others(rack))

    async def leaderless() -> bool:
        return (await rack.status())["leader"] is None

    await wait_until(leaderless, 10.0, f"{rack.name} to know no leader")
    started = time.monotonic()

    async def timed() -> tuple[dict, float]:
        result = await rack.append("h", "stale", timeout_s=60.0)
        return result, time.monotonic() - started

    answer = asyncio.create_task(timed())
    await asyncio.sleep(CUT_S)  # the stimulus: the partition lasts
    firewall.heal()
    result, took = await answer

    async def barrier() -> bool:
        return bool((await (await cluster.leader()).append("h", "barrier"))["ok"])

    await wait_until(barrier, 30.0, "a write after the heal")
    return result, took, await (await cluster.leader()).values("h")


async def test_stock_replays_a_queued_write_after_the_heal(
    clusters: Callable[..., RaftCluster], firewall: LoopbackFirewall
) -> None:
    cluster = clusters("stock", 3, conf={"commandsWaitLeader": True}, extra={"password": "pw"})
    result, took, history = await _write_while_cut_off(cluster, firewall)
    assert result["ok"], result
    assert took > CUT_S, f"the queued write committed {took:.1f} s after it was proposed"
    assert "stale" in history


async def test_hardened_refuses_a_write_it_cannot_commit(
    clusters: Callable[..., RaftCluster], firewall: LoopbackFirewall
) -> None:
    result, took, history = await _write_while_cut_off(clusters("hardened", 3), firewall)
    assert not result["ok"] and took < 1.0, (result, took)
    assert "stale" not in history


async def test_hardened_drops_a_write_forwarded_into_a_partition(
    clusters: Callable[..., RaftCluster], firewall: LoopbackFirewall
) -> None:
    """A write forwarded to the leader just after the cut is not committed after the heal.

    The rack still believes in its leader for up to an election timeout, so it
    forwards the proposal: the bytes wait in the TCP connection's buffers, and
    the kernel would deliver them when the path comes back, long after the
    writer was told the write failed. The hardened rack resets that connection
    when it forgets the leader, which throws them away.
    """
    cluster = clusters("hardened", 3)
    await cluster.start_all()
    leader = await cluster.leader()
    rack = cluster.others(leader)[0]
    firewall.partition([rack], cluster.others(rack))
    result = await rack.append("h", "forwarded", timeout_s=2.0)  # at once, leader still believed
    assert not result["ok"], result

    async def leaderless() -> bool:
        return (await rack.status())["leader"] is None

    await wait_until(leaderless, 10.0, f"{rack.name} to know no leader")
    firewall.heal()

    async def caught_up() -> bool:
        if not (await (await cluster.leader()).append("h", "barrier"))["ok"]:
            return False
        return "barrier" in await rack.values("h")

    await wait_until(caught_up, 30.0, f"{rack.name} back in the cluster")
    await asyncio.sleep(CUT_S)  # the stimulus: time for a delayed delivery to land
    for node in cluster.nodes:
        assert "forwarded" not in await node.values("h"), node.name
