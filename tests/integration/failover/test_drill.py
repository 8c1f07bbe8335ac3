"""The fire drill on a live three-rack lab, run through the CLI (docs/drill.md).

The demo appliance counts on its disk, replicated to the two other racks;
the invariant checker scans every rack's QEMU every 0.1 s. From the
observer namespace, ``meshcloud drill appliance app1`` runs the drill
against a rack that does not run app1:

- app1 runs again on another rack, under a new epoch;
- the drill's RTO agrees with the checker: the moment the drill says app1
  ran on the new rack is the moment the checker first saw it there (both
  read the host's monotonic clock), and the checker's outage (the guest
  paused on the cut rack when its lease ran out) ends then; the detection
  lies near ``lease_s + margin_s`` (what bench/failover.py measures);
- RPO is measured (the lag the new primary's copy had at the cut);
- no double run, no counter violation;
- the cut rack rejoins (the leader counts it alive), app1 moves back there
  with a planned move, and the printed report has the figures.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from meshcloud.lab.plan import API_PORT
from meshcloud.lab.pytest_plugin import MakeLab

from .scenario import (
    BOOT_TIMEOUT_S,
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

pytestmark = [
    pytest.mark.slow,
    pytest.mark.vm,
    pytest.mark.root,
    pytest.mark.timeout(900),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

WaitFor = Callable[..., Any]
IP = "10.90.0.11"
MESHCLOUD = str(Path(sys.executable).parent / "meshcloud")


def test_the_drill_fails_over_measures_and_restores(
    lab_factory: MakeLab, wait_for: WaitFor, tmp_path: Path
) -> None:
    wait_for = partial(wait_for, interval=0.2)
    lab, api = start_lab(lab_factory, 3, wait_for)
    deploy(api, lab, spec("app1", IP, replicas=2))
    before = wait_for(
        lambda: (a := assignment(api, lab, "app1")) and a["primary"] and len(a["replicas"]) == 2
        and a,
        PLACE_TIMEOUT_S,
        "app1 to be placed with two replicas",
    )  # fmt: skip
    source = before["primary"]
    checker = watch(lab, api)
    try:
        wait_for(lambda: counter(lab, source, IP), BOOT_TIMEOUT_S, f"app1 to answer on {source}")
        wait_for(lambda: replicated(api, lab, "app1", 2), PLACE_TIMEOUT_S, "app1's replicas")
        via = sorted(before["replicas"])[0]
        token = api.token
        out = tmp_path / "drill.txt"
        done = lab.exec(
            None,
            [MESHCLOUD, "drill", "appliance", "app1", "--api",
             f"http://{lab.rack(via).ip}:{API_PORT}", "--token", token, "--out", str(out)],
            timeout=600.0, check=False,
        )  # fmt: skip
        print(done.stderr)
        print(done.stdout)
        assert done.returncode == 0, done.stderr[-2000:]
        text = done.stdout
        assert out.read_text() == text
        for needle in ("Recovery time (RTO)", "detection", "Data at risk (RPO)", "Restore"):
            assert needle in text
        ident = re.search(r"drill (drill-[0-9a-f]+)", done.stderr)
        assert ident is not None, done.stderr
        report = api.request(via, "GET", f"/api/v1/drill?id={ident.group(1)}")["report"]
        print(json.dumps(report, indent=2))
        f = report["figures"]
        new_primary = report["new_primary"]

        # 1. it ran again elsewhere, under a new epoch
        assert report["rack"] == source and new_primary in before["replicas"]
        assert report["new_epoch"] > before["epoch"]

        # 2. the RTO agrees with the independent observer
        clock = report["clock"]
        seen = checker.first_running_after("app1", clock["cut_at"], [source])
        assert seen is not None and seen[1] == new_primary, checker.timeline.get("app1")
        assert abs(seen[0] - clock["running_at"]) < 2.0, (seen[0], clock)
        outage = next(s for s in checker.outages("app1") if s[1] >= clock["cut_at"])
        assert clock["cut_at"] <= outage[0] < clock["decided_at"], (outage, clock)
        assert abs(outage[1] - clock["running_at"]) < 2.0, (outage, clock)
        low, high = f["expected_detect_s"]
        assert low - 0.5 <= f["detect_s"] <= high + 5.0, f
        assert f["rto_s"] == pytest.approx(f["detect_s"] + f["restart_s"], abs=0.01)
        assert f["rpo_s"] is not None and 0 <= f["rpo_s"] < 60, f

        # 3. restore: the rack rejoined, app1 went back with a planned move
        assert report["restore"]["rejoined"].startswith("yes"), report["restore"]
        assert report["restore"]["moved_back"].startswith("yes"), report["restore"]
        doc = cluster(api, lab.racks())
        assert doc is not None
        assert api.request(via, "GET", "/api/v1/drill")["current"] is None
        leader = doc["leader"]
        health = api.cluster(leader)["health"]["racks"]
        assert health[source]["state"] == "alive", health
        after = assignment(api, lab, "app1")
        assert after is not None and after["primary"] == source
        wait_for(lambda: counter(lab, source, IP), BOOT_TIMEOUT_S, f"app1 to answer on {source}")

        # 4. never on two racks at once; no start below the replicated counter
        checker.assert_ok()
        print(
            f"drill: RTO {f['rto_s']} s (detection {f['detect_s']}, restart {f['restart_s']}),"
            f" RPO {f['rpo_s']} s; checker outage {outage[1] - outage[0]:.2f} s"
        )
    finally:
        checker.stop()
