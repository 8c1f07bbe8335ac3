"""The history checker on the lab: every acknowledged write survives partitions, kills and restarts.

Five racks of the lab (network namespaces, one Raft node each, log
compaction on) take appends from four clients per rack while a nemesis
isolates the leader, kills and restarts racks, and splits the cluster with
the leader on the minority side. At the end every rack must hold the same
history, containing every write that was reported successful (see
history.py for the rules).

The same run against stock pysyncobj 0.3.17 must fail (it reports writes of
a cut-off leader successful and then drops them): ``test_stock_...`` asserts
it does; it fails only if upstream changed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from history import History, check, client
from raftcluster import FAST_TIMERS, RaftNode, fill_ballast, wait_until
from raftlab import leader_rack, start_lab, wait_answering

from meshcloud.lab.lab import Lab

pytestmark = [pytest.mark.root, pytest.mark.slow]

RACKS = 5
CLIENTS_PER_RACK = 4
WRITE_TIMEOUT_S = 10.0
CONF = {**FAST_TIMERS, "logCompactionMinEntries": 100, "commandsWaitLeader": False,
        "leaderFallbackTimeout": 1.0}  # fmt: skip
BALLAST = 2000  # a snapshot bigger than the socket buffers, as a real map over a real link


def start_raft_lab(lab_factory: Callable[..., Lab], mode: str) -> tuple[Lab, dict[str, RaftNode]]:
    return start_lab(lab_factory, mode, RACKS, conf=CONF)


async def nemesis(lab: Lab, nodes: dict[str, RaftNode], log: list[str]) -> None:
    """A fixed schedule of faults (seconds from the start of the workload)."""

    async def step(at: float, start: float, what: str, action: Callable[[], Any]) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(max(0.0, start + at - loop.time()))
        log.append(f"{loop.time() - start:5.1f}s {what}")
        await asyncio.to_thread(action)

    loop = asyncio.get_running_loop()
    start = loop.time()
    leader = await leader_rack(nodes)
    await step(2, start, f"isolate the leader {leader}", lambda: lab.partition(leader))
    await step(6, start, "heal", lab.heal)
    leader = await leader_rack(nodes)
    follower = next(r for r in nodes if r != leader)
    await step(9, start, f"kill {follower}", lambda: lab.kill(follower))
    await step(11, start, f"restart {follower}", lambda: lab.restart(follower, wait=False))
    leader = await leader_rack(nodes)
    buddy = next(r for r in nodes if r not in (leader, follower))
    await step(13, start, f"split: {leader},{buddy} | the rest",
               lambda: lab.partition(f"{leader},{buddy}"))  # fmt: skip
    await step(17, start, "heal", lab.heal)
    leader = await leader_rack(nodes)
    await step(19, start, f"kill the leader {leader}", lambda: lab.kill(leader))
    await step(21, start, f"restart {leader}", lambda: lab.restart(leader, wait=False))
    await step(24, start, "stop", lambda: None)


async def run_history(lab: Lab, nodes: dict[str, RaftNode]) -> tuple[History, list[str], list[str]]:
    await wait_answering(nodes)
    first = nodes[await leader_rack(nodes)]
    await fill_ballast(first, BALLAST)

    history = History()
    stop = asyncio.Event()

    async def append(rack: str, value: str) -> dict[str, Any]:
        return await nodes[rack].append("h", value, timeout_s=WRITE_TIMEOUT_S)

    clients = [
        asyncio.create_task(client(history, rack, append, stop, f"{rack}c{i}"))
        for rack in nodes
        for i in range(CLIENTS_PER_RACK)
    ]
    faults: list[str] = []
    try:
        await nemesis(lab, nodes, faults)
    finally:
        stop.set()
        await asyncio.gather(*clients)
    await asyncio.to_thread(lab.heal)

    async def converged() -> dict[str, list[str]] | None:
        finals = {rack: await node.values("h") for rack, node in nodes.items()}
        first_list = next(iter(finals.values()))
        return finals if all(v == first_list for v in finals.values()) else None

    try:
        finals = await wait_until(converged, 60.0, "every rack to hold the same history")
    except AssertionError:
        finals = {rack: await node.values("h") for rack, node in nodes.items()}
    problems = check(history, finals)
    return history, faults, problems


def _report(mode: str, history: History, faults: list[str], problems: list[str]) -> str:
    lines = [f"{mode}: {history.summary()}", *faults, *(problems or ["no violation"])]
    return "\n".join(lines)


@pytest.mark.timeout(400)
async def test_stock_history_loses_acknowledged_writes(lab_factory: Callable[..., Lab]) -> None:
    lab, nodes = start_raft_lab(lab_factory, "stock")
    history, faults, problems = await run_history(lab, nodes)
    print(_report("stock", history, faults, problems))
    assert any("acknowledged writes are missing" in p for p in problems), _report(
        "stock", history, faults, problems
    )


@pytest.mark.timeout(400)
async def test_hardened_history_keeps_every_acknowledged_write(
    lab_factory: Callable[..., Lab],
) -> None:
    lab, nodes = start_raft_lab(lab_factory, "hardened")
    history, faults, problems = await run_history(lab, nodes)
    print(_report("hardened", history, faults, problems))
    assert history.summary().get("ok", 0) > 100, "the workload barely ran"
    assert problems == [], _report("hardened", history, faults, problems)
