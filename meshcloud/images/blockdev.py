"""What the running system uses its block devices for (read-only, no side effects).

Reads ``/proc/self/mountinfo``, ``/proc/swaps`` and sysfs, and resolves
every device down to the whole disks beneath it: a partition to its disk,
a device-mapper or md device to its members (``slaves/``), a loop device
to the disk holding its backing file. :func:`refusals` uses this to say
why a device must not be flashed. The roots of /proc and /sys are
parameters so that tests can describe a machine with plain files.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

BLKROGET = 0x125E
BLKGETSIZE64 = 0x80081272
BLKFLSBUF = 0x1261
SYSTEM_MOUNTS = ("/", "/boot", "/boot/efi", "/usr")
_OCTAL = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class Mount:
    devnum: tuple[int, int]
    mount_point: str
    source: str


def parse_mountinfo(text: str) -> list[Mount]:
    """Mounts from /proc/self/mountinfo (octal escapes in paths decoded)."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 10 or "-" not in fields[6:]:
            continue
        major, _, minor = fields[2].partition(":")
        sep = fields.index("-", 6)
        source = fields[sep + 2] if len(fields) > sep + 2 else ""
        point = _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), fields[4])
        mounts.append(Mount((int(major), int(minor)), point, source))
    return mounts


def parse_swaps(text: str) -> list[str]:
    """Swap device or file paths from /proc/swaps."""
    return [line.split()[0] for line in text.splitlines()[1:] if line.strip()]


@dataclass
class SystemView:
    """The machine's block devices as seen through /proc and /sys."""

    proc: Path = Path("/proc")
    sys: Path = Path("/sys")
    dev: Path = Path("/dev")
    _mounts: list[Mount] | None = field(default=None, repr=False)

    def mounts(self) -> list[Mount]:
        if self._mounts is None:
            self._mounts = parse_mountinfo((self.proc / "self" / "mountinfo").read_text())
        return self._mounts

    def swaps(self) -> list[str]:
        try:
            return parse_swaps((self.proc / "swaps").read_text())
        except OSError:
            return []

    def node(self, devnum: tuple[int, int]) -> Path | None:
        """The sysfs directory of a block device number, or None (e.g. tmpfs, overlay)."""
        link = self.sys / "dev" / "block" / f"{devnum[0]}:{devnum[1]}"
        return link.resolve() if link.exists() else None

    def devnum_of_name(self, name: str) -> tuple[int, int] | None:
        for base in (self.sys / "class" / "block" / name, self.sys / "block" / name):
            try:
                major, minor = (base / "dev").read_text().strip().split(":")
                return int(major), int(minor)
            except (OSError, ValueError):
                continue
        return None

    @staticmethod
    def is_partition(node: Path) -> bool:
        return (node / "partition").exists()

    def whole_disk(self, node: Path) -> Path:
        return node.parent if self.is_partition(node) else node

    def partitions(self, disk: str) -> list[str]:
        base = self.sys / "block" / disk
        try:
            return sorted(p.name for p in base.iterdir() if (p / "partition").exists())
        except OSError:
            return []

    def holders(self, name: str) -> list[str]:
        """Devices (dm, md) built on ``name`` or on one of its partitions."""
        found = []
        for part in [name, *self.partitions(name)]:
            base = self.sys / "block" / name
            hdir = (base / "holders") if part == name else (base / part / "holders")
            try:
                found += sorted(h.name for h in hdir.iterdir())
            except OSError:
                continue
        return found

    def loop_backing_file(self, disk: str) -> str | None:
        try:
            text = (self.sys / "block" / disk / "loop" / "backing_file").read_text().strip()
        except OSError:
            return None
        return text or None

    def underlying_disks(self, devnum: tuple[int, int], _depth: int = 0) -> set[str]:
        """Names of every whole disk a device rests on, itself included."""
        node = self.node(devnum)
        if node is None or _depth > 16:
            return set()
        disk = self.whole_disk(node)
        found = {disk.name}
        try:
            slaves = list((disk / "slaves").iterdir())
        except OSError:
            slaves = []
        for slave in slaves:
            num = self.devnum_of_name(slave.name)
            if num is not None:
                found |= self.underlying_disks(num, _depth + 1)
        backing = self.loop_backing_file(disk.name)
        if backing:
            try:
                st = os.stat(backing)
            except OSError:
                st = None
            if st is not None:
                found |= self.underlying_disks(
                    (os.major(st.st_dev), os.minor(st.st_dev)), _depth + 1
                )
        return found

    def disks_under_path(self, path: Path) -> set[str]:
        """Whole disks beneath the file system that holds ``path``."""
        st = os.stat(path)
        return self.underlying_disks((os.major(st.st_dev), os.minor(st.st_dev)))

    def system_disks(self) -> dict[str, str]:
        """{disk: mount point} for the disks under /, /boot, /boot/efi and /usr."""
        found: dict[str, str] = {}
        for mount in self.mounts():
            if mount.mount_point in SYSTEM_MOUNTS:
                for disk in self.underlying_disks(mount.devnum):
                    found.setdefault(disk, mount.mount_point)
        return found

    def mounted_on(self, disk: str) -> list[str]:
        """Mount points of file systems on ``disk``, its partitions, or devices built on it."""
        points = []
        for mount in self.mounts():
            if disk in self.underlying_disks(mount.devnum):
                points.append(f"{mount.source or '?'} at {mount.mount_point}")
        return points

    def swapping_on(self, disk: str) -> list[str]:
        found = []
        for path in self.swaps():
            try:
                st = os.stat(path)
            except OSError:
                continue
            num = st.st_rdev if stat.S_ISBLK(st.st_mode) else st.st_dev
            if disk in self.underlying_disks((os.major(num), os.minor(num))):
                found.append(path)
        return found

    def read_only(self, disk: str) -> bool:
        try:
            return (self.sys / "block" / disk / "ro").read_text().strip() == "1"
        except OSError:
            return False

    def size_bytes(self, disk: str) -> int:
        try:
            return int((self.sys / "block" / disk / "size").read_text()) * 512
        except (OSError, ValueError):
            return 0

    def describe(self, disk: str) -> dict[str, str]:
        """Model, serial and size of a disk, for the flash log."""
        info = {"size_bytes": str(self.size_bytes(disk))}
        base = self.sys / "block" / disk
        for key, rel in (("model", "device/model"), ("serial", "device/serial"),
                         ("wwid", "device/wwid"), ("backing_file", "loop/backing_file")):  # fmt: skip
            try:
                value = (base / rel).read_text().strip()
            except OSError:
                continue
            if value:
                info[key] = value
        return info


