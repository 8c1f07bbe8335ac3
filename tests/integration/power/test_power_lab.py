"""Power-aware placement in the lab: real upsd and NUT's dummy-ups driver in every rack.

Three racks, each with a UPS (``Lab.up(nut=True)``), the real daemon reading
it through upsd, the demo appliance replicated to a second rack, and the
invariant checker watching every QEMU:

1. the appliance's rack goes on battery with an hour left: it stays put;
2. the UPS reports low battery with two minutes left: the appliance moves
   away (through the planned-move path drains use) *before* the rack is
   killed, loses no acknowledged write (the first counter the new primary
   starts from is at least every value the old one served), and the old
   rack keeps its copy as a replica while it lasts;
3. the rack is killed: nothing else happens to the appliance;
4. the rack comes back on mains while a third rack is on battery: a new
   appliance goes to the rack back on mains, and the first one does not
   move back.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest

from meshcloud.demo import demo_image_files, seed_lab_image
from meshcloud.lab.api import LabApi
from meshcloud.lab.pytest_plugin import MakeLab
from tests.integration.failover.scenario import (
    BOOT_TIMEOUT_S,
    FORM_TIMEOUT_S,
    PLACE_TIMEOUT_S,
    assignment,
    cluster,
    counter,
    deploy,
    live_racks,
    replicated,
    spec,
    watch,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.vm,
    pytest.mark.root,
    pytest.mark.timeout(900),  # 85 s on a quiet machine; boots and final syncs under load
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(
        not os.path.exists("/lib/nut/dummy-ups"), reason="needs nut-server (make bootstrap)"
    ),
]

WaitFor = Callable[..., Any]
IPS = {"voip": "10.90.0.21", "maps": "10.90.0.22"}
REPORT_TIMEOUT_S = 30.0  # the driver re-reads ups.dev every 2 s, the daemon polls every 1 s
MOVE_TIMEOUT_S = 180.0  # final sync and a TCG boot on the target, on a loaded machine


def rack_power(api: LabApi, lab: Any, rack: str) -> dict[str, Any] | None:
    doc = cluster(api, live_racks(lab))
    power = doc["racks"].get(rack, {}).get("power") if doc else None
    return power if isinstance(power, dict) else None


class CounterWatch:
    """Reads the counter a rack serves, in a thread, and keeps the highest value seen."""

    def __init__(self, lab: Any, rack: str, ip: str) -> None:
        self.lab, self.rack, self.ip = lab, rack, ip
        self.highest = -1
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            value = counter(self.lab, self.rack, self.ip)
            if value is not None:
                self.highest = max(self.highest, value)
            self.stopping.wait(0.2)  # pacing of the probe, not synchronisation

    def stop(self) -> int:
        self.stopping.set()
        self.thread.join(timeout=10)
        return self.highest


def test_a_rack_on_low_battery_hands_its_appliance_over_before_it_dies(
    lab_factory: MakeLab, wait_for: WaitFor
) -> None:
    wait_for = partial(wait_for, interval=0.2)
    lab = lab_factory(3, nut=True)
    manifest, files = demo_image_files()
    seed_lab_image(lab, manifest, files)
    api = LabApi(lab, timeout_s=5.0)
    wait_for(
        lambda: all(
            (p := rack_power(api, lab, r)) and p["source"] == "nut" and not p["on_battery"]
            for r in lab.racks()
        ),
        FORM_TIMEOUT_S,
        "every rack to form the cluster and report its UPS on mains",
    )
    deploy(api, lab, spec("voip", IPS["voip"], replicas=1, priority=900))
    checker = watch(lab, api)
    try:
        before = wait_for(
            lambda: (a := assignment(api, lab, "voip")) and a["primary"] and a, PLACE_TIMEOUT_S,
            "voip to be placed",
        )  # fmt: skip
        source, epoch = before["primary"], before["epoch"]
        wait_for(lambda: counter(lab, source, IPS["voip"]), BOOT_TIMEOUT_S, "voip to serve")
        wait_for(lambda: replicated(api, lab, "voip", 2), PLACE_TIMEOUT_S, "voip's replica")

        # 1. on battery with an hour left: nothing moves
        lab.set_ups(source, "OB DISCHRG", 80, 3600)
        power = wait_for(
            lambda: (p := rack_power(api, lab, source)) and p["on_battery"] and p,
            REPORT_TIMEOUT_S,
            f"{source} to report that it is on battery",
        )
        assert not power["evacuating"] and power["runtime_s"] == 3600
        now = assignment(api, lab, "voip")
        assert now is not None and (now["primary"], now["epoch"]) == (source, epoch)

        # 2. low battery, two minutes left: voip moves away before the rack dies
        served = CounterWatch(lab, source, IPS["voip"])
        try:
            lab.set_ups(source, "OB DISCHRG LB", 8, 120)
            wait_for(
                lambda: (p := rack_power(api, lab, source)) and p["evacuating"],
                REPORT_TIMEOUT_S,
                f"{source} to ask for its appliances to move",
            )
            after = wait_for(
                lambda: (
                    (a := assignment(api, lab, "voip")) and a["primary"] not in (None, source) and a
                ),
                MOVE_TIMEOUT_S,
                f"voip to move off {source}",
            )
        finally:
            highest_served = served.stop()
        target = after["primary"]
        assert after["epoch"] > epoch and source in after["replicas"]
        value = wait_for(
            lambda: counter(lab, target, IPS["voip"]), BOOT_TIMEOUT_S, f"voip to serve on {target}"
        )
        start = wait_for(
            lambda: next(
                (s for s in checker.started()
                 if s["appliance"] == "voip" and s["checked"] and s["epoch"] == after["epoch"]),
                None,
            ),
            PLACE_TIMEOUT_S,
            f"the checker to read voip's counter on {target}",
        )  # fmt: skip
        # No acknowledged write lost: the planned move (pause, final sync, switch) starts
        # the target from at least every value the source served.
        assert highest_served > 0
        assert start["value"] >= highest_served, (
            f"voip started on {target} from {start['value']}, but {source} had served"
            f" {highest_served}"
        )
        move = (assignment(api, lab, "voip") or {}).get("move")
        events = " ".join(
            e["message"] for r in live_racks(lab) for e in api.cluster(r).get("events", [])
        )
        print(f"voip: {source} -> {target}, counter {highest_served} -> {value}; move {move}")

        # 3. the rack dies: voip already runs elsewhere, under the same epoch
        lab.kill(source)
        later = wait_for(
            lambda: (v := counter(lab, target, IPS["voip"])) and v > value and v,
            BOOT_TIMEOUT_S,
            f"voip to keep counting on {target} after {source} died",
        )
        now = assignment(api, lab, "voip")
        assert now is not None and (now["primary"], now["epoch"]) == (target, after["epoch"])

        # 4. back on mains while the third rack is on battery: the new appliance goes to
        # the rack back on mains; voip does not move back
        third = next(r for r in lab.racks() if r not in (source, target))
        lab.set_ups(third, "OB DISCHRG", 90, 3000)
        lab.set_ups(source, "OL CHRG", 30, 900)
        lab.restart(source)
        wait_for(
            lambda: (p := rack_power(api, lab, source)) and not p["on_battery"]
            and (q := rack_power(api, lab, third)) and q["on_battery"],
            REPORT_TIMEOUT_S + FORM_TIMEOUT_S,
            f"{source} back on mains and {third} on battery in the map",
        )  # fmt: skip
        deploy(api, lab, spec("maps", IPS["maps"], replicas=1, priority=100))
        maps = wait_for(
            lambda: (a := assignment(api, lab, "maps")) and a["primary"] and a,
            PLACE_TIMEOUT_S,
            "maps to be placed",
        )
        assert maps["primary"] == source, f"maps went to {maps['primary']}, not to {source}"
        now = assignment(api, lab, "voip")
        assert now is not None and (now["primary"], now["epoch"]) == (target, after["epoch"])
        assert f"{source} on battery, low battery, 2 min left" in events
        print(f"counter on {target} {later}; maps placed on {source} (back on mains)")
        checker.assert_ok()
    finally:
        checker.stop()
    checker.assert_ok()
