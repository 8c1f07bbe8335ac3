"""Flashing real loop devices: writes, verification, identity, refusals, corruption."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from meshcloud.cli import main
from meshcloud.images.blockdev import SystemView
from meshcloud.images.bmap import read_bmap
from meshcloud.images.disklayout import IDENTITY_START_BYTES
from meshcloud.images.flash import flash_devices, load_image, plan_flash
from meshcloud.images.identity import read_identity_from_disk
from meshcloud.images.kit import Kit, rack_identity

from .conftest import LoopFactory, make_test_image

pytestmark = pytest.mark.root


def mapped_ranges_match(image: Path, device: Path) -> bool:
    """Every mapped range of the image, but the identity record, reads back from the device."""
    bmap = read_bmap(image.with_name(image.name + ".bmap"))
    with open(device, "rb") as dev:
        for r, start, length in bmap.spans():
            if start <= IDENTITY_START_BYTES < start + length:
                continue  # flash replaced the blank record with the rack's identity
            dev.seek(start)
            if hashlib.sha256(dev.read(length)).hexdigest() != r.sha256:
                return False
    return True


def partition_node(dev: Path, number: int) -> Path:
    """The /dev node of a loop device's partition; skips if this kernel makes none."""
    sys_part = Path("/sys/block") / dev.name / f"{dev.name}p{number}"
    deadline = time.monotonic() + 5
    while not sys_part.exists():
        if time.monotonic() > deadline:
            pytest.skip(
                "this kernel reads no partition tables (no CONFIG_MSDOS_PARTITION);"
                " tests/unit/images/test_blockdev.py covers partitions with a fake sysfs"
            )
        time.sleep(0.05)
    node = Path(f"{dev}p{number}")
    deadline = time.monotonic() + 5
    while not node.exists():  # devtmpfs creates it shortly after
        assert time.monotonic() < deadline, f"{node} did not appear"
        time.sleep(0.05)
    return node


def log_entries(kit: Kit) -> list[dict[str, object]]:
    return [json.loads(line) for line in kit.flash_log.read_text().splitlines()]


def test_flash_one_device_writes_verifies_and_reads_identity_back(
    small_image: Path, kit: Kit, loop_device: LoopFactory
) -> None:
    dev = loop_device()
    # Stale bytes on the disk where the image has holes must not matter, and stay.
    with open(dev, "r+b") as f:
        f.seek(20 * 1024 * 1024)
        f.write(b"stale" * 1000)
    result = CliRunner().invoke(
        main, ["flash", str(small_image), str(dev), "--rack", "rack-1", "--kit", str(kit.directory)]
    )
    assert result.exit_code == 0, result.output
    assert f"PASS    {dev}  rack rack-1" in result.output
    assert mapped_ranges_match(small_image, dev)
    identity = read_identity_from_disk(dev)
    assert identity == rack_identity(kit, "rack-1")
    assert identity is not None and identity.site == "north"
    assert "-----BEGIN PRIVATE KEY-----" in identity.files["tls/rack.key"]
    with open(dev, "rb") as f:
        f.seek(20 * 1024 * 1024)
        assert f.read(5) == b"stale"  # a hole in the map: not written
    [entry] = log_entries(kit)
    assert entry["result"] == "pass" and entry["rack"] == "rack-1"
    assert entry["device"] == str(dev)
    assert (
        entry["written_bytes"] == read_bmap(small_image.with_name("rack-os.img.bmap")).mapped_bytes
    )
    assert (kit.directory / "passports" / "rack-1.pdf").stat().st_size > 1000
    assert os.stat(kit.flash_log).st_mode & 0o077 == 0


