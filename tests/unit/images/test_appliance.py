"""The appliance build's pure parts and the counter-disk parser."""

import gzip
import stat
import struct
import zlib

import pytest

from meshcloud.core.errors import InvalidInput
from meshcloud.images import appliance_disk as disk
from meshcloud.images.appliance import (
    BuildError,
    CpioEntry,
    cpio_newc,
    gzip_reproducible,
    initramfs_entries,
    module_name,
    pick_kernel,
    resolve_modules,
)

MODULES_DEP = """\
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/block/virtio_blk.ko.xz: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/drivers/input/evdev.ko:
kernel/a/loop-a.ko: kernel/b/loop_b.ko
kernel/b/loop_b.ko: kernel/a/loop-a.ko
"""


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("kernel/drivers/net/virtio_net.ko", "virtio_net"),
        ("kernel/drivers/block/virtio_blk.ko.xz", "virtio_blk"),
        ("kernel/drivers/char/hw_random/virtio-rng.ko.zst", "virtio_rng"),
    ],
)
def test_module_name(path: str, name: str) -> None:
    assert module_name(path) == name


@pytest.mark.parametrize(
    ("wanted", "builtin", "expected"),
    [
        (["virtio_ring"], "", ["virtio/virtio_ring.ko"]),
        (["virtio_blk"], "", ["virtio/virtio_ring.ko", "virtio/virtio.ko", "block/virtio_blk.ko.xz"]),
        (
            ["virtio_pci", "virtio_blk"],
            "",
            ["virtio/virtio_pci_modern_dev.ko", "virtio/virtio_ring.ko", "virtio/virtio.ko",
             "virtio/virtio_pci.ko", "block/virtio_blk.ko.xz"],
        ),
        (
            ["virtio_net"],
            "",
            ["core/failover.ko", "net/net_failover.ko", "virtio/virtio_ring.ko",
             "virtio/virtio.ko", "net/virtio_net.ko"],
        ),
        (["virtio_blk", "evdev"], "kernel/drivers/block/virtio_blk.ko\n", ["input/evdev.ko"]),
    ],
)  # fmt: skip
def test_resolve_modules_loads_dependencies_first(
    wanted: list[str], builtin: str, expected: list[str]
) -> None:
    got = resolve_modules(MODULES_DEP, builtin, wanted)
    assert [p.split("/", 2)[-1] for p in got] == expected


