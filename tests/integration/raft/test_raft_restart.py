"""Defect (d) and two journal faults: what a rack finds on its disk after a restart.

(d) A journal without a usable full dump: after a compaction and a restart,
stock pysyncobj stays at last_applied=1 for good (its state is empty) while
its log is complete, so it can still win an election. The hardened library
refuses a journal without a dump file, and a rack whose dump is missing
rebuilds its state from the leader without standing for election meanwhile.

A restart right after a full dump was written but before the journal was
trimmed: stock pysyncobj throws away the journal entries newer than the
dump, entries it had acknowledged. The hardened loader keeps them.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from pysyncobj.journal import FileJournal
from raftcluster import RaftCluster, RaftNode, wait_until

COMPACT = {"logCompactionMinEntries": 20}


async def _write(node: RaftNode, values: list[str]) -> None:
    answers = await node.append_many("h", values)
    assert all(a["ok"] for a in answers), answers[:3]


async def _compacted(node: RaftNode, below: int) -> bool:
    """The node holds everything written (commit index) in fewer than ``below`` entries."""
    status = await node.status()
    return int(status["log_len"]) < below and int(status["commit_index"]) >= below


@pytest.mark.slow
async def test_stock_journal_without_dump_is_stuck_after_restart(
    clusters: Callable[..., RaftCluster],
) -> None:
    cluster = clusters("stock", 3, conf=COMPACT, extra={"password": "stock-pw", "dump": False})
    await cluster.start_all()
    leader = await cluster.leader()
    values = [f"v{i}" for i in range(60)]
    await _write(leader, values)
    victim = cluster.others(leader)[0]
    await wait_until(lambda: _compacted(victim, 40), 20.0, f"{victim.name} to compact its log")
    await cluster.restart(victim)

    async def rejoined() -> bool:
        # Its log is complete, so it may follow the old leader or win the next
        # election itself (then a leader with an empty state: stuck all the same).
        mine, theirs = await victim.status(), await leader.status()
        return bool(mine["leader"]) and mine["commit_index"] >= theirs["commit_index"]

    await wait_until(rejoined, 15.0, f"{victim.name} to rejoin the cluster (follower or leader)")
    await asyncio.sleep(2.0)  # the stimulus: give it every chance to apply
    status = await victim.status()
    assert status["last_applied"] == 1, status
    assert await victim.values("h") == []
    assert status["commit_index"] > 60  # its log is complete: it could win an election


@pytest.mark.slow
async def test_hardened_rebuilds_its_state_when_the_dump_is_lost(
    clusters: Callable[..., RaftCluster],
) -> None:
    cluster = clusters("hardened", 3, conf=COMPACT)
    await cluster.start_all()
    leader = await cluster.leader()
    values = [f"v{i}" for i in range(60)]
    await _write(leader, values)
    victim = cluster.others(leader)[0]
    await wait_until(lambda: _compacted(victim, 40), 20.0, f"{victim.name} to compact its log")
    cluster.kill(victim)
    dump = Path(victim.config["state_dir"]) / "dump"
    dump.unlink()
    term = (await leader.status())["term"]
    cluster.start(victim)
    await cluster.wait_ready(victim)

    async def rebuilt() -> bool:
        status = await victim.status()
        return not status["recovering"] and await victim.values("h") == values

    await wait_until(rebuilt, 20.0, f"{victim.name} to rebuild its state from the leader")
    assert (await leader.status())["term"] == term, "the rebuilding rack caused an election"
    assert await cluster.leader() is leader
    assert (Path(victim.config["state_dir"]) / "journal.incomplete").exists()


async def _restart_between_dump_and_trim(cluster: RaftCluster) -> tuple[list[str], list[str]]:
    """One node: write, dump, write more, and restart as if killed before the journal trim."""
    (node,) = cluster.nodes
    await cluster.start_all()
    await cluster.leader()
    state = Path(node.config["state_dir"])
    first = [f"a{i}" for i in range(30)]
    await _write(node, first)
    untrimmed = state / "journal.untrimmed"
    shutil.copyfile(state / "journal", untrimmed)
    await node.request({"op": "compact"})
    await wait_until(lambda: _compacted(node, 20), 10.0, "the compaction")
    later = [f"b{i}" for i in range(10)]
    await _write(node, later)
    await cluster.stop(node)
    # The journal as a kill before the trim leaves it: every entry, the oldest included.
    newer = list(FileJournal(str(state / "journal"))[:])
    old = FileJournal(str(untrimmed))
    last = old[-1][1]
    for entry in newer:
        if entry[1] > last:
            old.add(*entry)
    old._destroy()
    shutil.move(untrimmed, state / "journal")
    cluster.start(node)
    await cluster.wait_ready(node)
    await cluster.leader()
    await wait_until(lambda: _applied(node), 10.0, "the restarted node to apply its journal")
    return first + later, await node.values("h")


async def _applied(node: RaftNode) -> bool:
    status = await node.status()
    return bool(status["last_applied"] >= status["commit_index"] > 1)


async def test_stock_restart_after_a_dump_drops_newer_journal_entries(
    clusters: Callable[..., RaftCluster],
) -> None:
    cluster = clusters("stock", 1, extra={"password": "stock-pw"})
    written, kept = await _restart_between_dump_and_trim(cluster)
    assert kept == written[:30], f"stock kept {len(kept)} of {len(written)} values"


async def test_hardened_restart_after_a_dump_keeps_newer_journal_entries(
    clusters: Callable[..., RaftCluster],
) -> None:
    cluster = clusters("hardened", 1)
    written, kept = await _restart_between_dump_and_trim(cluster)
    assert kept == written
