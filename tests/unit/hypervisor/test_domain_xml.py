"""The domain XML builder: table-driven, including hostile names."""

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from meshcloud.core.errors import InvalidInput
from meshcloud.core.models import ApplianceSpec, DiskSpec, PortSpec, appliance_mac
from meshcloud.hypervisor.domain_xml import (
    METADATA_NS,
    Accel,
    DiskAttachment,
    HostDetails,
    KernelBoot,
    NetworkAttachment,
    appliance_of,
    appliance_uuid,
    build_domain_xml,
    domain_name,
    kernel_cmdline,
    tap_name,
)

HOSTILE_NAMES = [
    "",
    "a'b",
    'a"b',
    "a<b",
    "a>b",
    "a&b",
    "a/b",
    "..",
    "../etc",
    "a b",
    "a\x00b",
    "a\nb",
    "a\x1bb",
    "x" * 64,
    "\u0430pp",  # Cyrillic a
    "app\u200b",  # zero-width space
    "Demo",
    "-demo",
    "demo-",
    "de--mo",
]

SPEC = ApplianceSpec(
    name="tile-cache",
    image="demo",
    vcpus=2,
    memory_mib=192,
    disks=(DiskSpec("data", 1), DiskSpec("logs", 2)),
    priority=700,
    ports=(PortSpec("http", 8080),),
    ip="10.42.0.10",
    boot_args="meshcloud.write_mbps=5",
)
DISKS = (
    DiskAttachment("data", Path("/var/lib/meshcloud/volumes/tile-cache/data/overlay.qcow2")),
    DiskAttachment("logs", Path("/var/lib/meshcloud/volumes/tile-cache/logs/overlay.qcow2")),
)
NET = NetworkAttachment("mcbr0", 24, "10.42.0.1", tap_name("tile-cache"))
BOOT = KernelBoot(Path("/srv/appliance/vmlinuz"), Path("/srv/appliance/initramfs.img"))


def host(**changes: object) -> HostDetails:
    fields: dict[str, object] = {
        "cluster_id": "c0ffee",
        "disks": DISKS,
        "network": NET,
        "boot": BOOT,
        "accel": Accel.TCG,
        "epoch": 7,
    }
    fields.update(changes)
    return HostDetails(**fields)  # type: ignore[arg-type]


def parse(xml: str) -> ET.Element:
    return ET.fromstring(xml)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("name", "mc-tile-cache"),
        ("uuid", appliance_uuid("c0ffee", "tile-cache")),
        ("memory", "192"),
        ("vcpu", "2"),
        ("os/type", "hvm"),
        ("os/kernel", "/srv/appliance/vmlinuz"),
        ("os/initrd", "/srv/appliance/initramfs.img"),
        ("on_poweroff", "destroy"),
        ("on_crash", "destroy"),
    ],
)
def test_element_text(path: str, expected: str) -> None:
    assert parse(build_domain_xml(SPEC, host())).findtext(path) == expected


@pytest.mark.parametrize(
    ("path", "attribute", "expected"),
    [
        (".", "type", "qemu"),
        ("memory", "unit", "MiB"),
        ("os/type", "machine", "pc"),
        ("clock", "offset", "utc"),
        ("devices/disk[1]/source", "file", str(DISKS[0].path)),
        ("devices/disk[1]/target", "dev", "vda"),
        ("devices/disk[1]/target", "bus", "virtio"),
        ("devices/disk[1]/driver", "type", "qcow2"),
        ("devices/disk[1]/driver", "cache", "writeback"),
        ("devices/disk[2]/source", "file", str(DISKS[1].path)),
        ("devices/disk[2]/target", "dev", "vdb"),
        ("devices/interface", "type", "bridge"),
        ("devices/interface/source", "bridge", "mcbr0"),
        ("devices/interface/mac", "address", appliance_mac("c0ffee", "tile-cache")),
        ("devices/interface/model", "type", "virtio"),
        ("devices/interface/target", "dev", tap_name("tile-cache")),
        ("devices/serial", "type", "null"),
        ("devices/memballoon", "model", "none"),
        (f"metadata/{{{METADATA_NS}}}appliance", "epoch", "7"),
        (f"metadata/{{{METADATA_NS}}}appliance", "name", "tile-cache"),
        (f"metadata/{{{METADATA_NS}}}appliance", "cluster", "c0ffee"),
    ],
)
def test_attributes(path: str, attribute: str, expected: str) -> None:
    el = parse(build_domain_xml(SPEC, host())).find(path)
    assert el is not None, path
    assert el.get(attribute) == expected


@pytest.mark.parametrize(
    ("changes", "check"),
    [
        ({"accel": Accel.KVM}, lambda d: d.get("type") == "kvm" and d.find("cpu") is not None),
        ({"accel": Accel.TCG}, lambda d: d.get("type") == "qemu" and d.find("cpu") is None),
        ({"boot": None}, lambda d: d.find("os/kernel") is None and d.find("os/boot") is not None),
        ({"network": None}, lambda d: d.find("devices/interface") is None),
        (
            {"console_log": Path("/var/log/mc/tile-cache.log")},
            lambda d: d.find("devices/serial/source").get("path") == "/var/log/mc/tile-cache.log",
        ),
        ({"machine": "q35"}, lambda d: d.find("os/type").get("machine") == "q35"),
    ],
)
def test_host_details_shape_the_domain(changes: dict[str, object], check) -> None:  # type: ignore[no-untyped-def]
    assert check(parse(build_domain_xml(SPEC, host(**changes))))


