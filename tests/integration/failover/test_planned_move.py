"""Planned moves of the real demo appliance lose no acknowledged write.

One three-rack lab, the demo appliance (its disk replicated to the two other
racks) counting on its disk, the invariant checker watching every rack's
QEMU every 0.1 s and every copy's counter every second, and a probe asking
the guest for its counter (``GET /counter`` answers with the last *durable*
value: an acknowledged write) as fast as it answers:

1. an operator moves it (``POST /api/v1/appliances/app1/move``) to one
   replica holder: the old primary pauses the guest, ships the last delta,
   the target starts from it under a new epoch. The counter on the target's
   disk at its start is at least the last value the guest acknowledged on the
   source before the pause, and the downtime is reported in the map (the
   assignment's ``move`` record) and in the target's events;
2. its new rack is drained: the drain goes through the same path (the
   leader begins the move; the record says why), with the same guarantee;
3. a move to a rack that is cut off from the others as it begins: the final
   sync cannot reach it, the move is abandoned (the record and an event say
   why) and the appliance resumes on its rack under the same epoch, counting
   on from where it was;

and at no moment does the appliance run on two racks.
"""

from __future__ import annotations

import threading
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
    LAB_VM,
    PLACE_TIMEOUT_S,
    assignment,
    cluster,
    counter,
    deploy,
    replicated,
    spec,
    start_lab,
    watch,
)

pytestmark = LAB_VM

WaitFor = Callable[..., Any]
IP = "10.90.0.11"
MOVE_TIMEOUT_S = 120.0  # pause, final sync, switch, a TCG start on a loaded machine


class CounterProbe:
    """Asks the guest on ``rack`` for its counter until stopped: (monotonic time, value)."""

    def __init__(self, lab: Lab, rack: str) -> None:
        self.lab, self.rack = lab, rack
        self.answers: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            value = counter(self.lab, self.rack, IP)
            if value is not None:
                self.answers.append((time.monotonic(), value))

    def __enter__(self) -> CounterProbe:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def last_before(self, moment: float) -> int:
        """The last value acknowledged before ``moment`` (0 if none)."""
        return max((v for t, v in self.answers if t < moment), default=0)