def test_two_devices_in_one_run_each_get_their_rack(
    small_image: Path, kit: Kit, loop_device: LoopFactory
) -> None:
    dev1, dev2 = loop_device(), loop_device()
    args = ["flash", str(small_image), str(dev1), str(dev2), "--kit", str(kit.directory)]
    result = CliRunner().invoke(main, [*args, "--rack", "rack-1", "--rack", "rack-2"])
    assert result.exit_code == 0, result.output
    assert result.output.count("PASS") == 2
    for dev, rack in ((dev1, "rack-1"), (dev2, "rack-2")):
        assert mapped_ranges_match(small_image, dev)
        identity = read_identity_from_disk(dev)
        assert identity is not None and identity.rack == rack
    assert [e["rack"] for e in log_entries(kit)] == ["rack-1", "rack-2"]
    assert {p.name for p in (kit.directory / "passports").iterdir()} == {"rack-1.pdf", "rack-2.pdf"}


def test_corrupted_image_range_is_detected(
    small_image: Path, kit: Kit, loop_device: LoopFactory, tmp_path: Path
) -> None:
    bad = tmp_path / "bad" / "rack-os.img"
    bad.parent.mkdir()
    shutil.copyfile(small_image, bad)
    shutil.copyfile(small_image.with_name("rack-os.img.bmap"), bad.with_name("rack-os.img.bmap"))
    bmap = read_bmap(bad.with_name("rack-os.img.bmap"))
    _r, start, length = list(bmap.spans())[-1]
    with open(bad, "r+b") as f:  # flip one byte in the middle of the last mapped range
        f.seek(start + length // 2)
        byte = f.read(1)
        f.seek(start + length // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    dev = loop_device()
    result = CliRunner().invoke(
        main, ["flash", str(bad), str(dev), "--rack", "rack-1", "--kit", str(kit.directory)]
    )
    assert result.exit_code == 1
    assert "FAIL" in result.output and "does not match its checksum" in result.output
    assert f"blocks {_r.first}-{_r.last}" in result.output
    [entry] = log_entries(kit)
    assert entry["result"] == "fail"
    assert read_identity_from_disk_or_none(dev) is None  # identity is written only after success


def read_identity_from_disk_or_none(dev: Path) -> object:
    try:
        return read_identity_from_disk(dev)
    except Exception:
        return None


def assert_refused(kit: Kit, image: Path, dev: Path, reason: str, mounted: bool = False) -> None:
    """The CLI refuses the device with ``reason``, writes nothing and logs the refusal.

    (A mounted file system writes to its device by itself: no byte comparison then.)
    """
    before = "" if mounted else hashlib.sha256(Path(dev).read_bytes()).hexdigest()
    result = CliRunner().invoke(
        main, ["flash", str(image), str(dev), "--rack", "rack-1", "--kit", str(kit.directory)]
    )
    assert result.exit_code == 1, result.output
    assert "REFUSED" in result.output and reason in result.output, result.output
    if not mounted:
        assert hashlib.sha256(Path(dev).read_bytes()).hexdigest() == before
    assert log_entries(kit)[-1]["result"] == "refused"


def test_refuses_a_device_with_a_mounted_partition(
    small_image: Path, kit: Kit, loop_device: LoopFactory, mounted: object, tmp_path: Path
) -> None:
    backing = make_test_image(tmp_path / "other.img")  # a partitioned disk
    dev = loop_device(backing=backing, partscan=True)
    part = partition_node(dev, 2)
    subprocess.run(["mkfs.ext4", "-q", str(part)], check=True)
    mount = mounted  # type: ignore[assignment]
    point = mount(part)  # type: ignore[operator]
    assert_refused(kit, small_image, dev, f"it is mounted ({part} at {point})", mounted=True)


def test_refuses_a_mounted_whole_disk(
    small_image: Path, kit: Kit, loop_device: LoopFactory, mounted: object
) -> None:
    dev = loop_device()
    subprocess.run(["mkfs.ext4", "-q", str(dev)], check=True)
    mounted(dev)  # type: ignore[operator]
    assert_refused(kit, small_image, dev, "it is mounted", mounted=True)


def test_refuses_a_read_only_device(small_image: Path, kit: Kit, loop_device: LoopFactory) -> None:
    dev = loop_device(read_only=True)
    assert_refused(kit, small_image, dev, "it is read-only")


def test_refuses_the_loop_device_backed_by_the_image_itself(
    small_image: Path, kit: Kit, loop_device: LoopFactory, tmp_path: Path
) -> None:
    image = tmp_path / "copy" / "rack-os.img"
    image.parent.mkdir()
    shutil.copyfile(small_image, image)
    shutil.copyfile(small_image.with_name("rack-os.img.bmap"), image.with_name("rack-os.img.bmap"))
    dev = loop_device(backing=image)
    assert_refused(kit, image, dev, "backed by the image file")


def test_refuses_the_disk_that_holds_the_image(
    small_image: Path, kit: Kit, loop_device: LoopFactory, mounted: object
) -> None:
    dev = loop_device(size_bytes=64 * 1024 * 1024)
    subprocess.run(["mkfs.ext4", "-q", str(dev)], check=True)
    point = mounted(dev)  # type: ignore[operator]
    image = point / "rack-os.img"
    shutil.copyfile(small_image, image)
    shutil.copyfile(small_image.with_name("rack-os.img.bmap"), image.with_name("rack-os.img.bmap"))
    plan = plan_flash(load_image(image), [(dev, "rack-1")])
    [planned] = plan.devices
    assert any("holds the image file" in r for r in planned.reasons), planned.reasons
    assert_refused(kit, image, dev, "holds the image file", mounted=True)


def test_refuses_the_running_system_disk_without_writing(small_image: Path, kit: Kit) -> None:
    view = SystemView()
    system = view.system_disks()
    disks = [d for d in system if (view.sys / "block" / d / "device").exists()] or sorted(system)
    if not disks:
        pytest.skip("/ is not on a block device here")
    device = Path("/dev") / disks[0]
    plan = plan_flash(load_image(small_image), [(device, "rack-1")])
    [planned] = plan.devices
    assert not planned.accepted
    assert any("running system" in r for r in planned.reasons), planned.reasons
    # The command line only checks here (--check): even a bug must never reach a write.
    result = CliRunner().invoke(
        main,
        ["flash", str(small_image), str(device), "--rack", "rack-1", "--kit", str(kit.directory),
         "--check"],
    )  # fmt: skip
    assert (
        result.exit_code == 1 and "REFUSED" in result.output and "running system" in result.output
    )


def test_refuses_a_regular_file(small_image: Path, tmp_path: Path) -> None:
    other = make_test_image(tmp_path / "other.img")
    [planned] = plan_flash(load_image(small_image), [(other, "rack-1")]).devices
    assert "not a block device" in planned.reasons[0]


def test_refuses_a_partition(small_image: Path, loop_device: LoopFactory, tmp_path: Path) -> None:
    backing = make_test_image(tmp_path / "other.img")
    dev = loop_device(backing=backing, partscan=True)
    part = partition_node(dev, 2)
    [planned] = plan_flash(load_image(small_image), [(part, "rack-1")]).devices
    assert "is a partition" in planned.reasons[0]


def test_mixed_run_flashes_good_devices_and_reports_refused_ones(
    small_image: Path, kit: Kit, loop_device: LoopFactory
) -> None:
    good, read_only = loop_device(), loop_device(read_only=True)
    plan = plan_flash(load_image(small_image), [(good, "rack-1"), (read_only, "rack-2")])
    results = flash_devices(plan, kit)
    assert [r.result for r in results] == ["pass", "refused"]
    assert [e["result"] for e in log_entries(kit)] == ["pass", "refused"]


def test_bmaptool_accepts_our_bmap(small_image: Path, loop_device: LoopFactory) -> None:
    if shutil.which("bmaptool") is None:
        pytest.skip("bmaptool (bmap-tools) not installed")
    dev = loop_device()
    subprocess.run(
        ["bmaptool", "copy", "--bmap", f"{small_image}.bmap", str(small_image), str(dev)],
        check=True,
        capture_output=True,
    )
    assert mapped_ranges_match(small_image, dev)
