"""Chaos: random faults on a five-rack lab, with the invariant checker watching throughout.

Two demo appliances (disks replicated to two other racks) run while a
nemesis (tests/chaos/nemesis.py) kills racks silently, freezes daemons, cuts
racks off, degrades links and restarts daemons, one or two at a time, never
more than a minority. Throughout, the invariant checker (meshcloud/lab/checker.py)
scans every rack's QEMU every 0.1 s and the counters every second. At the end:

- no appliance ever ran (not paused) on two racks at once;
- no appliance started under a new epoch below the value the map recorded as
  replicated on a replica that was available;
- every appliance ran again within ``MESHCLOUD_CHAOS_RTO_S`` (30 s) of every
  outage, since a majority was always up.

Duration: ``MESHCLOUD_CHAOS_S`` seconds of faults (default 600 when ``CI`` is
set, 120 otherwise); ``MESHCLOUD_CHAOS_SEED`` fixes the random choices.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest

from meshcloud.lab.checker import InvariantChecker
from meshcloud.lab.pytest_plugin import MakeLab
from tests.integration.failover.scenario import (
    BOOT_TIMEOUT_S,
    PLACE_TIMEOUT_S,
    cluster,
    deploy,
    spec,
    start_lab,
)

from .nemesis import Nemesis

DURATION_S = float(os.environ.get("MESHCLOUD_CHAOS_S", "600" if os.environ.get("CI") else "120"))
RTO_BOUND_S = float(os.environ.get("MESHCLOUD_CHAOS_RTO_S", "30"))
SEED = int(os.environ.get("MESHCLOUD_CHAOS_SEED", str(int(time.time()))))
APPS = {"chaos1": "10.90.0.31", "chaos2": "10.90.0.32"}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.vm,
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.timeout(DURATION_S + 900),
]

WaitFor = Callable[..., Any]


def test_chaos_never_runs_twice_nor_loses_replicated_writes(
    lab_factory: MakeLab, wait_for: WaitFor
) -> None:
    wait_for = partial(wait_for, interval=0.5)
    rng = random.Random(SEED)
    print(f"chaos: {DURATION_S:g} s, seed {SEED}, RTO bound {RTO_BOUND_S:g} s")
    lab, api = start_lab(lab_factory, 5, wait_for)
    nemesis = Nemesis(lab, rng)
    deploy(
        api,
        lab,
        spec("chaos1", APPS["chaos1"], replicas=2, priority=700),
        spec("chaos2", APPS["chaos2"], replicas=2, priority=300),
    )
    infos = {r: lab.rack(r) for r in lab.racks()}

    def up_racks() -> list[str]:
        return [r for r in lab.racks() if r not in nemesis.impaired()]

    checker = InvariantChecker(
        lambda: {r: (i.netns, i.state_dir) for r, i in infos.items()},
        lambda: cluster(api, up_racks()),
        available=nemesis.available,
    ).start()
    try:
        wait_for(lambda: all(checker.running_on(n) for n in APPS), PLACE_TIMEOUT_S, "both to run")
        wait_for(
            lambda: all(checker.replicated_now(n) > 0 for n in APPS),
            BOOT_TIMEOUT_S,
            "both appliances to boot and replicate",
        )
        chaos_started = time.monotonic()
        end = chaos_started + DURATION_S
        while time.monotonic() < end:
            fault = nemesis.inject()
            if fault is not None:
                print(
                    f"{time.monotonic() - chaos_started:7.1f} s  {fault.kind} {fault.racks} {fault.detail}"
                )
            if rng.random() < 0.3:  # sometimes a second fault overlaps the first
                time.sleep(rng.uniform(1.0, 4.0))
                second = nemesis.inject()
                if second is not None:
                    print(
                        f"{time.monotonic() - chaos_started:7.1f} s  + {second.kind} {second.racks}"
                    )
            time.sleep(rng.uniform(2.0, 15.0))
            nemesis.repair_all()
            time.sleep(rng.uniform(3.0, 12.0))
        nemesis.repair_all()
        # everything healed: every appliance runs again, once
        wait_for(
            lambda: all(len(checker.running_on(n)) == 1 for n in APPS),
            PLACE_TIMEOUT_S,
            "both appliances to run after the chaos",
        )
    finally:
        nemesis.repair_all()
        checker.stop()
    outages = {
        n: [(round(a - chaos_started, 1), round(b - a, 2)) for a, b in checker.outages(n)]
        for n in APPS
    }
    summary = {
        "seed": SEED,
        "faults": len(nemesis.faults),
        "kinds": {
            k: sum(1 for f in nemesis.faults if f.kind == k)
            for k in {f.kind for f in nemesis.faults}
        },
        "starts": len(checker.started()),
        "outages": outages,
        "violations": [v.message for v in checker.violations][:10],
        "checker_passes": checker.passes,
        "checker_max_pass_s": round(checker.max_pass_s, 3),
    }
    print(json.dumps(summary, indent=1))
    checker.assert_ok()
    assert len(nemesis.faults) >= max(3, DURATION_S / 60), "the nemesis barely acted"
    too_long = {n: [o for o in spans if o[1] > RTO_BOUND_S] for n, spans in outages.items()}
    assert not any(too_long.values()), f"outages over {RTO_BOUND_S:g} s: {too_long}"
