"""Freezing and merging the disks of a running appliance through libvirt.

Each function takes a ``libvirt.virConnect`` and the domain name and blocks:
call them on the hypervisor adapter's own thread, e.g.
``await hv.async_run(lambda conn: freeze_disks(conn, "mc-voip", {...}))``
(meshcloud.hypervisor.libvirt_hv runs every libvirt call on one executor).

- :func:`freeze_disks` takes one disk-only external snapshot of the listed
  disks at once (ATOMIC), onto overlays we created ourselves with 4 KiB
  clusters (REUSE_EXT), without libvirt snapshot metadata (NO_METADATA).
  The guest keeps running; the previous overlays become read-only: they are
  the frozen generation. With a guest agent, QUIESCE freezes the guest's
  filesystems around it (application-friendlier; still not
  application-consistent).
- :func:`block_commit` merges a frozen, non-active overlay into the layer
  below while the guest runs (an intermediate commit) and waits for the
  job to finish; ``RELATIVE`` keeps relative backing names.
"""

from __future__ import annotations

import contextlib
import time
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from meshcloud.core.errors import HypervisorError, InvalidInput, ReplicationError
from meshcloud.core.names import validate_name

GUEST_AGENT_CHANNEL = "org.qemu.guest_agent.0"


def snapshot_xml(targets: Mapping[str, Path], other_targets: list[str], description: str) -> str:
    """Disk-only snapshot XML: each ``targets`` dev gets an external overlay; the rest none."""
    root = ET.Element("domainsnapshot")
    ET.SubElement(root, "description").text = description
    disks = ET.SubElement(root, "disks")
    for dev, path in sorted(targets.items()):
        if not dev.isalnum():
            raise InvalidInput(f"disk target {dev!r} is not a plain device name")
        el = ET.SubElement(disks, "disk", name=dev, snapshot="external", type="file")
        ET.SubElement(el, "driver", type="qcow2")
        ET.SubElement(el, "source", file=str(path))
    for dev in sorted(other_targets):
        ET.SubElement(disks, "disk", name=dev, snapshot="no")
    return ET.tostring(root, encoding="unicode")


def disk_targets(domain_xml: str) -> dict[str, tuple[str, str]]:
    """``{disk name: (target dev, source file)}`` from a domain's XML.

    The disk name is the ``<serial>`` meshcloud gives each disk; a disk
    without one is listed under its target dev.
    """
    out: dict[str, tuple[str, str]] = {}
    root = ET.fromstring(domain_xml)  # noqa: S314 (libvirt's own XML, not user input)
    for el in root.iterfind("./devices/disk"):
        if el.get("device", "disk") != "disk":
            continue
        target = el.find("target")
        source = el.find("source")
        if target is None or target.get("dev") is None:
            continue
        dev = target.get("dev", "")
        serial = el.findtext("serial") or dev
        out[serial] = (dev, source.get("file", "") if source is not None else "")
    return out


def has_guest_agent(domain_xml: str) -> bool:
    for ch in ET.fromstring(domain_xml).iterfind(  # noqa: S314 (libvirt's own XML)
        "./devices/channel/target"
    ):
        if ch.get("name") == GUEST_AGENT_CHANNEL:
            return True
    return False


def _libvirt() -> Any:
    import libvirt

    return libvirt


def freeze_disks(
    conn: Any,
    domain: str,
    new_overlays: Mapping[str, Path],
    *,
    quiesce: bool | None = None,
    description: str = "meshcloud generation",
) -> None:
    """Switch every listed disk (by meshcloud disk name) of a running domain to its new overlay."""
    libvirt = _libvirt()
    for name in new_overlays:
        validate_name("disk", name)
    try:
        dom = conn.lookupByName(domain)
        xml = dom.XMLDesc(0)
    except libvirt.libvirtError as exc:
        raise HypervisorError(f"cannot read domain {domain}: {exc}") from exc
    found = disk_targets(xml)
    missing = sorted(set(new_overlays) - set(found))
    if missing:
        raise ReplicationError(f"domain {domain} has no disk {', '.join(missing)} to freeze")
    targets = {found[name][0]: path for name, path in new_overlays.items()}
    others = [dev for name, (dev, _) in found.items() if name not in new_overlays]
    flags = (
        libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
        | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
        | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
        | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT
    )
    use_agent = has_guest_agent(xml) if quiesce is None else quiesce
    snap = snapshot_xml(targets, others, description)
    try:
        if use_agent:
            try:
                dom.snapshotCreateXML(snap, flags | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE)
                return
            except libvirt.libvirtError:
                if quiesce:
                    raise
        dom.snapshotCreateXML(snap, flags)
    except libvirt.libvirtError as exc:
        raise ReplicationError(
            f"snapshot of {domain} failed: {exc}; the disks still write to their old overlays"
        ) from exc


