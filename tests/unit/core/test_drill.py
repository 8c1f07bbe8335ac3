"""The fire drill's pure parts: the map record and ops, the refusals, the figures, the report."""

from __future__ import annotations

from typing import Any

import pytest

from meshcloud.core.drill import (
    Drill,
    Timeline,
    check_drill,
    choose_appliance,
    figures,
    report_text,
)
from meshcloud.core.errors import Conflict, InvalidInput, NotFound
from meshcloud.core.models import (
    ApplianceSpec,
    Assignment,
    Capacity,
    DiskSpec,
    Move,
    MovePhase,
    Rack,
)
from meshcloud.core.state import PlacementState, apply, raise_for_result

RACKS = ("r1", "r2", "r3")
ALL = frozenset(RACKS)


def run(state: PlacementState, command: dict[str, Any]) -> PlacementState:
    new, result = apply(state, command)
    raise_for_result(result)
    return new


def cluster(
    apps: dict[str, int] | None = None, gens: dict[str, int] | None = None
) -> PlacementState:
    """Three racks; each appliance (name -> priority) runs on r1 with replicas r2, r3."""
    s = PlacementState()
    s = run(s, {"op": "cluster_init", "cluster_id": "c", "max_voters": 3, "voters": list(RACKS)})
    for r in RACKS:
        s = run(s, {"op": "rack_join", "rack": Rack(r, "s0", Capacity(4, 4096, 100)).to_dict()})
    for name, priority in (apps or {"web": 100}).items():
        spec = ApplianceSpec(
            name, "demo", disks=(DiskSpec("data", 1),), replicas=2, priority=priority
        )
        s = run(s, {"op": "appliance_set", "spec": spec.to_dict()})
        asg = Assignment(name, "r1", ("r2", "r3"), epoch=3)
        s = run(s, {"op": "assignment_set", "assignment": asg.to_dict(), "expected_epoch": None})
        for rack, gen in (gens if gens is not None else {"r2": 7, "r3": 6}).items():
            s = run(s, {"op": "replica_report", "appliance": name, "rack": rack, "generation": gen})
    return s


# -- the map's record ------------------------------------------------------------------


def test_a_drill_begins_updates_and_ends_in_the_map() -> None:
    s = cluster()
    drill = Drill("drill-1", "web", "r1", 3, "r2")
    s = run(s, {"op": "drill_begin", "drill": drill.to_dict()})
    assert s.drill == drill
    s = run(s, {"op": "drill_update", "id": "drill-1", "lag_at_cut_s": {"r2": 0.4, "r3": -1}})
    s = run(s, {"op": "drill_update", "id": "drill-1", "running_on": "r2", "running_epoch": 4})
    assert s.drill is not None and s.drill.running_on == "r2"
    assert dict(s.drill.lag_at_cut_s or {}) == {"r2": 0.4, "r3": -1.0}
    assert PlacementState.from_dict(s.to_dict()) == s  # full dumps keep it
    s = run(s, {"op": "drill_end", "id": "drill-1"})
    assert s.drill is None


def test_one_drill_at_a_time_and_updates_name_it() -> None:
    s = run(
        cluster(), {"op": "drill_begin", "drill": Drill("drill-1", "web", "r1", 3, "r2").to_dict()}
    )
    _, result = apply(
        s, {"op": "drill_begin", "drill": Drill("drill-2", "web", "r1", 3, "r3").to_dict()}
    )
    assert result["error"] == "conflict"
    _, result = apply(s, {"op": "drill_update", "id": "drill-2", "fenced": False})
    assert result["error"] == "conflict"
    same, result = apply(s, {"op": "drill_end", "id": "drill-2"})  # not current: no change
    assert result["ok"] and same.drill is not None


@pytest.mark.parametrize(
    "record",
    [
        {"id": "Drill 1", "appliance": "web", "rack": "r1", "epoch": 3, "by": "r2"},
        {"id": "drill-1", "appliance": "web", "rack": "../x", "epoch": 3, "by": "r2"},
        {"id": "drill-1", "appliance": "web", "rack": "r1", "epoch": -1, "by": "r2"},
        {"id": "drill-1", "appliance": "web", "rack": "r1", "epoch": 3, "by": "r2", "x": 1},
        {"id": "drill-1", "appliance": "web", "rack": "r1", "epoch": 3},
        {"id": "drill-1", "appliance": "web", "rack": "r1", "epoch": 3, "by": "r2",
         "lag_at_cut_s": {"r2": "soon"}},
    ],
)  # fmt: skip
def test_bad_drill_records_are_refused(record: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput):
        Drill.from_dict(record)
    _, result = apply(cluster(), {"op": "drill_begin", "drill": record})
    assert result["error"] == "invalid"


def test_a_drill_of_an_unknown_appliance_is_refused_by_the_map() -> None:
    _, result = apply(
        cluster(), {"op": "drill_begin", "drill": Drill("drill-1", "nope", "r1", 3, "r2").to_dict()}
    )
    assert result["error"] == "not_found"


# -- refusals ------------------------------------------------------------------------------


def test_a_safe_drill_names_the_rack_and_the_replicas_with_a_copy() -> None:
    plan = check_drill(cluster().snapshot(), "web", ALL, leader="r2")
    assert (plan.rack, plan.epoch, dict(plan.replicas)) == ("r1", 3, {"r2": 7, "r3": 6})
    assert plan.notes == ()


