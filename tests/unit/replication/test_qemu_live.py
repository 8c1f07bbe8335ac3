import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from meshcloud.core.errors import InvalidInput
from meshcloud.replication.live import disk_targets, has_guest_agent, snapshot_xml
from meshcloud.replication.qemu import (
    commit_argv,
    flatten_argv,
    parse_qcow2_header,
    rebase_unsafe_argv,
)


def header(size: int, cluster_bits: int = 12, backing: bytes = b"") -> bytes:
    head = bytearray(4096)
    off = 200 if backing else 0
    struct.pack_into(">4sIQIIQ", head, 0, b"QFI\xfb", 3, off, len(backing), cluster_bits, size)
    head[off : off + len(backing)] = backing
    return bytes(head)


def test_parse_qcow2_header() -> None:
    h = parse_qcow2_header(header(1 << 30, backing=b"g000000000004.qcow2"))
    assert (h.virtual_size, h.cluster_bytes, h.backing_name) == (
        1 << 30,
        4096,
        "g000000000004.qcow2",
    )
    assert parse_qcow2_header(header(512)).backing_name == ""
    with pytest.raises(InvalidInput):
        parse_qcow2_header(b"RAW" + bytes(200))


def test_commit_keeps_the_overlay_and_rebase_only_touches_the_header() -> None:
    assert commit_argv(Path("/v/a/d/g1.qcow2"))[:4] == ["qemu-img", "commit", "-q", "-d"]
    argv = rebase_unsafe_argv(Path("/v/a/d/.recv.qcow2"), "g000000000004.qcow2")
    assert "-u" in argv and argv[argv.index("-b") + 1] == "g000000000004.qcow2"
    with pytest.raises(InvalidInput):
        rebase_unsafe_argv(Path("/v/x"), "../other/g.qcow2")


def test_flatten_reads_a_live_chain() -> None:
    argv = flatten_argv(Path("/v/top.qcow2"), Path("/v/seed.qcow2"))
    assert "-U" in argv and "cluster_size=4096" in argv


def test_snapshot_xml_freezes_only_the_listed_disks() -> None:
    xml = snapshot_xml({"vdb": Path("/v/a/data/g000000000002.qcow2")}, ["vda"], "gen 1")
    root = ET.fromstring(xml)
    disks = {d.get("name"): d for d in root.iterfind("./disks/disk")}
    assert disks["vdb"].get("snapshot") == "external"
    assert disks["vdb"].find("source").get("file") == "/v/a/data/g000000000002.qcow2"
    assert disks["vdb"].find("driver").get("type") == "qcow2"
    assert disks["vda"].get("snapshot") == "no"
    with pytest.raises(InvalidInput):
        snapshot_xml({"vd'b": Path("/x")}, [], "x")


DOMAIN = """<domain type='qemu'><name>mc-voip</name><devices>
<disk type='file' device='disk'><source file='/v/voip/root/g000000000001.qcow2'/><target dev='vda' bus='virtio'/><serial>root</serial></disk>
<disk type='file' device='disk'><source file='/v/voip/data/g000000000001.qcow2'/><target dev='vdb' bus='virtio'/><serial>data</serial></disk>
<disk type='file' device='cdrom'><target dev='sda'/></disk>
<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
</devices></domain>"""


def test_disk_targets_by_serial() -> None:
    assert disk_targets(DOMAIN) == {
        "root": ("vda", "/v/voip/root/g000000000001.qcow2"),
        "data": ("vdb", "/v/voip/data/g000000000001.qcow2"),
    }
    assert has_guest_agent(DOMAIN)
    assert not has_guest_agent("<domain><devices/></domain>")