def block_commit(
    conn: Any,
    domain: str,
    disk: str,
    top: Path,
    base: Path,
    *,
    timeout_s: float = 600.0,
    poll_s: float = 0.01,
) -> None:
    """Merge ``top`` (frozen, not the active layer) into ``base`` while the guest runs."""
    libvirt = _libvirt()
    validate_name("disk", disk)
    try:
        dom = conn.lookupByName(domain)
        found = disk_targets(dom.XMLDesc(0))
    except libvirt.libvirtError as exc:
        raise HypervisorError(f"cannot read domain {domain}: {exc}") from exc
    if disk not in found:
        raise ReplicationError(f"domain {domain} has no disk {disk}")
    dev = found[disk][0]
    try:
        dom.blockCommit(dev, str(base), str(top), 0, libvirt.VIR_DOMAIN_BLOCK_COMMIT_RELATIVE)
    except libvirt.libvirtError as exc:
        raise ReplicationError(f"block commit of {domain}/{disk} failed to start: {exc}") from exc
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            info = dom.blockJobInfo(dev, 0)
        except libvirt.libvirtError as exc:
            raise ReplicationError(f"block commit of {domain}/{disk}: {exc}") from exc
        if not info:
            return
        time.sleep(poll_s)  # libvirt offers no blocking wait for an intermediate commit
    with contextlib.suppress(libvirt.libvirtError):  # it may have just finished: same chain
        dom.blockJobAbort(dev, 0)
    raise ReplicationError(
        f"block commit of {domain}/{disk} did not finish in {timeout_s} s: aborted;"
        " the chain is unchanged and the merge will be retried"
    )


def domain_disk_sources(conn: Any, domain: str) -> dict[str, str]:
    """``{disk name: current source file}`` of a domain (to reconcile after a crash)."""
    dom = conn.lookupByName(domain)
    return {name: src for name, (_, src) in disk_targets(dom.XMLDesc(0)).items()}


def is_running(conn: Any, domain: str) -> bool:
    libvirt = _libvirt()
    try:
        dom = conn.lookupByName(domain)
    except libvirt.libvirtError:
        return False
    state, _ = dom.state()
    return state in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_PAUSED)


class LibvirtLiveOps:
    """The live operations of one domain, run through ``run(fn)`` which calls ``fn(conn)``.

    ``run`` is how the caller reaches libvirt: in the daemon, a bridge to the
    hypervisor adapter's thread; in tests, ``lambda fn: fn(conn)``.
    """

    def __init__(self, run: Any, domain: str, *, quiesce: bool | None = None) -> None:
        self._run = run
        self.domain = domain
        self.quiesce = quiesce

    def running(self) -> bool:
        return bool(self._run(lambda conn: is_running(conn, self.domain)))

    def freeze(self, new_overlays: Mapping[str, Path], description: str) -> None:
        self._run(
            lambda conn: freeze_disks(
                conn, self.domain, new_overlays, quiesce=self.quiesce, description=description
            )
        )

    def commit(self, disk: str, top: Path, base: Path) -> None:
        self._run(lambda conn: block_commit(conn, self.domain, disk, top, base))

    def sources(self) -> dict[str, str]:
        """``{disk name: file the running guest writes to}``."""
        return dict(self._run(lambda conn: domain_disk_sources(conn, self.domain)))