def test_the_plan_names_other_appliances_on_the_rack_and_a_leader_cut() -> None:
    plan = check_drill(cluster({"web": 100, "voip": 900}).snapshot(), "web", ALL, leader="r1")
    assert plan.also_affected == ("voip",)
    assert any("voip" in n for n in plan.notes)
    assert any("leads the Raft group" in n for n in plan.notes)


def test_refusals() -> None:
    snap = cluster().snapshot()
    with pytest.raises(NotFound, match="does not exist"):
        check_drill(snap, "nope", ALL)
    with pytest.raises(InvalidInput):
        check_drill(snap, "Bad/Name", ALL)
    with pytest.raises(Conflict, match="already lost"):
        check_drill(snap, "web", frozenset({"r1", "r2"}))
    with pytest.raises(Conflict, match="under way"):
        check_drill(snap, "web", ALL, drill_running=Drill("drill-1", "web", "r1", 3, "r2"))
    with pytest.raises(Conflict, match="no live replica"):
        check_drill(cluster(gens={}).snapshot(), "web", ALL)
    with pytest.raises(Conflict, match="no live replica"):
        check_drill(cluster(gens={"r2": 0}).snapshot(), "web", ALL)


def test_no_drill_without_a_majority_after_the_cut() -> None:
    s = cluster()
    s = run(s, {"op": "rack_remove", "rack": "r3"})  # two voters: losing one leaves no majority
    with pytest.raises(Conflict, match="no majority"):
        check_drill(s.snapshot(), "web", frozenset({"r1", "r2"}))


def test_no_drill_of_a_stopped_or_moving_appliance() -> None:
    s = run(cluster(), {"op": "appliance_desired", "name": "web", "state": "stopped"})
    with pytest.raises(Conflict, match="stopped"):
        check_drill(s.snapshot(), "web", ALL)
    moving = Assignment(
        "web", "r1", ("r2", "r3"), epoch=3, move=Move("r1", "r2", MovePhase.HANDOVER)
    )
    snap = cluster().snapshot()
    snap = type(snap)(**{**snap.__dict__, "assignments": {"web": moving}})
    with pytest.raises(Conflict, match="being moved"):
        check_drill(snap, "web", ALL)


def test_a_random_drill_picks_among_the_lowest_priority() -> None:
    snap = cluster({"voip": 900, "tiles": 50, "files": 50}).snapshot()
    picked = {choose_appliance(snap, ALL, i) for i in range(10)}
    assert picked == {"files", "tiles"}
    with pytest.raises(Conflict, match="no appliance can be drilled"):
        choose_appliance(cluster(gens={}).snapshot(), ALL, 0)


# -- figures and the report ---------------------------------------------------------------


def test_figures_split_rto_into_detection_and_restart_and_read_rpo_from_the_lag() -> None:
    t = Timeline(
        cut_at=100.0, decided_at=104.3, running_at=106.0, new_primary="r2", new_epoch=4,
        lag_at_cut_s={"r2": 0.8, "r3": -1.0}, generations_at_cut={"r2": 7, "r3": 6},
        start_generation=7,
    )  # fmt: skip
    f = figures(t, lease_s=3.0, margin_s=1.5, renew_s=0.5)
    assert (f["rto_s"], f["detect_s"], f["restart_s"], f["rpo_s"]) == (6.0, 4.3, 1.7, 0.8)
    assert f["rpo_generations_behind"] == 0
    assert f["expected_detect_s"] == [4.0, 4.5]


def test_unknown_figures_stay_unknown() -> None:
    f = figures(Timeline(cut_at=5.0, new_primary="r3", lag_at_cut_s={"r3": -1.0}), 3.0, 1.5, 0.5)
    assert f["rto_s"] is None and f["restart_s"] is None and f["rpo_s"] is None


def test_the_report_prints_what_field_staff_keep() -> None:
    report = {
        "id": "drill-1", "cluster_id": "c", "started": "2026-01-01 10:00:00 UTC", "by": "r2",
        "appliance": "web", "priority": 100, "rack": "r1", "new_primary": "r2",
        "outcome": "passed: the appliance ran again on another rack",
        "figures": figures(
            Timeline(100.0, 104.3, 106.0, "r2", 4, {"r2": 0.8}, {"r2": 7}, 6), 3.0, 1.5, 0.5
        ),
        "kept_aside": {"id": "web-3", "generations": 2, "bytes": 4096},
        "restore": {"rejoined": "yes", "moved_back": "yes: down 1.2 s, no write lost"},
        "notes": ["r1 leads the Raft group"],
        "steps": [{"at_s": 0.1, "message": "drill drill-1: cutting r1 off"}],
    }  # fmt: skip
    text = report_text(report)
    for needle in (
        "fire drill drill-1", "6.00 s", "4.30 s", "1.70 s", "0.80 s", "4.0-4.5 s",
        "generation 6 (1 behind", "web-3", "moved back   yes", "cutting r1 off", "passed",
    ):  # fmt: skip
        assert needle in text, needle
    assert "not measured" in report_text({"id": "x", "steps": []})
