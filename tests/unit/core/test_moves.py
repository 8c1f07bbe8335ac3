"""Planned moves and operator stop/start: the map's ops, the leader's plan, reconcile."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import pytest

from meshcloud.core.errors import Conflict, NotFound
from meshcloud.core.models import (
    ApplianceSpec,
    ApplianceState,
    Assignment,
    Capacity,
    ClusterSnapshot,
    DiskSpec,
    Move,
    MovePhase,
    Rack,
)
from meshcloud.core.moves import MoveSettings, age_key, move_command, plan_moves
from meshcloud.core.placement import place_snapshot
from meshcloud.core.reconcile import (
    Destroy,
    DomainState,
    HandOver,
    LeaseView,
    LocalDomain,
    Pause,
    Resume,
    Start,
    Stop,
    reconcile,
)
from meshcloud.core.state import PlacementState, apply, raise_for_result

RACKS = ("r1", "r2", "r3")


def spec(name: str = "app1", disks: bool = True, replicas: int = 1) -> ApplianceSpec:
    return ApplianceSpec(
        name, "demo", disks=(DiskSpec("data", 1),) if disks else (), replicas=replicas
    )


def base_state(*specs: ApplianceSpec) -> PlacementState:
    s = PlacementState()
    for cmd in (
        {"op": "cluster_init", "cluster_id": "c", "max_voters": 3, "voters": list(RACKS)},
        *(
            {"op": "rack_join", "rack": Rack(r, "s0", Capacity(4, 4096, 100)).to_dict()}
            for r in RACKS
        ),
        *({"op": "appliance_set", "spec": sp.to_dict()} for sp in specs or (spec(),)),
    ):
        s = run(s, cmd)
    return s


def run(s: PlacementState, command: Mapping[str, Any]) -> PlacementState:
    new, result = apply(s, dict(command))
    raise_for_result(result)
    return new


def refused(s: PlacementState, command: Mapping[str, Any]) -> str:
    new, result = apply(s, dict(command))
    assert not result["ok"] and new is s, result
    return str(result["message"])


def placed(s: PlacementState, asg: Assignment) -> PlacementState:
    old = s.assignments.get(asg.appliance)
    return run(
        s,
        {
            "op": "assignment_set",
            "assignment": asg.to_dict(),
            "expected_epoch": old.epoch if old else None,
        },
    )


ON_R1 = Assignment("app1", "r1", ("r2",), epoch=3)


# -- the map's ops -------------------------------------------------------------------


def test_a_planned_move_goes_through_every_phase_in_the_map() -> None:
    s = placed(base_state(), ON_R1)
    s = run(
        s, {"op": "move_begin", "appliance": "app1", "epoch": 3, "to": "r2", "reason": "r1 drained"}
    )
    asg = s.assignments["app1"]
    assert asg.moving and asg.primary == "r1" and asg.epoch == 3
    assert asg.move == Move("r1", "r2", MovePhase.HANDOVER, "r1 drained")
    s = run(
        s,
        {"op": "move_synced", "appliance": "app1", "epoch": 3, "rack": "r1",
         "generation": 17, "paused_at": 1000.0},
    )  # fmt: skip
    assert s.assignments["app1"].move == Move(
        "r1", "r2", MovePhase.SYNCED, "r1 drained", 17, 1000.0
    )
    s = run(s, {"op": "move_switch", "appliance": "app1", "epoch": 3})
    asg = s.assignments["app1"]
    assert (asg.primary, asg.replicas, asg.epoch) == ("r2", ("r1",), 4)
    assert asg.move is not None and asg.move.phase is MovePhase.SWITCHED and not asg.moving
    assert "moved from r1 to r2 (generation 17)" in asg.reason
    s = run(
        s, {"op": "move_done", "appliance": "app1", "epoch": 4, "rack": "r2", "downtime_s": 2.5}
    )
    move = s.assignments["app1"].move
    assert move is not None and move.phase is MovePhase.DONE and move.downtime_s == 2.5
    # the record survives a round trip through the map's serialisation
    assert PlacementState.from_dict(s.to_dict()).assignments == s.assignments


def test_move_ops_refuse_what_would_break_the_protocol() -> None:
    s = placed(base_state(), ON_R1)
    begin = {"op": "move_begin", "appliance": "app1", "epoch": 3, "to": "r3"}
    assert "r3 holds no replica of app1" in refused(s, begin)
    assert "epoch 3, not 2" in refused(s, {**begin, "to": "r2", "epoch": 2})
    assert "already runs on r1" in refused(s, {**begin, "to": "r1"})
    s = run(s, {**begin, "to": "r2"})
    assert "already moving to r2" in refused(s, {**begin, "to": "r2"})
    # only the primary reports the sync; no switch before the sync
    synced = {"op": "move_synced", "appliance": "app1", "epoch": 3, "rack": "r2",
              "generation": 5, "paused_at": 1.0}  # fmt: skip
    assert "not the primary" in refused(s, synced)
    assert "its move is handover" in refused(
        s, {"op": "move_switch", "appliance": "app1", "epoch": 3}
    )
    done = {"op": "move_done", "appliance": "app1", "epoch": 3, "rack": "r1", "downtime_s": 1}
    assert "handover" in refused(s, done)


def test_a_leader_deciding_from_an_old_snapshot_cannot_erase_a_move() -> None:
    s = placed(base_state(), ON_R1)
    s = run(s, {"op": "move_begin", "appliance": "app1", "epoch": 3, "to": "r2"})
    s = placed(s, replace(ON_R1, replicas=("r2", "r3")))  # same epoch, no move record
    asg = s.assignments["app1"]
    assert asg.replicas == ("r2", "r3") and asg.moving
    # a failover (new epoch) ends it
    s = placed(s, Assignment("app1", "r2", ("r3",), epoch=4))
    assert s.assignments["app1"].move is None


def test_an_abandoned_move_leaves_the_appliance_where_it_was() -> None:
    s = placed(base_state(), ON_R1)
    s = run(s, {"op": "move_begin", "appliance": "app1", "epoch": 3, "to": "r2"})
    s = run(s, {"op": "move_abandon", "appliance": "app1", "epoch": 3, "reason": "sync failed"})
    asg = s.assignments["app1"]
    assert asg.primary == "r1" and asg.epoch == 3 and not asg.moving
    assert asg.move is not None and asg.move.phase is MovePhase.ABANDONED
    assert asg.move.reason == "sync failed"


def test_desired_state_is_kept_in_the_map() -> None:
    s = placed(base_state(), ON_R1)
    s = run(s, {"op": "appliance_desired", "name": "app1", "state": "stopped"})
    assert s.snapshot().stopped == frozenset({"app1"})
    assert PlacementState.from_dict(s.to_dict()).stopped == frozenset({"app1"})
    s = run(s, {"op": "appliance_desired", "name": "app1", "state": "running"})
    assert s.stopped == frozenset()
    assert "does not exist" in refused(
        s, {"op": "appliance_desired", "name": "x", "state": "stopped"}
    )
    assert "must be 'running' or 'stopped'" in refused(
        s, {"op": "appliance_desired", "name": "app1", "state": "paused"}
    )
    s = run(s, {"op": "appliance_desired", "name": "app1", "state": "stopped"})
    s = run(s, {"op": "appliance_remove", "name": "app1"})
    assert s.stopped == frozenset()


# -- placement: stop and start -------------------------------------------------------


ALL = frozenset(RACKS)


def test_a_stopped_appliance_stays_on_its_rack_and_starts_there_again() -> None:
    s = placed(base_state(), ON_R1)
    s = run(s, {"op": "appliance_desired", "name": "app1", "state": "stopped"})
    out = place_snapshot(s.snapshot(), ALL)
    asg = out.assignments["app1"]
    assert (asg.primary, asg.replicas, asg.epoch, asg.state) == (
        "r1",
        ("r2",),
        3,
        ApplianceState.STOPPED,
    )
    assert out.reasons == ("app1 stopped by an operator on r1",)
    s = placed(s, asg)
    # its rack is lost while it is stopped: it stays stopped, its data stays listed
    lost = place_snapshot(s.snapshot(), frozenset({"r2", "r3"}))
    assert lost.assignments["app1"] == asg
    # started again: same rack, same epoch (its latest writes are there)
    s = run(s, {"op": "appliance_desired", "name": "app1", "state": "running"})
    out = place_snapshot(s.snapshot(), ALL)
    asg = out.assignments["app1"]
    assert (asg.primary, asg.epoch, asg.state) == ("r1", 3, ApplianceState.RUNNING)
    assert out.reasons[0].startswith("app1 started by an operator; starting it on r1")


# -- the leader's plan ---------------------------------------------------------------


def drained(s: PlacementState, rack: str) -> PlacementState:
    doc = s.racks[rack].to_dict()
    doc["drained"] = True
    return run(s, {"op": "rack_join", "rack": doc})


def plan(
    s: PlacementState,
    alive: frozenset[str] = ALL,
    age: float = 0.0,
    settings: MoveSettings | None = None,
) -> Any:
    snap = s.snapshot()
    wanted = place_snapshot(snap, alive, replica_generations=snap.replica_generations)
    return plan_moves(snap, wanted.assignments, alive, {n: age for n in snap.appliances}, settings)


def reported(s: PlacementState, rack: str, generation: int) -> PlacementState:
    return run(
        s, {"op": "replica_report", "appliance": "app1", "rack": rack, "generation": generation}
    )


def test_a_drain_begins_a_planned_move_to_the_replica_holder() -> None:
    s = drained(reported(placed(base_state(), ON_R1), "r2", 9), "r1")
    p = plan(s)
    assert p.commands == (
        {"op": "move_begin", "appliance": "app1", "epoch": 3, "to": "r2", "reason": "r1 drained"},
    )
    assert p.assignments["app1"] == s.assignments["app1"] and p.held == {"app1"}
    assert p.reasons == (
        "r1 drained; handing app1 over from r1 to r2 (replica gen 9): pause, final sync,"
        " start there",
    )


def test_a_target_without_data_becomes_a_replica_first_then_stop_and_start_after_a_while() -> None:
    s = drained(placed(base_state(spec(replicas=0)), Assignment("app1", "r1", (), epoch=3)), "r1")
    s = reported(s, "r1", 2)  # it was replicated once: a copy can catch up
    p = plan(s)
    (target,) = p.assignments["app1"].replicas
    assert p.commands == () and p.assignments["app1"].primary == "r1"
    assert "adding replica on" in p.reasons[0]
    s = placed(s, p.assignments["app1"])
    assert plan(s).commands == ()  # waits for the copy
    late = plan(s, age=MoveSettings().catch_up_s)
    assert late.assignments["app1"].primary == target and late.assignments["app1"].epoch == 4
    assert "moving it by stopping and starting" in late.reasons[0]
    s = reported(s, target, 5)
    assert plan(s).commands[0]["to"] == target


def test_without_disks_or_a_live_source_nothing_is_planned() -> None:
    s = drained(placed(base_state(spec(disks=False)), ON_R1), "r1")
    assert plan(s).commands == () and plan(s).assignments["app1"].primary != "r1"
    s = reported(drained(placed(base_state(), ON_R1), "r1"), "r2", 9)
    p = plan(s, alive=frozenset({"r2", "r3"}))  # r1 lost: failover
    assert p.commands == () and p.assignments["app1"].primary == "r2"


def moving(phase: MovePhase = MovePhase.HANDOVER) -> PlacementState:
    s = reported(placed(base_state(), ON_R1), "r2", 9)
    s = run(s, {"op": "move_begin", "appliance": "app1", "epoch": 3, "to": "r2", "reason": "ops"})
    if phase is MovePhase.SYNCED:
        s = run(s, {"op": "move_synced", "appliance": "app1", "epoch": 3, "rack": "r1",
                    "generation": 10, "paused_at": 5.0})  # fmt: skip
    return s


def test_the_leader_switches_a_synced_move_and_waits_for_one_in_handover() -> None:
    p = plan(moving())
    assert p.commands == () and p.assignments["app1"].primary == "r1"
    p = plan(moving(MovePhase.SYNCED))
    assert p.commands == ({"op": "move_switch", "appliance": "app1", "epoch": 3},)
    assert "switching it to r2 under epoch 4" in p.reasons[0]


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ("timeout", "r1 reported no final sync within 60 s"),
        ("target-lost", "r2 was lost"),
        ("target-drained", "r2 was drained"),
        ("stopped", "it was stopped by an operator"),
    ],
)
def test_the_leader_abandons_a_move_that_cannot_finish(change: str, why: str) -> None:
    s = moving()
    alive, age = ALL, 0.0
    if change == "timeout":
        age = 60.0
    elif change == "target-lost":
        alive = frozenset({"r1", "r3"})
    elif change == "target-drained":
        s = drained(s, "r2")
    else:
        s = run(s, {"op": "appliance_desired", "name": "app1", "state": "stopped"})
    p = plan(s, alive=alive, age=age)
    assert p.commands == (
        {"op": "move_abandon", "appliance": "app1", "epoch": 3,
         "reason": f"{why}; app1 resumes on r1"},
    )  # fmt: skip
    assert p.assignments["app1"] == s.assignments["app1"]


def test_a_source_lost_mid_move_fails_over_and_the_new_epoch_ends_the_move() -> None:
    p = plan(moving(MovePhase.SYNCED), alive=frozenset({"r2", "r3"}))
    asg = p.assignments["app1"]
    assert p.commands == () and asg.primary == "r2" and asg.epoch == 4 and asg.move is None
    assert p.reasons == ("r1 lost while handing app1 over to r2; failing over",)


def test_after_an_abandoned_move_a_drain_waits_before_trying_again() -> None:
    s = drained(moving(), "r1")
    s = run(s, {"op": "move_abandon", "appliance": "app1", "epoch": 3, "reason": "x"})
    assert plan(s).commands == () and plan(s).held == {"app1"}
    retry = plan(s, age=MoveSettings().retry_after_s)
    assert retry.commands[0]["op"] == "move_begin"


def test_age_key_changes_with_the_phase() -> None:
    s = moving()
    a = age_key(s.assignments["app1"], s.assignments["app1"])
    b = age_key(moving(MovePhase.SYNCED).assignments["app1"], s.assignments["app1"])
    assert a != b and age_key(None, None) == ()


# -- an operator's move ---------------------------------------------------------------


def test_an_operators_move_goes_to_a_replica_holder_with_room() -> None:
    s = reported(
        placed(base_state(spec(replicas=2)), Assignment("app1", "r1", ("r2", "r3"), 3)), "r3", 8
    )
    snap = s.snapshot()
    assert move_command(snap, "app1")["to"] == "r3"  # the freshest
    assert move_command(snap, "app1", "r2")["reason"] == "moved by an operator to r2"
    with pytest.raises(Conflict, match="already runs on r1"):
        move_command(snap, "app1", "r1")
    with pytest.raises(NotFound, match="not a member"):
        move_command(snap, "app1", "r9")
    with pytest.raises(NotFound, match="does not exist"):
        move_command(snap, "nope")
    s2 = placed(base_state(), ON_R1)
    with pytest.raises(Conflict, match="r3 holds no replica of app1"):
        move_command(s2.snapshot(), "app1", "r3")
    s3 = run(s2, {"op": "appliance_desired", "name": "app1", "state": "stopped"})
    with pytest.raises(Conflict, match="stopped"):
        move_command(s3.snapshot(), "app1", "r2")
    # the command it builds is one the map accepts
    run(s2, move_command(s2.snapshot(), "app1", "r2"))


# -- reconcile on the source ----------------------------------------------------------


def decide(s: PlacementState, rack: str, state: DomainState, epoch: int = 3) -> tuple[Any, ...]:
    domains = {"app1": LocalDomain("app1", state, epoch)}
    return reconcile(rack, s.snapshot(), domains, LeaseView.holding(), {}, 0.0).actions


def test_the_source_hands_over_and_then_never_resumes_until_the_map_says_so() -> None:
    assert decide(moving(), "r1", DomainState.RUNNING) == (HandOver("app1", 3, "r2"),)
    assert decide(moving(), "r1", DomainState.PAUSED) == (HandOver("app1", 3, "r2"),)
    synced = moving(MovePhase.SYNCED)
    assert decide(synced, "r1", DomainState.PAUSED) == ()  # no Resume
    assert decide(synced, "r1", DomainState.RUNNING) == (Pause("app1"),)
    # abandoned: resumes here; switched: destroyed here, started on the target
    abandoned = run(synced, {"op": "move_abandon", "appliance": "app1", "epoch": 3, "reason": "x"})
    assert decide(abandoned, "r1", DomainState.PAUSED) == (Resume("app1", 3),)
    switched = run(synced, {"op": "move_switch", "appliance": "app1", "epoch": 3})
    assert decide(switched, "r1", DomainState.PAUSED) == (Destroy("app1"),)
    target = reconcile("r2", switched.snapshot(), {}, LeaseView.holding(), {}, 0.0).actions
    assert target == (Start("app1", 4),)


def test_a_stopped_appliance_is_stopped_gracefully_on_its_rack() -> None:
    s = placed(base_state(), ON_R1)
    s = run(s, {"op": "appliance_desired", "name": "app1", "state": "stopped"})
    s = placed(s, place_snapshot(s.snapshot(), ALL).assignments["app1"])
    assert decide(s, "r1", DomainState.RUNNING) == (Stop("app1"),)
    assert decide(s, "r1", DomainState.SHUTOFF) == ()


def test_snapshot_round_trip_keeps_stopped() -> None:
    snap = ClusterSnapshot("c", stopped=frozenset({"a"}))
    assert ClusterSnapshot.from_dict(snap.to_dict()).stopped == frozenset({"a"})
