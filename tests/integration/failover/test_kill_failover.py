"""Failover after power cuts, with the real daemon and the real demo appliance.

One five-rack lab, two appliances whose disks replicate to two other racks,
the invariant checker watching every rack's QEMU every 0.1 s and every
replica's counter every second:

1. the Raft leader's rack, which runs an appliance, loses power (silently:
   its link is cut first): the appliance runs again on the replica holder
   with the freshest generation the map recorded, under a new epoch, and its
   counter continues from at least the last replicated value;
2. the primary rack of the other appliance (not the leader) loses power: same;
3. the first rack comes back: its old copy, which holds writes nobody
   received, is kept aside and listed (``GET /api/v1/diverged``) with its size
   and time span; it runs nothing that moved;

and at no moment does any appliance run on two racks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any

from meshcloud.lab.api import LabApi
from meshcloud.lab.checker import InvariantChecker
from meshcloud.lab.lab import Lab
from meshcloud.lab.pytest_plugin import MakeLab

from .scenario import (
    BOOT_TIMEOUT_S,
    FAILOVER_TIMEOUT_S,
    LAB_VM,
    PLACE_TIMEOUT_S,
    assignment,
    cluster,
    counter,
    deploy,
    live_racks,
    replicated,
    spec,
    start_lab,
    watch,
)

pytestmark = LAB_VM

WaitFor = Callable[..., Any]
IPS = {"app1": "10.90.0.11", "app2": "10.90.0.12"}
MIN_REPLICATED = 20  # two seconds of counting on a replica before the cut


def _fail_over(
    lab: Lab, api: LabApi, checker: InvariantChecker, wait_for: WaitFor, name: str
) -> tuple[str, int]:
    """Power-cut the rack running ``name``; check where and from what it starts again."""
    before = assignment(api, lab, name)
    assert before is not None and before["primary"]
    victim, old_epoch = before["primary"], before["epoch"]
    served = wait_for(
        lambda: counter(lab, victim, IPS[name]), BOOT_TIMEOUT_S, f"{name} to serve its counter"
    )
    reports = wait_for(
        lambda: replicated(api, lab, name, 2), PLACE_TIMEOUT_S, f"{name}'s replicas to report"
    )
    wait_for(
        lambda: checker.replicated_now(name) >= MIN_REPLICATED,
        BOOT_TIMEOUT_S,
        f"{name}'s counter to reach {MIN_REPLICATED} on a replica the map records",
    )
    cut = lab.kill(victim)

    def moved() -> tuple[float, str] | None:
        return checker.first_running_after(name, cut, exclude=[victim])

    at, home = wait_for(moved, FAILOVER_TIMEOUT_S, f"{name} to run again off {victim}")
    after = wait_for(
        lambda: (a := assignment(api, lab, name)) and a["epoch"] > old_epoch and a,
        PLACE_TIMEOUT_S,
        f"the map to show {name}'s new epoch",
    )
    assert after["primary"] == home and home in before["replicas"]
    # the freshest live holder the map recorded (reports may have grown since we read them)
    seen = checker.map_before(name, after["epoch"])  # the map just before the move
    assert seen is not None
    final = {r: g for r, g in seen.reports.items() if r in before["replicas"]}
    assert final.get(home, -1) == max(final.values()), f"{home} was not the freshest: {final}"
    assert all(final.get(r, -1) >= g for r, g in reports.items()), (final, reports, before)
    # the counter on the new primary's disk started at or above the replicated value
    start = wait_for(
        lambda: next(
            (s for s in checker.started() if s["appliance"] == name and s["checked"]
             and s["epoch"] == after["epoch"]),
            None,
        ),
        PLACE_TIMEOUT_S,
        f"the checker to read {name}'s counter on {home}",
    )  # fmt: skip
    floor, why = checker.floor_for(name, after["epoch"])
    assert start["value"] >= floor >= MIN_REPLICATED, (
        f"started from {start['value']}, replicated {floor} ({why})"
    )
    # and the guest goes on counting from there, past what it served before the cut
    value = wait_for(
        lambda: (v := counter(lab, home, IPS[name])) is not None and v > floor and v,
        BOOT_TIMEOUT_S,
        f"{name} to serve its counter on {home}",
    )
    assert value > floor and served > 0
    print(
        f"{name}: {victim} cut, running on {home} after {at - cut:.2f} s, counter {floor} -> {value}"
    )
    return victim, after["epoch"]


def test_power_cuts_fail_over_to_the_freshest_replica_and_the_return_keeps_writes_aside(
    lab_factory: MakeLab, wait_for: WaitFor
) -> None:
    wait_for = partial(wait_for, interval=0.2)
    lab, api = start_lab(lab_factory, 5, wait_for)
    deploy(api, lab, spec("app1", IPS["app1"], replicas=2), spec("app2", IPS["app2"], replicas=2))
    placed = wait_for(
        lambda: (
            (d := cluster(api, lab.racks()))
            and all(d["assignments"].get(n, {}).get("primary") for n in IPS)
            and d
        ),
        PLACE_TIMEOUT_S,
        "both appliances to be placed",
    )
    checker = watch(lab, api)
    try:
        leader = placed["leader"]
        on_leader = [n for n in IPS if placed["assignments"][n]["primary"] == leader]
        first = on_leader[0] if on_leader else "app1"  # r1 founds, leads and takes app1
        second = next(n for n in IPS if n != first)
        victim1, epoch1 = _fail_over(lab, api, checker, wait_for, first)
        if on_leader:
            assert victim1 == leader
        victim2, _ = _fail_over(lab, api, checker, wait_for, second)
        assert victim2 != victim1

        # the first victim comes back: it runs nothing that moved, keeps its writes aside
        lab.restart(victim1)

        def kept() -> list[dict[str, Any]] | None:
            try:
                doc = api.get(live_racks(lab)[0], "/api/v1/diverged")
            except Exception:
                return None
            mine = [c for c in doc["diverged"] if c["rack"] == victim1 and c["appliance"] == first]
            return mine or None

        (copy,) = wait_for(
            kept, PLACE_TIMEOUT_S, f"{victim1} to keep its old copy of {first} aside"
        )
        assert copy["epoch"] < epoch1 and copy["bytes"] > 0
        assert 0 < copy["first_write_at"] <= copy["last_write_at"] <= copy["kept_at"] <= time.time()
        assert (lab.state_dir(victim1) / "volumes" / ".diverged" / copy["id"]).is_dir()
        assert not (lab.state_dir(victim1) / "volumes" / first).exists()
        assert checker.running_on(first).keys() != {victim1}
        checker.assert_ok()
    finally:
        checker.stop()
    checker.assert_ok()
    assert checker.passes > 100 and checker.max_pass_s < 1.0
