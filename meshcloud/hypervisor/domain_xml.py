"""Domain XML for an appliance: a pure function of its spec and host-side details.

Nothing is escaped by hand: the document is built with xml.etree, and every
name is validated first (the spec validates itself; this module validates
the host-side details), so a hostile name never reaches libvirt.
"""

from __future__ import annotations

import ipaddress
import os
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from meshcloud.core.errors import InvalidInput
from meshcloud.core.models import ApplianceSpec, appliance_mac
from meshcloud.core.names import validate_name
from meshcloud.lab.netns import NetnsError, check_ifname

DOMAIN_PREFIX = "mc-"
METADATA_NS = "https://meshcloud.invalid/xmlns/appliance/1"
_UUID_NS = uuid.UUID("5d0b8f7e-52a1-4c55-9b1e-6d3c0e1f4a77")
MAX_CLUSTER_ID_LEN = 128
DEFAULT_HTTP_PORT = 80
_DISK_TARGETS = "abcdefgh"  # MAX_DISKS in the core models is 8


class Accel(StrEnum):
    """How QEMU runs guest code: KVM acceleration or TCG emulation."""

    KVM = "kvm"
    TCG = "tcg"

    @property
    def domain_type(self) -> str:
        return "kvm" if self is Accel.KVM else "qemu"


def domain_name(appliance: str) -> str:
    """The libvirt domain name of an appliance (prefixed, so others' domains are left alone)."""
    return DOMAIN_PREFIX + validate_name("appliance", appliance)


def appliance_of(domain: str) -> str | None:
    """The appliance name of a libvirt domain, or None if the domain is not meshcloud's."""
    if not domain.startswith(DOMAIN_PREFIX):
        return None
    name = domain[len(DOMAIN_PREFIX) :]
    try:
        return validate_name("appliance", name)
    except InvalidInput:
        return None


def appliance_uuid(cluster_id: str, appliance: str) -> str:
    """A stable domain UUID: the same appliance has the same UUID on every rack."""
    return str(uuid.uuid5(_UUID_NS, f"{cluster_id}/{appliance}"))


def check_path(kind: str, path: Path) -> Path:
    """An absolute path with no control characters (which XML 1.0 cannot carry)."""
    text = os.fspath(path)
    if not os.path.isabs(text):
        raise InvalidInput(f"{kind} path {text!r} must be absolute")
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise InvalidInput(f"{kind} path {text!r} contains control characters")
    if "/../" in text + "/":
        raise InvalidInput(f"{kind} path {text!r} must not contain '..'")
    return path


def _check_ifname(kind: str, name: str) -> str:
    try:
        return check_ifname(name)
    except NetnsError as exc:
        raise InvalidInput(f"{kind}: {exc}") from None


def tap_name(appliance: str) -> str:
    """A stable tap name for an appliance, at most 15 characters (the kernel's limit)."""
    validate_name("appliance", appliance)
    return "mct" + uuid.uuid5(_UUID_NS, appliance).hex[:12]


@dataclass(frozen=True)
class DiskAttachment:
    """Where one of the spec's disks lives on this rack."""

    name: str
    path: Path
    format: str = "qcow2"

    def __post_init__(self) -> None:
        validate_name("disk", self.name)
        check_path(f"disk {self.name}", self.path)
        if self.format not in ("qcow2", "raw"):
            raise InvalidInput(
                f"disk {self.name}: format must be qcow2 or raw, not {self.format!r}"
            )


@dataclass(frozen=True)
class NetworkAttachment:
    """The rack segment the appliance joins: a bridge, and how the guest reaches the rest."""

    bridge: str
    prefix_len: int = 24
    gateway: str | None = None
    tap: str | None = None

    def __post_init__(self) -> None:
        _check_ifname("bridge", self.bridge)
        if self.tap is not None:
            _check_ifname("tap", self.tap)
            if self.tap.startswith(("vnet", "macvtap", "macvlan")):
                raise InvalidInput(f"tap name {self.tap!r} uses a prefix libvirt reserves")
        if isinstance(self.prefix_len, bool) or not 1 <= self.prefix_len <= 32:
            raise InvalidInput(f"prefix_len ({self.prefix_len}) must be between 1 and 32")
        if self.gateway is not None:
            try:
                ipaddress.IPv4Address(self.gateway)
            except ValueError:
                raise InvalidInput(f"gateway {self.gateway!r} is not an IPv4 address") from None


@dataclass(frozen=True)
class KernelBoot:
    """Boot straight from a kernel and initramfs (the demo appliance)."""

    kernel: Path
    initrd: Path

    def __post_init__(self) -> None:
        check_path("kernel", self.kernel)
        check_path("initrd", self.initrd)