def _move(
    lab: Lab,
    api: LabApi,
    checker: InvariantChecker,
    wait_for: WaitFor,
    start: Callable[[dict[str, Any]], None],
    min_generation: int = 2,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run ``start`` (which begins a planned move); check no acknowledged write is lost."""
    before = assignment(api, lab, "app1")
    assert before is not None and before["primary"] and before["state"] == "running"
    source = before["primary"]
    wait_for(lambda: counter(lab, source, IP), BOOT_TIMEOUT_S, f"app1 to answer on {source}")
    wait_for(
        lambda: replicated(api, lab, "app1", min_generation),
        PLACE_TIMEOUT_S,
        f"app1's replicas to report generation {min_generation}",
    )
    with CounterProbe(lab, source) as probe:
        wait_for(lambda: len(probe.answers) >= 3, BOOT_TIMEOUT_S, "the probe's first answers")
        start(before)
        after = wait_for(
            lambda: (
                (a := assignment(api, lab, "app1"))
                and a["epoch"] > before["epoch"]
                and (a.get("move") or {}).get("phase") == "done"
                and a
            ),
            MOVE_TIMEOUT_S,
            "app1's planned move to finish",
        )
    target = after["primary"]
    move = after["move"]
    assert after["epoch"] == before["epoch"] + 1 and target in before["replicas"]
    assert (move["source"], move["to"]) == (source, target)
    # the checker saw it paused on the source, then running on the target
    outage = next(
        (span for span in reversed(checker.outages("app1")) if span[0] >= probe.answers[0][0]),
        None,
    )
    assert outage is not None, checker.timeline.get("app1")
    acked = probe.last_before(outage[0])
    started = wait_for(
        lambda: next(
            (s for s in checker.started() if s["appliance"] == "app1"
             and s["epoch"] == after["epoch"] and s["checked"]),
            None,
        ),
        PLACE_TIMEOUT_S,
        f"the checker to read app1's counter on {target}",
    )  # fmt: skip
    assert started["rack"] == target
    assert acked > 0 and started["value"] >= acked, (
        f"{target} started from {started['value']}, {source} had acknowledged {acked}"
    )
    # the downtime is reported: in the map, and in the target's events
    down = move["downtime_s"]
    measured = outage[1] - outage[0]
    assert isinstance(down, int | float) and down > 0
    assert abs(down - measured) < 3.0, f"reported {down:.2f} s, the checker saw {measured:.2f} s"
    events = [e["message"] for e in api.cluster(target)["events"] if e.get("rack") == target]
    assert any(f"moved app1 from {source} to {target} without losing a write" in m for m in events)
    value = wait_for(
        lambda: (v := counter(lab, target, IP)) is not None and v > acked and v,
        BOOT_TIMEOUT_S,
        f"app1 to count on from {acked} on {target}",
    )
    print(
        f"app1: {source} -> {target}: acknowledged {acked} before the pause, started from"
        f" {started['value']}, counting {value}; downtime reported {down:.2f} s,"
        f" checker {measured:.2f} s"
    )
    return before, after


def test_a_planned_move_and_a_drain_lose_no_acknowledged_write(
    lab_factory: MakeLab, wait_for: WaitFor
) -> None:
    wait_for = partial(wait_for, interval=0.2)
    lab, api = start_lab(lab_factory, 3, wait_for)
    deploy(api, lab, spec("app1", IP, replicas=2))
    wait_for(
        lambda: (a := assignment(api, lab, "app1")) and a["primary"] and len(a["replicas"]) == 2,
        PLACE_TIMEOUT_S,
        "app1 to be placed with two replicas",
    )
    checker = watch(lab, api)
    try:
        # 1. an operator's move to a chosen replica holder
        def operator_move(before: dict[str, Any]) -> None:
            to = sorted(before["replicas"])[0]
            reply = api.request(
                before["primary"], "POST", "/api/v1/appliances/app1/move", {"to": to}
            )
            assert reply["move"]["to"] == to and reply["move"]["phase"] == "handover"

        _, after = _move(lab, api, checker, wait_for, operator_move)
        assert after["move"]["reason"].startswith("moved by an operator")

        # 2. a drain goes through the same path
        def drain(before: dict[str, Any]) -> None:
            api.request(before["primary"], "POST", f"/api/v1/racks/{before['primary']}/drain")

        # (its replicas follow the new primary once they report past the synced generation)
        synced = after["move"]["generation"]
        before, after = _move(lab, api, checker, wait_for, drain, min_generation=synced + 2)
        assert after["move"]["reason"] == f"{before['primary']} drained"
        doc = cluster(api, lab.racks())
        assert doc is not None
        leader_events = [e["message"] for e in api.cluster(doc["leader"])["events"]]
        assert any(f"handing app1 over from {before['primary']}" in m for m in leader_events)
        _abandoned_move(lab, api, checker, wait_for, drained=before["primary"])
        checker.assert_ok()
    finally:
        checker.stop()


def _abandoned_move(
    lab: Lab, api: LabApi, checker: InvariantChecker, wait_for: WaitFor, drained: str
) -> None:
    before = assignment(api, lab, "app1")
    assert before is not None and before["primary"]
    source = before["primary"]
    target = next(r for r in lab.racks() if r not in (source, drained))
    wait_for(
        lambda: (a := assignment(api, lab, "app1")) and target in a["replicas"],
        PLACE_TIMEOUT_S,
        f"{target} to hold a replica of app1",
    )
    with CounterProbe(lab, source) as probe:
        wait_for(lambda: len(probe.answers) >= 3, BOOT_TIMEOUT_S, "the probe's first answers")
        lab.partition(target)
        try:
            api.request(source, "POST", "/api/v1/appliances/app1/move", {"to": target})
            after = wait_for(
                lambda: (
                    (a := assignment(api, lab, "app1"))
                    and (a.get("move") or {}).get("phase") == "abandoned"
                    and a
                ),
                MOVE_TIMEOUT_S,
                "the move to the cut-off rack to be abandoned",
            )
            acked = max(v for _t, v in probe.answers)
            value = wait_for(
                lambda: (v := counter(lab, source, IP)) is not None and v > acked and v,
                BOOT_TIMEOUT_S,
                f"app1 to count on on {source}",
            )
        finally:
            lab.heal()
    assert after["primary"] == source and after["epoch"] == before["epoch"]
    assert after["move"]["reason"].endswith(f"app1 resumes on {source}"), after["move"]
    assert set(checker.running_on("app1")) == {source}
    said = [
        e["message"]
        for rack in {source, api.cluster(source)["leader"] or source}
        for e in api.cluster(rack)["events"]
    ]
    assert any("abandon" in m and "app1" in m for m in said), said
    print(
        f"app1: move to cut-off {target} abandoned ({after['move']['reason']}); {value} on {source}"
    )
