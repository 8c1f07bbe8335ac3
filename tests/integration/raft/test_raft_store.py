"""The placement-map store end to end: racks found, join, vote or follow, fail and return.

Every rack is a SyncObjStore in its own process (raftnode.py, ``store``
mode) on a loopback address: rack n1 founds the cluster, the others join
through it. The map decides who votes (max_voters, spread across sites); the
racks reconcile Raft membership to it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from raftcluster import LoopbackFirewall, RaftCluster, RaftNode, wait_until

from meshcloud import clock
from meshcloud.core.models import Capacity, Rack
from meshcloud.raft.syncobj_store import RaftSettings, SyncObjStore
from meshcloud.replication.testbed import free_port

pytestmark = pytest.mark.slow


def store_cluster(
    clusters: Callable[..., RaftCluster], sites: str, max_voters: int, **kwargs: object
) -> RaftCluster:
    cluster = clusters("store", len(sites), extra={"max_voters": max_voters}, **kwargs)
    for node, site in zip(cluster.nodes, sites, strict=True):
        node.config["site"] = site
    cluster.nodes[0].config["found"] = True
    founder = cluster.nodes[0]
    for node in cluster.nodes[1:]:
        node.config["peers"] = [founder.id]
    return cluster


async def settled(cluster: RaftCluster, voters: int) -> dict[str, dict]:
    """Wait until the map names ``voters`` voters and Raft membership matches it everywhere."""

    async def check() -> dict[str, dict] | None:
        statuses = {n.name: await n.status() for n in cluster.nodes if n.running()}
        wanted = {n.id for n in cluster.nodes if n.name in next(iter(statuses.values()))["voters"]}
        for name, status in statuses.items():
            if set(status["racks"]) != {n.name for n in cluster.nodes}:
                return None  # a rack has not joined the map yet
            if len(status["voters"]) != voters or set(status["raft_voters"]) != wanted:
                return None
            node = next(n for n in cluster.nodes if n.name == name)
            role = "voter" if node.id in wanted else "follower"
            if status["role"] != role or status["leader"] is None:
                return None
        return statuses

    return await wait_until(check, 40.0, f"{voters} voters everywhere")


async def start_in_order(cluster: RaftCluster) -> None:
    for node in cluster.nodes:
        cluster.start(node)
        await cluster.wait_ready(node)


async def writes_everywhere(cluster: RaftCluster, key: str, nodes: list[RaftNode]) -> list[str]:
    """One write through each node, retried while the node answers Unavailable.

    A rack that has just joined may be restarting as a voter, or waiting for
    the leader to add it, for a moment: like any client, the test retries
    (a write that timed out may still commit, so values are checked as a set).
    """
    values = []
    for node in nodes:
        value = f"{key}-{node.name}"

        async def write(n: RaftNode = node, v: str = value) -> dict | None:
            answer = await n.append(key, v)
            if not answer["ok"] and answer.get("error") == "Unavailable":
                return None
            return answer

        answer = await wait_until(write, 20.0, f"a write through {node.name}")
        assert answer["ok"], (node.name, answer)
        values.append(value)
    return values


async def applied_everywhere(cluster: RaftCluster, key: str, values: list[str]) -> None:
    for node in cluster.nodes:
        if node.running():

            async def has_all(n: RaftNode = node) -> bool:
                return set(values) <= set(await n.values(key))

            await wait_until(has_all, 15.0, f"{node.name} to apply {key}")


async def test_five_racks_form_one_cluster_with_three_voters_across_sites(
    clusters: Callable[..., RaftCluster],
) -> None:
    cluster = store_cluster(clusters, "aabbc", max_voters=3)
    await start_in_order(cluster)
    statuses = await settled(cluster, 3)
    status = statuses["n1"]
    sites = {node.config["site"] for node in cluster.nodes if node.name in status["voters"]}
    assert len(sites) >= 2, f"voters {status['voters']} all on one site"
    leaders = {s["leader"] for s in statuses.values()}
    assert len(leaders) == 1, f"racks follow different leaders: {leaders}"
    values = await writes_everywhere(cluster, "h", cluster.nodes)  # followers write too
    await applied_everywhere(cluster, "h", values)


async def test_killing_the_leader_rack_lets_writes_continue(
    clusters: Callable[..., RaftCluster],
) -> None:
    cluster = store_cluster(clusters, "abcab", max_voters=5)
    await start_in_order(cluster)
    await settled(cluster, 5)
    leader = await cluster.leader()
    cluster.kill(leader)
    survivors = cluster.others(leader)

    async def write() -> bool:
        return bool((await survivors[0].append("h", "after-kill", timeout_s=1.0))["ok"])

    await wait_until(write, 10.0, "a write after the leader's rack died")
    values = await writes_everywhere(cluster, "h2", survivors)
    await applied_everywhere(cluster, "h2", values)


async def test_a_late_rack_joins_and_catches_up(clusters: Callable[..., RaftCluster]) -> None:
    cluster = store_cluster(clusters, "abca", max_voters=3)
    late = cluster.nodes[-1]
    for node in cluster.nodes[:-1]:
        cluster.start(node)
        await cluster.wait_ready(node)
    early = await writes_everywhere(cluster, "h", cluster.nodes[:-1])
    cluster.start(late)
    await cluster.wait_ready(late)
    statuses = await settled(cluster, 3)
    assert statuses[late.name]["role"] == "follower"
    await applied_everywhere(cluster, "h", early)
    assert (await late.append("h", "from-late"))["ok"]


async def test_removing_a_voter_promotes_a_follower(clusters: Callable[..., RaftCluster]) -> None:
    cluster = store_cluster(clusters, "abca", max_voters=3)
    await start_in_order(cluster)
    statuses = await settled(cluster, 3)
    voters = statuses["n1"]["voters"]
    follower = next(n for n in cluster.nodes if n.name not in voters)
    leader = await cluster.leader()
    victim = next(n for n in cluster.nodes if n.name in voters and n is not leader)
    answer = await leader.propose({"op": "rack_remove", "rack": victim.name})
    assert answer["ok"], answer
    cluster.kill(victim)  # decommissioned
    remaining = cluster.others(victim)

    async def promoted() -> bool:
        statuses = [await n.status() for n in remaining]
        ids = {n.id for n in remaining if n.name in statuses[0]["voters"]}
        return (
            all(follower.name in s["voters"] and set(s["raft_voters"]) == ids for s in statuses)
            and (await follower.status())["role"] == "voter"
        )

    await wait_until(promoted, 30.0, f"{follower.name} to be promoted")
    values = await writes_everywhere(cluster, "h", remaining)
    await applied_everywhere(cluster, "h", values)


@pytest.mark.root
async def test_the_minority_side_cannot_commit(
    clusters: Callable[..., RaftCluster], firewall: LoopbackFirewall
) -> None:
    cluster = store_cluster(clusters, "abcab", max_voters=5)
    await start_in_order(cluster)
    await settled(cluster, 5)
    minority, majority = cluster.nodes[:2], cluster.nodes[2:]
    firewall.partition(minority, majority)
    await cluster.leader(majority)
    for node in minority:
        answer = await node.append("h", f"minority-{node.name}", timeout_s=2.0)
        assert not answer["ok"] and answer["error"] == "Unavailable", answer
    values = await writes_everywhere(cluster, "h", majority)
    await asyncio.sleep(2.5)  # the stimulus: the split outlasts the connection timeout (1.5 s)
    for node in majority:
        assert not any(v.startswith("minority") for v in await node.values("h"))
    firewall.heal()
    await applied_everywhere(cluster, "h", values)
    history = await minority[0].values("h")
    assert not any(v.startswith("minority") for v in history)


@pytest.mark.root
async def test_a_restarted_rack_recovers_its_state_from_its_journal(
    clusters: Callable[..., RaftCluster], firewall: LoopbackFirewall
) -> None:
    cluster = store_cluster(clusters, "abc", max_voters=3, conf={"logCompactionMinEntries": 30})
    await start_in_order(cluster)
    await settled(cluster, 3)
    leader = await cluster.leader()
    values = [f"v{i}" for i in range(80)]  # more than a compaction: dump + journal
    answers = await leader.append_many("h", values)
    assert all(a["ok"] for a in answers)
    rack = cluster.others(leader)[0]
    await applied_everywhere(cluster, "h", values)
    await asyncio.sleep(1.5)  # the journal's commit index is stored once a second
    cluster.kill(rack)
    firewall.partition([rack], cluster.others(rack))  # it must rebuild from its own disk
    cluster.start(rack)
    await cluster.wait_ready(rack)

    async def rebuilt() -> bool:
        return await rack.values("h") == values

    await wait_until(rebuilt, 10.0, f"{rack.name} to rebuild its map from its journal")
    firewall.heal()

    async def writes() -> bool:  # proposals fail at once until it follows a leader again
        return bool((await rack.append("h", "after-restart"))["ok"])

    await wait_until(writes, 10.0, f"{rack.name} to write after the heal")


async def test_lease_renewals_are_stamped_by_the_leader(
    clusters: Callable[..., RaftCluster],
) -> None:
    cluster = store_cluster(clusters, "abc", max_voters=3)
    await start_in_order(cluster)
    await settled(cluster, 3)
    leader = await cluster.leader()
    rack = cluster.others(leader)[0]
    before = clock.now()
    answer = await rack.propose(
        {"op": "lease_renew", "rack": rack.name, "issued_at": 12.5, "received_at": 0.0}
    )
    assert answer["ok"], answer
    after = clock.now()
    state = await rack.request({"op": "state"})
    lease = state["leases"][rack.name]
    assert lease["issued_at"] == 12.5
    # stamped on the clock the leader's lease keeper reads (CLOCK_BOOTTIME; same host here)
    assert lease["leader"] == leader.name and before <= lease["received_at"] <= after
    assert lease["term"] == (await leader.status())["term"]


async def test_a_founder_leads_at_once_not_after_an_election_timeout(tmp_path: Path) -> None:
    """A new cluster's only voter stands at its first tick: joiners do not wait on it."""
    port = free_port()
    rack = Rack("r1", "a", Capacity(4, 4096, 100), address="127.0.0.1", raft_port=port)
    settings = RaftSettings(
        rack=rack,
        state_dir=tmp_path,
        secret="f" * 40,
        found=True,
        raft_min_timeout_s=20.0,  # far longer than the bound below
        raft_max_timeout_s=25.0,
        connection_timeout_s=25.0,  # pysyncobj wants it at least the longest election timeout
    )
    store = SyncObjStore(settings)
    started = time.monotonic()
    await store.start()
    try:
        await wait_until(lambda: _leads(store), 10.0, "the founder to lead")
        assert time.monotonic() - started < settings.raft_min_timeout_s
    finally:
        await store.stop()


async def _leads(store: SyncObjStore) -> bool:
    return store.status().leader == "r1"
