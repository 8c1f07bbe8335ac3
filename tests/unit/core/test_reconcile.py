"""The agent's cycle decision: table-driven cases, plus safety properties."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshcloud.core.errors import InvalidInput
from meshcloud.core.models import (
    ApplianceSpec,
    ApplianceState,
    Assignment,
    Capacity,
    ClusterSnapshot,
    Rack,
)
from meshcloud.core.reconcile import (
    LIVE,
    CrashHistory,
    Destroy,
    DomainState,
    LeaseView,
    LocalDomain,
    Pause,
    ReportFailed,
    RestartPolicy,
    Resume,
    Start,
    Stop,
    reconcile,
)

RUN, PAUSED, OFF, CRASHED = (
    DomainState.RUNNING,
    DomainState.PAUSED,
    DomainState.SHUTOFF,
    DomainState.CRASHED,
)
GOING, OTHER = DomainState.SHUTTING_DOWN, DomainState.OTHER
HELD = LeaseView.holding()
POLICY = RestartPolicy(max_restarts=3, window_s=100.0, backoff_initial_s=2.0, backoff_max_s=10.0)
PRIORITY = {"voip": 900, "db": 500, "wiki": 100}


def snap(*assignments: Assignment) -> ClusterSnapshot:
    cap = Capacity(8, 8192, 100)
    return ClusterSnapshot(
        cluster_id="c1",
        racks={"r1": Rack("r1", "a", cap), "r2": Rack("r2", "b", cap)},
        appliances={n: ApplianceSpec(n, "demo", priority=p) for n, p in PRIORITY.items()},
        assignments={a.appliance: a for a in assignments},
    )


def here(name: str, epoch: int, rack: str = "r1", **kw: Any) -> Assignment:
    return Assignment(name, rack, (), epoch, **kw)


def doms(*items: tuple[str, DomainState, int]) -> dict[str, LocalDomain]:
    return {n: LocalDomain(n, s, e) for n, s, e in items}


def cycle(
    assignments: list[Assignment],
    domains: dict[str, LocalDomain],
    lease: LeaseView = HELD,
    crashes: dict[str, CrashHistory] | None = None,
    now: float = 1000.0,
) -> tuple[str, tuple[object, ...]]:
    reason, actions = reconcile(
        "r1", snap(*assignments), domains, lease, crashes or {}, now, POLICY
    )
    assert reason and "\n" not in reason
    return reason, actions


CASES = [
    # (id, assignments, domains, expected actions, words in the reason)
    ("start-assigned", [here("voip", 3)], {}, [Start("voip", 3)], "starting voip (epoch 3)"),
    (
        "steady",
        [here("voip", 3)],
        doms(("voip", RUN, 3)),
        [],
        "all 1 appliances assigned here are running",
    ),
    ("nothing", [], {}, [], "nothing is assigned here"),
    (
        "removed-stops",
        [],
        doms(("wiki", RUN, 2)),
        [Stop("wiki")],
        "stopping wiki: no longer assigned here",
    ),
    (
        "waiting-stops",
        [Assignment("wiki", None, ("r1",), 3, ApplianceState.WAITING)],
        doms(("wiki", RUN, 2)),
        [Stop("wiki")],
        "stopping wiki",
    ),
    (
        "moved-destroys",
        [here("db", 5, rack="r2")],
        doms(("db", RUN, 4)),
        [Destroy("db")],
        "destroying db (moved to r2 under epoch 5)",
    ),
    (
        "older-epoch-replaced",
        [here("db", 5)],
        doms(("db", RUN, 4)),
        [Destroy("db"), Start("db", 5)],
        "restarting db (epoch 4, map epoch 5): it ran under an older epoch",
    ),
    (
        "newer-epoch-left-alone",
        [here("db", 5, rack="r2")],
        doms(("db", RUN, 6)),
        [],
        "leaving db (local epoch 6, map epoch 5) alone",
    ),
    (
        "paused-resumes",
        [here("voip", 3)],
        doms(("voip", PAUSED, 3)),
        [Resume("voip", 3)],
        "resuming voip: lease held and still assigned here",
    ),
    (
        "paused-older-epoch-restarts",
        [here("voip", 4)],
        doms(("voip", PAUSED, 3)),
        [Destroy("voip"), Start("voip", 4)],
        "it ran under an older epoch",
    ),
    (
        "paused-moved-destroyed",
        [here("voip", 4, rack="r2")],
        doms(("voip", PAUSED, 3)),
        [Destroy("voip")],
        "the map runs it elsewhere now",
    ),
    (
        "paused-unassigned-destroyed",
        [],
        doms(("wiki", PAUSED, 3)),
        [Destroy("wiki")],
        "stopping wiki",
    ),
    (
        "power-cut-starts-only-what-stays",
        [here("voip", 3), here("wiki", 8, rack="r2"), here("db", 6)],
        doms(("voip", OFF, 3), ("wiki", OFF, 7), ("db", OFF, 5)),
        [Start("voip", 3), Start("db", 6)],
        "starting voip (epoch 3), db (epoch 6)",
    ),
    (
        "crashed-without-history-starts",
        [here("voip", 3)],
        doms(("voip", CRASHED, 3)),
        [Start("voip", 3)],
        "starting voip",
    ),
    (
        "starts-in-priority-order-after-stops",
        [here("wiki", 1), here("voip", 1), here("db", 1)],
        doms(("proxy", RUN, 1)),
        [Stop("proxy"), Start("voip", 1), Start("db", 1), Start("wiki", 1)],
        "stopping proxy: no longer assigned here; starting voip (epoch 1), db (epoch 1), wiki",
    ),
    (
        "shutting-down-assigned-waits",
        [here("voip", 3)],
        doms(("voip", GOING, 3)),
        [],
        "waiting for voip (shutting-down) to settle",
    ),
    (
        "shutting-down-older-epoch-replaced",
        [here("voip", 4)],
        doms(("voip", GOING, 3)),
        [Destroy("voip"), Start("voip", 4)],
        "it ran under an older epoch",
    ),
    (
        "shutting-down-moved-destroyed",
        [here("voip", 4, rack="r2")],
        doms(("voip", GOING, 3)),
        [Destroy("voip")],
        "the map runs it elsewhere now",
    ),
    (
        "shutting-down-unassigned-left-to-finish",
        [],
        doms(("wiki", GOING, 3)),
        [],
        "waiting for wiki (shutting-down) to settle",
    ),
    (
        "unknown-state-assigned-left-alone",
        [here("voip", 3)],
        doms(("voip", OTHER, 3)),
        [],
        "waiting for voip (other) to settle",
    ),
    (
        "unknown-state-unassigned-destroyed",
        [],
        doms(("wiki", OTHER, 3)),
        [Destroy("wiki")],
        "stopping wiki: no longer assigned here",
    ),
    (
        "shutoff-unassigned-ignored",
        [here("wiki", 2, rack="r2")],
        doms(("wiki", OFF, 1)),
        [],
        "nothing is assigned here",
    ),
]


@pytest.mark.parametrize(
    ("assignments", "domains", "expected", "words"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_cycle_with_lease(
    assignments: list[Assignment],
    domains: dict[str, LocalDomain],
    expected: list[object],
    words: str,
) -> None:
    reason, actions = cycle(assignments, domains)
    assert list(actions) == expected
    assert words in reason


def crashed(*times: float, epoch: int = 3, reported: bool = False) -> dict[str, CrashHistory]:
    return {"voip": CrashHistory(epoch, tuple(times), reported)}


CRASH_CASES = [
    # (id, history, now, expected actions, words)
    ("first-crash-backs-off", crashed(999.0), 1000.0, [], "restarting voip in 1.0 s (back-off after crash 1)"),
    ("first-crash-after-backoff", crashed(998.0), 1000.0, [Start("voip", 3)], "restarting voip (epoch 3), restart 1 of at most 3"),
    ("backoff-doubles", crashed(990.0, 997.0), 1000.0, [], "in 1.0 s (back-off after crash 2)"),
    ("backoff-is-capped", crashed(980.0, 985.0, 990.0), 1000.0, [Start("voip", 3)], "restart 3 of at most 3"),
    ("too-many-crashes-reported", crashed(960.0, 970.0, 980.0, 990.0), 1000.0, [ReportFailed("voip", 3, 4)], "voip crashed 4 times in 100 s; reporting it as failed"),
    ("reported-once", crashed(960.0, 970.0, 980.0, 990.0, reported=True), 1000.0, [], "voip failed here and waits for an operator"),
    ("old-crashes-forgotten", crashed(100.0, 200.0, 300.0, 400.0), 1000.0, [Start("voip", 3)], "starting voip (epoch 3)"),
    ("new-epoch-starts-afresh", crashed(996.0, 997.0, 998.0, 999.0, epoch=2), 1000.0, [Start("voip", 3)], "starting voip"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("history", "now", "expected", "words"),
    [c[1:] for c in CRASH_CASES],
    ids=[c[0] for c in CRASH_CASES],
)
def test_crashed_appliance_restarts_with_backoff_then_is_reported(
    history: dict[str, CrashHistory], now: float, expected: list[object], words: str
) -> None:
    for domain in ({}, doms(("voip", CRASHED, 3)), doms(("voip", OFF, 3))):
        reason, actions = cycle([here("voip", 3)], domain, crashes=history, now=now)
        assert list(actions) == expected
        assert words in reason


LEASE_CASES = [
    # (id, lease, domains, expected actions, words)
    (
        "lost-pauses-everything-starts-nothing",
        LeaseView.lost(999.0),
        doms(("voip", RUN, 3), ("wiki", RUN, 2), ("db", OFF, 6)),
        [Pause("voip"), Pause("wiki")],
        "no lease for 1.0 s; pausing voip, wiki to fence this rack (destroyed after 10 s",
    ),
    (
        "lost-just-now",
        LeaseView.lost(None),
        doms(("voip", RUN, 3)),
        [Pause("voip")],
        "no lease for 0.0 s; pausing voip",
    ),
    (
        "paused-stay-paused-in-grace",
        LeaseView.lost(995.0),
        doms(("voip", PAUSED, 3)),
        [],
        "starting nothing until the lease is back (1 paused)",
    ),
    (
        "active-states-are-paused-too",
        LeaseView.lost(999.0),
        doms(("voip", GOING, 3), ("wiki", OTHER, 2)),
        [Pause("voip"), Pause("wiki")],
        "pausing voip, wiki",
    ),
    (
        "grace-over-destroys",
        LeaseView.lost(990.0),
        doms(("voip", PAUSED, 3), ("wiki", RUN, 2), ("db", OFF, 6)),
        [Destroy("voip"), Destroy("wiki")],
        "no lease for 10.0 s; destroying voip, wiki: the 10 s grace period is over",
    ),
]


@pytest.mark.parametrize(
    ("lease", "domains", "expected", "words"),
    [c[1:] for c in LEASE_CASES],
    ids=[c[0] for c in LEASE_CASES],
)
def test_without_lease_fence_and_never_start(
    lease: LeaseView, domains: dict[str, LocalDomain], expected: list[object], words: str
) -> None:
    reason, actions = cycle(
        [here("voip", 3), here("wiki", 2), here("db", 6)], domains, lease=lease, now=1000.0
    )
    assert list(actions) == expected
    assert words in reason


def test_lease_regained_after_blip_resumes_without_restart() -> None:
    a = [here("voip", 3)]
    _, fenced = cycle(a, doms(("voip", RUN, 3)), lease=LeaseView.lost(999.5))
    assert fenced == (Pause("voip"),)
    _, back = cycle(a, doms(("voip", PAUSED, 3)))
    assert back == (Resume("voip", 3),)


def test_backoff_schedule() -> None:
    p = RestartPolicy(backoff_initial_s=1.0, backoff_max_s=30.0)
    assert [p.backoff_s(n) for n in range(8)] == [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert p.backoff_s(10_000) == 30.0


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"max_restarts": -1}, "max_restarts"),
        ({"window_s": 0}, "window_s"),
        ({"fence_grace_s": -1.0}, "fence_grace_s"),
        ({"backoff_initial_s": 5.0, "backoff_max_s": 1.0}, "backoff_max_s"),
    ],
)
def test_bad_policies_are_refused(kwargs: dict[str, Any], words: str) -> None:
    with pytest.raises(InvalidInput, match=words):
        RestartPolicy(**kwargs)


def test_domain_keys_must_match() -> None:
    with pytest.raises(InvalidInput, match="does not match"):
        reconcile("r1", snap(), {"voip": LocalDomain("wiki", RUN, 1)}, HELD, {}, 0.0)


# -- safety properties over random inputs ------------------------------------------------

NAMES = [*sorted(PRIORITY), "proxy"]


@st.composite
def situations(
    draw: st.DrawFn,
) -> tuple[ClusterSnapshot, dict[str, LocalDomain], LeaseView, dict[str, CrashHistory], float]:
    assignments = []
    for name in sorted(PRIORITY):
        if draw(st.booleans()):
            state = draw(st.sampled_from(list(ApplianceState)))
            primary = (
                draw(st.sampled_from(["r1", "r2"])) if state is ApplianceState.RUNNING else None
            )
            assignments.append(Assignment(name, primary, (), draw(st.integers(0, 5)), state))
    domains = {
        n: LocalDomain(n, draw(st.sampled_from(list(DomainState))), draw(st.integers(0, 5)))
        for n in NAMES
        if draw(st.booleans())
    }
    now = 1000.0
    lease = draw(
        st.one_of(
            st.just(HELD),
            st.builds(LeaseView.lost, st.one_of(st.none(), st.floats(900.0, 1000.0))),
        )
    )
    crashes = {
        n: CrashHistory(
            draw(st.integers(0, 5)),
            tuple(sorted(draw(st.lists(st.floats(800.0, 1000.0), max_size=6)))),
            draw(st.booleans()),
        )
        for n in sorted(PRIORITY)
        if draw(st.booleans())
    }
    return snap(*assignments), domains, lease, crashes, now


@settings(max_examples=300, deadline=None)
@given(situations())
def test_cycle_safety(
    situation: tuple[
        ClusterSnapshot, dict[str, LocalDomain], LeaseView, dict[str, CrashHistory], float
    ],
) -> None:
    snapshot, domains, lease, crashes, now = situation
    reason, actions = reconcile("r1", snapshot, domains, lease, crashes, now, POLICY)
    assert reason and "\n" not in reason
    assert reconcile("r1", snapshot, domains, lease, crashes, now, POLICY) == (reason, actions)
    touched = [a.appliance for a in actions if not isinstance(a, ReportFailed)]
    for action in actions:
        asg = snapshot.assignments.get(action.appliance)
        if isinstance(action, Start | Resume):
            # Never without a lease; only what the map assigns here; exactly the map's epoch.
            assert lease.held
            assert asg is not None and asg.primary == "r1"
            assert asg.state is ApplianceState.RUNNING
            assert action.epoch == asg.epoch
        if isinstance(action, Start):
            dom = domains.get(action.appliance)
            if dom is not None and dom.state in LIVE:
                assert Destroy(action.appliance) in actions  # never two copies here either
        if isinstance(action, Stop | Destroy | Pause):
            assert action.appliance in domains and domains[action.appliance].state in LIVE
        if isinstance(action, Stop):
            assert domains[action.appliance].state is RUN
    # At most one lifecycle action per appliance, except destroy-then-start.
    for name in set(touched):
        kinds = [
            type(a) for a in actions if a.appliance == name and not isinstance(a, ReportFailed)
        ]
        assert kinds in ([Start], [Stop], [Pause], [Resume], [Destroy], [Destroy, Start])
    if not lease.held:
        assert all(isinstance(a, Pause | Destroy) for a in actions)
    # Starts come last, most important first.
    starts = [a for a in actions if isinstance(a, Start)]
    assert list(actions[len(actions) - len(starts) :]) == starts
    prios = [PRIORITY[s.appliance] for s in starts]
    assert prios == sorted(prios, reverse=True)