def ioctl_read_only(fd: int) -> bool:
    """BLKROGET: True if the kernel marks the open device read-only."""
    buf = fcntl.ioctl(fd, BLKROGET, struct.pack("i", 0))
    return bool(struct.unpack("i", buf)[0])


def ioctl_size_bytes(fd: int) -> int:
    buf = fcntl.ioctl(fd, BLKGETSIZE64, struct.pack("Q", 0))
    return int(struct.unpack("Q", buf)[0])


def flush_buffers(fd: int) -> None:
    """Drop the kernel's cached blocks of a device so that reads come from the medium."""
    os.fsync(fd)
    with contextlib.suppress(OSError):
        fcntl.ioctl(fd, BLKFLSBUF, 0)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


@dataclass(frozen=True)
class Target:
    """A device named on the command line, resolved."""

    path: Path
    name: str
    devnum: tuple[int, int]


def resolve_target(path: Path, view: SystemView) -> tuple[Target | None, list[str]]:
    """The whole-disk target for ``path``, or None and why it cannot be one."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return None, [f"cannot open it: {exc.strerror}"]
    if not stat.S_ISBLK(st.st_mode):
        return None, ["it is not a block device (name a disk such as /dev/sdb or /dev/loop3)"]
    devnum = (os.major(st.st_rdev), os.minor(st.st_rdev))
    node = view.node(devnum)
    if node is None:
        return None, ["the kernel does not list it in /sys/dev/block"]
    if view.is_partition(node):
        return None, [
            f"it is a partition of /dev/{node.parent.name}: name the whole disk"
            f" (/dev/{node.parent.name}), the image holds its own partition table"
        ]
    return Target(path, node.name, devnum), []


def refusals(target: Target, image: Path, image_bytes: int, view: SystemView) -> list[str]:
    """Every reason not to write ``image`` to ``target`` (empty list: safe to flash)."""
    reasons = []
    system = view.system_disks()
    if target.name in system:
        reasons.append(
            f"it holds the running system ({system[target.name]} is on it);"
            " meshcloud never writes to the disk it runs from"
        )
    image_disks = view.disks_under_path(image)
    backing = view.loop_backing_file(target.name)
    same_file = False
    if backing:
        try:
            same_file = os.path.samefile(backing, image)
        except OSError:
            same_file = False
    if same_file:
        reasons.append(f"it is a loop device backed by the image file {image} itself")
    elif target.name in image_disks:
        reasons.append(f"it holds the image file {image}; copy the image to another disk first")
    mounted = view.mounted_on(target.name)
    if mounted:
        reasons.append(f"it is mounted ({'; '.join(mounted)}): unmount it first")
    swaps = view.swapping_on(target.name)
    if swaps:
        reasons.append(f"it is used as swap ({', '.join(swaps)}): swapoff first")
    holders = view.holders(target.name)
    if holders and not mounted:
        reasons.append(
            f"it is in use by {', '.join(holders)} (LVM, RAID or dm-crypt): release it first"
        )
    if view.read_only(target.name):
        reasons.append("it is read-only (write-protected medium or `losetup -r`)")
    size = view.size_bytes(target.name)
    if 0 < size < image_bytes:
        reasons.append(f"it is too small ({size} bytes) for the image ({image_bytes} bytes)")
    return reasons
