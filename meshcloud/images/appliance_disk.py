"""The demo appliance's data-disk layout, and reading its counter from the host.

The guest program (rack-images/appliances/demo/mcappliance.c) writes, on the
raw data disk (no filesystem), all integers little-endian:

- sector 0, the header (512 bytes): ``MCDISK01``, u32 layout version (1),
  u32 record size (512), u64 log offset (4096), u64 log slots (8192),
  u64 data offset (16 MiB), zero padding, u32 CRC-32 of bytes 0-507 at 508;
- the counter log, a ring of 8192 records of 512 bytes from offset 4096:
  record ``seq`` sits in slot ``seq % 8192``; each holds ``MCCNTR01``,
  u64 seq (from 1), u64 wall-clock time in ns, zero padding, u32 CRC-32 of
  bytes 0-507 at 508. A record is written with O_DIRECT|O_DSYNC and the
  counter advances only after the write returned;
- from 16 MiB to the end: random data written at ``meshcloud.write_mbps``.

The last durable counter value is the valid record with the highest seq.
A torn or half-written record fails its CRC and is ignored, which is right:
it was never acknowledged. See docs/appliance.md.
"""

from __future__ import annotations

import struct
import tempfile
import zlib
from pathlib import Path
from typing import NamedTuple

from meshcloud.core.errors import InvalidInput
from meshcloud.hypervisor.qemu_img import read_head_argv, run_qemu_img

LAYOUT_VERSION = 1
SECTOR_BYTES = 512
HEADER_MAGIC = b"MCDISK01"
RECORD_MAGIC = b"MCCNTR01"
RECORD_BYTES = 512
LOG_OFFSET = 4096
LOG_SLOTS = 8192
DATA_OFFSET = 16 << 20
COUNTER_REGION_BYTES = LOG_OFFSET + LOG_SLOTS * RECORD_BYTES  # what the reader needs
TICK_S = 0.1  # the guest appends one record every 100 ms


class CounterValue(NamedTuple):
    """One durable counter record: its sequence number and wall-clock time (s)."""

    seq: int
    timestamp: float


NO_COUNTER = CounterValue(0, 0.0)


def _crc_ok(block: bytes) -> bool:
    stored: int = struct.unpack_from("<I", block, 508)[0]
    return zlib.crc32(block[:508]) == stored


def encode_header() -> bytes:
    """The header sector the guest writes on a blank disk (used by the build and tests)."""
    body = HEADER_MAGIC + struct.pack(
        "<IIQQQ", LAYOUT_VERSION, RECORD_BYTES, LOG_OFFSET, LOG_SLOTS, DATA_OFFSET
    )
    body = body.ljust(508, b"\0")
    return body + struct.pack("<I", zlib.crc32(body))


def encode_record(seq: int, timestamp_ns: int) -> bytes:
    """One counter record as the guest writes it (used by tests)."""
    body = (RECORD_MAGIC + struct.pack("<QQ", seq, timestamp_ns)).ljust(508, b"\0")
    return body + struct.pack("<I", zlib.crc32(body))


def record_offset(seq: int) -> int:
    """Byte offset of record ``seq`` on the disk."""
    return LOG_OFFSET + (seq % LOG_SLOTS) * RECORD_BYTES


def parse_counter_log(head: bytes) -> list[CounterValue]:
    """Every valid record in the first COUNTER_REGION_BYTES of a disk, by seq.

    A blank disk (all-zero header) has no records. A header that is neither
    blank nor ours raises InvalidInput.
    """
    if len(head) < COUNTER_REGION_BYTES:
        raise InvalidInput(
            f"counter region is {COUNTER_REGION_BYTES} bytes, got only {len(head)}:"
            " the disk is too small to be an appliance data disk"
        )
    header = head[:SECTOR_BYTES]
    if header == bytes(SECTOR_BYTES):
        return []
    if header != encode_header():
        if header[:8] == HEADER_MAGIC and _crc_ok(header):
            (version,) = struct.unpack_from("<I", header, 8)
            raise InvalidInput(
                f"data disk has counter layout version {version}; this meshcloud reads"
                f" version {LAYOUT_VERSION}: rebuild the appliance or upgrade meshcloud"
            )
        raise InvalidInput("data disk has no meshcloud counter header: is it an appliance disk?")
    records: dict[int, CounterValue] = {}
    for slot in range(LOG_SLOTS):
        start = LOG_OFFSET + slot * RECORD_BYTES
        block = head[start : start + RECORD_BYTES]
        if block[:8] != RECORD_MAGIC or not _crc_ok(block):
            continue
        seq, ts_ns = struct.unpack_from("<QQ", block, 8)
        if seq == 0 or seq % LOG_SLOTS != slot:
            continue
        records[seq] = CounterValue(seq, ts_ns / 1e9)
    return [records[s] for s in sorted(records)]


def last_counter(head: bytes) -> CounterValue:
    """The last durable counter value in a disk head, or NO_COUNTER (0, 0.0)."""
    records = parse_counter_log(head)
    return records[-1] if records else NO_COUNTER


def read_disk_head(image: Path, *, fmt: str = "qcow2") -> bytes:
    """The first COUNTER_REGION_BYTES of the guest-visible disk (follows backing files)."""
    with tempfile.TemporaryDirectory(prefix="mc-counter-") as tmp:
        out = Path(tmp) / "head.raw"
        run_qemu_img(read_head_argv(image, out, COUNTER_REGION_BYTES, fmt=fmt), timeout_s=60)
        return out.read_bytes()


def read_counter_log(image: Path, *, fmt: str = "qcow2") -> list[CounterValue]:
    """Every valid counter record on a data disk image (up to the last 8192), by seq."""
    return parse_counter_log(read_disk_head(image, fmt=fmt))


def read_counter_from_image(image: Path, *, fmt: str = "qcow2") -> CounterValue:
    """The last durable counter value on a data disk image: ``(seq, timestamp)``.

    Works on a qcow2 overlay chain and on an image a running QEMU has open
    (it reads what the guest had flushed). Returns ``(0, 0.0)`` for a blank
    disk; raises InvalidInput for a disk that is not an appliance data disk.
    """
    return last_counter(read_disk_head(image, fmt=fmt))
