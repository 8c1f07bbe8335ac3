"""Block maps: which blocks of a sparse image hold data, with a SHA-256 per range.

The file format is bmaptool's version 2.0 XML (``bmaptool copy`` accepts the
files written here, and :func:`parse_bmap` reads bmaptool's), so a rack
image can also be flashed with stock tools. Generating a map reads the
image's holes with ``SEEK_DATA``/``SEEK_HOLE``: blocks that were never
written are not in the map and are not written when flashing.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from meshcloud.core.errors import InvalidInput

BLOCK_BYTES = 4096
CHUNK_BYTES = 4 * 1024 * 1024
_ZERO_SUM = "0" * 64


@dataclass(frozen=True)
class BmapRange:
    """Blocks ``first``..``last`` (inclusive) hold data whose SHA-256 is ``sha256``."""

    first: int
    last: int
    sha256: str

    def byte_span(self, block_bytes: int, image_bytes: int) -> tuple[int, int]:
        """(offset, length) in bytes; the last block of the image may be short."""
        start = self.first * block_bytes
        end = min((self.last + 1) * block_bytes, image_bytes)
        return start, end - start


@dataclass(frozen=True)
class Bmap:
    """A parsed block map."""

    image_bytes: int
    block_bytes: int
    ranges: tuple[BmapRange, ...]

    @property
    def blocks_count(self) -> int:
        return -(-self.image_bytes // self.block_bytes)

    @property
    def mapped_blocks(self) -> int:
        return sum(r.last - r.first + 1 for r in self.ranges)

    @property
    def mapped_bytes(self) -> int:
        return sum(r.byte_span(self.block_bytes, self.image_bytes)[1] for r in self.ranges)

    def spans(self) -> Iterator[tuple[BmapRange, int, int]]:
        """Each range with its byte offset and length."""
        for r in self.ranges:
            start, length = r.byte_span(self.block_bytes, self.image_bytes)
            yield r, start, length


def data_extents(fd: int, size: int, block_bytes: int = BLOCK_BYTES) -> list[tuple[int, int]]:
    """Block ranges [(first, last)] of a file that hold data (per SEEK_DATA/SEEK_HOLE)."""
    extents: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break
            raise
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        first, last = data // block_bytes, (min(hole, size) - 1) // block_bytes
        if extents and extents[-1][1] >= first - 1:
            extents[-1] = (extents[-1][0], max(last, extents[-1][1]))
        else:
            extents.append((first, last))
        pos = hole
    return extents


def hash_span(fd: int, offset: int, length: int) -> str:
    """SHA-256 of ``length`` bytes of ``fd`` from ``offset``."""
    digest = hashlib.sha256()
    end = offset + length
    while offset < end:
        chunk = os.pread(fd, min(CHUNK_BYTES, end - offset), offset)
        if not chunk:
            raise InvalidInput(f"unexpected end of file at byte {offset}")
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()


def generate_bmap(image: Path, block_bytes: int = BLOCK_BYTES) -> Bmap:
    """The block map of a (sparse) image file, hashing every mapped range."""
    with open(image, "rb", buffering=0) as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        ranges = []
        for first, last in data_extents(fd, size, block_bytes):
            start = first * block_bytes
            length = min((last + 1) * block_bytes, size) - start
            ranges.append(BmapRange(first, last, hash_span(fd, start, length)))
    return Bmap(size, block_bytes, tuple(ranges))


def render_bmap(bmap: Bmap) -> str:
    """The bmap XML (bmaptool format 2.0), with its own checksum filled in."""

    def text(file_sum: str) -> str:
        lines = [
            '<?xml version="1.0" ?>',
            "<!-- Block map of a meshcloud rack image: only these blocks hold data. -->",
            '<bmap version="2.0">',
            f"    <ImageSize> {bmap.image_bytes} </ImageSize>",
            f"    <BlockSize> {bmap.block_bytes} </BlockSize>",
            f"    <BlocksCount> {bmap.blocks_count} </BlocksCount>",
            f"    <MappedBlocksCount> {bmap.mapped_blocks} </MappedBlocksCount>",
            "    <ChecksumType> sha256 </ChecksumType>",
            f"    <BmapFileChecksum> {file_sum} </BmapFileChecksum>",
            "    <BlockMap>",
        ]
        for r in bmap.ranges:
            span = f"{r.first}" if r.first == r.last else f"{r.first}-{r.last}"
            lines.append(f'        <Range chksum="{r.sha256}"> {span} </Range>')
        lines += ["    </BlockMap>", "</bmap>", ""]
        return "\n".join(lines)

    return text(hashlib.sha256(text(_ZERO_SUM).encode()).hexdigest())


def _int(root: ET.Element, tag: str) -> int:
    node = root.find(tag)
    if node is None or node.text is None or not node.text.strip().isdigit():
        raise InvalidInput(f"bmap: <{tag}> is missing or not a number")
    return int(node.text.strip())


def parse_bmap(text: str) -> Bmap:
    """Parse bmap XML (format 2.x, SHA-256); checks the file's own checksum."""
    try:
        root = ET.fromstring(text)  # noqa: S314 (a local file we or bmaptool wrote; no entities)
    except ET.ParseError as exc:
        raise InvalidInput(f"bmap: not valid XML: {exc}") from None
    version = root.get("version", "")
    if root.tag != "bmap" or not version.startswith("2."):
        raise InvalidInput(f"bmap: unsupported format version {version!r} (need 2.x)")
    ctype = (root.findtext("ChecksumType") or "").strip()
    if ctype != "sha256":
        raise InvalidInput(f"bmap: checksum type {ctype!r} is not supported (need sha256)")
    file_sum = (root.findtext("BmapFileChecksum") or "").strip()
    if not re.fullmatch(r"[0-9a-f]{64}", file_sum):
        raise InvalidInput("bmap: <BmapFileChecksum> is missing or malformed")
    zeroed = text.replace(file_sum, _ZERO_SUM, 1)
    if hashlib.sha256(zeroed.encode()).hexdigest() != file_sum:
        raise InvalidInput("bmap: the file's own checksum does not match: it is damaged")
    image_bytes, block_bytes = _int(root, "ImageSize"), _int(root, "BlockSize")
    if block_bytes <= 0 or block_bytes % 512:
        raise InvalidInput(f"bmap: block size {block_bytes} must be a multiple of 512")
    ranges = []
    blocks = -(-image_bytes // block_bytes)
    previous_last = -1
    for node in root.iter("Range"):
        span = (node.text or "").strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", span)
        chksum = node.get("chksum", "")
        if not m or not re.fullmatch(r"[0-9a-f]{64}", chksum):
            raise InvalidInput(f"bmap: malformed range {span!r}")
        first = int(m.group(1))
        last = int(m.group(2) or first)
        if not previous_last < first <= last < blocks:
            raise InvalidInput(f"bmap: range {span} is out of order or outside the image")
        ranges.append(BmapRange(first, last, chksum))
        previous_last = last
    bmap = Bmap(image_bytes, block_bytes, tuple(ranges))
    mapped = _int(root, "MappedBlocksCount")
    if mapped != bmap.mapped_blocks:
        raise InvalidInput(f"bmap: MappedBlocksCount {mapped} != {bmap.mapped_blocks} in ranges")
    return bmap


def read_bmap(path: Path) -> Bmap:
    """Read and parse a bmap file."""
    try:
        return parse_bmap(path.read_text())
    except OSError as exc:
        raise InvalidInput(f"cannot read bmap {path}: {exc}") from exc


def sparse_copy(src: Path, dst: Path, bmap: Bmap) -> None:
    """Copy an image to a new file, writing only the mapped ranges (holes stay holes)."""
    with open(src, "rb", buffering=0) as fin, open(dst, "xb", buffering=0) as fout:
        os.ftruncate(fout.fileno(), bmap.image_bytes)
        for _r, start, length in bmap.spans():
            pos = start
            while pos < start + length:
                chunk = os.pread(fin.fileno(), min(CHUNK_BYTES, start + length - pos), pos)
                if not chunk:
                    raise InvalidInput(f"{src}: shorter than its bmap says")
                os.pwrite(fout.fileno(), chunk, pos)
                pos += len(chunk)
