"""Cluster formation: table-driven cases and a simulation of racks admitting each other."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from meshcloud.core.errors import InvalidInput
from meshcloud.core.formation import (
    NOT_FORMED,
    AlreadyFormed,
    Decision,
    FormationStatus,
    Found,
    Join,
    Member,
    PeerReport,
    Wait,
    decide,
    founding_set,
)

U1 = "11111111-1111-4111-8111-111111111111"
U2 = "22222222-2222-4222-8222-222222222222"


def member(name: str, leader: bool = False) -> Member:
    return Member(name=name, address="10.0.0.1", raft_port=7440, api_port=8440)


def formed(uuid_: str, leader: str | None, *members: str) -> FormationStatus:
    return FormationStatus(
        formed=True, cluster_uuid=uuid_, leader=leader, members=tuple(member(m) for m in members)
    )


def report(
    name: str,
    *view: str,
    expect: int = 3,
    status: FormationStatus = NOT_FORMED,
) -> PeerReport:
    return PeerReport(
        name=name, bootstrap_expect=expect, status=status, candidates=frozenset({name, *view})
    )


def peers(*reports: PeerReport) -> dict[str, PeerReport]:
    return {r.name: r for r in reports}


# (case, self name, self status, bootstrap_expect, peers, expected type, text in reason)
CASES: list[tuple[str, str, FormationStatus, int, dict[str, PeerReport], type, str]] = [
    ("alone, expect 3", "a", NOT_FORMED, 3, {}, Wait, "found 1 of 3 racks (a)"),
    (
        "two of three",
        "a",
        NOT_FORMED,
        3,
        peers(report("b", "a")),
        Wait,
        "waiting for 1 more",
    ),
    (
        "founder, all agree",
        "a",
        NOT_FORMED,
        3,
        peers(report("b", "a", "c"), report("c", "a", "b")),
        Found,
        "founds the cluster",
    ),
    (
        "founder, a peer has not seen everyone yet",
        "a",
        NOT_FORMED,
        3,
        peers(report("b", "a"), report("c", "a", "b")),
        Wait,
        "rack b names the founding racks a, b, not a, b, c (has not yet admitted c)",
    ),
    (
        "not the founder",
        "b",
        NOT_FORMED,
        3,
        peers(report("a", "b", "c"), report("c", "a", "b")),
        Wait,
        "waiting for a to found the cluster",
    ),
    (
        "more racks than expected: lowest names found",
        "a",
        NOT_FORMED,
        3,
        peers(
            report("b", "a", "c", "d"),
            report("c", "a", "b", "d", "e"),
            report("d", "a", "b"),
            report("e", "c"),
        ),
        Found,
        "(a, b, c) agree",
    ),
    (
        "a peer saw a lower name",
        "b",
        NOT_FORMED,
        2,
        peers(report("c", "a", "b", expect=2)),
        Wait,
        "rack c names the founding racks a, b, not b, c (sees lower names)",
    ),
    (
        "expect 1 founds alone",
        "a",
        NOT_FORMED,
        1,
        {},
        Found,
        "founds the cluster",
    ),
    (
        "bootstrap_expect mismatch",
        "a",
        NOT_FORMED,
        3,
        peers(report("b", "a", "c", expect=5), report("c", "a", "b")),
        Wait,
        "rack b expects 5 racks",
    ),
    (
        "a formed peer beats founding",
        "a",
        NOT_FORMED,
        3,
        peers(
            report("b", "a", "c"),
            report("c", "a", "b"),
            report("z", "a", status=formed(U1, "z", "z")),
        ),
        Join,
        "asking z to add this rack",
    ),
    (
        "late rack joins",
        "d",
        NOT_FORMED,
        3,
        peers(report("a", "d", status=formed(U1, "b", "a", "b", "c"))),
        Join,
        "report the formed cluster",
    ),
    (
        "ever formed never founds",
        "a",
        formed(U1, "a", "a"),
        3,
        peers(report("b", "a", "c"), report("c", "a", "b")),
        AlreadyFormed,
        "member of cluster",
    ),
    (
        "formed rack warns about a second cluster",
        "a",
        formed(U1, "a", "a"),
        3,
        peers(report("b", "a", status=formed(U2, "b", "b"))),
        AlreadyFormed,
        "WARNING",
    ),
    (
        "two clusters seen: the bigger one wins",
        "x",
        NOT_FORMED,
        3,
        peers(
            report("a", "x", status=formed(U2, "a", "a")),
            report("b", "x", status=formed(U1, "b", "b", "c")),
        ),
        Join,
        "joining the one with the most known members",
    ),
]


@pytest.mark.parametrize(
    ("self_name", "status", "expect", "reports", "kind", "text"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_decide_table(
    self_name: str,
    status: FormationStatus,
    expect: int,
    reports: dict[str, PeerReport],
    kind: type,
    text: str,
) -> None:
    decision = decide(self_name, status, expect, reports)
    assert isinstance(decision, kind), decision
    assert text in decision.reason


def test_found_names_the_founding_set_and_the_new_uuid() -> None:
    decision = decide("a", NOT_FORMED, 2, peers(report("b", "a", "c", expect=2)), U2)
    assert isinstance(decision, Found)
    assert decision.founding_set == ("a", "b")
    assert decision.cluster_uuid == U2


def test_a_bad_new_uuid_is_refused() -> None:
    with pytest.raises(InvalidInput, match="not a lowercase UUID"):
        decide("a", NOT_FORMED, 1, {}, "not-a-uuid")


def test_join_prefers_the_leaders_own_claim() -> None:
    decision = decide(
        "d",
        NOT_FORMED,
        3,
        peers(
            report("a", "d", status=formed(U1, "c", "a", "b", "c")),
            report("b", "d", status=formed(U1, "b", "a", "b", "c")),
        ),
    )
    assert isinstance(decision, Join)
    assert decision.leader == "b"
    assert decision.cluster_uuid == U1
    assert decision.contacts() == ("b", "a", "c")
    assert [m.name for m in decision.members] == ["a", "b", "c"]


def test_join_without_a_known_leader_lists_members() -> None:
    decision = decide("d", NOT_FORMED, 3, peers(report("a", "d", status=formed(U1, None, "a"))))
    assert isinstance(decision, Join)
    assert decision.leader is None
    assert decision.contacts() == ("a",)
    assert "leader is not known" in decision.reason


def test_report_under_a_wrong_key_is_refused() -> None:
    with pytest.raises(InvalidInput, match="carries the name"):
        decide("a", NOT_FORMED, 3, {"b": report("c", "a")})


@pytest.mark.parametrize(
    ("kwargs", "text"),
    [
        ({"formed": False, "cluster_uuid": U1}, "an unformed rack has no cluster uuid"),
        ({"formed": True, "cluster_uuid": None}, "not a lowercase UUID"),
        ({"formed": True, "cluster_uuid": "A" + U1[1:]}, "not a lowercase UUID"),
        ({"formed": True, "cluster_uuid": U1, "leader": "../x"}, "leader rack name"),
        (
            {"formed": True, "cluster_uuid": U1, "members": (member("a"), member("a"))},
            "unique",
        ),
    ],
)
def test_status_validation(kwargs: dict[str, object], text: str) -> None:
    with pytest.raises(InvalidInput, match=text):
        FormationStatus(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "text"),
    [
        ({"name": "a", "bootstrap_expect": 0}, "bootstrap_expect"),
        ({"name": "a", "bootstrap_expect": True}, "bootstrap_expect"),
        ({"name": "A", "bootstrap_expect": 3}, "rack name"),
        ({"name": "a", "bootstrap_expect": 3, "candidates": frozenset({"b"})}, "include itself"),
        ({"name": "a", "bootstrap_expect": 3, "candidates": frozenset({"a", "<b>"})}, "'<'"),
    ],
)
def test_report_validation(kwargs: dict[str, object], text: str) -> None:
    with pytest.raises(InvalidInput, match=text):
        PeerReport(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "text"),
    [
        ({"address": "10.0.0.300"}, "not an IP address"),
        ({"address": "host.example"}, "not an IP address"),
        ({"raft_port": 0}, "between 1 and 65535"),
        ({"api_port": 70000}, "between 1 and 65535"),
        ({"api_port": "8440"}, "between 1 and 65535"),
    ],
)
def test_member_validation(kwargs: dict[str, object], text: str) -> None:
    base: dict[str, object] = {
        "name": "a",
        "address": "10.0.0.1",
        "raft_port": 7440,
        "api_port": 8440,
    }
    with pytest.raises(InvalidInput, match=text):
        Member(**(base | kwargs))  # type: ignore[arg-type]


def test_founding_set_is_the_lowest_names() -> None:
    assert founding_set({"d", "b", "a", "c"}, 3) == ("a", "b", "c")
    assert founding_set({"b"}, 3) == ("b",)


# --- a simulation of racks admitting each other in any order --------------------------


@dataclass
class SimRack:
    """One rack as the discovery layer keeps it: the latest report of every admitted peer.

    Its view is itself plus the peers it holds a report from; it only grows.
    """

    name: str
    expect: int
    status: FormationStatus = NOT_FORMED
    reports: dict[str, PeerReport] = field(default_factory=dict)
    found_sets: list[tuple[str, ...]] = field(default_factory=list)
    view_at_founding: frozenset[str] = frozenset()

    @property
    def view(self) -> frozenset[str]:
        return frozenset({self.name, *self.reports})

    def report(self) -> PeerReport:
        return PeerReport(self.name, self.expect, self.status, self.view)


def admit(client: SimRack, server: SimRack, answer_lost: bool = False) -> None:
    """One admission, in the order the real protocol builds its messages.

    The client builds its report before it knows the server (step 2 request);
    the server admits the client, then builds its own report (step 2 answer),
    which may be lost on the way back.
    """
    client_report = client.report()
    server.reports[client.name] = client_report
    answer = server.report()
    if not answer_lost:
        client.reports[server.name] = answer


def step(rack: SimRack, join_completes: bool = True) -> Decision:
    decision = decide(rack.name, rack.status, rack.expect, rack.reports)
    if isinstance(decision, Found):
        uuid_ = str(uuid.uuid5(uuid.NAMESPACE_DNS, rack.name))
        rack.status = formed(uuid_, rack.name, rack.name)
        rack.found_sets.append(decision.founding_set)
        rack.view_at_founding = frozenset(rack.view)
    elif isinstance(decision, Join) and join_completes:
        names = {m.name for m in decision.members} | {rack.name}
        rack.status = formed(decision.cluster_uuid, decision.leader, *sorted(names))
    return decision


POOL = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"]


@st.composite
def schedules(draw: st.DrawFn, split_possible: bool = True) -> tuple[int, list[str], list[tuple]]:
    """bootstrap_expect, rack names, and events: admissions, each optionally followed by
    decisions on either side, and lone decisions (with or without the join completing)."""
    expect = draw(st.integers(1, 4))
    most = 3 * expect + 1 if split_possible else 2 * expect - 1
    count = draw(st.integers(1, min(len(POOL), most)))
    names = draw(st.permutations(POOL))[:count]
    index = st.integers(0, count - 1)
    event = st.one_of(
        st.tuples(st.just("admit"), index, index, st.booleans(), st.booleans(), st.booleans()),
        st.tuples(
            st.just("decide"), index, st.booleans(), st.just(False), st.just(False), st.just(False)
        ),
    )
    events = draw(st.lists(event, max_size=60))
    return expect, names, events


def run(expect: int, names: list[str], events: list[tuple]) -> dict[str, SimRack]:
    racks = {n: SimRack(n, expect) for n in names}
    for kind, i, arg, decide_client, decide_server, answer_lost in events:
        rack = racks[names[i]]
        if kind == "admit":
            other = racks[names[arg]]
            if other is not rack:
                admit(rack, other, answer_lost)
                if decide_client:
                    step(rack)
                if decide_server:
                    step(other)
        else:
            step(rack, join_completes=arg)
    return racks


def founders(racks: dict[str, SimRack]) -> list[tuple[str, ...]]:
    return [s for r in racks.values() for s in r.found_sets]


@settings(max_examples=600, deadline=None)
@given(schedules())
@example(
    (2, ["a", "b", "c"], [("admit", 1, 2, True, False, False), ("admit", 0, 2, True, False, False)])
)
def test_founding_sets_never_overlap(schedule: tuple[int, list[str], list[tuple]]) -> None:
    """Any number of racks, any order: two founded sets share no rack."""
    racks = run(*schedule)
    sets = founders(racks)
    for i, first in enumerate(sets):
        for second in sets[i + 1 :]:
            assert not set(first) & set(second), (first, second)


@settings(max_examples=600, deadline=None)
@given(schedules(split_possible=False))
def test_at_most_one_founder_when_no_split_is_possible(
    schedule: tuple[int, list[str], list[tuple]],
) -> None:
    """Fewer than 2 x bootstrap_expect racks: whatever the order, at most one rack founds."""
    assert len(founders(run(*schedule))) <= 1


@settings(max_examples=300, deadline=None)
@given(schedules(split_possible=False))
def test_every_rack_ends_in_one_cluster(schedule: tuple[int, list[str], list[tuple]]) -> None:
    """After any prefix, once everyone sees everyone, all racks are in exactly one cluster."""
    expect, names, _ = schedule
    racks = run(*schedule)
    for _round in range(4 * len(names) + 4):
        for client in racks.values():
            for server in racks.values():
                if client is not server:
                    admit(client, server)
        for rack in racks.values():
            step(rack)
    if len(names) < expect:
        assert not any(r.status.formed for r in racks.values())
        return
    uuids = {r.status.cluster_uuid for r in racks.values()}
    assert len(uuids) == 1 and None not in uuids, uuids
    assert len(founders(racks)) == 1


@settings(max_examples=200, deadline=None)
@given(schedules(split_possible=False), st.data())
def test_racks_that_see_each_other_never_both_found(
    schedule: tuple[int, list[str], list[tuple]], data: st.DataObject
) -> None:
    """With a partial visibility graph, two founders never admitted each other first.

    Precisely: of two founders, the one with the higher name had not admitted
    the lower one when it founded (so a pair that admitted each other both
    ways before deciding never yields two founders).
    """
    expect, names, events = schedule
    visible = {
        frozenset(pair)
        for pair in data.draw(
            st.sets(st.tuples(st.sampled_from(names), st.sampled_from(names)), max_size=30)
        )
        if pair[0] != pair[1]
    }
    filtered = [
        e
        for e in events
        if e[0] == "decide" or frozenset((names[e[1]], names[e[2]])) in visible or e[1] == e[2]
    ]
    racks = run(expect, names, filtered)
    founding = [r for r in racks.values() if r.found_sets]
    for lower in founding:
        for higher in founding:
            if lower.name < higher.name:
                assert lower.name not in higher.view_at_founding, (lower.name, higher.name)


def test_one_at_a_time_with_long_gaps() -> None:
    """Racks arriving one by one (each admitting everyone before the next) form one cluster."""
    racks: dict[str, SimRack] = {}
    for name in ["e", "c", "a", "d", "b"]:
        racks[name] = SimRack(name, 3)
        for _ in range(3):
            for client in racks.values():
                for server in racks.values():
                    if client is not server:
                        admit(client, server)
            for rack in racks.values():
                step(rack)
    assert len(founders(racks)) == 1
    assert founders(racks)[0] == ("a", "c", "e")
    assert len({r.status.cluster_uuid for r in racks.values()}) == 1


def test_join_carries_the_founding_voters() -> None:
    founders = (member("a"), member("b"), member("c"))
    status = FormationStatus(
        formed=True, cluster_uuid=U1, leader="a", members=(member("a"),), founding=founders
    )
    # rack b saw the founder's report: it is a founding voter
    decision = decide("b", NOT_FORMED, 3, peers(report("a", "b", "c", status=status)))
    assert isinstance(decision, Join)
    assert decision.founding == founders
    assert decision.founding_voter("b")
    assert not decision.founding_voter("d")
    # a reporter without them (a rack that joined before they existed) does not hide them
    plain = formed(U1, "a", "a", "e")
    decision = decide(
        "b", NOT_FORMED, 3, peers(report("e", "b", status=plain), report("a", "b", status=status))
    )
    assert isinstance(decision, Join)
    assert decision.founding == founders


@pytest.mark.parametrize(
    ("kwargs", "text"),
    [
        ({"formed": False, "founding": (member("a"),)}, "an unformed rack"),
        (
            {"formed": True, "cluster_uuid": U1, "founding": (member("a"), member("a"))},
            "founding voter names must be unique",
        ),
        (
            {
                "formed": True,
                "cluster_uuid": U1,
                "founding": tuple(member(f"r{i}") for i in range(6)),
            },
            "at most 5 founding voters",
        ),
        ({"formed": True, "cluster_uuid": U1, "founding": ["a"]}, "tuple of Member"),
    ],
)
def test_founding_validation(kwargs: dict[str, object], text: str) -> None:
    with pytest.raises(InvalidInput, match=text):
        FormationStatus(**kwargs)  # type: ignore[arg-type]
