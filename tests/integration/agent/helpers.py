"""Probes for the agent's lab tests: which QEMU runs in which rack, under which epoch."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from meshcloud.hypervisor.domain_xml import DOMAIN_PREFIX, METADATA_NS
from meshcloud.lab import netns
from meshcloud.lab.api import ApiError, LabApi
from meshcloud.lab.lab import Lab


def qemu_guests(lab: Lab, rack: str) -> dict[str, int]:
    """``{appliance: pid}`` of the QEMU processes running inside ``rack``'s namespace.

    This is the hypervisor's ground truth: a domain that runs has a QEMU
    process, born in the namespace of the rack whose daemon started it.
    """
    info = lab.rack(rack)
    if info.power != "on":
        return {}
    guests = {}
    for pid in netns.pids_in_netns(info.netns):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not argv or not argv[0].endswith(b"qemu-system-x86_64"):
            continue
        for i, arg in enumerate(argv[:-1]):
            if arg == b"-name":
                guest = argv[i + 1].decode().split(",")[0].removeprefix("guest=")
                if guest.startswith(DOMAIN_PREFIX):
                    guests[guest[len(DOMAIN_PREFIX) :]] = pid
    return guests


def _epoch_in(path: Path) -> int | None:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    # etc/qemu/*.xml holds <domain>; run/qemu/*.xml wraps it in <domstatus>
    element = next(root.iter(f"{{{METADATA_NS}}}appliance"), None)
    return int(element.get("epoch", "0")) if element is not None else None


def live_epoch(lab: Lab, rack: str, appliance: str) -> int | None:
    """The epoch a running domain was started under (libvirt's live status file)."""
    return _epoch_in(lab.state_dir(rack) / "libvirt" / "run" / "qemu" / f"mc-{appliance}.xml")


def defined_epoch(lab: Lab, rack: str, appliance: str) -> int | None:
    """The epoch in a rack's persistent definition of an appliance (None: not defined there)."""
    return _epoch_in(lab.state_dir(rack) / "libvirt" / "etc" / "qemu" / f"mc-{appliance}.xml")


def cluster(api: LabApi, racks: list[str]) -> dict[str, Any] | None:
    """The cluster document from the first rack that answers."""
    for rack in racks:
        try:
            doc = api.get(rack, "/api/v1/cluster")
        except ApiError:
            continue
        return dict(doc)
    return None


def assigned(doc: dict[str, Any]) -> dict[str, tuple[str, int]]:
    """``{appliance: (primary, epoch)}`` for the appliances the map wants running."""
    return {
        name: (a["primary"], a["epoch"])
        for name, a in doc["assignments"].items()
        if a["state"] == "running" and a["primary"]
    }


def runs_where_the_map_says(lab: Lab, api: LabApi) -> dict[str, tuple[str, int]] | None:
    """The map's running assignments if every powered rack runs exactly those, under their epochs."""
    racks = lab.racks()
    doc = cluster(api, racks)
    if doc is None:
        return None
    wanted = assigned(doc)
    for rack in racks:
        mine = {n for n, (primary, _e) in wanted.items() if primary == rack}
        if set(qemu_guests(lab, rack)) != mine:
            return None
        if any(live_epoch(lab, rack, n) != wanted[n][1] for n in mine):
            return None
    return wanted


def rack_events(api: LabApi, rack: str) -> list[dict[str, Any]]:
    """The events ``rack`` itself published (its agent's sentences among them)."""
    try:
        doc = api.get(rack, "/api/v1/cluster")
    except ApiError:
        return []
    return [e for e in doc.get("events", []) if e.get("rack") == rack]
