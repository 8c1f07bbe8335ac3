"""Shared steps of the failover lab tests: a lab with the demo image, appliances, probes."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable
from typing import Any

import pytest

from meshcloud.core.models import ApplianceSpec, DiskSpec, PortSpec
from meshcloud.demo import demo_image_files, ensure_segment_address, seed_lab_image
from meshcloud.hypervisor.reach import http_get
from meshcloud.lab.api import ApiError, LabApi
from meshcloud.lab.checker import InvariantChecker
from meshcloud.lab.lab import Lab
from meshcloud.lab.pytest_plugin import MakeLab

# The marks of every test that runs the real demo appliance in a lab (the failover
# tests and tests/integration/agent/test_appliances_lab.py).
LAB_VM = [
    pytest.mark.slow,
    pytest.mark.vm,
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]
WaitFor = Callable[..., Any]
FORM_TIMEOUT_S = 90.0
PLACE_TIMEOUT_S = 120.0  # placement, image check, volumes, QEMU start; more under load
BOOT_TIMEOUT_S = 240.0  # a TCG boot takes about 8 s idle, far longer on a loaded machine
FAILOVER_TIMEOUT_S = 60.0  # lease_s + margin_s (5 s) plus a start, on a loaded machine


def spec(name: str, ip: str, replicas: int = 1, priority: int = 500) -> ApplianceSpec:
    return ApplianceSpec(
        name, "demo", memory_mib=128, disks=(DiskSpec("data", 1),), ports=(PortSpec("http", 80),),
        ip=ip, replicas=replicas, priority=priority,
    )  # fmt: skip


def cluster(api: LabApi, racks: Iterable[str]) -> dict[str, Any] | None:
    """The map document from the first rack that answers."""
    for rack in racks:
        with contextlib.suppress(ApiError):
            doc: dict[str, Any] = api.cluster(rack)
            return doc
    return None


def live_racks(lab: Lab) -> list[str]:
    return [r for r in lab.racks() if lab.rack(r).power == "on"]


def start_lab(lab_factory: MakeLab, racks: int, wait_for: WaitFor) -> tuple[Lab, LabApi]:
    """A lab with the demo image on every rack and the cluster formed."""
    lab = lab_factory(racks)
    manifest, files = demo_image_files()
    seed_lab_image(lab, manifest, files)
    api = LabApi(lab, timeout_s=5.0)

    def formed() -> bool:
        doc = cluster(api, lab.racks())
        return doc is not None and bool(doc["leader"]) and set(doc["racks"]) == set(lab.racks())

    wait_for(formed, FORM_TIMEOUT_S, f"the {racks} racks to form a cluster", interval=0.5)
    return lab, api


def deploy(api: LabApi, lab: Lab, *specs: ApplianceSpec) -> None:
    for s in specs:
        api.request(live_racks(lab)[0], "PUT", f"/api/v1/appliances/{s.name}", s.to_dict())


def watch(
    lab: Lab, api: LabApi, available: Callable[[str, float], bool] | None = None
) -> InvariantChecker:
    """The invariant checker on this lab (started; stop it at the end)."""
    infos = {r: lab.rack(r) for r in lab.racks()}

    def racks() -> dict[str, Any]:
        return {r: (i.netns, i.state_dir) for r, i in infos.items()}

    def is_on(rack: str, _t: float) -> bool:
        return lab.rack(rack).power == "on"

    def current_map() -> dict[str, Any] | None:
        # ask racks that are on: a cut rack would hold each read for the API timeout,
        # and the checker's record of the map (map_before) would fall seconds behind
        return cluster(api, live_racks(lab))

    return InvariantChecker(racks, current_map, available=available or is_on).start()


def assignment(api: LabApi, lab: Lab, name: str, via: str | None = None) -> dict[str, Any] | None:
    """``name``'s assignment from the map of rack ``via`` (default: the first that answers)."""
    doc = cluster(api, [via] if via else live_racks(lab))
    return None if doc is None else doc["assignments"].get(name)


def counter(lab: Lab, rack: str, ip: str) -> int | None:
    """The counter the appliance serves (GET /counter on its segment, from inside ``rack``)."""
    try:
        ensure_segment_address(lab, rack)
        reply = http_get(lab.rack(rack).netns, ip, 80, "/counter", 2.0)
    except Exception:
        return None
    return int(reply.json()["seq"]) if reply.status == 200 else None


def replicated(api: LabApi, lab: Lab, name: str, min_generation: int) -> dict[str, int] | None:
    """The map's replica generations of ``name`` once every listed replica reported enough."""
    doc = cluster(api, live_racks(lab))
    if doc is None:
        return None
    asg = doc["assignments"].get(name)
    reports = doc["replica_generations"].get(name, {})
    if asg is None or not asg["replicas"] or asg["state"] != "running":
        return None
    if all(reports.get(r, -1) >= min_generation for r in asg["replicas"]):
        return {r: reports[r] for r in asg["replicas"]}
    return None
