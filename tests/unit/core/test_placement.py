"""Placement: one property test per rule, plus table-driven examples."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from meshcloud.core.errors import InvalidInput
from meshcloud.core.models import (
    ApplianceSpec,
    ApplianceState,
    Assignment,
    Capacity,
    ClusterSnapshot,
    DiskSpec,
    Rack,
)
from meshcloud.core.placement import (
    EventKind,
    PlacementEvent,
    PlacementInput,
    PlacementResult,
    apply_event,
    place,
    place_snapshot,
    primaries_changed,
)

PROPS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
RUNNING, WAITING, STOPPED = ApplianceState.RUNNING, ApplianceState.WAITING, ApplianceState.STOPPED


# -- builders ------------------------------------------------------------------------------


def rack(name: str, site: str = "s0", cpu: int = 8, mem: int = 8192, disk: int = 100) -> Rack:
    return Rack(name, site, Capacity(cpu, mem, disk))


def app(
    name: str, cpu: int = 1, mem: int = 256, disk: int = 1, priority: int = 500, replicas: int = 1
) -> ApplianceSpec:
    return ApplianceSpec(
        name,
        "demo",
        vcpus=cpu,
        memory_mib=mem,
        disks=(DiskSpec("data", disk),),
        priority=priority,
        replicas=replicas,
    )


def state(
    racks: list[Rack],
    apps: list[ApplianceSpec],
    assignments: list[Assignment] = (),  # type: ignore[assignment]
    alive: set[str] | None = None,
    gens: Mapping[str, Mapping[str, int]] | None = None,
    preference: Mapping[str, float] | None = None,
) -> PlacementInput:
    return PlacementInput(
        racks={r.name: r for r in racks},
        appliances={a.name: a for a in apps},
        alive=frozenset(r.name for r in racks) if alive is None else frozenset(alive),
        assignments={a.appliance: a for a in assignments},
        replica_generations=gens or {},
        rack_preference=preference or {},
    )


# -- invariants, checked on the final state ----------------------------------------------


def eligible(s: PlacementInput) -> list[str]:
    return sorted(n for n in s.alive if n in s.racks and not s.racks[n].drained)


def free(s: PlacementInput, out: Mapping[str, Assignment]) -> dict[str, list[int]]:
    """Free [vcpus, memory, disk] per eligible rack under ``out``."""
    left = {
        n: [s.racks[n].capacity.vcpus, s.racks[n].capacity.memory_mib, s.racks[n].capacity.disk_gib]
        for n in eligible(s)
    }
    for name, asg in out.items():
        spec = s.appliances[name]
        for holder in asg.holders():
            if holder in left:
                left[holder][2] -= spec.disk_gib
        if asg.primary in left:
            left[asg.primary][0] -= spec.vcpus
            left[asg.primary][1] -= spec.memory_mib
    return left


def check_capacity(s: PlacementInput, out: Mapping[str, Assignment]) -> None:
    for rack_name, (cpu, mem, disk) in free(s, out).items():
        assert cpu >= 0 and mem >= 0 and disk >= 0, f"{rack_name} over capacity"


def check_structure(s: PlacementInput, r: PlacementResult) -> None:
    """Names, states, racks: what every result must look like."""
    out = r.assignments
    assert list(out) == sorted(s.appliances)
    ok = set(eligible(s))
    for name, asg in out.items():
        spec = s.appliances[name]
        old = s.assignments.get(name)
        before = set(old.holders()) if old else set()
        assert len(set(asg.holders())) == len(asg.holders())
        if asg.state is RUNNING:
            assert asg.primary in ok, f"{name} runs on ineligible {asg.primary}"
            assert set(asg.replicas) <= ok
            assert len(asg.replicas) <= spec.replicas
        else:
            assert asg.primary is None
            # A waiting or stopped appliance keeps copies only where it had them: its data.
            assert set(asg.replicas) <= before
        for holder in asg.holders():
            assert holder in ok or holder in before, f"new copy of {name} on ineligible {holder}"
        # Epoch: bumped exactly when the primary changes.
        old_primary = old.primary if old else None
        old_epoch = old.epoch if old else 0
        if old is not None and asg.primary == old_primary:
            assert asg.epoch == old_epoch
        else:
            assert asg.epoch == old_epoch + 1
        if asg.state is WAITING:
            assert asg.reason, f"{name} waits without a reason"


def check_spread(s: PlacementInput, out: Mapping[str, Assignment]) -> None:
    """Missing replicas or shared sites only when no rack that would fix it has disk left."""
    left = free(s, out)
    ok = eligible(s)
    for name, asg in out.items():
        if asg.state is not RUNNING:
            continue
        spec = s.appliances[name]
        holders = set(asg.holders())
        sites = {s.racks[h].site for h in holders}
        if len(asg.replicas) < min(spec.replicas, len(ok) - 1):
            for other in ok:
                if other not in holders:
                    assert left[other][2] < spec.disk_gib, f"{name} short of replicas"
        if len(sites) < len(holders):
            for other in ok:
                if s.racks[other].site not in sites:
                    assert left[other][2] < spec.disk_gib, f"{name} shares a site needlessly"


def check_priority(s: PlacementInput, out: Mapping[str, Assignment]) -> None:
    """A waiting appliance could not run anywhere even with every lower-priority one stopped."""
    left = free(s, out)
    for name, asg in out.items():
        if asg.state is not WAITING:
            continue
        spec = s.appliances[name]
        for rack_name, (cpu, mem, disk) in left.items():
            for other, o in out.items():
                if o.primary == rack_name and s.appliances[other].priority < spec.priority:
                    cpu += s.appliances[other].vcpus
                    mem += s.appliances[other].memory_mib
            need_disk = 0 if rack_name in asg.replicas else spec.disk_gib
            fits = cpu >= spec.vcpus and mem >= spec.memory_mib and disk >= need_disk
            assert not fits, f"{name} waits although it fits on {rack_name}"


def check_all(s: PlacementInput, r: PlacementResult) -> None:
    check_structure(s, r)
    check_capacity(s, r.assignments)
    check_spread(s, r.assignments)
    check_priority(s, r.assignments)


# -- strategies ----------------------------------------------------------------------------

RACK_NAMES = [f"r{i}" for i in range(8)]


@st.composite
def clusters(draw: st.DrawFn, ample: bool = False) -> PlacementInput:
    n_racks = draw(st.integers(1, 7))
    n_sites = draw(st.integers(1, 4))
    racks = []
    for i in range(n_racks):
        if ample:
            cap = Capacity(1000, 1 << 20, 10_000)
        else:
            cap = Capacity(
                draw(st.integers(0, 12)), draw(st.integers(0, 16)) * 512, draw(st.integers(0, 40))
            )
        racks.append(Rack(RACK_NAMES[i], f"s{draw(st.integers(0, n_sites - 1))}", cap))
    apps = [
        app(
            f"a{i}",
            cpu=draw(st.integers(1, 4)),
            mem=draw(st.integers(1, 8)) * 256,
            disk=draw(st.integers(1, 8)),
            priority=draw(st.sampled_from([0, 100, 500, 500, 900, 1000])),
            replicas=draw(st.integers(0, 3)),
        )
        for i in range(draw(st.integers(0, 14)))
    ]
    return state(racks, apps)


@st.composite
def arbitrary_assignments(draw: st.DrawFn, s: PlacementInput) -> PlacementInput:
    """Any current map, even one no placement would produce (over capacity, dead racks)."""
    names = [*sorted(s.racks), "gone"]
    out = []
    for spec in s.appliances.values():
        if not draw(st.booleans()):
            continue
        holders = draw(st.lists(st.sampled_from(names), unique=True, max_size=4))
        status = draw(st.sampled_from([RUNNING, RUNNING, WAITING, STOPPED]))
        primary = holders[0] if holders and status is RUNNING else None
        replicas = tuple(holders[1:] if primary else holders)
        out.append(Assignment(spec.name, primary, replicas, draw(st.integers(0, 50)), status))
    alive = draw(st.sets(st.sampled_from(sorted(s.racks))))
    gens = {
        spec: {r: draw(st.integers(0, 5)) for r in sorted(s.racks) if draw(st.booleans())}
        for spec in sorted(s.appliances)
    }
    return replace(
        s,
        assignments={a.appliance: a for a in out},
        alive=frozenset(alive),
        replica_generations=gens,
    )


@st.composite
def events(draw: st.DrawFn, s: PlacementInput) -> PlacementEvent:
    kinds = [
        EventKind.RACK_LOST,
        EventKind.RACK_JOINED,
        EventKind.RACK_DRAINED,
        EventKind.RACK_UNDRAINED,
    ]
    if s.appliances:
        kinds.append(EventKind.APPLIANCE_REMOVED)
    kind = draw(st.sampled_from(kinds))
    pool = sorted(s.appliances) if kind is EventKind.APPLIANCE_REMOVED else sorted(s.racks)
    return PlacementEvent(kind, draw(st.sampled_from(pool)))


# -- properties: one per rule --------------------------------------------------------------


@PROPS
@given(st.data())
def test_rules_hold_for_initial_placement_and_after_any_event(data: st.DataObject) -> None:
    s = data.draw(clusters())
    first = place(s)
    check_all(s, first)
    after = replace(s, assignments=first.assignments)
    event = data.draw(events(after))
    second = place(after, event)
    check_all(apply_event(after, event), second)


@PROPS
@given(st.data())
def test_rules_hold_from_an_arbitrary_map(data: st.DataObject) -> None:
    s = data.draw(arbitrary_assignments(data.draw(clusters())))
    check_all(s, place(s))


@PROPS
@given(st.data())
def test_capacity_is_never_exceeded(data: st.DataObject) -> None:
    s = data.draw(clusters())
    if data.draw(st.booleans()):
        s = data.draw(arbitrary_assignments(s))
    check_capacity(s, place(s).assignments)


@PROPS
@given(st.data())
def test_replicas_are_distinct_other_racks_on_other_sites_where_possible(
    data: st.DataObject,
) -> None:
    s = data.draw(clusters(ample=data.draw(st.booleans())))
    out = place(s).assignments
    n_ok = len(eligible(s))
    for asg in out.values():
        assert asg.primary not in asg.replicas
        assert len(set(asg.replicas)) == len(asg.replicas)
    check_spread(s, out)
    # With room everywhere, every appliance gets all its replicas, spread over the most sites.
    if all(r.capacity.disk_gib >= 10_000 for r in s.racks.values()):
        n_sites = len({r.site for r in s.racks.values()})
        for name, asg in out.items():
            spec = s.appliances[name]
            assert len(asg.replicas) == min(spec.replicas, n_ok - 1)
            sites = {s.racks[h].site for h in asg.holders()}
            assert len(sites) == min(len(asg.holders()), n_sites)


@PROPS
@given(st.data())
def test_higher_priority_runs_before_lower(data: st.DataObject) -> None:
    s = data.draw(clusters())
    out = place(s).assignments
    check_priority(s, out)
    # The pairwise form of the rule: a waiting H never fits in a running lower L's place.
    left = free(s, out)
    for h, ha in out.items():
        if ha.state is not WAITING:
            continue
        hs = s.appliances[h]
        for lo, la in out.items():
            ls = s.appliances[lo]
            if la.state is RUNNING and ls.priority < hs.priority:
                cpu, mem, disk = left[la.primary]  # type: ignore[index]
                assert not (
                    cpu + ls.vcpus >= hs.vcpus
                    and mem + ls.memory_mib >= hs.memory_mib
                    and disk >= hs.disk_gib
                )


@PROPS
@given(st.data())
def test_deterministic_under_permutation(data: st.DataObject) -> None:
    s = data.draw(clusters())
    if data.draw(st.booleans()):
        s = data.draw(arbitrary_assignments(s))
    rnd = data.draw(st.randoms(use_true_random=False))

    def shuffled(m: Mapping[str, object]) -> dict[str, object]:
        items = list(m.items())
        rnd.shuffle(items)
        return dict(items)

    t = PlacementInput(
        racks=shuffled(s.racks),  # type: ignore[arg-type]
        appliances=shuffled(s.appliances),  # type: ignore[arg-type]
        alive=frozenset(rnd.sample(sorted(s.alive), len(s.alive))),
        assignments=shuffled(s.assignments),  # type: ignore[arg-type]
        replica_generations={k: shuffled(v) for k, v in shuffled(s.replica_generations).items()},  # type: ignore[misc]
    )
    a, b = place(s), place(t)
    assert list(a.assignments.items()) == list(b.assignments.items())
    assert a.reasons == b.reasons


@PROPS
@given(st.data())
def test_losing_a_rack_moves_exactly_its_appliances_when_capacity_allows(
    data: st.DataObject,
) -> None:
    s = data.draw(clusters(ample=True))
    assume(len(s.racks) >= 2)
    before = place(s).assignments
    lost = data.draw(st.sampled_from(sorted(s.racks)))
    after = place(replace(s, assignments=before), PlacementEvent(EventKind.RACK_LOST, lost))
    on_lost = {n for n, a in before.items() if a.primary == lost}
    assert primaries_changed(before, after.assignments) == on_lost
    for name in on_lost:
        new = after.assignments[name]
        assert new.state is RUNNING and new.epoch == before[name].epoch + 1
        # Promoted from a replica when it had one.
        if before[name].replicas:
            assert new.primary in before[name].replicas


@PROPS
@given(st.data())
def test_losing_a_rack_moves_others_only_to_make_room_for_more_important(
    data: st.DataObject,
) -> None:
    s = data.draw(clusters())
    before = place(s).assignments
    lost = data.draw(st.sampled_from(sorted(s.racks)))
    after = place(replace(s, assignments=before), PlacementEvent(EventKind.RACK_LOST, lost))
    out = after.assignments
    for name in primaries_changed(before, out):
        old = before[name]
        if old.primary is None or old.primary == lost:
            continue  # it was waiting, or it had to move
        # It gave way: something more important now runs where it ran.
        mine = s.appliances[name].priority
        assert any(
            a.primary == old.primary
            and before[o].primary != old.primary
            and s.appliances[o].priority > mine
            for o, a in out.items()
        ), f"{name} moved off {old.primary} for no reason"


@PROPS
@given(st.data())
def test_placement_is_stable_when_nothing_changes(data: st.DataObject) -> None:
    s = data.draw(clusters())
    first = place(s)
    again = place(replace(s, assignments=first.assignments))
    assert again.assignments == first.assignments
    assert again.reasons == ()


# -- examples ------------------------------------------------------------------------------

R3 = [rack("r1", "s1"), rack("r2", "s2"), rack("r3", "s3")]


def test_freshest_live_replica_is_promoted_with_a_new_epoch() -> None:
    s = state(
        [*R3, rack("r4", "s1")],
        [app("tile-cache", replicas=2)],
        [Assignment("tile-cache", "r1", ("r2", "r3"), epoch=7)],
        gens={"tile-cache": {"r2": 811, "r3": 812}},
    )
    r = place(s, PlacementEvent(EventKind.RACK_LOST, "r1"))
    asg = r.assignments["tile-cache"]
    assert (asg.primary, asg.epoch, asg.state) == ("r3", 8, RUNNING)
    assert r.reasons[0].startswith("r1 lost; moving tile-cache to r3 (replica gen 812)")
    assert "r2" in asg.replicas and len(asg.replicas) == 2


def test_a_fresher_replica_without_room_loses_to_one_with_room() -> None:
    s = state(
        [rack("r1", "s1"), rack("r2", "s2", cpu=1), rack("r3", "s3", cpu=8)],
        [app("tile-cache", cpu=2, replicas=2), app("busy", cpu=1, priority=1000, replicas=0)],
        [
            Assignment("tile-cache", "r1", ("r2", "r3"), epoch=1),
            Assignment("busy", "r2", (), epoch=1),
        ],
        alive={"r2", "r3"},
        gens={"tile-cache": {"r2": 9, "r3": 4}},
    )
    r = place(s)
    assert r.assignments["tile-cache"].primary == "r3"
    assert "replica gen 4; r2 had no room" in r.reasons[0]


@pytest.mark.parametrize(
    ("gens", "expected"),
    [
        ({"r2": 5, "r3": 5}, "r2"),  # tie on generation: name order
        ({"r3": 1}, "r3"),  # a holder with a generation beats one without
        ({}, "r2"),
    ],
)
def test_promotion_ties_are_broken_deterministically(gens: dict[str, int], expected: str) -> None:
    s = state(
        R3,
        [app("voip", replicas=2)],
        [Assignment("voip", "r1", ("r3", "r2"), epoch=2)],
        alive={"r2", "r3"},
        gens={"voip": gens},
    )
    assert place(s).assignments["voip"].primary == expected


def test_no_replica_means_a_fresh_start_elsewhere() -> None:
    s = state(R3, [app("proxy", replicas=0)], [Assignment("proxy", "r1", (), epoch=1)])
    r = place(s, PlacementEvent(EventKind.RACK_LOST, "r1"))
    assert r.assignments["proxy"].primary in ("r2", "r3")
    assert "no replica to promote; it starts from its image" in r.reasons[0]


def test_short_capacity_the_most_important_keep_running() -> None:
    s = state(
        [rack("r1", cpu=4)],
        [app("voip", cpu=3, priority=900), app("wiki", cpu=3, priority=100)],
    )
    out = place(s).assignments
    assert out["voip"].state is RUNNING
    assert out["wiki"].state is WAITING
    assert "wiki waits: no live rack has room for 3 vCPU" in out["wiki"].reason
    assert "(priority 100)" in out["wiki"].reason


def test_lower_priority_gives_way_when_a_rack_is_lost() -> None:
    s = state(
        [rack("r1", cpu=4), rack("r2", cpu=4)],
        [
            app("voip", cpu=3, priority=900, replicas=1),
            app("wiki", cpu=3, priority=100, replicas=0),
        ],
        [Assignment("voip", "r1", ("r2",), epoch=4), Assignment("wiki", "r2", (), epoch=2)],
    )
    r = place(s, PlacementEvent(EventKind.RACK_LOST, "r1"))
    out = r.assignments
    assert (out["voip"].primary, out["voip"].epoch) == ("r2", 5)
    assert (out["wiki"].state, out["wiki"].epoch) == (WAITING, 3)
    assert "stopping wiki (priority 100) on r2 to make room for voip (priority 900)" in r.reasons
    assert "voip needed room on r2; wiki waits" in out["wiki"].reason


def test_equal_priority_never_preempts() -> None:
    s = state(
        [rack("r1", cpu=4), rack("r2", cpu=4)],
        [app("a", cpu=3, replicas=0), app("b", cpu=3, replicas=0)],
        [Assignment("a", "r1", (), epoch=1), Assignment("b", "r2", (), epoch=1)],
    )
    out = place(s, PlacementEvent(EventKind.RACK_LOST, "r1")).assignments
    assert out["a"].state is WAITING and out["b"].primary == "r2"


def test_drain_moves_appliances_and_undrain_moves_nothing_back() -> None:
    s = state(R3, [app("voip", replicas=1)], [Assignment("voip", "r1", ("r2",), epoch=1)])
    drained = place(s, PlacementEvent(EventKind.RACK_DRAINED, "r1"))
    asg = drained.assignments["voip"]
    assert asg.primary == "r2" and "r1" not in asg.holders()
    assert drained.reasons[0].startswith("r1 drained; moving voip to r2")
    s2 = replace(
        apply_event(s, PlacementEvent(EventKind.RACK_DRAINED, "r1")),
        assignments=drained.assignments,
    )
    back = place(s2, PlacementEvent(EventKind.RACK_UNDRAINED, "r1"))
    assert back.assignments == drained.assignments and back.reasons == ()


def test_replicas_go_to_other_sites_first() -> None:
    racks = [
        rack("a1", "north"),
        rack("a2", "north", disk=1000),
        rack("b1", "south"),
        rack("c1", "east"),
    ]
    out = place(state(racks, [app("db", replicas=2, disk=10)])).assignments["db"]
    sites = {racks_by[h].site for racks_by in [{r.name: r for r in racks}] for h in out.holders()}
    assert len(sites) == 3


def test_a_duplicate_site_copy_is_swapped_for_another_site_when_room_appears() -> None:
    racks = [rack("a1", "north"), rack("a2", "north"), rack("b1", "south")]
    s = state(racks, [app("db", replicas=1)], [Assignment("db", "a1", ("a2",), epoch=1)])
    r = place(s)
    assert r.assignments["db"].replicas == ("b1",)
    assert r.reasons == ("db: adding replica on b1; dropping the copy on a2",)


def test_rack_joined_lets_a_waiting_appliance_run() -> None:
    racks = [rack("r1", cpu=2), rack("r2", cpu=8)]
    s = state(racks, [app("voip", cpu=4, replicas=0)], alive={"r1"})
    first = place(s)
    assert first.assignments["voip"].state is WAITING
    s2 = replace(s, assignments=first.assignments)
    r = place(s2, PlacementEvent(EventKind.RACK_JOINED, "r2"))
    assert r.assignments["voip"].primary == "r2"
    assert r.reasons == ("room found; starting voip on r2",)


def test_removed_appliance_disappears_with_a_reason() -> None:
    s = state(R3, [app("voip"), app("wiki")], [Assignment("voip", "r1", ("r2",), epoch=1)])
    r = place(s, PlacementEvent(EventKind.APPLIANCE_REMOVED, "voip"))
    assert "voip" not in r.assignments
    assert "voip removed; stopping it on r1 and releasing its copies" in r.reasons


def test_new_appliance_is_placed_with_one_sentence() -> None:
    s = state(R3, [app("voip", replicas=1)])
    r = place(s, PlacementEvent(EventKind.APPLIANCE_ADDED, "voip"))
    asg = r.assignments["voip"]
    assert asg.epoch == 1 and asg.state is RUNNING and len(asg.replicas) == 1
    assert r.reasons == (
        f"voip added; placing it on {asg.primary}; adding replica on {asg.replicas[0]}",
    )


def test_stopped_appliance_stays_stopped_and_keeps_its_copies() -> None:
    stopped = Assignment(
        "voip", None, ("r1", "r2"), epoch=3, state=STOPPED, reason="stopped by alice"
    )
    s = replace(state(R3, [app("voip")], [stopped]), stopped=frozenset({"voip"}))
    r = place(s)
    assert r.assignments["voip"] == stopped and r.reasons == ()


def test_waiting_appliance_keeps_its_data_holders() -> None:
    s = state(
        [rack("r1"), rack("r2", cpu=0)],
        [app("db", replicas=1)],
        [Assignment("db", "r1", ("r2",), epoch=5)],
        alive={"r2"},
    )
    asg = place(s).assignments["db"]
    assert asg.state is WAITING and asg.epoch == 6
    assert set(asg.replicas) == {"r1", "r2"}  # r1 holds the freshest copy, r2 a replica


def test_rack_preference_orders_racks_for_new_primaries() -> None:
    s = state(R3, [app("voip", replicas=0)], preference={"r2": 1.0, "r3": 0.5})
    assert place(s).assignments["voip"].primary == "r2"
    s = state(R3, [app("voip", replicas=0)], preference={"r1": -1.0, "r2": -1.0})
    assert place(s).assignments["voip"].primary == "r3"


def test_new_appliances_spread_over_racks_by_headroom() -> None:
    s = state(R3, [app(f"a{i}", replicas=0) for i in range(6)])
    out = place(s).assignments
    per_rack = sorted(sum(1 for a in out.values() if a.primary == r.name) for r in R3)
    assert per_rack == [2, 2, 2]


def test_spec_growing_beyond_its_rack_moves_it() -> None:
    s = state(
        [rack("r1", cpu=2), rack("r2", cpu=8)],
        [app("db", cpu=4, replicas=0)],
        [Assignment("db", "r1", (), epoch=1)],
    )
    r = place(s, PlacementEvent(EventKind.APPLIANCE_CHANGED, "db"))
    assert r.assignments["db"].primary == "r2"
    assert r.reasons[0].startswith("r1 has too little CPU or memory for db; moving db to r2")


def test_copies_beyond_a_racks_disk_are_dropped_least_important_first() -> None:
    s = state(
        [rack("r1", disk=10), rack("r2", disk=100)],
        [
            app("big", disk=8, priority=900, replicas=0),
            app("small", disk=5, priority=100, replicas=0),
        ],
        [Assignment("big", "r1", (), epoch=1), Assignment("small", "r1", (), epoch=1)],
    )
    r = place(s)
    assert r.assignments["big"].primary == "r1"
    assert r.assignments["small"].primary == "r2"
    assert (
        r.reasons[0]
        == "r1 has too little disk for every copy it holds; dropping the copy of small (5 GiB)"
    )


@pytest.mark.parametrize(
    "event",
    [
        PlacementEvent(EventKind.RACK_LOST, "nowhere"),
        PlacementEvent(EventKind.RACK_DRAINED, "nowhere"),
        PlacementEvent(EventKind.APPLIANCE_ADDED, "ghost"),
    ],
)
def test_events_naming_unknown_things_are_refused(event: PlacementEvent) -> None:
    with pytest.raises(InvalidInput, match=r"nowhere|ghost"):
        place(state(R3, []), event)


def test_snapshot_wrapper_matches_place() -> None:
    racks = {r.name: r for r in R3}
    apps = {"voip": app("voip")}
    snap = ClusterSnapshot("c1", racks, apps, {})
    assert (
        place_snapshot(snap, frozenset(racks)).assignments
        == place(PlacementInput(racks, apps, frozenset(racks))).assignments
    )


def test_thousand_appliances_on_a_hundred_racks_stay_within_bounds() -> None:
    rnd = random.Random(7)
    racks = [rack(f"rack-{i}", f"site-{i % 5}", cpu=64, mem=262144, disk=8192) for i in range(100)]
    apps = [
        app(
            f"app-{i}",
            cpu=rnd.choice([1, 2, 4, 8]),
            mem=rnd.choice([512, 2048, 8192]),
            disk=rnd.choice([10, 50, 200]),
            priority=rnd.randrange(1001),
            replicas=rnd.choice([0, 1, 2]),
        )
        for i in range(1000)
    ]
    s = state(racks, apps)
    r = place(s)
    check_capacity(s, r.assignments)
    assert all(a.state is RUNNING for a in r.assignments.values())
    after = place(
        replace(s, assignments=r.assignments), PlacementEvent(EventKind.RACK_LOST, "rack-3")
    )
    lost = {n for n, a in r.assignments.items() if a.primary == "rack-3"}
    assert primaries_changed(r.assignments, after.assignments) == lost


def test_mapping_keys_must_match_names() -> None:
    with pytest.raises(InvalidInput, match="rack key 'x' does not match its name 'r1'"):
        PlacementInput({"x": rack("r1")}, {}, frozenset())
    with pytest.raises(InvalidInput, match="appliance key"):
        PlacementInput({}, {"x": app("voip")}, frozenset())
