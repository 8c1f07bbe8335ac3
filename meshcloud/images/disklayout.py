"""The rack OS disk layout, and a parser for the MBR partition table (pure, no I/O).

The rack image is an MBR disk with two primary partitions::

    0        1 MiB        5 MiB   8 MiB                                end
    | MBR +  | identity   | gap   | root (ext4, bootable, extlinux)    |
    | extlinux mbr.bin    |       |                                    |

The identity partition (type 0xda, "non-FS data") holds one identity
record that ``meshcloud flash`` writes (see :mod:`meshcloud.images.identity`).
It comes first so that the root partition is last and can grow into the
rest of the disk on first boot.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from meshcloud.core.errors import InvalidInput

SECTOR_BYTES = 512
MIB = 1024 * 1024
IDENTITY_START_BYTES = 1 * MIB
IDENTITY_SIZE_BYTES = 4 * MIB
ROOT_START_BYTES = 8 * MIB
IDENTITY_TYPE = 0xDA
ROOT_TYPE = 0x83
DISK_ID = 0x6D657368  # "mesh": fixed so that the image is reproducible
ROOT_PARTUUID = f"{DISK_ID:08x}-02"


@dataclass(frozen=True)
class Partition:
    """One MBR partition entry; offsets in bytes."""

    number: int
    type_id: int
    start_bytes: int
    size_bytes: int
    bootable: bool

    @property
    def end_bytes(self) -> int:
        return self.start_bytes + self.size_bytes


@dataclass(frozen=True)
class DiskLayout:
    """Where the partitions of a rack image go, for a root file system of a given size."""

    root_size_bytes: int

    @property
    def identity(self) -> Partition:
        return Partition(1, IDENTITY_TYPE, IDENTITY_START_BYTES, IDENTITY_SIZE_BYTES, False)

    @property
    def root(self) -> Partition:
        return Partition(2, ROOT_TYPE, ROOT_START_BYTES, self.root_size_bytes, True)

    @property
    def total_bytes(self) -> int:
        return ROOT_START_BYTES + self.root_size_bytes


def layout_for_root(root_size_bytes: int) -> DiskLayout:
    """The layout for a root file system of ``root_size_bytes`` (a multiple of 1 MiB)."""
    if root_size_bytes <= 0 or root_size_bytes % MIB:
        raise InvalidInput(f"root size {root_size_bytes} must be a positive multiple of 1 MiB")
    return DiskLayout(root_size_bytes)


def sfdisk_script(layout: DiskLayout) -> str:
    """The input for ``sfdisk`` that writes ``layout``'s partition table."""
    ident, root = layout.identity, layout.root
    s = SECTOR_BYTES
    return (
        "label: dos\n"
        f"label-id: 0x{DISK_ID:08x}\n"
        "unit: sectors\n"
        f"start={ident.start_bytes // s}, size={ident.size_bytes // s}, type={IDENTITY_TYPE:x}\n"
        f"start={root.start_bytes // s}, size={root.size_bytes // s}, type={ROOT_TYPE:x},"
        " bootable\n"
    )


def parse_mbr(sector0: bytes) -> list[Partition]:
    """The primary partitions in an MBR sector; raises InvalidInput if it is not an MBR."""
    if len(sector0) < SECTOR_BYTES or sector0[510:512] != b"\x55\xaa":
        raise InvalidInput("no MBR partition table (the boot signature 55 aa is missing)")
    parts = []
    for index in range(4):
        entry = sector0[446 + 16 * index : 446 + 16 * (index + 1)]
        status, type_id = entry[0], entry[4]
        start_lba, sectors = struct.unpack_from("<II", entry, 8)
        if type_id == 0 or sectors == 0:
            continue
        parts.append(
            Partition(
                number=index + 1,
                type_id=type_id,
                start_bytes=start_lba * SECTOR_BYTES,
                size_bytes=sectors * SECTOR_BYTES,
                bootable=status == 0x80,
            )
        )
    return parts


def find_identity_partition(sector0: bytes) -> Partition:
    """The identity partition of a rack image; raises InvalidInput if there is none."""
    found = [p for p in parse_mbr(sector0) if p.type_id == IDENTITY_TYPE]
    if len(found) != 1:
        raise InvalidInput(
            f"expected one identity partition (type 0x{IDENTITY_TYPE:02x}), found {len(found)}:"
            " is this a meshcloud rack image (`meshcloud image build`)?"
        )
    return found[0]
