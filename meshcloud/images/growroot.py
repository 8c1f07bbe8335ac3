"""First boot on a rack: grow the root partition and file system into the whole disk.

The image's root partition is only as large as its contents plus some
headroom; the rack's boot disk is usually much larger. ``growpart`` (from
cloud-guest-utils) moves the end of the last partition, then ``resize2fs``
grows ext4 while mounted. meshcloud-growroot.service runs this once.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from meshcloud.images.identity import _mount_source_devnum


def root_partition(sys_root: Path = Path("/sys"), proc: Path = Path("/proc")) -> tuple[str, int]:
    """(disk name, partition number) of the partition mounted at /."""
    devnum = _mount_source_devnum((proc / "self" / "mountinfo").read_text(), "/")
    if devnum is None:
        raise RuntimeError("cannot find the device holding / in /proc/self/mountinfo")
    node = (sys_root / "dev" / "block" / f"{devnum[0]}:{devnum[1]}").resolve()
    number_file = node / "partition"
    if not number_file.exists():
        raise RuntimeError(f"/ is on {node.name}, which is not a partition: nothing to grow")
    return node.parent.name, int(number_file.read_text())


def growpart_argv(disk: str, number: int) -> list[str]:
    return ["growpart", f"/dev/{disk}", str(number)]


def resize2fs_argv(partition: str) -> list[str]:
    return ["resize2fs", f"/dev/{partition}"]


def main() -> int:
    disk, number = root_partition()
    grown = subprocess.run(growpart_argv(disk, number), capture_output=True, text=True)
    print(grown.stdout.strip() or grown.stderr.strip())
    if grown.returncode == 1 and "NOCHANGE" in grown.stdout:
        return 0  # the partition already fills the disk
    if grown.returncode != 0:
        return grown.returncode
    name = next(
        (
            p.name
            for p in Path(f"/sys/block/{disk}").iterdir()
            if (p / "partition").exists() and int((p / "partition").read_text()) == number
        ),
        f"{disk}{number}",
    )
    return subprocess.run(resize2fs_argv(name)).returncode


if __name__ == "__main__":
    sys.exit(main())
