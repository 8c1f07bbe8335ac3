"""The rack image's partition layout and the MBR parser."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from meshcloud.core.errors import InvalidInput
from meshcloud.images.disklayout import (
    IDENTITY_TYPE,
    MIB,
    ROOT_PARTUUID,
    find_identity_partition,
    layout_for_root,
    parse_mbr,
    sfdisk_script,
)


def test_layout_puts_identity_first_and_root_last() -> None:
    layout = layout_for_root(100 * MIB)
    assert layout.identity.start_bytes == 1 * MIB and layout.identity.size_bytes == 4 * MIB
    assert layout.root.start_bytes == 8 * MIB and layout.root.bootable
    assert layout.total_bytes == 108 * MIB
    assert ROOT_PARTUUID.endswith("-02")
    with pytest.raises(InvalidInput):
        layout_for_root(MIB + 1)


def test_sfdisk_writes_what_parse_mbr_reads(tmp_path: Path) -> None:
    if shutil.which("sfdisk") is None:
        pytest.skip("sfdisk (fdisk) not installed")
    layout = layout_for_root(16 * MIB)
    img = tmp_path / "d.img"
    img.write_bytes(b"")
    with open(img, "r+b") as f:
        f.truncate(layout.total_bytes)
    subprocess.run(["sfdisk", "-q", str(img)], input=sfdisk_script(layout), text=True, check=True)
    sector0 = img.read_bytes()[:512]
    assert parse_mbr(sector0) == [layout.identity, layout.root]
    assert find_identity_partition(sector0) == layout.identity
    assert layout.identity.type_id == IDENTITY_TYPE


def test_not_an_mbr_is_refused() -> None:
    with pytest.raises(InvalidInput, match="55 aa"):
        parse_mbr(b"\0" * 512)
    empty = bytearray(512)
    empty[510:512] = b"\x55\xaa"
    with pytest.raises(InvalidInput, match="identity partition"):
        find_identity_partition(bytes(empty))