@pytest.mark.parametrize(
    ("wanted", "message"), [(["nope"], "neither built in"), (["loop_a"], "cycle")]
)
def test_resolve_modules_refuses_missing_and_cycles(wanted: list[str], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        resolve_modules(MODULES_DEP, "", wanted)


def test_pick_kernel_takes_the_newest_cloud_kernel() -> None:
    names = ["vmlinuz-6.1.0-9-cloud-amd64", "vmlinuz-6.1.0-56-cloud-amd64", "vmlinuz-6.9.0-amd64",
             "config-6.1.0-99-cloud-amd64", "initrd.img-6.1.0-56-cloud-amd64"]  # fmt: skip
    assert pick_kernel(names) == "6.1.0-56-cloud-amd64"
    with pytest.raises(BuildError, match="linux-image-cloud-amd64"):
        pick_kernel(["vmlinuz-6.1.0-9-amd64"])


def _parse_cpio(data: bytes) -> dict[str, tuple[int, bytes]]:
    members: dict[str, tuple[int, bytes]] = {}
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701"
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        assert fields[5] == 0  # mtime fixed
        name_start = pos + 110
        name = data[name_start : name_start + namesize - 1].decode()
        body = name_start + namesize + (-(name_start + namesize) % 4)
        if name == "TRAILER!!!":
            return members
        members[name] = (mode, data[body : body + size])
        pos = body + size + (-(body + size) % 4)


def test_initramfs_is_reproducible_and_complete() -> None:
    kwargs = {
        "busybox": b"BB",
        "program": b"PROG",
        "rootfs": {"etc/inittab": (0o644, b"::sysinit:/etc/rc.sh\n"), "etc/acpi/PWRF/x": (0o755, b"#!/bin/sh\n")},
        "modules": [("/lib/modules/v/kernel/a/virtio.ko", b"\x7fELF1"), ("/lib/modules/v/kernel/b/virtio_blk.ko.xz", b"\x7fELF2")],
    }  # fmt: skip
    first = cpio_newc(initramfs_entries(**kwargs))  # type: ignore[arg-type]
    assert first == cpio_newc(list(reversed(initramfs_entries(**kwargs))))  # type: ignore[arg-type]
    members = _parse_cpio(first)
    assert stat.S_ISLNK(members["init"][0]) and members["init"][1] == b"bin/busybox"
    assert members["bin/mcappliance"] == (stat.S_IFREG | 0o755, b"PROG")
    assert stat.S_ISCHR(members["dev/console"][0])
    assert stat.S_ISDIR(members["etc/acpi/PWRF"][0])
    assert members["lib/modules/load-order"][1] == b"virtio.ko\nvirtio_blk.ko\n"
    assert members["lib/modules/virtio_blk.ko"][1] == b"\x7fELF2"
    assert gzip_reproducible(first) == gzip_reproducible(first)
    assert gzip.decompress(gzip_reproducible(first)) == first


def test_cpio_pads_names_and_data_to_four_bytes() -> None:
    data = cpio_newc([CpioEntry("a", stat.S_IFREG | 0o644, b"xyz")])
    assert len(data) % 4 == 0
    assert _parse_cpio(data)["a"][1] == b"xyz"


def _disk(records: dict[int, bytes] | None = None, header: bytes | None = None) -> bytearray:
    head = bytearray(disk.COUNTER_REGION_BYTES)
    head[: disk.SECTOR_BYTES] = disk.encode_header() if header is None else header
    for offset, block in (records or {}).items():
        head[offset : offset + len(block)] = block
    return head


def test_blank_disk_has_no_counter() -> None:
    assert disk.last_counter(bytes(disk.COUNTER_REGION_BYTES)) == disk.NO_COUNTER
    assert disk.last_counter(bytes(_disk())) == (0, 0.0)


def test_last_counter_is_the_highest_valid_record_and_survives_the_ring_wrap() -> None:
    seqs = [disk.LOG_SLOTS - 1, disk.LOG_SLOTS, disk.LOG_SLOTS + 1]  # slot LOG_SLOTS-1, 0, 1
    head = _disk({disk.record_offset(s): disk.encode_record(s, s * 100_000_000) for s in seqs})
    assert [r.seq for r in disk.parse_counter_log(bytes(head))] == seqs
    assert disk.last_counter(bytes(head)) == (disk.LOG_SLOTS + 1, (disk.LOG_SLOTS + 1) / 10)


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda rec: rec[:100] + b"X" + rec[101:],  # torn: CRC fails
        lambda rec: b"MCCNTR02" + rec[8:],  # wrong magic
        lambda rec: rec[:508] + struct.pack("<I", 0),  # zero CRC
    ],
)
def test_torn_newest_record_is_ignored(corrupt) -> None:  # type: ignore[no-untyped-def]
    good = {disk.record_offset(s): disk.encode_record(s, s) for s in (1, 2)}
    good[disk.record_offset(3)] = corrupt(disk.encode_record(3, 3))
    assert disk.last_counter(bytes(_disk(good))).seq == 2


def test_record_in_the_wrong_slot_is_ignored() -> None:
    head = _disk({disk.record_offset(5): disk.encode_record(6, 6)})
    assert disk.last_counter(bytes(head)) == disk.NO_COUNTER


def test_foreign_and_newer_headers_are_refused() -> None:
    with pytest.raises(InvalidInput, match="no meshcloud counter header"):
        disk.parse_counter_log(bytes(_disk(header=b"\xeb\x63\x90" + bytes(509))))
    newer = bytearray(disk.encode_header())
    newer[8:12] = struct.pack("<I", 2)
    newer[508:] = struct.pack("<I", zlib.crc32(bytes(newer[:508])))
    with pytest.raises(InvalidInput, match="layout version 2"):
        disk.parse_counter_log(bytes(_disk(header=bytes(newer))))
    with pytest.raises(InvalidInput, match="too small"):
        disk.parse_counter_log(b"\0" * 4096)
