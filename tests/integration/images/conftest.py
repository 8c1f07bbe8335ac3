"""Fixtures for flashing tests: a small sparse rack-style image, loop devices, a kit."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from meshcloud.images.bmap import generate_bmap, render_bmap
from meshcloud.images.disklayout import MIB, layout_for_root, sfdisk_script
from meshcloud.images.identity import encode_record
from meshcloud.images.kit import Kit, create_kit, load_kit, plan_kit

CHEAP_HASHER = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)


def needs_root() -> None:
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("needs root and losetup (loop devices)")


def make_test_image(path: Path, root_mib: int = 24) -> Path:
    """A sparse image with the rack layout: MBR, blank identity, data scattered in root."""
    layout = layout_for_root(root_mib * MIB)
    with open(path, "xb") as f:
        f.truncate(layout.total_bytes)
    subprocess.run(
        ["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(path)],
        input=sfdisk_script(layout),
        text=True,
        check=True,
    )
    rng = random.Random(1234)
    with open(path, "r+b") as f:
        f.seek(layout.identity.start_bytes)
        f.write(encode_record(None))
        # data at the start, in the middle and at the very end of root; holes between
        for offset_mib, length in ((0, 3 * MIB + 4096), (9, 512 * 1024), (root_mib - 1, MIB)):
            f.seek(layout.root.start_bytes + offset_mib * MIB)
            f.write(rng.randbytes(length))
    path.with_name(path.name + ".bmap").write_text(render_bmap(generate_bmap(path)))
    return path


@pytest.fixture(scope="session")
def small_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 32 MiB image with ~4.5 MiB of data (read-only: copy it before changing it)."""
    return make_test_image(tmp_path_factory.mktemp("image") / "rack-os.img")


@pytest.fixture
def kit(tmp_path: Path) -> Kit:
    plan = plan_kit(
        "relief", "rack-1,rack-2", sites="north,south", config_dir=str(tmp_path / "etc")
    )
    create_kit(plan, tmp_path / "kit", hasher=CHEAP_HASHER)
    return load_kit(tmp_path / "kit")


LoopFactory = Callable[..., Path]


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[LoopFactory]:
    """Attach loop devices to new backing files; every one is detached afterwards."""
    needs_root()
    attached: list[str] = []

    def attach(
        size_bytes: int = 40 * MIB,
        read_only: bool = False,
        backing: Path | None = None,
        partscan: bool = False,
    ) -> Path:
        if backing is None:
            backing = tmp_path / f"disk{len(attached)}.raw"
            with open(backing, "xb") as f:
                f.truncate(size_bytes)
        argv = ["losetup", "--find", "--show"]
        argv += ["--read-only"] if read_only else []
        argv += ["--partscan"] if partscan else []
        dev = subprocess.run(
            [*argv, str(backing)], capture_output=True, text=True, check=True
        ).stdout.strip()
        attached.append(dev)
        return Path(dev)

    yield attach
    for dev in reversed(attached):
        subprocess.run(["losetup", "--detach", dev], check=False)


@pytest.fixture
def mounted(tmp_path: Path, loop_device: LoopFactory) -> Iterator[Callable[[Path], Path]]:
    """Mount file systems for a test; every one is unmounted (before loops are detached)."""
    points: list[Path] = []

    def mount(device: Path) -> Path:
        point = tmp_path / f"mnt{len(points)}"
        point.mkdir()
        subprocess.run(["mount", str(device), str(point)], check=True)
        points.append(point)
        return point

    yield mount
    for point in reversed(points):
        subprocess.run(["umount", str(point)], check=False)
