"""Device resolution and refusals against a described machine (a fake /proc and /sys)."""

from __future__ import annotations

import os
from pathlib import Path

from meshcloud.images.blockdev import SystemView, Target, parse_mountinfo, parse_swaps, refusals

MOUNTINFO = """\
22 1 253:0 / / rw,relatime shared:1 - ext4 /dev/mapper/vg-root rw
23 22 8:1 / /boot rw,relatime shared:2 - ext4 /dev/sda1 rw
24 22 8:33 / /mnt/usb\\040stick rw,relatime shared:3 - vfat /dev/sdc1 rw
25 22 0:5 / /dev rw - devtmpfs udev rw
"""


def add_dev(sys_root: Path, name: str, devnum: str, parent: str | None = None) -> Path:
    """A block device directory in a fake sysfs, linked from /sys/dev/block/M:m."""
    base = sys_root / "devices" / "virtual" / "block"
    node = (base / parent / name) if parent else (base / name)
    node.mkdir(parents=True)
    (node / "dev").write_text(devnum + "\n")
    (node / "ro").write_text("0\n")
    (node / "size").write_text(str(1 << 21) + "\n")
    (node / "holders").mkdir()
    if parent:
        (node / "partition").write_text(name[-1] + "\n")
    else:
        (node / "slaves").mkdir()
        (sys_root / "block").mkdir(parents=True, exist_ok=True)
        (sys_root / "block" / name).symlink_to(node)
    (sys_root / "dev" / "block").mkdir(parents=True, exist_ok=True)
    (sys_root / "dev" / "block" / devnum).symlink_to(node)
    (sys_root / "class" / "block").mkdir(parents=True, exist_ok=True)
    (sys_root / "class" / "block" / name).symlink_to(node)
    return node


def machine(tmp_path: Path) -> SystemView:
    """sda (sda1 /boot, sda2 LVM PV under dm-0 = /), sdb blank, sdc (sdc1 mounted), sdd held."""
    sys_root, proc = tmp_path / "sys", tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "mountinfo").write_text(MOUNTINFO)
    (proc / "swaps").write_text("Filename Type Size Used Priority\n")
    add_dev(sys_root, "sda", "8:0")
    add_dev(sys_root, "sda1", "8:1", parent="sda")
    sda2 = add_dev(sys_root, "sda2", "8:2", parent="sda")
    dm0 = add_dev(sys_root, "dm-0", "253:0")
    (dm0 / "slaves" / "sda2").symlink_to(sda2)
    (sda2 / "holders" / "dm-0").symlink_to(dm0)
    add_dev(sys_root, "sdb", "8:16")
    add_dev(sys_root, "sdc", "8:32")
    add_dev(sys_root, "sdc1", "8:33", parent="sdc")
    sdd = add_dev(sys_root, "sdd", "8:48")
    (sdd / "holders" / "md0").mkdir()
    (sys_root / "block" / "sdb" / "ro").write_text("0\n")
    return SystemView(proc=proc, sys=sys_root)


def test_parse_mountinfo_decodes_escapes() -> None:
    mounts = parse_mountinfo(MOUNTINFO)
    assert mounts[2].mount_point == "/mnt/usb stick"
    assert mounts[0].devnum == (253, 0) and mounts[0].source == "/dev/mapper/vg-root"


def test_parse_swaps() -> None:
    text = "Filename\tType\tSize\tUsed\tPriority\n/dev/sdb2 partition 1 0 -2\n"
    assert parse_swaps(text) == ["/dev/sdb2"]


def test_system_disk_is_found_through_device_mapper_and_partitions(tmp_path: Path) -> None:
    view = machine(tmp_path)
    assert view.system_disks() == {"dm-0": "/", "sda": "/"}
    assert view.underlying_disks((8, 1)) == {"sda"}


def reasons_for(view: SystemView, name: str, image: Path, image_bytes: int = 1 << 20) -> list[str]:
    devnum = view.devnum_of_name(name)
    assert devnum is not None
    return refusals(Target(Path("/dev") / name, name, devnum), image, image_bytes, view)


def test_refusals(tmp_path: Path) -> None:
    view = machine(tmp_path)
    image = tmp_path / "img"
    image.write_bytes(b"x")
    sda = reasons_for(view, "sda", image)
    assert any("running system (/ is on it)" in r for r in sda)
    assert any("mounted" in r and "/dev/sda1 at /boot" in r for r in sda)
    assert reasons_for(view, "sdb", image) == []
    sdc = reasons_for(view, "sdc", image)
    assert sdc == ["it is mounted (/dev/sdc1 at /mnt/usb stick): unmount it first"]
    assert any("in use by md0" in r for r in reasons_for(view, "sdd", image))
    (view.sys / "block" / "sdb" / "ro").write_text("1\n")
    assert reasons_for(view, "sdb", image) == [
        "it is read-only (write-protected medium or `losetup -r`)"
    ]
    assert "too small" in reasons_for(view, "sdd", image, image_bytes=1 << 40)[-1]


def test_image_on_the_target_disk_is_refused(tmp_path: Path) -> None:
    view = machine(tmp_path)
    image = tmp_path / "img"
    image.write_bytes(b"x")
    st = os.stat(image)
    real = (os.major(st.st_dev), os.minor(st.st_dev))
    # Describe the test's own file system as sdb in the fake machine.
    (view.sys / "dev" / "block" / f"{real[0]}:{real[1]}").symlink_to(
        (view.sys / "block" / "sdb").resolve()
    )
    assert any("holds the image file" in r for r in reasons_for(view, "sdb", image))


def test_flash_checks_again_before_opening(tmp_path: Path) -> None:
    """Even a device the plan accepted is refused if it became unsafe (never opened)."""
    from meshcloud.images.bmap import Bmap
    from meshcloud.images.disklayout import Partition
    from meshcloud.images.flash import ImageInfo, PlannedDevice, flash_one
    from meshcloud.images.identity import Identity

    view = machine(tmp_path)
    image = tmp_path / "img"
    image.write_bytes(b"x")
    info = ImageInfo(image, tmp_path / "img.bmap", Bmap(4096, 4096, ()),
                     Partition(1, 0xDA, 0, 4096, False), "0" * 64)  # fmt: skip
    missing = tmp_path / "not-a-device"  # if the check failed, opening would fail too
    stale = PlannedDevice(missing, "rack-1", Target(missing, "sda", (8, 0)), ())
    ident = Identity("rack-1", "north", "relief", "id", "10.0.0.1", 24, 8440)
    result = flash_one(info, stale, ident, lambda *_: None, view)
    assert result.refused and "running system" in result.error
    assert not missing.exists()
