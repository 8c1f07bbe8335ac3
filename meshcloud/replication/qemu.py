"""qemu-img command lines replication needs beyond meshcloud.hypervisor.qemu_img (pure).

Plus a pure reader of the qcow2 header (virtual size, cluster size, backing
name), so the receiver can check a delta without starting a process.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from meshcloud.core.errors import InvalidInput
from meshcloud.hypervisor.qemu_img import QEMU_IMG, _check_path

QCOW2_MAGIC = b"QFI\xfb"
QCOW2_HEADER_BYTES = 104


def commit_argv(overlay: Path) -> list[str]:
    """argv merging ``overlay`` into its backing file, leaving the overlay as it was (``-d``).

    Killed half-way, the backing file holds part of the overlay's data and
    the overlay still covers all of it: the chain reads the same.
    """
    return [QEMU_IMG, "commit", "-q", "-d", "-f", "qcow2", "-t", "writeback",
            _check_path("overlay", overlay)]  # fmt: skip


def rebase_unsafe_argv(image: Path, backing_name: str) -> list[str]:
    """argv rewriting only the backing name stored in ``image`` (no data is read or written)."""
    if "/" in backing_name:
        raise InvalidInput(f"backing name {backing_name!r} must be a file in the same directory")
    return [QEMU_IMG, "rebase", "-q", "-u", "-f", "qcow2",
            "-b", _check_path("backing", backing_name), "-F", "qcow2",
            _check_path("image", image)]  # fmt: skip


def resize_argv(image: Path, size_bytes: int) -> list[str]:
    """argv growing a qcow2 image to ``size_bytes``."""
    if size_bytes <= 0 or size_bytes % 512:
        raise InvalidInput(f"disk size {size_bytes} must be a positive multiple of 512")
    return [QEMU_IMG, "resize", "-q", "-f", "qcow2", _check_path("image", image), str(size_bytes)]


def repair_leaks_argv(image: Path) -> list[str]:
    """argv reclaiming leaked clusters (what a killed ``qemu-img commit`` can leave)."""
    return [QEMU_IMG, "check", "-q", "-r", "leaks", "-f", "qcow2",
            _check_path("image", image)]  # fmt: skip


def compare_argv(
    image_a: Path, image_b: Path, *, fmt_a: str = "qcow2", fmt_b: str = "qcow2"
) -> list[str]:
    """argv comparing the guest-visible contents of two images (exit 0 = identical)."""
    return [QEMU_IMG, "compare", "-q", "-U", "-f", fmt_a, "-F", fmt_b,
            _check_path("image", image_a), _check_path("image", image_b)]  # fmt: skip


def check_argv(image: Path) -> list[str]:
    """argv printing qemu-img check's JSON (allocated clusters of this file only)."""
    return [QEMU_IMG, "check", "-U", "--output=json", "-f", "qcow2",
            _check_path("image", image)]  # fmt: skip


def flatten_argv(
    top: Path, target: Path, *, cluster_bytes: int = 4096, source_format: str = "qcow2"
) -> list[str]:
    """argv writing the whole chain under ``top`` into a standalone, sparse qcow2 ``target``.

    ``-U`` reads a chain a running QEMU holds open; only allocated data is
    written, so a mostly empty disk makes a small file (the seed).
    """
    if source_format not in ("qcow2", "raw"):
        raise InvalidInput(f"source format {source_format!r} must be qcow2 or raw")
    return [QEMU_IMG, "convert", "-q", "-U", "-f", source_format, "-O", "qcow2",
            "-o", f"cluster_size={cluster_bytes}",
            _check_path("top", top), _check_path("target", target)]  # fmt: skip


def create_overlay_named_argv(
    overlay: Path, backing_name: str, *, cluster_bytes: int = 4096
) -> list[str]:
    """argv creating an empty qcow2 overlay whose backing is ``backing_name`` in the same directory."""
    if "/" in backing_name:
        raise InvalidInput(f"backing name {backing_name!r} must be a file in the same directory")
    return [QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_bytes}",
            "-b", _check_path("backing", backing_name), "-F", "qcow2",
            _check_path("overlay", overlay)]  # fmt: skip


def create_blank_argv(image: Path, size_bytes: int, *, cluster_bytes: int = 4096) -> list[str]:
    """argv creating a blank standalone qcow2 of ``size_bytes``."""
    if size_bytes <= 0 or size_bytes % 512:
        raise InvalidInput(f"disk size {size_bytes} must be a positive multiple of 512")
    return [QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_bytes}",
            _check_path("image", image), str(size_bytes)]  # fmt: skip


@dataclass(frozen=True)
class Qcow2Header:
    """The fields of a qcow2 header replication checks."""

    version: int
    virtual_size: int
    cluster_bytes: int
    backing_name: str
    backing_offset: int = 0


def parse_qcow2_header(head: bytes) -> Qcow2Header:
    """Parse the first bytes (at least 104, plus the backing name) of a qcow2 file."""
    if len(head) < QCOW2_HEADER_BYTES or head[:4] != QCOW2_MAGIC:
        raise InvalidInput("not a qcow2 image (bad magic or short header)")
    version, backing_offset, backing_size, cluster_bits, size = struct.unpack_from(
        ">IQIIQ", head, 4
    )
    if version not in (2, 3) or not 9 <= cluster_bits <= 21:
        raise InvalidInput(
            f"unsupported qcow2 header (version {version}, cluster_bits {cluster_bits})"
        )
    backing = ""
    if backing_offset:
        if backing_size > 1023 or backing_offset + backing_size > len(head):
            raise InvalidInput("qcow2 backing file name is out of range")
        backing = head[backing_offset : backing_offset + backing_size].decode("utf-8", "replace")
    return Qcow2Header(version, size, 1 << cluster_bits, backing, backing_offset)
