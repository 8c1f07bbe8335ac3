"""The leader's placement loop on an in-memory store: proposals, compare-and-set, sentences."""

from __future__ import annotations

import asyncio
import contextlib

from meshcloud.agent.leader import PlacementLoop, assignment_commands, every_rack_alive
from meshcloud.core.errors import Conflict, Unavailable
from meshcloud.core.models import ApplianceSpec, Capacity, DiskSpec, Rack
from meshcloud.core.placement import place_snapshot
from tests.unit.agent.fakes import MemoryStore

CAP = Capacity(4, 2048, 50)


def cluster(racks: int = 3, appliances: tuple[str, ...] = ("a", "b", "c")) -> MemoryStore:
    store = MemoryStore(leader="r1")
    names = [f"r{i}" for i in range(1, racks + 1)]
    store.apply_now(
        {"op": "cluster_init", "cluster_id": "c1", "max_voters": 3, "voters": names[:3]}
    )
    for name in names:
        store.apply_now({"op": "rack_join", "rack": Rack(name, "default", CAP).to_dict()})
    for app in appliances:
        spec = ApplianceSpec(app, "demo", memory_mib=128, disks=(DiskSpec("data", 1),))
        store.apply_now({"op": "appliance_set", "spec": spec.to_dict()})
    return store


def drain(store: MemoryStore, rack: str) -> None:
    doc = store.state().racks[rack].to_dict()
    doc["drained"] = True
    store.apply_now({"op": "rack_join", "rack": doc})


async def test_new_appliances_get_one_primary_each_and_a_sentence() -> None:
    store = cluster()
    events: list[tuple[str, str]] = []
    loop = PlacementLoop("r1", store, on_event=lambda k, m, a: events.append((k, m)))
    result = await loop.cycle()
    assert result.commands == result.committed == 3
    snap = store.snapshot()
    assert sorted(a.primary for a in snap.assignments.values()) == ["r1", "r2", "r3"]  # type: ignore[type-var]
    assert all(a.epoch == 1 for a in snap.assignments.values())
    assert all(c["expected_epoch"] is None for c in store.proposed)
    assert events and events[0][0] == "placement" and "a added" in events[0][1]
    again = await loop.cycle()
    assert again.commands == 0 and len(events) == 1  # nothing changed: nothing said


async def test_a_drained_rack_loses_its_primaries_under_a_new_epoch() -> None:
    store = cluster()
    loop = PlacementLoop("r1", store)
    await loop.cycle()
    before = store.snapshot().assignments
    moved = [n for n, a in before.items() if a.primary == "r2"]
    drain(store, "r2")
    store.proposed.clear()
    result = await loop.cycle()
    after = store.snapshot().assignments
    for name in moved:
        assert after[name].primary != "r2"
        assert after[name].epoch == before[name].epoch + 1
    assert all(a.primary != "r2" for a in after.values())
    assert "r2 drained" in result.reason
    # every proposal named the epoch it read (compare-and-set)
    assert all(
        c["expected_epoch"] == before[c["assignment"]["appliance"]].epoch for c in store.proposed
    )


async def test_a_refused_proposal_ends_the_cycle_and_the_next_one_decides_again() -> None:
    store = cluster()
    loop = PlacementLoop("r1", store)
    store.fail_next = Conflict("appliance a is at epoch 1, not None")
    result = await loop.cycle()
    assert result.committed == 0 and "changed meanwhile" in result.reason
    store.fail_next = Unavailable("no quorum")
    result = await loop.cycle()
    assert result.committed == 0 and "cannot commit now" in result.reason
    result = await loop.cycle()
    assert result.committed == 3


def test_commands_only_for_changed_assignments() -> None:
    store = cluster()
    snap = store.snapshot()
    result = place_snapshot(snap, every_rack_alive(snap))
    commands = assignment_commands(snap, result)
    assert [c["assignment"]["appliance"] for c in commands] == ["a", "b", "c"]
    for c in commands:
        store.apply_now(c)
    snap = store.snapshot()
    assert assignment_commands(snap, place_snapshot(snap, every_rack_alive(snap))) == []


async def test_the_loop_places_only_while_this_rack_leads() -> None:
    store = cluster()
    store.leader = "r2"
    loop = PlacementLoop("r1", store, period_s=0.05)
    task = asyncio.create_task(loop.run())
    try:
        await asyncio.sleep(0.2)
        assert store.proposed == []
        store.leader = "r1"
        await store.wait_for(lambda s: len(s.assignments) == 3, timeout_s=5.0)
        # and it reacts to a change of the map without waiting for its period
        loop.period_s = 60.0
        await asyncio.sleep(0.1)
        drain(store, "r3")
        await store.wait_for(
            lambda s: all(a.primary != "r3" for a in s.assignments.values()), timeout_s=5.0
        )
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_alive_none_means_not_leading() -> None:
    store = cluster()
    loop = PlacementLoop("r1", store, alive=lambda _snap: None)
    result = await loop.cycle()
    assert result.commands == 0 and store.proposed == []


async def test_a_drain_of_a_replicating_cluster_moves_by_handover_then_switch() -> None:
    store = cluster(appliances=("a",))
    events: list[str] = []
    loop = PlacementLoop("r1", store, on_event=lambda k, m, a: events.append(m))
    await loop.cycle()
    asg = store.snapshot().assignments["a"]
    (replica,) = asg.replicas
    store.apply_now({"op": "replica_report", "appliance": "a", "rack": replica, "generation": 4})
    assert asg.primary is not None
    drain(store, asg.primary)
    await loop.cycle()
    moving = store.snapshot().assignments["a"]
    assert moving.primary == asg.primary and moving.epoch == asg.epoch and moving.moving
    assert f"handing a over from {asg.primary} to {replica}" in events[-1]
    assert "moving a to" not in events[-1]  # placement's stop-and-start sentence is left out
    assert (await loop.cycle()).commands == 0  # waits for the old primary's final sync
    store.apply_now({"op": "move_synced", "appliance": "a", "epoch": asg.epoch,
                     "rack": asg.primary, "generation": 5, "paused_at": 1.0})  # fmt: skip
    await loop.cycle()
    after = store.snapshot().assignments["a"]
    assert after.primary == replica and after.epoch == asg.epoch + 1
    assert "switching it to" in events[-1]