@dataclass(frozen=True)
class HostDetails:
    """What only the rack knows: where the disks are, which bridge, how to boot, KVM or not."""

    cluster_id: str
    disks: tuple[DiskAttachment, ...] = ()
    network: NetworkAttachment | None = None
    boot: KernelBoot | None = None
    accel: Accel = Accel.TCG
    epoch: int = 0
    console_log: Path | None = None
    machine: str = "pc"
    extra_cmdline: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        cid = self.cluster_id
        if not isinstance(cid, str) or not 0 < len(cid) <= MAX_CLUSTER_ID_LEN:
            raise InvalidInput(f"cluster_id must be 1-{MAX_CLUSTER_ID_LEN} characters")
        if not all(c.isascii() and (c.isalnum() or c in "-_.") for c in cid):
            raise InvalidInput(
                f"cluster_id {cid[:80]!r} may hold only ASCII letters, digits, '-_.'"
            )
        if isinstance(self.epoch, bool) or not 0 <= self.epoch < 1 << 62:
            raise InvalidInput(f"epoch ({self.epoch}) must be a non-negative integer")
        if self.console_log is not None:
            check_path("console log", self.console_log)
        if self.machine not in ("pc", "q35"):
            raise InvalidInput(f"machine must be 'pc' or 'q35', not {self.machine!r}")
        if not isinstance(self.accel, Accel):
            raise InvalidInput(f"accel must be kvm or tcg, not {self.accel!r}")


def kernel_cmdline(spec: ApplianceSpec, host: HostDetails) -> str:
    """The kernel command line of a kernel-booted appliance (see docs/appliance.md)."""
    args = ["console=ttyS0", "quiet", "panic=-1", f"meshcloud.name={spec.name}"]
    if spec.ip is not None and host.network is not None:
        args.append(f"meshcloud.ip={spec.ip}/{host.network.prefix_len}")
        if host.network.gateway is not None:
            args.append(f"meshcloud.gw={host.network.gateway}")
    http = next((p.port for p in spec.ports if p.name == "http"), DEFAULT_HTTP_PORT)
    args.append(f"meshcloud.port={http}")
    args += host.extra_cmdline
    if spec.boot_args:
        args += spec.boot_args.split()
    return " ".join(args)


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrs)
    if text is not None:
        el.text = text
    return el


def build_domain_xml(spec: ApplianceSpec, host: HostDetails) -> str:
    """The libvirt domain XML for ``spec`` on this rack. Pure: no I/O."""
    if not isinstance(spec, ApplianceSpec):
        raise InvalidInput("build_domain_xml needs an ApplianceSpec")
    want = [d.name for d in spec.disks]
    have = [d.name for d in host.disks]
    if want != have:
        raise InvalidInput(
            f"appliance {spec.name}: disks attached {have} do not match the spec's {want}"
        )
    for extra in host.extra_cmdline:
        if not extra or any(c.isspace() or not c.isprintable() or not c.isascii() for c in extra):
            raise InvalidInput(f"kernel argument {extra!r} must be printable ASCII without spaces")

    ET.register_namespace("meshcloud", METADATA_NS)
    dom = ET.Element("domain", type=host.accel.domain_type)
    _sub(dom, "name", domain_name(spec.name))
    _sub(dom, "uuid", appliance_uuid(host.cluster_id, spec.name))
    _sub(dom, "title", f"meshcloud appliance {spec.name}")
    meta = _sub(dom, "metadata")
    ET.SubElement(
        meta,
        f"{{{METADATA_NS}}}appliance",
        name=spec.name,
        cluster=host.cluster_id,
        epoch=str(host.epoch),
        priority=str(spec.priority),
    )
    _sub(dom, "memory", str(spec.memory_mib), unit="MiB")
    _sub(dom, "vcpu", str(spec.vcpus))
    os_el = _sub(dom, "os")
    _sub(os_el, "type", "hvm", arch="x86_64", machine=host.machine)
    if host.boot is not None:
        _sub(os_el, "kernel", str(host.boot.kernel))
        _sub(os_el, "initrd", str(host.boot.initrd))
        _sub(os_el, "cmdline", kernel_cmdline(spec, host))
    else:
        _sub(os_el, "boot", dev="hd")
    features = _sub(dom, "features")
    _sub(features, "acpi")
    _sub(features, "apic")
    if host.accel is Accel.KVM:
        _sub(dom, "cpu", mode="host-passthrough")
    _sub(dom, "clock", offset="utc")
    _sub(dom, "on_poweroff", "destroy")
    _sub(dom, "on_reboot", "restart")
    _sub(dom, "on_crash", "destroy")

    devices = _sub(dom, "devices")
    for index, disk in enumerate(host.disks):
        el = _sub(devices, "disk", type="file", device="disk")
        # writeback honours the guest's flushes (O_DSYNC, fsync) and works on any filesystem.
        _sub(el, "driver", name="qemu", type=disk.format, cache="writeback", discard="unmap")
        _sub(el, "source", file=str(disk.path))
        _sub(el, "target", dev=f"vd{_DISK_TARGETS[index]}", bus="virtio")
        _sub(el, "serial", disk.name)
    if host.network is not None:
        net = host.network
        el = _sub(devices, "interface", type="bridge")
        _sub(el, "mac", address=appliance_mac(host.cluster_id, spec.name))
        _sub(el, "source", bridge=net.bridge)
        if net.tap is not None:
            _sub(el, "target", dev=net.tap)
        _sub(el, "model", type="virtio")
    if host.console_log is not None:
        serial = _sub(devices, "serial", type="file")
        _sub(serial, "source", path=str(host.console_log), append="on")
        _sub(serial, "target", port="0")
    else:
        serial = _sub(devices, "serial", type="null")
        _sub(serial, "target", port="0")
    _sub(devices, "memballoon", model="none")
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode")
