"""Power-aware placement: evacuating racks short of power, preferring racks with runtime."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from hypothesis import assume, given
from hypothesis import strategies as st

from meshcloud.core.models import Assignment, Capacity, ClusterSnapshot, Rack
from meshcloud.core.placement import (
    EventKind,
    PlacementEvent,
    PlacementInput,
    PlacementResult,
    place,
    place_snapshot,
    primaries_changed,
)
from meshcloud.core.power import PowerSource, RackPower
from tests.unit.core.test_placement import (
    PROPS,
    RUNNING,
    WAITING,
    app,
    check_capacity,
    clusters,
    rack,
    state,
)


def evacuate(s: PlacementInput, racks: set[str]) -> PlacementInput:
    why = {r: f"{r} on battery, 5 min left" for r in sorted(racks)}
    prefs = {r: -2.0 for r in racks}
    return replace(s, evacuating=why, rack_preference=prefs)


def check_power_rules(s: PlacementInput, r: PlacementResult) -> None:
    """Structure with racks short of power: extra replicas only on evacuating racks."""
    ok = {n for n in s.alive if n in s.racks and not s.racks[n].drained}
    dying = set(s.evacuating) & ok
    for name, asg in r.assignments.items():
        spec = s.appliances[name]
        old = s.assignments.get(name)
        before = set(old.holders()) if old else set()
        if asg.state is RUNNING:
            assert asg.primary in ok
            steady = [h for h in asg.replicas if h not in dying]
            assert len(steady) <= spec.replicas
        for holder in asg.holders():
            if holder in dying and holder != asg.primary:
                assert holder in before, f"new copy of {name} on {holder}, which is short of power"
        old_primary = old.primary if old else None
        if old is not None and asg.primary == old_primary:
            assert asg.epoch == old.epoch
        else:
            assert asg.epoch == (old.epoch if old else 0) + 1
    check_capacity(s, r.assignments)


@st.composite
def placed_with_evacuation(
    draw: st.DrawFn, ample: bool = True
) -> tuple[PlacementInput, dict[str, Assignment], set[str]]:
    s = draw(clusters(ample=ample))
    assume(len(s.racks) >= 2)
    before = place(s).assignments
    dying = set(draw(st.sets(st.sampled_from(sorted(s.racks)), min_size=1)))
    assume(dying != set(s.racks))
    return evacuate(replace(s, assignments=before), dying), dict(before), dying


@PROPS
@given(placed_with_evacuation())
def test_evacuation_moves_exactly_the_primaries_of_racks_short_of_power(
    case: tuple[PlacementInput, dict[str, Assignment], set[str]],
) -> None:
    s, before, dying = case
    after = place(s)
    check_power_rules(s, after)
    out = after.assignments
    on_dying = {n for n, a in before.items() if a.primary in dying}
    assert primaries_changed(before, out) == on_dying
    for name in on_dying:
        new = out[name]
        assert new.state is RUNNING and new.primary not in dying
        assert new.epoch == before[name].epoch + 1
        # The rack short of power keeps its copy (a replica holder while it lasts).
        assert before[name].primary in new.replicas
        if any(h not in dying for h in before[name].replicas):
            assert new.primary in before[name].replicas, "a steady replica holder is promoted"
    # Every copy a dying rack held is still there.
    for name, old in before.items():
        for holder in old.holders():
            if holder in dying:
                assert holder in out[name].holders()


@PROPS
@given(placed_with_evacuation())
def test_moves_are_explained_most_important_first(
    case: tuple[PlacementInput, dict[str, Assignment], set[str]],
) -> None:
    s, before, _dying = case
    after = place(s)
    moved = sorted(
        primaries_changed(before, after.assignments),
        key=lambda n: (-s.appliances[n].priority, n),
    )
    lines = []
    for name in moved:
        old_rack = before[name].primary
        (line,) = [x for x in after.reasons if f"moving {name} to " in x]
        assert line.startswith(f"{old_rack} on battery, 5 min left; moving {name} to ")
        lines.append(after.reasons.index(line))
    assert lines == sorted(lines)


@PROPS
@given(placed_with_evacuation())
def test_back_on_mains_nothing_moves_back_and_placement_is_stable(
    case: tuple[PlacementInput, dict[str, Assignment], set[str]],
) -> None:
    s, _before, _dying = case
    evacuated = place(s).assignments
    again = place(replace(s, assignments=evacuated))
    assert again.assignments == evacuated and again.reasons == ()
    restored = replace(s, assignments=evacuated, evacuating={}, rack_preference={})
    mains = place(restored)
    assert primaries_changed(evacuated, mains.assignments) == frozenset()


@PROPS
@given(st.data())
def test_rules_hold_from_any_map_with_any_racks_short_of_power(data: st.DataObject) -> None:
    s = data.draw(clusters())
    if data.draw(st.booleans()):
        s = replace(s, assignments=place(s).assignments)
    dying = data.draw(st.sets(st.sampled_from(sorted(s.racks))))
    s = evacuate(s, dying)
    check_power_rules(s, place(s))
    event = PlacementEvent(EventKind.RACK_LOST, data.draw(st.sampled_from(sorted(s.racks))))
    lost = place(s, event)
    check_power_rules(replace(s, alive=s.alive - {event.name}), lost)


@PROPS
@given(st.data())
def test_racks_short_of_power_are_the_last_resort_not_a_reason_to_wait(
    data: st.DataObject,
) -> None:
    s = data.draw(clusters())
    plain = place(s).assignments
    everyone = evacuate(replace(s, assignments=plain), set(s.racks))
    out = place(everyone).assignments
    # Every rack short of power: nothing moves and nothing that ran starts waiting.
    assert primaries_changed(plain, out) == frozenset()
    for name, asg in plain.items():
        if asg.state is RUNNING:
            assert out[name].state is RUNNING


@PROPS
@given(st.data())
def test_new_primaries_prefer_racks_with_more_runtime(data: st.DataObject) -> None:
    s = data.draw(clusters(ample=True))
    assume(len(s.racks) >= 2)
    names = sorted(s.racks)
    prefs = {n: data.draw(st.sampled_from([0.0, -0.2, -0.9])) for n in names}
    s = replace(s, rack_preference=prefs)
    best = max(prefs.values())
    for name, asg in place(s).assignments.items():
        # Ample room everywhere: every new primary lands on a rack with the best power.
        assert prefs[asg.primary] == best, f"{name} placed on {asg.primary}"  # type: ignore[index]


# -- examples -------------------------------------------------------------------------------


def test_the_sentence_names_the_rack_its_runtime_and_the_target() -> None:
    s = state(
        [rack("r1", "s1"), rack("r2", "s2"), rack("r4", "s4")],
        [app("voip", priority=900), app("tiles", priority=100)],
        [Assignment("voip", "r2", ("r4",), epoch=3), Assignment("tiles", "r2", ("r1",), epoch=1)],
        gens={"voip": {"r4": 12}, "tiles": {"r1": 7}},
    )
    out = place(replace(s, evacuating={"r2": "r2 on battery, 9 min left"}))
    assert out.reasons[0].startswith(
        "r2 on battery, 9 min left; moving voip to r4 (replica gen 12)"
    )
    assert out.reasons[1].startswith("r2 on battery, 9 min left; moving tiles to r1")
    assert out.assignments["voip"] == Assignment(
        "voip", "r4", ("r1", "r2"), 4, RUNNING, out.assignments["voip"].reason
    )


def test_stays_on_a_dying_rack_when_no_other_rack_has_room() -> None:
    s = state(
        [rack("r1", cpu=1), rack("r2", cpu=2)],
        [app("voip", cpu=2)],
        [Assignment("voip", "r2", ("r1",), epoch=3)],
    )
    out = place(replace(s, evacuating={"r2": "r2 on battery, 2 min left"}))
    voip = out.assignments["voip"]
    assert (voip.primary, voip.epoch, voip.state) == ("r2", 3, RUNNING)
    assert "stays on r2 while its power lasts" in voip.reason
    assert place(replace(s, assignments=out.assignments, evacuating={"r2": "x"})).reasons == ()


def test_a_lost_primary_fails_over_to_the_freshest_copy_even_on_battery() -> None:
    s = state(
        [rack("r1", "s1"), rack("r2", "s2"), rack("r3", "s3")],
        [app("voip", replicas=2)],
        [Assignment("voip", "r1", ("r2", "r3"), epoch=3)],
        alive={"r2", "r3"},
        gens={"voip": {"r2": 20, "r3": 12}},
    )
    out = place(replace(s, evacuating={"r2": "r2 on battery, 9 min left"}))
    assert out.assignments["voip"].primary == "r2"  # data first; it is evacuated next cycle
    then = place(replace(s, assignments=out.assignments, evacuating={"r2": "r2 low"}))
    assert then.assignments["voip"].primary == "r3"


def test_higher_priority_evacuee_displaces_lower_priority_on_a_steady_rack() -> None:
    s = state(
        [rack("r1", cpu=2), rack("r2", cpu=2)],
        [app("voip", cpu=2, priority=900), app("tiles", cpu=2, priority=100)],
        [Assignment("voip", "r2", ("r1",), epoch=1), Assignment("tiles", "r1", ("r2",), epoch=1)],
    )
    out = place(replace(s, evacuating={"r2": "r2 on battery, 3 min left"})).assignments
    assert out["voip"].primary == "r1"
    assert out["tiles"].primary == "r2" or out["tiles"].state is WAITING


def power(rack_name: str, runtime_s: float | None, low: bool = False) -> RackPower:
    if runtime_s is None:
        return RackPower(rack_name)
    return RackPower(
        rack_name, PowerSource.NUT, True, low, 50.0, runtime_s, 600.0, 1.0, "OB LB" if low else "OB"
    )


def snapshot(power_reports: Mapping[str, RackPower]) -> ClusterSnapshot:
    from meshcloud.core.models import ApplianceSpec, DiskSpec

    racks = {n: Rack(n, "s" + n, Capacity(8, 8192, 100)) for n in ("r1", "r2", "r3")}
    voip = ApplianceSpec("voip", "demo", disks=(DiskSpec("data", 1),), priority=900)
    return ClusterSnapshot(
        "c1",
        racks=racks,
        appliances={"voip": voip},
        assignments={"voip": Assignment("voip", "r2", ("r3",), epoch=2)},
        power=dict(power_reports),
    )


def test_place_snapshot_reads_the_power_reports() -> None:
    alive = frozenset({"r1", "r2", "r3"})
    snap = snapshot({"r2": power("r2", 300.0), "r3": power("r3", 7200.0)})
    out = place_snapshot(snap, alive)
    assert out.assignments["voip"].primary == "r3"
    assert out.reasons[0].startswith("r2 on battery, 5 min left; moving voip to r3")
    # r3 has no replica: the move goes to the rack on mains, not the one on battery.
    snap2 = replace(snap, assignments={"voip": Assignment("voip", "r2", (), epoch=2)})
    assert place_snapshot(snap2, alive).assignments["voip"].primary == "r1"
    # Low battery evacuates whatever the runtime says; a rack on mains again keeps its primary.
    low = place_snapshot(replace(snap, power={"r2": power("r2", 5000.0, low=True)}), alive)
    assert low.assignments["voip"].primary == "r3"
    assert low.reasons[0].startswith("r2 on battery, low battery, 83 min left; moving voip")
    assert place_snapshot(replace(snap, power={"r2": power("r2", None)}), alive).reasons == ()
