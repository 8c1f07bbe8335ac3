"""The placement-map store on the lab: racks in real network namespaces.

Each rack's daemon is a SyncObjStore (raftnode.py in ``store`` mode). A
kill is the lab's power cut: the rack's link goes first, so nothing it says
while dying (no FIN, no RST) reaches anyone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from raftcluster import RaftNode, wait_until
from raftlab import configure_rack, leader_rack, start_lab, wait_answering

from meshcloud.lab.lab import Lab

pytestmark = [pytest.mark.root, pytest.mark.slow]


async def settled(nodes: dict[str, RaftNode], voters: int) -> None:
    """Every rack has joined the map, which names ``voters`` voters, and follows one leader."""

    async def check() -> bool:
        statuses = [await n.status() for n in nodes.values()]
        return (
            all(
                set(s["racks"]) == set(nodes)
                and len(s["voters"]) == voters
                and len(s["raft_voters"]) == voters
                and s["leader"] is not None
                for s in statuses
            )
            and len({s["leader"] for s in statuses}) == 1
        )

    await wait_until(check, 60.0, f"{len(nodes)} racks with {voters} voters and one leader")


async def write_through(nodes: list[RaftNode], key: str) -> list[str]:
    values = []
    for node in nodes:

        async def written(n: RaftNode = node) -> bool:
            return bool((await n.append(key, f"{key}-{n.name}"))["ok"])

        await wait_until(written, 15.0, f"a write through {node.name}")
        values.append(f"{key}-{node.name}")
    return values


async def holds(node: RaftNode, key: str, values: list[str]) -> bool:
    return set(values) <= set(await node.values(key))


async def test_three_racks_form_one_cluster(lab_factory: Callable[..., Lab]) -> None:
    _lab, nodes = start_lab(lab_factory, "store", 3, sites="a,b,c", max_voters=5)
    await wait_answering(nodes)
    await settled(nodes, 3)
    values = await write_through(list(nodes.values()), "h")
    for node in nodes.values():
        await wait_until(lambda n=node: holds(n, "h", values), 10.0, f"{node.name} to apply")


async def test_leader_kill_minority_and_a_late_rack(lab_factory: Callable[..., Lab]) -> None:
    lab, nodes = start_lab(lab_factory, "store", 5, sites="a,a,b,b,c", max_voters=5)
    await wait_answering(nodes)
    await settled(nodes, 5)

    # Killing the leader's rack: the others go on writing.
    dead = await leader_rack(nodes)
    await asyncio.to_thread(lab.kill, dead)
    alive = {r: n for r, n in nodes.items() if r != dead}
    values = await write_through(list(alive.values()), "after-kill")
    await asyncio.to_thread(lab.restart, dead, wait=False)
    await wait_answering([nodes[dead]])
    await wait_until(lambda: holds(nodes[dead], "after-kill", values), 20.0, f"{dead} to catch up")

    # The minority side of a partition cannot commit.
    await settled(nodes, 5)
    names = sorted(nodes)
    minority, majority = names[:2], names[2:]
    await asyncio.to_thread(lab.partition, ",".join(minority), ",".join(majority))
    await leader_rack({r: nodes[r] for r in majority})
    for rack in minority:
        answer = await nodes[rack].append("split", f"minority-{rack}", timeout_s=2.0)
        assert not answer["ok"] and answer["error"] == "Unavailable", answer
    committed = await write_through([nodes[r] for r in majority], "split")
    await asyncio.sleep(2.5)  # the stimulus: the split outlasts the connection timeout (1.5 s)
    for rack in majority:
        assert not any(v.startswith("minority") for v in await nodes[rack].values("split"))
    await asyncio.to_thread(lab.heal)
    for rack in minority:
        node = nodes[rack]
        await wait_until(lambda n=node: holds(n, "split", committed), 20.0, f"{rack} to catch up")
        # Sent before the split was noticed, a minority write could still commit if
        # the split healed within the connection timeout; this one lasted longer.
        assert not any(v.startswith("minority") for v in await node.values("split"))

    # A late rack joins (as a follower: five voters already) and catches up.
    late = await asyncio.to_thread(lab.add_rack, "c", start_daemon=False)
    first = nodes[names[0]]
    nodes[late] = configure_rack(lab, late, "store", [f"{first.address}:{first.port}"], {},
                                 max_voters=5)  # fmt: skip
    await asyncio.to_thread(lab.start_daemon, late, wait=False)
    await wait_answering([nodes[late]])
    await settled(nodes, 5)
    assert (await nodes[late].status())["role"] == "follower"
    await wait_until(lambda: holds(nodes[late], "split", committed), 20.0, f"{late} to catch up")
    assert (await nodes[late].append("h", "from-the-late-rack"))["ok"]


async def test_a_rack_alone_rebuilds_its_map_from_its_journal(
    lab_factory: Callable[..., Lab],
) -> None:
    lab, nodes = start_lab(lab_factory, "store", 3, conf={"logCompactionMinEntries": 50})
    await wait_answering(nodes)
    await settled(nodes, 3)
    leader = nodes[await leader_rack(nodes)]
    values = [f"v{i}" for i in range(120)]  # more than two compactions: a dump and a journal
    answers = await leader.append_many("h", values)
    assert all(a["ok"] for a in answers)
    for node in nodes.values():
        await wait_until(lambda n=node: holds(n, "h", values), 10.0, f"{node.name} to apply")
    await asyncio.sleep(1.5)  # the journal's commit index is stored once a second
    for rack in nodes:  # the whole site loses power
        await asyncio.to_thread(lab.kill, rack)
    alone = sorted(nodes)[1]
    await asyncio.to_thread(lab.restart, alone, wait=False)  # power comes back on one rack
    await wait_answering([nodes[alone]])

    async def rebuilt() -> bool:
        return await nodes[alone].values("h") == values

    await wait_until(rebuilt, 15.0, f"{alone} to rebuild its map with no one to talk to")
    for rack in nodes:
        if rack != alone:
            await asyncio.to_thread(lab.restart, rack, wait=False)
    await wait_answering(nodes)
    await write_through(list(nodes.values()), "after")
