"""Flash a rack image to boot disks: mapped blocks only, checked, verified, with identity.

``meshcloud flash IMAGE DEVICE... --rack NAME --kit DIR`` runs in two
phases, like Ganeti's logical units:

1. **check** (:func:`plan_flash`, no side effects): read the bmap and the
   image's partition table, resolve every device, and collect every reason
   to refuse it: mounted (itself, a partition, or a device built on it),
   the disk the running system boots from, the disk holding the image (or a
   loop device backed by the image file), read-only, swap, held by dm/md,
   too small. A refused device is never opened for writing; there is no
   option to override the system-disk refusal.
2. **execute** (:func:`flash_devices`): for each accepted device, in
   parallel, open it exclusively (``O_EXCL``: the kernel refuses a mounted
   device), write each mapped range while hashing it and compare with the
   bmap's checksum, flush, drop the cache and read every range back, then
   write the rack's identity record and read it back. Each device passes or
   fails on its own; every outcome is appended to the kit's
   ``flash-log.jsonl``.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import json
import mmap
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshcloud import __version__
from meshcloud.core.errors import InvalidInput, MeshcloudError
from meshcloud.images.blockdev import (
    SystemView,
    Target,
    flush_buffers,
    ioctl_read_only,
    ioctl_size_bytes,
    refusals,
    resolve_target,
)
from meshcloud.images.bmap import Bmap, BmapRange, read_bmap
from meshcloud.images.disklayout import SECTOR_BYTES, Partition, find_identity_partition
from meshcloud.images.identity import Identity, decode_record, encode_record, record_length
from meshcloud.images.kit import Kit, rack_identity
from meshcloud.images.tools import FlashError, FlashRefused

CHUNK_BYTES = 4 * 1024 * 1024
ALIGN = 4096

# progress(device, phase, done_bytes, total_bytes); phase: write | verify | identity | done
ProgressFn = Callable[[str, str, int, int], None]


@dataclass(frozen=True)
class ImageInfo:
    """A rack image ready to flash: its map, identity area and hash."""

    path: Path
    bmap_path: Path
    bmap: Bmap
    identity_area: Partition
    sha256: str


@dataclass(frozen=True)
class PlannedDevice:
    path: Path
    rack: str
    target: Target | None
    reasons: tuple[str, ...]

    @property
    def accepted(self) -> bool:
        return self.target is not None and not self.reasons


@dataclass(frozen=True)
class FlashPlan:
    image: ImageInfo
    devices: tuple[PlannedDevice, ...]

    @property
    def refused(self) -> list[PlannedDevice]:
        return [d for d in self.devices if not d.accepted]


@dataclass
class DeviceResult:
    device: str
    rack: str
    ok: bool
    error: str = ""
    refused: bool = False
    written_bytes: int = 0
    write_s: float = 0.0
    verify_s: float = 0.0
    started: str = ""
    details: dict[str, str] = field(default_factory=dict)

    @property
    def result(self) -> str:
        return "pass" if self.ok else ("refused" if self.refused else "fail")


def image_sha256(image: Path) -> str:
    """The image's SHA-256: from SHA256SUMS beside it if listed there, else computed."""
    sums = image.parent / "SHA256SUMS"
    try:
        for line in sums.read_text().splitlines():
            digest, _, name = line.partition("  ")
            if name.strip() == image.name and len(digest) == 64:
                return digest
    except OSError:
        pass
    h = hashlib.sha256()
    with open(image, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def load_image(image: Path, bmap_path: Path | None = None) -> ImageInfo:
    """Read the bmap and the identity partition of an image; raises InvalidInput if unusable."""
    bmap_path = bmap_path or image.with_name(image.name + ".bmap")
    if not bmap_path.exists():
        raise InvalidInput(
            f"no block map {bmap_path}: meshcloud flash writes only mapped blocks and needs the"
            " .bmap made by `meshcloud image build` beside the image (or --bmap FILE)"
        )
    bmap = read_bmap(bmap_path)
    try:
        size = image.stat().st_size
        with open(image, "rb") as f:
            sector0 = f.read(SECTOR_BYTES)
    except OSError as exc:
        raise InvalidInput(f"cannot read image {image}: {exc}") from exc
    if size != bmap.image_bytes:
        raise InvalidInput(
            f"{image} is {size} bytes but its bmap says {bmap.image_bytes}: they do not belong"
            " together"
        )
    area = find_identity_partition(sector0)
    if area.end_bytes > bmap.image_bytes:
        raise InvalidInput(f"{image}: the identity partition ends beyond the image")
    return ImageInfo(image, bmap_path, bmap, area, image_sha256(image))


def pair_racks(devices: Sequence[Path], racks: Sequence[str]) -> list[tuple[Path, str]]:
    """One --rack for every device, or one per device in order."""
    if not devices:
        raise InvalidInput("name at least one device to flash")
    if len(racks) == 1:
        return [(d, racks[0]) for d in devices]
    if len(racks) != len(devices):
        raise InvalidInput(
            f"give one --rack for all devices or one per device ({len(devices)}), not {len(racks)}"
        )
    return list(zip(devices, racks, strict=True))


def plan_flash(
    image: ImageInfo,
    devices: Sequence[tuple[Path, str]],
    view: SystemView | None = None,
) -> FlashPlan:
    """Check every device (no writes). Refused devices carry their reasons."""
    view = view or SystemView()
    planned = []
    seen: set[str] = set()
    for path, rack in devices:
        target, reasons = resolve_target(path, view)
        if target is not None:
            if target.name in seen:
                reasons.append("it is named twice in this run")
            seen.add(target.name)
            reasons += refusals(target, image.path, image.bmap.image_bytes, view)
        planned.append(PlannedDevice(path, rack, target, tuple(reasons)))
    return FlashPlan(image, tuple(planned))


# -- execute ---------------------------------------------------------------------------------


class _Device:
    """An exclusively opened device with an aligned buffer, O_DIRECT where possible."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_EXCL | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise FlashRefused(
                    f"{path}: the kernel reports it busy (mounted or in use): nothing written"
                ) from None
            raise FlashError(f"{path}: cannot open for writing: {exc.strerror}") from None
        self.direct_fd: int | None = None
        try:
            self.direct_fd = os.open(path, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)
        except OSError:
            self.direct_fd = None
        self.buffer = mmap.mmap(-1, CHUNK_BYTES)

    def close(self) -> None:
        # The aligned buffer is freed with the object: views of it may still be alive.
        if self.direct_fd is not None:
            os.close(self.direct_fd)
        os.close(self.fd)

    def write(self, data: memoryview, offset: int) -> None:
        fd = self.direct_fd
        if fd is not None and len(data) % ALIGN == 0 and offset % ALIGN == 0:
            try:
                self._write_all(fd, data, offset)
                return
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self.direct_fd = None
                os.close(fd)
        self._write_all(self.fd, data, offset)

    @staticmethod
    def _write_all(fd: int, data: memoryview, offset: int) -> None:
        while data:
            n = os.pwritev(fd, [data], offset)
            if n <= 0:
                raise OSError(errno.EIO, "short write")
            data, offset = data[n:], offset + n

    def read_into(self, length: int, offset: int) -> memoryview:
        """Read ``length`` bytes at ``offset`` into the aligned buffer (bypassing the cache)."""
        view = memoryview(self.buffer)[:length]
        self.pread_into(view, offset)
        return view

    def pread_into(self, view: memoryview, offset: int) -> None:
        """Fill ``view`` (page-aligned) from ``offset``, with O_DIRECT where it applies."""
        length = len(view)
        fd = self.direct_fd if (length % ALIGN == 0 and offset % ALIGN == 0) else None
        got = 0
        while got < length:
            try:
                n = os.preadv(fd if fd is not None else self.fd, [view[got:]], offset + got)
            except OSError as exc:
                if fd is not None and exc.errno == errno.EINVAL:
                    fd = None
                    continue
                raise
            if n <= 0:
                raise FlashError(f"{self.path}: unexpected end of device at byte {offset + got}")
            got += n

    def flush(self) -> None:
        flush_buffers(self.fd)


def _range_label(r: BmapRange, start: int, length: int) -> str:
    return f"blocks {r.first}-{r.last} (bytes {start}-{start + length - 1})"


@dataclass
class _Chunk:
    """One chunk read ahead: its buffer, place, and the range's digest if it ends the range."""

    buf: mmap.mmap
    pos: int
    size: int
    ends: BmapRange | None = None
    digest: str = ""

    @property
    def view(self) -> memoryview:
        return memoryview(self.buf)[: self.size]


class _ReadAhead:
    """Reads the mapped ranges chunk by chunk in a background thread, a few chunks ahead.

    Reading (and, with ``hash_ranges``, hashing) overlaps with what the
    caller does with the previous chunk: writing it, or hashing it.
    Buffers are page-aligned (mmap) for O_DIRECT; the caller gives each
    chunk back with :meth:`release`.
    """

    def __init__(
        self, read: Callable[[memoryview, int], None], bmap: Bmap, hash_ranges: bool, depth: int = 4
    ) -> None:
        self.read = read
        self.bmap = bmap
        self.hash_ranges = hash_ranges
        self.free: queue.Queue[mmap.mmap | None] = queue.Queue()
        for _ in range(depth):
            self.free.put(mmap.mmap(-1, CHUNK_BYTES))
        self.ready: queue.Queue[_Chunk | BaseException | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="flash-read-ahead", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for r, start, length in self.bmap.spans():
                digest = hashlib.sha256() if self.hash_ranges else None
                pos, end = start, start + length
                while pos < end:
                    buf = self.free.get()
                    if buf is None:
                        return  # closed
                    chunk = _Chunk(buf, pos, min(CHUNK_BYTES, end - pos))
                    with chunk.view as view:
                        self.read(view, pos)
                        if digest is not None:
                            digest.update(view)
                    pos += chunk.size
                    if pos >= end:
                        chunk.ends = r
                        chunk.digest = digest.hexdigest() if digest is not None else ""
                    self.ready.put(chunk)
            self.ready.put(None)
        except BaseException as exc:  # handed to the caller, raised there
            self.ready.put(exc)

    def __iter__(self) -> Iterator[_Chunk]:
        while True:
            item = self.ready.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def release(self, chunk: _Chunk) -> None:
        self.free.put(chunk.buf)

    def close(self) -> None:
        self.free.put(None)
        self.thread.join()


def write_ranges(image: ImageInfo, dev: _Device, on_bytes: Callable[[int], None]) -> int:
    """Write every mapped range, checking each range's SHA-256 as it streams; return bytes.

    A background thread reads and hashes the image a few chunks ahead of the writes.
    """
    written = 0
    with open(image.path, "rb", buffering=0) as src:

        def read(view: memoryview, pos: int) -> None:
            if os.preadv(src.fileno(), [view], pos) != len(view):
                raise FlashError(f"{image.path}: short read at byte {pos}")

        ahead = _ReadAhead(read, image.bmap, hash_ranges=True)
        try:
            for chunk in ahead:
                with chunk.view as view:
                    dev.write(view, chunk.pos)
                ahead.release(chunk)
                written += chunk.size
                on_bytes(written)
                r = chunk.ends
                if r is not None and chunk.digest != r.sha256:
                    start, length = r.byte_span(image.bmap.block_bytes, image.bmap.image_bytes)
                    raise FlashError(
                        f"image {_range_label(r, start, length)} does not match its checksum in"
                        f" {image.bmap_path.name}: the image file is corrupt; copy it again"
                        " or rebuild it"
                    )
        finally:
            ahead.close()
    return written


def verify_ranges(image: ImageInfo, dev: _Device, on_bytes: Callable[[int], None]) -> None:
    """Read every mapped range back from the device and compare with the bmap's SHA-256.

    A background thread reads (O_DIRECT, past the cache) while this one hashes.
    """
    done = 0
    digest = hashlib.sha256()
    ahead = _ReadAhead(dev.pread_into, image.bmap, hash_ranges=False)
    try:
        for chunk in ahead:
            with chunk.view as view:
                digest.update(view)
            ahead.release(chunk)
            done += chunk.size
            on_bytes(done)
            r = chunk.ends
            if r is not None:
                if digest.hexdigest() != r.sha256:
                    start, length = r.byte_span(image.bmap.block_bytes, image.bmap.image_bytes)
                    raise FlashError(
                        f"{dev.path}: read-back of {_range_label(r, start, length)} differs from"
                        " the image: the device does not hold what was written (failing medium?)"
                    )
                digest = hashlib.sha256()
    finally:
        ahead.close()


def write_identity(image: ImageInfo, dev: _Device, identity: Identity) -> None:
    """Write the identity record into the identity area and read it back."""
    record = encode_record(identity)
    area = image.identity_area
    if len(record) > area.size_bytes:
        raise FlashError(
            f"identity record ({len(record)} bytes) does not fit the identity partition"
            f" ({area.size_bytes} bytes)"
        )
    buf = mmap.mmap(-1, len(record))  # page-aligned for O_DIRECT
    buf.write(record)
    dev.write(memoryview(buf), area.start_bytes)
    dev.flush()
    header = bytes(dev.read_into(ALIGN, area.start_bytes))
    total = -(-record_length(header) // ALIGN) * ALIGN
    back = bytes(dev.read_into(total, area.start_bytes))
    if back != record or decode_record(back) != identity:
        raise FlashError(f"{dev.path}: the identity record read back differs from what was written")


def flash_one(
    image: ImageInfo,
    device: PlannedDevice,
    identity: Identity,
    progress: ProgressFn,
    view: SystemView,
) -> DeviceResult:
    """Flash one accepted device; never raises for device problems (they become a result)."""
    name = str(device.path)
    result = DeviceResult(name, device.rack, ok=False, started=_now())
    assert device.target is not None
    result.details = view.describe(device.target.name)
    total = image.bmap.mapped_bytes
    dev: _Device | None = None
    try:
        # Checked again just before opening: the plan may be minutes old.
        again = refusals(device.target, image.path, image.bmap.image_bytes, view)
        if again:
            raise FlashRefused(f"refused {name}: " + "; ".join(again))
        dev = _Device(device.path)
        if ioctl_read_only(dev.fd):
            raise FlashRefused(f"{name}: the kernel reports it read-only (BLKROGET)")
        size = ioctl_size_bytes(dev.fd)
        if size < image.bmap.image_bytes:
            raise FlashRefused(f"{name}: {size} bytes is smaller than the image")
        t0 = time.monotonic()
        progress(name, "write", 0, total)
        result.written_bytes = write_ranges(image, dev, lambda n: progress(name, "write", n, total))
        dev.flush()
        result.write_s = time.monotonic() - t0
        t1 = time.monotonic()
        progress(name, "verify", 0, total)
        verify_ranges(image, dev, lambda n: progress(name, "verify", n, total))
        progress(name, "identity", 0, 1)
        write_identity(image, dev, identity)
        result.verify_s = time.monotonic() - t1
        result.ok = True
        progress(name, "done", total, total)
    except FlashRefused as exc:
        result.refused = True
        result.error = str(exc)
    except (MeshcloudError, OSError) as exc:
        result.error = str(exc) if isinstance(exc, MeshcloudError) else f"{name}: {exc}"
        progress(name, "failed", 0, total)
    finally:
        if dev is not None:
            dev.close()
    return result


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def log_entry(result: DeviceResult, image: ImageInfo, kit: Kit) -> dict[str, Any]:
    return {
        "time": result.started or _now(),
        "finished": _now(),
        "result": result.result,
        "rack": result.rack,
        "cluster": kit.cluster,
        "cluster_id": kit.cluster_id,
        "device": result.device,
        "device_info": result.details,
        "image": str(image.path),
        "image_sha256": image.sha256,
        "mapped_bytes": image.bmap.mapped_bytes,
        "written_bytes": result.written_bytes,
        "write_s": round(result.write_s, 3),
        "verify_s": round(result.verify_s, 3),
        "error": result.error,
        "host": socket.gethostname(),
        "meshcloud_version": __version__,
    }


def append_log(path: Path, entry: dict[str, Any]) -> None:
    """Append one JSON line (O_APPEND: earlier lines are never rewritten)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, (json.dumps(entry, sort_keys=True) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def flash_devices(
    plan: FlashPlan,
    kit: Kit,
    progress: ProgressFn = lambda *_: None,
    view: SystemView | None = None,
) -> list[DeviceResult]:
    """Flash every accepted device in parallel; log every device's outcome in the kit."""
    view = view or SystemView()
    identities = {d.rack: rack_identity(kit, d.rack) for d in plan.devices}
    results: dict[int, DeviceResult] = {}
    threads = []
    for index, device in enumerate(plan.devices):
        if not device.accepted:
            results[index] = DeviceResult(
                str(device.path), device.rack, ok=False, refused=True, started=_now(),
                error=f"refused {device.path}: " + "; ".join(device.reasons),
            )  # fmt: skip
            continue

        def work(i: int = index, d: PlannedDevice = device) -> None:
            try:
                results[i] = flash_one(plan.image, d, identities[d.rack], progress, view)
            except Exception as exc:  # a bug must still give this device a FAIL line
                results[i] = DeviceResult(str(d.path), d.rack, ok=False, error=f"{d.path}: {exc!r}")

        thread = threading.Thread(target=work, name=f"flash-{device.path.name}")
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    ordered = [results[i] for i in range(len(plan.devices))]
    for result in ordered:
        append_log(kit.flash_log, log_entry(result, plan.image, kit))
    return ordered
