"""Appliances on a three-rack lab with the real daemon: they run exactly where the map says.

One lab, one story (each step proves one rule, and reuses the VMs the step
before started, to keep the boots few):

1. three appliances deployed through the API land on three racks and each
   rack runs exactly the appliances the map assigns to it, under their epochs
   (checked on the racks' QEMU processes and libvirt's live status); one of
   them answers on its segment (the image, disk and network really work); a
   VM whose QEMU is killed is restarted in place under the same epoch;
2. draining a rack moves its appliance to another rack under a new epoch
   (stop and start) and leaves the other appliances' VMs alone;
3. deleting an appliance stops it everywhere and moves its volumes aside;
4. a power cut: the rack's appliance is started elsewhere (leases), and when
   the rack comes back it starts nothing the map no longer assigns to it,
   although its libvirt still holds a definition of the moved appliance.

A second test proves that an image failing its checksum is never used.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from functools import partial
from typing import Any

from meshcloud.core.models import ApplianceSpec, DiskSpec, PortSpec
from meshcloud.demo import demo_image_files, ensure_segment_address, seed_lab_image
from meshcloud.hypervisor.reach import http_get
from meshcloud.lab.api import LabApi
from meshcloud.lab.lab import Lab
from meshcloud.lab.pytest_plugin import MakeLab
from tests.integration.failover.scenario import LAB_VM

from .helpers import (
    assigned,
    cluster,
    defined_epoch,
    live_epoch,
    qemu_guests,
    rack_events,
    runs_where_the_map_says,
)

pytestmark = LAB_VM

WaitFor = Callable[..., Any]
PLACE_TIMEOUT_S = 90.0  # placement, image check, volumes, QEMU start: seconds, more under load
BOOT_TIMEOUT_S = 240.0  # a TCG boot takes about 8 s idle, far longer on a loaded machine
FAILOVER_TIMEOUT_S = 90.0  # lease_s + margin_s (5 s by default) plus a start


def spec(name: str, ip: str) -> ApplianceSpec:
    return ApplianceSpec(
        name, "demo", memory_mib=128, disks=(DiskSpec("data", 1),),
        ports=(PortSpec("http", 80),), ip=ip,
    )  # fmt: skip


def start_lab(lab_factory: MakeLab, wait_for: WaitFor) -> tuple[Lab, LabApi]:
    """A three-rack lab with the demo image on every rack and the cluster formed."""
    lab = lab_factory(3)
    manifest, files = demo_image_files()
    seed_lab_image(lab, manifest, files)
    api = LabApi(lab)

    def ready() -> bool:
        doc = cluster(api, lab.racks())
        return doc is not None and bool(doc["leader"]) and set(doc["racks"]) == set(lab.racks())

    wait_for(ready, 60.0, "the three racks to form a cluster")
    return lab, api


def test_appliances_follow_the_map_through_drain_delete_and_power_cut(
    lab_factory: MakeLab, wait_for: WaitFor
) -> None:
    wait_for = partial(wait_for, interval=0.5)  # each probe runs commands and API calls
    lab, api = start_lab(lab_factory, wait_for)
    racks = lab.racks()
    specs = [spec(f"app{i}", f"10.90.0.1{i}") for i in (1, 2, 3)]
    for s in specs:
        api.request(racks[0], "PUT", f"/api/v1/appliances/{s.name}", s.to_dict())

    # 1. three appliances on three racks, each rack running exactly its own
    def spread() -> dict[str, tuple[str, int]] | None:
        where = runs_where_the_map_says(lab, api)
        return where if where is not None and len(where) == 3 else None

    where = wait_for(spread, PLACE_TIMEOUT_S, "three appliances running where the map says")
    assert sorted(primary for primary, _epoch in where.values()) == racks
    pids = {name: qemu_guests(lab, rack)[name] for name, (rack, _e) in where.items()}

    first_rack = where["app1"][0]
    ensure_segment_address(lab, first_rack)

    def page() -> dict[str, Any] | None:
        try:
            reply = http_get(lab.rack(first_rack).netns, "10.90.0.11", 80, "/counter", 2.0)
        except OSError:
            return None
        return reply.json() if reply.status == 200 else None

    counter = wait_for(page, BOOT_TIMEOUT_S, "app1 to answer on its segment")
    assert counter["name"] == "app1"

    # a VM whose QEMU dies is restarted in place, under the same epoch (after its back-off)
    crash_rack, crash_epoch = where["app3"]
    os.kill(pids["app3"], signal.SIGKILL)  # this test's own VM

    def restarted() -> int | None:
        pid = qemu_guests(lab, crash_rack).get("app3")
        return pid if pid is not None and pid != pids["app3"] else None

    pids["app3"] = wait_for(restarted, PLACE_TIMEOUT_S, "app3 to be restarted in place")
    assert live_epoch(lab, crash_rack, "app3") == crash_epoch

    # 2. drain the rack of app2: app2 moves under a new epoch, the others stay put
    drained, epoch2 = where["app2"]
    api.request(racks[0], "POST", f"/api/v1/racks/{drained}/drain")

    def moved() -> dict[str, tuple[str, int]] | None:
        now = runs_where_the_map_says(lab, api)
        if now is None or now.get("app2", (drained, 0))[0] == drained:
            return None
        return now

    where = wait_for(moved, PLACE_TIMEOUT_S, f"app2 to move off drained {drained}")
    assert where["app2"][1] == epoch2 + 1
    assert qemu_guests(lab, drained) == {}
    for name in ("app1", "app3"):
        rack, _epoch = where[name]
        assert qemu_guests(lab, rack)[name] == pids[name], f"{name} was restarted by the drain"

    # 3. delete app3: it stops everywhere, its volumes are kept aside on its rack
    app3_rack = where["app3"][0]
    api.request(racks[0], "DELETE", "/api/v1/appliances/app3")

    def deleted() -> bool:
        doc = cluster(api, racks)
        gone = doc is not None and "app3" not in doc["appliances"]
        return gone and all("app3" not in qemu_guests(lab, r) for r in racks)

    wait_for(deleted, PLACE_TIMEOUT_S, "app3 to stop everywhere")
    volumes = lab.state_dir(app3_rack) / "volumes"
    wait_for(
        lambda: not (volumes / "app3").exists() and (volumes / ".deleted" / "app3.0").is_dir(),
        PLACE_TIMEOUT_S,
        "app3's volumes to be moved aside",
    )

    # 4. power cut of the rack running app1 (not the drained one)
    victim, epoch1 = where["app1"]
    assert victim != drained
    lab.kill(victim)

    def failed_over() -> dict[str, tuple[str, int]] | None:
        now = runs_where_the_map_says(lab, api)
        if now is None or now.get("app1", (victim, 0))[0] == victim:
            return None
        return now

    where = wait_for(failed_over, FAILOVER_TIMEOUT_S, f"app1 to run again off {victim}")
    new_home, new_epoch = where["app1"]
    assert new_epoch > epoch1
    app1_pid = qemu_guests(lab, new_home)["app1"]

    seen = {e["seq"] for e in rack_events(api, victim)}  # nothing: the rack is off
    lab.restart(victim)

    def settled() -> bool:
        fresh = [e for e in rack_events(api, victim) if e["seq"] not in seen]
        return any(e["kind"] == "agent" and "nothing is assigned here" in e["message"]
                   for e in fresh)  # fmt: skip

    wait_for(settled, PLACE_TIMEOUT_S, f"{victim}'s agent to decide after the restart")
    # it still holds the old definition of app1, and did not start it
    assert defined_epoch(lab, victim, "app1") == epoch1
    assert qemu_guests(lab, victim) == {}
    assert qemu_guests(lab, new_home).get("app1") == app1_pid
    assert live_epoch(lab, new_home, "app1") == new_epoch
    doc = cluster(api, racks)
    assert doc is not None and assigned(doc)["app1"] == (new_home, new_epoch)


def test_an_image_that_fails_its_checksum_is_never_used(
    lab_factory: MakeLab, wait_for: WaitFor
) -> None:
    wait_for = partial(wait_for, interval=0.5)  # each probe runs commands and API calls
    lab, api = start_lab(lab_factory, wait_for)
    racks = lab.racks()
    for rack in racks:  # same size, other bytes: only the checksum can tell
        kernel = lab.state_dir(rack) / "images" / "demo" / "vmlinuz"
        size = kernel.stat().st_size
        kernel.chmod(0o644)
        kernel.write_bytes(b"\0" * size)
    s = spec("app1", "10.90.0.11")
    api.request(racks[0], "PUT", f"/api/v1/appliances/{s.name}", s.to_dict())

    def refused() -> str | None:
        doc = cluster(api, racks)
        if doc is None or "app1" not in assigned(doc):
            return None
        rack = assigned(doc)["app1"][0]
        hits = [e for e in rack_events(api, rack) if "failed its checksum" in e["message"]]
        return rack if hits else None

    rack = wait_for(refused, PLACE_TIMEOUT_S, "the rack of app1 to refuse the corrupt image")
    images = lab.state_dir(rack) / "images" / "demo"
    assert (images / ".bad-vmlinuz").exists() and not (images / "vmlinuz").exists()
    assert all(qemu_guests(lab, r) == {} for r in racks)
    assert defined_epoch(lab, rack, "app1") is None  # nothing was even defined from it

    manifest, files = demo_image_files()
    seed_lab_image(lab, manifest, files)  # a good copy arrives: the next retry uses it
    wait_for(
        lambda: "app1" in qemu_guests(lab, rack),
        PLACE_TIMEOUT_S,
        "app1 to start from the good image",
    )
