"""Defect (a): acknowledged writes lost after a partition, with log compaction on.

A leader cut off from the majority keeps appending writes it cannot commit.
The majority elects a new leader, writes on and compacts its log. After the
heal, the old leader receives a snapshot in chunks; stock pysyncobj moves
its commit index over its own divergent log on every chunk, applies those
writes and reports them SUCCESS; then the snapshot replaces them. (The map
carries some ballast so that the snapshot is larger than the socket buffers
and arrives over several polls, as a real map over a real link does.)

Both modes run with the same timers, commandsWaitLeader=False and
leaderFallbackTimeout=1.0: the difference is the library's code alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from raftcluster import LoopbackFirewall, RaftCluster, fill_ballast, wait_until

pytestmark = pytest.mark.root

CONF = {"logCompactionMinEntries": 20, "commandsWaitLeader": False, "leaderFallbackTimeout": 1.0}
CUT_WRITES = 20
MAJORITY_WRITES = 60
BALLAST = 2000


async def run_partition(
    cluster: RaftCluster, firewall: LoopbackFirewall
) -> tuple[set[str], set[str]]:
    """Return (writes through the cut-off leader reported successful, those missing at the end)."""
    await cluster.start_all()
    old = await cluster.leader()
    majority = cluster.others(old)
    for i in range(5):
        assert (await old.append("h", f"before-{i}"))["ok"]
    # Ballast: a snapshot larger than the socket buffers arrives over several polls.
    await fill_ballast(old, BALLAST)
    old = await cluster.leader()  # (an election may have happened on a busy machine)
    majority = cluster.others(old)
    firewall.partition([old], majority, reject=True)
    cut = asyncio.create_task(
        old.append_many("h", [f"cut-{i}" for i in range(CUT_WRITES)], timeout_s=20.0)
    )
    new = await cluster.leader(majority)
    assert new is not old
    for i in range(MAJORITY_WRITES):
        answer = await new.append("h", f"majority-{i}")
        assert answer["ok"], answer
    firewall.heal()
    results = await cut
    acknowledged = {f"cut-{i}" for i, r in enumerate(results) if r["ok"]}
    errors = sorted({str(r.get("error")) for r in results if not r["ok"]})
    print(f"cut-off writes: {len(acknowledged)} acknowledged; errors: {errors}")

    async def converged() -> list[str] | None:
        views = [await n.values("h") for n in cluster.nodes]
        return views[0] if all(v == views[0] for v in views) else None

    final = await wait_until(converged, 20.0, "every node to hold the same history")
    assert final[:5] == [f"before-{i}" for i in range(5)]
    return acknowledged, acknowledged - set(final)


@pytest.mark.slow
async def test_stock_pysyncobj_loses_acknowledged_writes(
    clusters: Callable[..., RaftCluster], firewall: LoopbackFirewall
) -> None:
    """Reproduces the defect: fails only if upstream pysyncobj changed."""
    cluster = clusters("stock", 3, conf=CONF, extra={"password": "stock-test-password"})
    acknowledged, lost = await run_partition(cluster, firewall)
    assert acknowledged, "stock pysyncobj acknowledged none of the cut-off leader's writes"
    assert lost == acknowledged, f"expected every acknowledged cut-off write lost, lost {lost}"


@pytest.mark.slow
async def test_hardened_keeps_every_acknowledged_write(
    clusters: Callable[..., RaftCluster], firewall: LoopbackFirewall
) -> None:
    cluster = clusters("hardened", 3, conf=CONF)
    _acknowledged, lost = await run_partition(cluster, firewall)
    assert lost == set(), f"acknowledged writes lost: {sorted(lost)}"
