"""The placement map state machine: table-driven cases and properties."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshcloud.core.errors import Conflict, InvalidInput, NotFound
from meshcloud.core.models import Capacity, Rack
from meshcloud.core.state import (
    EMPTY,
    OPS,
    PlacementState,
    apply,
    choose_voters,
    founding_voters,
    raise_for_result,
    validate_command,
    voter_count,
)

CAP = {"vcpus": 8, "memory_mib": 8192, "disk_gib": 100}


def rack(name: str, site: str = "a", address: str = "10.0.0.1") -> dict[str, Any]:
    return {"name": name, "site": site, "capacity": CAP, "address": address, "raft_port": 7440}


def spec(name: str = "voip") -> dict[str, Any]:
    return {"name": name, "image": "demo"}


def run(*commands: Mapping[str, Any], state: PlacementState = EMPTY) -> PlacementState:
    for command in commands:
        state, result = apply(state, command)
        assert result["ok"], result
    return state


INIT = {"op": "cluster_init", "cluster_id": "c1", "max_voters": 3, "voters": ["r1"]}
BASE = run(
    INIT,
    {"op": "rack_join", "rack": rack("r1")},
    {"op": "appliance_set", "spec": spec()},
)


# --- refusals: (command, error kind, words in the message) -------------------------

REFUSED: list[tuple[Any, str, str]] = [
    ("not a dict", "invalid", "must be an object"),
    ({"op": "nope"}, "invalid", "unknown op"),
    ({"op": "append", "key": "h"}, "invalid", "missing field(s) value"),
    ({"op": "append", "key": "h", "value": 1, "extra": 1}, "invalid", "unknown field(s) extra"),
    ({"op": "append", "key": "H!", "value": 1}, "invalid", "valid name"),
    ({"op": "append", "key": "h", "value": 1.5}, "invalid", "string or an integer"),
    ({"op": "append", "key": "h", "value": True}, "invalid", "string or an integer"),
    ({"op": "append", "key": "h", "value": "x" * 300}, "invalid", "longer than"),
    ({"op": "append", "key": "h", "value": 1, "request_id": ""}, "invalid", "request_id"),
    ({"op": "append", "key": "h", "value": 1, "expected_revision": 99}, "conflict", "revision"),
    ({"op": "rack_join", "rack": {"name": "Bad", "site": "a", "capacity": CAP}}, "invalid", "rack"),
    ({"op": "rack_join", "rack": "r2"}, "invalid", "must be an object"),
    ({"op": "rack_remove", "rack": "ghost"}, "not_found", "not a member"),
    ({"op": "appliance_remove", "name": "ghost"}, "not_found", "does not exist"),
    ({"op": "appliance_set", "spec": {"name": "x"}}, "invalid", "missing"),
    (
        {"op": "assignment_set", "assignment": {"appliance": "ghost", "primary": "r1"},
         "expected_epoch": None},
        "not_found", "set its spec first",
    ),
    (
        {"op": "assignment_set", "assignment": {"appliance": "voip", "primary": "r1"},
         "expected_epoch": 3},
        "conflict", "no assignment",
    ),
    (
        {"op": "lease_renew", "rack": "ghost", "issued_at": 1.0, "received_at": 2.0},
        "not_found", "has not joined",
    ),
    (
        {"op": "lease_renew", "rack": "r1", "issued_at": float("nan"), "received_at": 2.0},
        "invalid", "finite",
    ),
    (
        {"op": "lease_renew", "rack": "r1", "issued_at": "soon", "received_at": 2.0},
        "invalid", "number",
    ),
    ({"op": "replica_report", "appliance": "ghost", "rack": "r1", "generation": 1}, "not_found", ""),
    ({"op": "replica_report", "appliance": "voip", "rack": "r1", "generation": -1}, "invalid", ""),
    ({"op": "cluster_init", "cluster_id": "c2", "max_voters": 3, "voters": ["r1"]}, "conflict", "c1"),
    ({"op": "cluster_init", "cluster_id": "c1", "max_voters": 4, "voters": ["r1"]}, "invalid", ""),
    ({"op": "cluster_init", "cluster_id": "c1", "max_voters": 1, "voters": ["a", "b"]}, "invalid", ""),
]  # fmt: skip


@pytest.mark.parametrize(("command", "kind", "words"), REFUSED)
def test_refused_commands_leave_the_state_unchanged(command: Any, kind: str, words: str) -> None:
    new, result = apply(BASE, command)
    assert new is BASE
    assert result["ok"] is False
    assert result["error"] == kind
    assert words in result["message"]


def test_raise_for_result_maps_error_kinds() -> None:
    assert raise_for_result({"ok": True})["ok"]
    for kind, cls in (("invalid", InvalidInput), ("conflict", Conflict), ("not_found", NotFound)):
        with pytest.raises(cls, match="because"):
            raise_for_result({"ok": False, "error": kind, "message": "because"})


def test_validate_command_raises() -> None:
    with pytest.raises(InvalidInput, match="unknown op"):
        validate_command({"op": "drop_tables"})
    cmd = {"op": "append", "key": "h", "value": "v"}
    assert validate_command(cmd) is cmd


# --- transitions --------------------------------------------------------------------


def test_revision_counts_changes_only_and_request_id_is_echoed() -> None:
    state, result = apply(BASE, {"op": "append", "key": "h", "value": 1, "request_id": "q1"})
    assert result == {"ok": True, "changed": True, "index": 0, "revision": 4, "request_id": "q1"}
    same, result = apply(state, {"op": "rack_join", "rack": rack("r1")})
    assert same is state and result["changed"] is False and result["revision"] == 4


def test_append_keeps_order() -> None:
    state = run(*({"op": "append", "key": "h", "value": v} for v in ("a", "b", 3)), state=BASE)
    assert state.logs["h"] == ("a", "b", 3)


def test_assignment_compare_and_set_and_epochs() -> None:
    asg = {"appliance": "voip", "primary": "r1", "epoch": 1}
    s1 = run({"op": "assignment_set", "assignment": asg, "expected_epoch": None}, state=BASE)
    assert s1.assignments["voip"].epoch == 1
    # A second racer that also read "no assignment" loses.
    _, lost = apply(s1, {"op": "assignment_set", "assignment": asg, "expected_epoch": None})
    assert lost["error"] == "conflict"
    # Moving the primary needs a new epoch.
    moved = {"appliance": "voip", "primary": "r2", "epoch": 1}
    _, refused = apply(s1, {"op": "assignment_set", "assignment": moved, "expected_epoch": 1})
    assert refused["error"] == "conflict" and "new epoch" in refused["message"]
    moved["epoch"] = 2
    s2 = run({"op": "assignment_set", "assignment": moved, "expected_epoch": 1}, state=s1)
    assert s2.assignments["voip"].primary == "r2"
    # Stale epoch from a rack that decided on the old map.
    _, stale = apply(s2, {"op": "assignment_set", "assignment": moved, "expected_epoch": 1})
    assert stale["error"] == "conflict"
    older = {"appliance": "voip", "primary": "r2", "epoch": 1}
    _, back = apply(s2, {"op": "assignment_set", "assignment": older, "expected_epoch": 2})
    assert back["error"] == "conflict" and "older" in back["message"]


def test_lease_carries_the_proposer_times() -> None:
    cmd = {"op": "lease_renew", "rack": "r1", "issued_at": 10.5, "received_at": 99.0,
           "leader": "r1", "term": 4}  # fmt: skip
    state = run(cmd, state=BASE)
    lease = state.leases["r1"]
    assert (lease.issued_at, lease.received_at, lease.leader, lease.term) == (10.5, 99.0, "r1", 4)
    assert state.snapshot().leases["r1"] == lease


def test_replica_generation_never_goes_back() -> None:
    report = {"op": "replica_report", "appliance": "voip", "rack": "r1", "generation": 5}
    state = run(report, state=BASE)
    _, result = apply(state, {**report, "generation": 4})
    assert result["error"] == "conflict"
    state = run({**report, "generation": 6}, state=state)
    assert state.snapshot().replica_generations == {"voip": {"r1": 6}}
    state = run({"op": "appliance_remove", "name": "voip"}, state=state)
    assert "voip" not in state.generations and "voip" not in state.appliances


def test_a_rack_dropped_from_the_holders_loses_its_generation_report() -> None:
    # r3 reported generation 14 while it held a copy; it is dropped (lost), and later
    # holds a copy again, re-seeded from a history whose generations are lower: its old
    # 14 must not make a failover pick it as the freshest.
    def report(r: str, g: int) -> dict[str, Any]:
        return {"op": "replica_report", "appliance": "voip", "rack": r, "generation": g}

    def assign(
        primary: str, replicas: list[str], epoch: int, expected: int | None
    ) -> dict[str, Any]:
        asg = {"appliance": "voip", "primary": primary, "replicas": replicas, "epoch": epoch}
        return {"op": "assignment_set", "assignment": asg, "expected_epoch": expected}

    state = run(assign("r1", ["r2", "r3"], 1, None), report("r2", 12), report("r3", 14), state=BASE)
    state = run(assign("r2", ["r4"], 2, 1), state=state)  # r1 and r3 lost
    assert state.snapshot().replica_generations == {"voip": {"r2": 12}}
    state = run(assign("r2", ["r3", "r4"], 2, 2), report("r3", 6), state=state)
    assert state.snapshot().replica_generations == {"voip": {"r2": 12, "r3": 6}}


def test_snapshot_is_a_cluster_snapshot() -> None:
    snap = BASE.snapshot()
    assert snap.cluster_id == "c1"
    assert set(snap.racks) == {"r1"} and set(snap.appliances) == {"voip"}
    assert snap.voters == ("r1",)
    assert snap.revision == BASE.revision


# --- voters ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("racks", "max_voters", "expected"),
    [(0, 5, 0), (1, 5, 1), (2, 5, 1), (3, 5, 3), (4, 5, 3), (5, 5, 5), (9, 5, 5), (9, 3, 3),
     (4, 1, 1)],
)  # fmt: skip
def test_voter_count_is_odd_and_capped(racks: int, max_voters: int, expected: int) -> None:
    assert voter_count(racks, max_voters) == expected


def _racks(*specs: tuple[str, str]) -> dict[str, Rack]:
    return {n: Rack(n, s, Capacity(1, 64, 1)) for n, s in specs}


def test_voters_spread_across_sites() -> None:
    racks = _racks(("a1", "a"), ("a2", "a"), ("a3", "a"), ("b1", "b"), ("c1", "c"))
    assert choose_voters(racks, (), 3) == ("a1", "b1", "c1")
    assert choose_voters(racks, ("a1", "a2", "a3"), 3) == ("a1", "a2", "a3")  # no churn
    assert choose_voters(racks, ("a1",), 5) == ("a1", "a2", "a3", "b1", "c1")


def test_removing_a_voter_promotes_a_follower() -> None:
    state = run(
        {"op": "cluster_init", "cluster_id": "c1", "max_voters": 3, "voters": ["r1", "r2", "r3"]},
        *({"op": "rack_join", "rack": rack(n, site)} for n, site in
          (("r1", "a"), ("r2", "a"), ("r3", "b"), ("r4", "c"), ("r5", "a"))),
    )  # fmt: skip
    assert state.voters == ("r1", "r2", "r3")
    state, result = apply(state, {"op": "rack_remove", "rack": "r2"})
    assert result["promoted"] == ["r4"]  # the rack of the site with no voter
    assert state.voters == ("r1", "r3", "r4")
    state = run(
        {"op": "rack_remove", "rack": "r4"}, {"op": "rack_remove", "rack": "r5"}, state=state
    )
    assert state.voters == ("r1",)  # two racks left: one voter (an odd number)


def test_founding_voters_keep_their_seats_before_they_join() -> None:
    init = {"op": "cluster_init", "cluster_id": "c1", "max_voters": 3, "voters": ["r1", "r2", "r3"]}
    state = run(init, {"op": "rack_join", "rack": rack("r4", "z")})
    assert state.voters == ("r1", "r2", "r3")


# --- properties --------------------------------------------------------------------------

names = st.sampled_from(["r1", "r2", "r3", "r4", "voip", "tiles", "h"])
values = st.one_of(st.integers(-5, 5), st.text(max_size=5), st.none(), st.booleans(), st.floats())
commands = st.one_of(
    st.fixed_dictionaries({"op": st.just("append"), "key": names, "value": values}),
    st.fixed_dictionaries({"op": st.just("rack_join"),
                           "rack": st.builds(rack, names, st.sampled_from(["a", "b"]))}),
    st.fixed_dictionaries({"op": st.just("rack_remove"), "rack": names}),
    st.fixed_dictionaries({"op": st.just("appliance_set"), "spec": st.builds(spec, names)}),
    st.fixed_dictionaries({"op": st.just("appliance_remove"), "name": names}),
    st.fixed_dictionaries({
        "op": st.just("assignment_set"),
        "assignment": st.fixed_dictionaries({"appliance": names, "primary": names,
                                             "epoch": st.integers(0, 3)}),
        "expected_epoch": st.one_of(st.none(), st.integers(0, 3)),
    }),
    st.fixed_dictionaries({"op": st.just("lease_renew"), "rack": names,
                           "issued_at": st.floats(0, 1e6), "received_at": st.floats(0, 1e6)}),
    st.fixed_dictionaries({"op": st.just("replica_report"), "appliance": names, "rack": names,
                           "generation": st.integers(0, 5)}),
    st.dictionaries(st.sampled_from(["op", "key", "value", "rack"]), values, max_size=4),
    st.sampled_from([INIT, {"op": "cluster_init", "cluster_id": "c2", "max_voters": 5,
                            "voters": ["r2"]}]),
)  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(st.lists(commands, max_size=25))
def test_apply_is_total_deterministic_and_round_trips(cmds: list[Any]) -> None:
    first = second = EMPTY
    for cmd in cmds:
        wire = json.loads(json.dumps(cmd))  # what a follower sees after the log
        before = first
        first, r1 = apply(first, cmd)
        second, r2 = apply(second, wire)
        assert r1 == r2
        assert first == second
        assert first.revision == before.revision + (1 if r1.get("changed") else 0)
        if not r1["ok"]:
            assert first is before
        if cmd.get("op") != "cluster_init":
            assert set(first.voters) <= set(first.racks) | set(before.voters)
        assert len(first.voters) <= first.max_voters
    restored = PlacementState.from_dict(json.loads(json.dumps(first.to_dict())))
    assert restored == first
    assert restored.snapshot() == first.snapshot()


def test_every_op_is_documented() -> None:
    import meshcloud.core.state as module

    for op in OPS:
        assert op in (module.__doc__ or "")


def test_founding_voters_seat_the_founder_and_spread_sites() -> None:
    sites = {"a1": "a", "a2": "a", "a3": "a", "b1": "b", "c1": "c"}
    assert founding_voters("a1", sites, 3) == ("a1", "b1", "c1")
    assert founding_voters("a1", sites, 5) == ("a1", "a2", "a3", "b1", "c1")
    # four racks: an odd number of voters
    four = {"r1": "x", "r2": "x", "r3": "x", "r4": "x"}
    assert founding_voters("r1", four, 5) == ("r1", "r2", "r3")
    # the founder keeps a seat even where the site rule alone would not give it one
    assert founding_voters("z9", {"z9": "z", "a1": "a"}, 1) == ("z9",)


def test_founding_voters_refuse_bad_input() -> None:
    with pytest.raises(InvalidInput, match="1, 3 or 5"):
        founding_voters("r1", {"r1": "x"}, 4)
    with pytest.raises(InvalidInput, match="founder r9"):
        founding_voters("r9", {"r1": "x"}, 3)
