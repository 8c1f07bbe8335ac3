"""Block maps: generation from holes, the bmaptool 2.0 format, damage detection."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

from meshcloud.core.errors import InvalidInput
from meshcloud.images.bmap import (
    BLOCK_BYTES,
    generate_bmap,
    parse_bmap,
    read_bmap,
    render_bmap,
    sparse_copy,
)


def sparse_file(path: Path, size: int, chunks: list[tuple[int, bytes]]) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in chunks:
            f.seek(offset)
            f.write(data)
    return path


def test_generate_maps_only_written_blocks_with_range_hashes(tmp_path: Path) -> None:
    data_a, data_b = b"a" * 5000, b"b" * 100
    img = sparse_file(tmp_path / "x.img", 1 << 20, [(0, data_a), (600_000, data_b)])
    bmap = generate_bmap(img)
    assert bmap.image_bytes == 1 << 20
    assert [(r.first, r.last) for r in bmap.ranges] == [(0, 1), (146, 146)]
    first = bmap.ranges[0]
    expected = hashlib.sha256(data_a + b"\0" * (2 * BLOCK_BYTES - len(data_a))).hexdigest()
    assert first.sha256 == expected
    assert bmap.mapped_blocks == 3


def test_last_block_may_be_short(tmp_path: Path) -> None:
    img = sparse_file(tmp_path / "x.img", 10_000, [(9_000, b"z" * 1000)])
    bmap = generate_bmap(img)
    [(r, start, length)] = list(bmap.spans())
    assert (r.first, r.last, start, length) == (2, 2, 8192, 10_000 - 8192)


def test_render_and_parse_round_trip(tmp_path: Path) -> None:
    img = sparse_file(tmp_path / "x.img", 1 << 20, [(0, b"x" * 10), (1 << 19, b"y")])
    bmap = generate_bmap(img)
    assert parse_bmap(render_bmap(bmap)) == bmap


def test_a_damaged_bmap_is_refused(tmp_path: Path) -> None:
    img = sparse_file(tmp_path / "x.img", 1 << 20, [(0, b"x" * 10)])
    text = render_bmap(generate_bmap(img))
    tampered = text.replace(
        "<MappedBlocksCount> 1 </MappedBlocksCount>", "<MappedBlocksCount> 2 </MappedBlocksCount>"
    )
    with pytest.raises(InvalidInput, match="own checksum"):
        parse_bmap(tampered)
    with pytest.raises(InvalidInput, match="not valid XML"):
        parse_bmap("<bmap")
    with pytest.raises(InvalidInput, match="version"):
        parse_bmap('<bmap version="1.4"></bmap>')


def test_ranges_out_of_the_image_are_refused(tmp_path: Path) -> None:
    img = sparse_file(tmp_path / "x.img", 8192, [(0, b"x")])
    text = render_bmap(generate_bmap(img)).replace("> 0 </Range>", "> 5 </Range>")
    # recompute the file checksum so that only the range is wrong
    import re

    old = re.search(r"<BmapFileChecksum> (\w+) </BmapFileChecksum>", text).group(1)  # type: ignore[union-attr]
    zeroed = text.replace(old, "0" * 64)
    fixed = zeroed.replace("0" * 64, hashlib.sha256(zeroed.encode()).hexdigest(), 1)
    with pytest.raises(InvalidInput, match="outside the image"):
        parse_bmap(fixed)


def test_sparse_copy_keeps_holes(tmp_path: Path) -> None:
    img = sparse_file(tmp_path / "x.img", 8 << 20, [(0, b"x" * 4096), (4 << 20, b"y" * 4096)])
    bmap = generate_bmap(img)
    sparse_copy(img, tmp_path / "copy.img", bmap)
    copy = tmp_path / "copy.img"
    assert copy.read_bytes() == img.read_bytes()
    assert copy.stat().st_blocks * 512 < 1 << 20


def test_we_read_bmaptools_own_files(tmp_path: Path) -> None:
    if shutil.which("bmaptool") is None:
        pytest.skip("bmaptool (bmap-tools) not installed")
    img = sparse_file(tmp_path / "x.img", 4 << 20, [(8192, b"q" * 9000), (3 << 20, b"r")])
    out = tmp_path / "x.bmap"
    subprocess.run(
        ["bmaptool", "create", "-o", str(out), str(img)], check=True, capture_output=True
    )
    theirs = read_bmap(out)
    assert [(r.first, r.last, r.sha256) for r in theirs.ranges] == [
        (r.first, r.last, r.sha256) for r in generate_bmap(img).ranges
    ]