def test_kernel_cmdline_carries_the_network_and_boot_args() -> None:
    line = kernel_cmdline(SPEC, host())
    args = line.split()
    assert "console=ttyS0" in args
    assert "meshcloud.name=tile-cache" in args
    assert "meshcloud.ip=10.42.0.10/24" in args
    assert "meshcloud.gw=10.42.0.1" in args
    assert "meshcloud.port=8080" in args
    assert args[-1] == "meshcloud.write_mbps=5"
    assert parse(build_domain_xml(SPEC, host())).findtext("os/cmdline") == line


def test_kernel_cmdline_without_address_or_http_port() -> None:
    spec = ApplianceSpec(name="quiet", image="demo")
    args = kernel_cmdline(spec, host(network=None, disks=())).split()
    assert not [a for a in args if a.startswith(("meshcloud.ip=", "meshcloud.gw="))]
    assert "meshcloud.port=80" in args


def test_xml_is_deterministic_and_same_identity_on_every_rack() -> None:
    a = build_domain_xml(SPEC, host())
    assert a == build_domain_xml(SPEC, host())
    other_rack = host(disks=tuple(DiskAttachment(d.name, Path("/other") / d.name) for d in DISKS))
    assert parse(build_domain_xml(SPEC, other_rack)).findtext("uuid") == parse(a).findtext("uuid")


def test_paths_are_escaped_by_the_xml_library_not_by_hand() -> None:
    odd = Path("/srv/a&b<c>'\"/data.qcow2")
    xml = build_domain_xml(SPEC, host(disks=(DiskAttachment("data", odd), DISKS[1])))
    assert parse(xml).find("devices/disk/source").get("file") == str(odd)  # type: ignore[union-attr]


@pytest.mark.parametrize("bad", HOSTILE_NAMES)
def test_hostile_names_never_reach_the_xml(bad: str) -> None:
    with pytest.raises(InvalidInput):
        ApplianceSpec(name=bad, image="demo")
    with pytest.raises(InvalidInput):
        ApplianceSpec(name="ok", image=bad)
    with pytest.raises(InvalidInput):
        DiskSpec(bad, 1)
    with pytest.raises(InvalidInput):
        PortSpec(bad, 80)
    with pytest.raises(InvalidInput):
        DiskAttachment(bad, Path("/srv/x.qcow2"))
    with pytest.raises(InvalidInput):
        domain_name(bad)
    with pytest.raises(InvalidInput):
        tap_name(bad)
    assert appliance_of("mc-" + bad) is None


@pytest.mark.parametrize(
    "make",
    [
        lambda: NetworkAttachment("br<0"),
        lambda: NetworkAttachment("a" * 16),
        lambda: NetworkAttachment("br0", tap="vnet7"),  # libvirt's own prefix
        lambda: NetworkAttachment("br0", tap="ta p"),
        lambda: NetworkAttachment("br0", prefix_len=33),
        lambda: NetworkAttachment("br0", gateway='10.0.0.1"/><x'),
        lambda: DiskAttachment("data", Path("relative/data.qcow2")),
        lambda: DiskAttachment("data", Path("/srv/\x00/data.qcow2")),
        lambda: DiskAttachment("data", Path("/srv/../etc/shadow")),
        lambda: DiskAttachment("data", Path("/srv/data.qcow2"), format="vmdk"),
        lambda: KernelBoot(Path("/boot/vmlinuz\n"), Path("/boot/initrd")),
        lambda: host(cluster_id="c'<>"),
        lambda: host(cluster_id=""),
        lambda: host(epoch=-1),
        lambda: host(machine="isapc"),
        lambda: host(console_log=Path("log.txt")),
    ],
)
def test_hostile_host_details_are_refused(make) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidInput):
        make()


@pytest.mark.parametrize("boot_args", ["a;b", "$(reboot)", "a'b", "init=/bin/sh\n", "x" * 300])
def test_hostile_boot_args_are_refused_by_the_model(boot_args: str) -> None:
    with pytest.raises(InvalidInput):
        ApplianceSpec(name="demo", image="demo", boot_args=boot_args)


def test_disks_must_match_the_spec() -> None:
    with pytest.raises(InvalidInput, match="do not match"):
        build_domain_xml(SPEC, host(disks=DISKS[:1]))
    with pytest.raises(InvalidInput, match="do not match"):
        build_domain_xml(SPEC, host(disks=(DISKS[1], DISKS[0])))


@pytest.mark.parametrize("extra", ["", "a b", "a\x00", "é=1"])
def test_extra_kernel_arguments_are_checked(extra: str) -> None:
    with pytest.raises(InvalidInput):
        build_domain_xml(SPEC, host(extra_cmdline=(extra,)))


def test_tap_names_fit_the_kernel_limit_and_differ() -> None:
    taps = {tap_name(n) for n in ("a", "b", "tile-cache", "x" * 63)}
    assert len(taps) == 4
    assert all(len(t) <= 15 and t.startswith("mct") for t in taps)


def test_domain_names_round_trip() -> None:
    assert appliance_of(domain_name("tile-cache")) == "tile-cache"
    assert appliance_of("someone-elses-vm") is None
